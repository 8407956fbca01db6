"""Real node processes on loopback addresses: replication, signatures, 421,
kill -9 and anti-entropy, swarm splits, deregistration."""

import random
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from testnet.base import crypto
from testnet.controller import open_testnet
from testnet.base.swarm import swarm_for

pytestmark = pytest.mark.network


def now_ms() -> int:
    return int(time.time() * 1000)


def db_hashes(net, name: str) -> set[str]:
    path = Path(net.nodes[name].plan.db)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {h for (h,) in db.execute("SELECT hash FROM messages")}


async def swarms(net) -> dict[str, int]:
    body = await net.call("registry", "get_service_nodes", {})
    by_key = {rt.plan.ed25519_public: n for n, rt in net.nodes.items()}
    return {by_key[n["ed25519_public"]]: n["swarm_id"] for n in body["nodes"] if n["ed25519_public"] in by_key}


async def wait_until(predicate, timeout_s: float, what: str):
    with trio.move_on_after(timeout_s):
        while True:
            result = await predicate()
            if result is True:
                return
            await trio.sleep(0.2)
    raise AssertionError(f"{what} not true within {timeout_s} s: {result}")


async def store(net, node: str, session_id: str, data: bytes):
    resp = await net._pool.call(node, "store", {"pubkey": session_id, "namespace": 0, "data": data,
                                                "ttl": 3_600_000, "timestamp": now_ms()}, timeout=5)
    return resp


async def placement_ok(net, messages: dict[str, str]):
    """Every message on every live member of its account's swarm, and nowhere else."""
    sw = await swarms(net)
    ids = sorted(set(sw.values()))
    held = {n: db_hashes(net, n) for n in sw}
    problems = []
    for h, sid in messages.items():
        target = swarm_for(sid, ids)
        for n, s in sw.items():
            if (s == target) != (h in held[n]):
                problems.append((h[:8], n, "missing" if s == target else "stray"))
    return True if not problems else problems[:5]


async def test_replication_signatures_421_anti_entropy_split_and_deregistration(tmp_path):
    rng = random.Random(5)
    accounts = [crypto.Identity.from_seed(rng.randbytes(32)) for _ in range(12)]
    async with open_testnet(nodes=6, users=0, min_swarm=3, links="direct", seed=11, check=False,
                            run_dir=tmp_path / "run") as net:
        names = list(net.nodes)
        assert len(set((await swarms(net)).values())) == 1
        messages: dict[str, str] = {}

        # A store is committed everywhere in the swarm, with every member's outcome in the reply.
        for i, acct in enumerate(accounts):
            resp = await store(net, names[i % 6], acct.session_id, b"m%d" % i)
            assert resp.status == 200, resp.body
            assert len(resp.body["swarm"]) == 6
            assert all(v["status"] == 200 for v in resp.body["swarm"].values())
            messages[resp.body["hash"]] = acct.session_id
        for n in names:
            assert db_hashes(net, n) == set(messages)

        # Retrieve: a valid signature returns the message, a wrong one is 401.
        alice = accounts[0]
        ts = now_ms()
        args = {"pubkey": alice.session_id, "namespace": 0, "last_hash": "", "timestamp": ts,
                "pubkey_ed25519": alice.ed25519_public.hex(),
                "signature": crypto.sign_request(alice, crypto.retrieve_signature_message(0, ts))}
        got = (await net._pool.call(names[3], "retrieve", args, timeout=5)).body
        assert [m["data"] for m in got["messages"]] == [b"m0"]
        forged = dict(args, signature=crypto.sign_request(accounts[1], crypto.retrieve_signature_message(0, ts)))
        assert (await net._pool.call(names[3], "retrieve", forged, timeout=5)).status == 401

        # kill -9 a member; stores go on; after a restart it catches up by anti-entropy.
        victim = names[5]
        await net.node_kill(victim)
        later = {}
        for i, acct in enumerate(accounts[:6]):
            resp = await store(net, names[i % 5], acct.session_id, b"late%d" % i)
            assert resp.status == 200
            assert resp.body["swarm"][net.nodes[victim].plan.ed25519_public]["status"] != 200
            later[resp.body["hash"]] = acct.session_id
        messages.update(later)
        assert not set(later) & db_hashes(net, victim)
        await net.node_restart(victim)

        async def victim_caught_up():
            missing = set(messages) - db_hashes(net, victim)
            return True if not missing else f"{len(missing)} missing"
        await wait_until(victim_caught_up, 15, "restarted node holds every message")

        # Add nodes until the swarm splits: every message ends up on every member of its new swarm.
        for _ in range(4):
            await net.node_add()
        sw = await swarms(net)
        assert len(set(sw.values())) == 2
        await wait_until(lambda: placement_ok(net, messages), 20, "messages follow the split")

        # A store at a node outside the account's swarm: 421 with the right members.
        sw = await swarms(net)
        for sid in {*messages.values()}:
            target = swarm_for(sid, sorted(set(sw.values())))
            outsider = next(n for n, s in sw.items() if s != target)
            resp = await store(net, outsider, sid, b"wrong swarm")
            assert resp.status == 421
            members = {net.nodes[n].plan.ed25519_public for n, s in sw.items() if s == target}
            assert {m["ed25519_public"] for m in resp.body["nodes"]} == members
            break

        # Deregister a member: nothing is lost, placement converges again.
        leaving = next(iter(sw))
        await net.node_remove(leaving)
        await wait_until(lambda: placement_ok(net, messages), 20, "placement after deregistration")


async def test_big_messages_behind_a_paused_peer_stay_within_frames(tmp_path):
    # Found by review: with a peer paused, replication queued up to 500 messages into one
    # request; 20 kB messages made it 3 MB, over the 1 MiB frame limit, and the node crashed.
    owner = crypto.Identity.from_seed(b"\x05" * 32)
    async with open_testnet(nodes=5, users=0, min_swarm=5, links="direct", seed=3, check=False,
                            run_dir=tmp_path / "run") as net:
        await net.node_pause("n02")
        statuses = []

        async def one(i: int) -> None:
            resp = await store(net, "n01", owner.session_id, bytes([i]) * 20_000)
            statuses.append(resp.status)

        async with trio.open_nursery() as nursery:
            for i in range(150):
                nursery.start_soon(one, i)
                await trio.sleep(0.005)
        assert statuses == [200] * 150
        await net.node_resume("n02")
        stored = db_hashes(net, "n01")
        assert len(stored) == 150

        async def all_hold_them():
            missing = {n: len(stored - db_hashes(net, n)) for n in net.nodes}
            return True if not any(missing.values()) else missing
        await wait_until(all_hold_them, 20, "every member holds all 150 (anti-entropy after the pause)")

        # 3 MB of messages cannot come back in one reply: retrieve pages through them by last hash.
        got, last = [], ""
        for _ in range(20):
            ts = now_ms()
            body = (await net._pool.call("n03", "retrieve", {
                "pubkey": owner.session_id, "namespace": 0, "last_hash": last, "timestamp": ts,
                "pubkey_ed25519": owner.ed25519_public.hex(),
                "signature": crypto.sign_request(owner, crypto.retrieve_signature_message(0, ts))}, timeout=5)).body
            got += [m["hash"] for m in body["messages"]]
            last = got[-1]
            if not body["more"]:
                break
        assert len(got) == 150 and set(got) == stored
