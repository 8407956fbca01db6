"""A bad disk under a real node process (nodes/disk.py through admin_disk): a full disk
refuses stores with 507 and still serves what it holds, then stores again once healed;
a database found damaged at run time is no longer served, set aside, and rebuilt from
the swarm's peers before it answers a retrieve again."""

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from testnet.base import crypto
from testnet.controller import open_testnet

pytestmark = pytest.mark.network


def now_ms() -> int:
    return int(time.time() * 1000)


async def store(net, node: str, account, data: bytes):
    return await net._pool.call(node, "store", {"pubkey": account.session_id, "namespace": 0, "data": data,
                                                "ttl": 3_600_000, "timestamp": now_ms()}, timeout=5)


async def retrieve(net, node: str, account):
    ts = now_ms()
    args = {"pubkey": account.session_id, "namespace": 0, "last_hash": "", "timestamp": ts,
            "pubkey_ed25519": account.ed25519_public.hex(),
            "signature": crypto.sign_request(account, crypto.retrieve_signature_message(0, ts))}
    return await net._pool.call(node, "retrieve", args, timeout=5)


def log_events(net, node: str) -> list[str]:
    path = Path(net.nodes[node].plan.log)
    return [json.loads(line).get("event", "") for line in path.read_text().splitlines() if line.startswith("{")]


async def test_full_disk_then_a_database_damaged_at_run_time(tmp_path):
    alice = crypto.Identity.from_seed(random.Random(3).randbytes(32))
    async with open_testnet(nodes=3, users=0, min_swarm=3, links="direct", seed=7, check=False,
                            run_dir=tmp_path / "run") as net:
        n1, n2, _ = list(net.nodes)
        held = set()
        for i in range(3):
            resp = await store(net, n1, alice, b"before %d" % i)
            assert resp.status == 200, resp.body
            held.add(resp.body["hash"])

        # Full: a store at the node is refused with 507 (nothing acknowledged), its copy of a
        # store taken elsewhere says 507 too, and it serves what it holds.
        await net.admin(n1, "admin_disk", action="arm", fault="full")
        refused = await store(net, n1, alice, b"while full")
        assert refused.status == 507, refused.body
        elsewhere = await store(net, n2, alice, b"taken by a peer")
        assert elsewhere.status == 200
        member = elsewhere.body["swarm"][net.nodes[n1].plan.ed25519_public]
        assert member["status"] != 200 and "507" in member["error"], member  # the peer's refusal, passed on
        held.add(elsewhere.body["hash"])
        got = await retrieve(net, n1, alice)
        assert got.status == 200 and {m["hash"] for m in got.body["messages"]} == held - {elsewhere.body["hash"]}
        # Healed: it stores again.
        await net.admin(n1, "admin_disk", action="heal", fault="full")
        resp = await store(net, n1, alice, b"after the heal")
        assert resp.status == 200, resp.body
        held.add(resp.body["hash"])

        # Damaged at run time: a row whose content no longer matches its hash (a misdirected
        # write).  The retrieve that reads it answers 503, never the wrong message; the file
        # is set aside and rebuilt from the peers, and only then served again, whole.
        damaged = next(iter(held))
        with sqlite3.connect(net.nodes[n1].plan.db) as db:
            db.execute("UPDATE messages SET data = ? WHERE hash = ?", (b"not what was stored", damaged))
        with trio.fail_after(60):  # the node sees the write at its next read transaction (20 s was too short twice, under load)
            while (bad := await retrieve(net, n1, alice)).status == 200:
                assert all(crypto.message_hash(alice.session_id, 0, m["data"]) == m["hash"]
                           for m in bad.body["messages"]), bad.body  # never the wrong message
                await trio.sleep(0.1)
        assert bad.status == 503, bad.body
        with trio.fail_after(45):  # a deadline for a loaded machine: it takes ~2 anti-entropy rounds
            while (got := await retrieve(net, n1, alice)).status != 200:
                assert got.status == 503, got.body  # rebuilding: never a partial answer
                await trio.sleep(0.2)
        assert {m["hash"] for m in got.body["messages"]} >= held
        assert all(crypto.message_hash(alice.session_id, 0, m["data"]) == m["hash"] for m in got.body["messages"])
        events = log_events(net, n1)
        assert any(e.startswith("database corrupt at run time") for e in events)
        assert "database set aside: rebuilding from swarm peers by anti-entropy" in events
        assert "database rebuilt from swarm peers" in events
        assert Path(str(net.nodes[n1].plan.db) + ".corrupt").exists()
