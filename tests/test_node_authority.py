"""A hostile member of an account's swarm (nodes/proofs.py): membership is no
authority over the account's messages.  The proofs each change carries, as
plain calls; then, from a raw socket authenticated as a registered member of
bob's swarm (its key taken from the run directory, as an operator gone bad
holds it), each op against every other member of a real network."""

import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from nodes import auth, proofs
from nodes.core import MAX_TTL_MS, STORE_CLOCK_WINDOW_MS
from nodes.storage import StoredMessage
from testnet.base import crypto
from testnet.base.protocol import RequestError, Status
from testnet.base.rpc import open_rpc

BOB = crypto.Identity.from_seed(bytes([7]) * 32)
MALLORY = crypto.Identity.from_seed(bytes([8]) * 32)
NOW = 1_700_000_000_000
DAY = 24 * 3600 * 1000
SLACK = proofs.REPLICA_CLOCK_SLACK_MS


def status_of(fn, *args) -> int:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.status


def delete_args(identity: crypto.Identity, hashes: list[str], *, signed=None, key=None) -> dict:
    """A client's delete of ``identity``'s messages, signed by ``key`` (default: the account)
    over ``signed`` (default: the same hashes)."""
    key = key or identity
    return {"pubkey": identity.session_id, "hashes": hashes, "pubkey_ed25519": key.ed25519_public.hex(),
            "signature": crypto.sign_fast(key, crypto.delete_signature_message(signed or hashes))}


def expire_args(identity: crypto.Identity, hashes: list[str], expiry: int, *, signed_expiry=None, key=None) -> dict:
    key = key or identity
    sig = key.sign(crypto.expire_signature_message(signed_expiry if signed_expiry is not None else expiry, hashes))
    return {"pubkey": identity.session_id, "hashes": hashes, "expiry": expiry,
            "pubkey_ed25519": key.ed25519_public.hex(), "signature": sig}


def as_entry(args: dict, *keys: str) -> list:
    return [args[k] for k in ("pubkey", "hashes", *keys, "pubkey_ed25519", "signature")]


# --------------------------------------------------------------------------- pure


def test_a_forwarded_delete_is_taken_only_with_the_accounts_signature_over_exactly_its_hashes():
    h1, h2 = "h" * 43, "g" * 43
    genuine = proofs.SignedDelete.from_client(delete_args(BOB, [h1, h2]))
    genuine.verify()
    back = proofs.SignedDelete.from_wire(genuine.to_wire())
    assert back == genuine and proofs.SignedDelete.from_bytes(genuine.to_bytes()) == genuine
    back.verify()
    refused = {
        "unsigned": [BOB.session_id, [h1, h2]],
        "signed by another account's key": as_entry(delete_args(BOB, [h1, h2], key=MALLORY)),
        "bob's key, another's signature": [BOB.session_id, [h1, h2], BOB.ed25519_public.hex(),
                                           MALLORY.sign(crypto.delete_signature_message([h1, h2]))],
        "bob's signature over other hashes": as_entry(delete_args(BOB, [h2], signed=[h1])),
        "bob's signature, a hash added": as_entry({**delete_args(BOB, [h1]), "hashes": [h1, h2]}),
        "bob's signature, another account": [MALLORY.session_id, *genuine.to_wire()[1:]],
        "signature of the wrong type": [BOB.session_id, [h1], BOB.ed25519_public.hex(), "sig"],
    }
    for what, entry in refused.items():
        assert status_of(proofs.SignedDelete.from_wire(entry).verify) == Status.UNAUTHORIZED, what
    for bad in ([BOB.session_id], [BOB.session_id, "h"], {"a": 1}, [BOB.session_id, [h1], "k", b"s", 1], "x"):
        assert status_of(proofs.SignedDelete.from_wire, bad) == Status.BAD_REQUEST, bad
    assert status_of(proofs.signed_deletes, {"messages": "x"}) == Status.BAD_REQUEST


def test_a_forwarded_expiry_is_taken_only_with_the_accounts_signature_within_the_window():
    h = "h" * 43
    genuine = proofs.SignedExpire.from_client(expire_args(BOB, [h], NOW + 60_000), NOW)
    genuine.verify(NOW)
    assert proofs.SignedExpire.from_wire(genuine.to_wire()) == genuine
    # The node that took it checked the window on its clock: ours may be behind by the slack.
    proofs.SignedExpire.from_wire(as_entry(expire_args(BOB, [h], NOW + MAX_TTL_MS + SLACK), "expiry")).verify(NOW)
    too_far = proofs.SignedExpire.from_wire(as_entry(expire_args(BOB, [h], NOW + MAX_TTL_MS + SLACK + 1), "expiry"))
    assert status_of(too_far.verify, NOW) == Status.BAD_REQUEST
    for what, entry in {
        "unsigned": [BOB.session_id, [h], 1],
        "signed by another account's key": as_entry(expire_args(BOB, [h], 1, key=MALLORY), "expiry"),
        "bob's signature for another expiry": as_entry(expire_args(BOB, [h], 1, signed_expiry=NOW + 60_000),
                                                       "expiry"),
    }.items():
        assert status_of(proofs.SignedExpire.from_wire(entry).verify, NOW) == Status.UNAUTHORIZED, what
    for bad in ([BOB.session_id, [h]], [BOB.session_id, [h], "1"], [BOB.session_id, [h], True], [BOB.session_id, [h], 2**63]):
        assert status_of(proofs.SignedExpire.from_wire, bad) == Status.BAD_REQUEST, bad


def test_a_peer_pays_for_the_signatures_it_makes_a_node_check():
    budget = proofs.SignatureBudget(burst=1000, per_second=100.0, max_per_request=500)
    assert status_of(budget.charge, "a", 501, 1, 0.0) == Status.TOO_LARGE  # cap on entries, however few distinct
    budget.charge("a", 500, 500, 0.0)
    budget.charge("a", 500, 500, 0.0)
    assert status_of(budget.charge, "a", 10, 10, 0.0) == Status.RATE_LIMITED  # nothing taken: still empty
    budget.charge("b", 500, 500, 0.0)  # each peer its own budget
    budget.charge("a", 10, 10, 0.1)  # refilled at 100/s
    assert status_of(budget.charge, "a", 1, 1, 0.1) == Status.RATE_LIMITED and budget.refused == 3


def copy(ts: int, expiry: int, data: bytes = b"sealed") -> StoredMessage:
    return StoredMessage(BOB.session_id, 0, crypto.message_hash(BOB.session_id, 0, data), data, ts, expiry)


def test_a_copy_is_kept_only_as_a_store_could_have_made_it():
    fresh, old = copy(NOW, NOW + 3_600_000), copy(NOW - 3 * DAY, NOW + 3_600_000)
    shortened = copy(NOW - 60_000, NOW + 1_000)  # a signed expire shortened it below any TTL: still a message
    skewed = copy(NOW + STORE_CLOCK_WINDOW_MS + SLACK, NOW + DAY)  # the storing node's clock was ahead
    assert proofs.accept_copies([fresh, old, shortened, skewed], NOW) == [fresh, old, shortened, skewed]
    # A life no store gives (timestamp + 14 days) is cut to the one a store gives: a backdated
    # plant dies at once, an extended message lives as its store made it.
    backdated = copy(NOW - 20 * DAY, NOW + 3_600_000)
    extended = copy(NOW - DAY, NOW + MAX_TTL_MS)
    assert proofs.accept_copies([backdated, extended], NOW) == [copy(NOW - DAY, NOW - DAY + MAX_TTL_MS)]
    assert proofs.accept_copies([copy(NOW - 60_000, NOW)], NOW) == []  # expired here: nothing to keep
    for bad in (copy(NOW + STORE_CLOCK_WINDOW_MS + SLACK + 1, NOW + DAY),  # from the future
                copy(NOW, NOW + MAX_TTL_MS + SLACK + 1)):  # longer than any store or expire gives
        assert status_of(proofs.accept_copies, [fresh, bad], NOW) == Status.BAD_REQUEST


def test_the_rehoming_allowance_is_the_registrys_history_of_assignments():
    from nodes.core import SwarmView
    from testnet.base.swarm import swarm_for

    a, b = "aa" * 32, "bb" * 32
    low, high = 0, 2**63
    bob_swarm = swarm_for(BOB.session_id, [low, high])
    other = high if bob_swarm == low else low

    def view(height, swarms, port=1):
        return SwarmView.from_registry({"height": height, "nodes": [
            {"ed25519_public": k, "x25519_public": "00" * 32, "host": "127.0.0.1", "port": port, "swarm_id": s}
            for k, s in swarms.items()]}, a)

    e = auth.Entitlements()
    e.update(view(1, {a: bob_swarm, b: other}))
    e.update(view(2, {a: other, b: bob_swarm}))
    assert e.may_hold(a, BOB.session_id, rehoming=True)
    # Views that change addresses alone replace no assignment: they push nothing out.
    for h in range(3, 3 + 2 * auth.RECENT_ASSIGNMENTS):
        e.update(view(h, {a: other, b: bob_swarm}, port=h))
    assert e.may_hold(a, BOB.session_id, rehoming=True)
    # As many replaced assignments as the registry keeps, then the oldest is forgotten.
    c = "cc" * 32
    for h in range(100, 100 + auth.RECENT_ASSIGNMENTS + 1):
        e.update(view(h, {a: other, b: bob_swarm, **({c: other} if h % 2 else {})}))
    assert not e.may_hold(a, BOB.session_id, rehoming=True)
    from testnet.registry import HISTORY_LENGTH
    assert auth.RECENT_ASSIGNMENTS == HISTORY_LENGTH


# --------------------------------------------------------------------------- a hostile peer, in process


async def test_anti_entropy_takes_only_what_a_hostile_peer_can_prove(nursery, tmp_path):
    """The node's own round against a peer that lies: it lists bob's deleted message under
    alice's account, offers a copy no store makes, and holds bob's deleted message."""
    import random
    from functools import partial

    from nodes import core
    from nodes.anti_entropy import AntiEntropy
    from nodes.core import NodeConfig, SwarmView
    from nodes.replication import GroupCommit
    from nodes.storage import Storage, ae_bucket
    from testnet.base.rpc import ConnectionPool, serve

    alice = crypto.Identity.from_seed(bytes([9]) * 32)
    me, peer = "aa" * 32, "bb" * 32
    now = now_ms()
    deleted = copy(now, now + 3_600_000, b"bob's deleted message")
    fine = StoredMessage(alice.session_id, 0, crypto.message_hash(alice.session_id, 0, b"hi"), b"hi", now,
                         now + 3_600_000)
    future = StoredMessage(alice.session_id, 0, crypto.message_hash(alice.session_id, 0, b"later"), b"later",
                           now + 2 * DAY, now + 3 * DAY)
    storage = Storage(tmp_path / "db.sqlite")
    signed = proofs.SignedDelete.from_client(delete_args(BOB, [deleted.hash]))
    storage.delete(BOB.session_id, [deleted.hash], tombstone_until=now + MAX_TTL_MS, proof=signed.to_bytes())
    offer = [fine]
    heard: list[tuple[str, dict]] = []

    async def hostile(req, _peer):
        heard.append((req.op, req.args))
        if req.op == "ae_digest":
            return 200, {"buckets": {pk: [[ae_bucket(now), "lie"]] for pk in (alice.session_id, BOB.session_id)}}
        if req.op == "ae_hashes":
            return 200, {"hashes": {alice.session_id: sorted([deleted.hash, fine.hash, future.hash]),
                                    BOB.session_id: [deleted.hash]}}
        if req.op == "ae_fetch":
            return 200, {"messages": [core.message_to_wire(m) for m in [deleted, *offer]]}
        return 200, {}

    [(host, port)] = await nursery.start(partial(serve, hostile, [("127.0.0.1", 0)]))
    view = SwarmView.from_registry({"height": 1, "nodes": [
        {"ed25519_public": k, "x25519_public": "00" * 32, "host": host, "port": port, "swarm_id": 0}
        for k in (me, peer)]}, me)
    commit = GroupCommit(storage)  # commits at the end of each loop turn: no task of its own
    pool = ConnectionPool(nursery, lambda key: (host, port, None))
    config = NodeConfig(name="n01", seed_file="-", listen=(("127.0.0.1", 0),), db="-", log=None,
                        registry=("127.0.0.1", 1))
    ae = AntiEntropy(config, me=me, storage=storage, commit=commit, pool=pool, now_ms=now_ms,
                     rng=random.Random(1), view=lambda: view, stats={"ae_fetched": 0, "ae_pushed": 0},
                     bugs=set())
    try:
        await ae._sync_with(view, peer, storage.ae_digests(view.is_mine), (0, 1))
        held = {m.hash for m in storage.messages_for()}
        assert held == {fine.hash}  # bob's deleted message stays deleted, whoever it is listed under
        # What it holds of ours that we deleted: our proof goes to it, never our word alone.
        (sent,) = [args for op, args in heard if op == "replicate_delete"]
        assert [proofs.SignedDelete.from_wire(e) for e in sent["messages"]] == [signed]
        # A copy no store makes spoils the whole answer: nothing of it is taken, the round ends.
        offer[:] = [future]
        heard.clear()
        storage.delete(alice.session_id, [fine.hash])
        await ae._sync_with(view, peer, storage.ae_digests(view.is_mine), (0, 2))
        assert storage.messages_for() == [] and "replicate_delete" not in {op for op, _ in heard}
    finally:
        await pool.aclose()
        storage.close()


async def test_a_peers_signature_checks_are_paid_from_its_budget_before_any_is_made(tmp_path):
    from nodes.core import SwarmView
    from nodes.peer_ops import PeerOps
    from nodes.storage import Storage

    me, peer, other = "aa" * 32, "bb" * 32, "cc" * 32
    view = SwarmView.from_registry({"height": 1, "nodes": [
        {"ed25519_public": k, "x25519_public": "00" * 32, "host": "127.0.0.1", "port": 1, "swarm_id": 0}
        for k in (me, peer, other)]}, me)
    entitled = auth.Entitlements()
    entitled.update(view)
    storage = Storage(tmp_path / "db.sqlite")
    checks = []
    budget = proofs.SignatureBudget(burst=4, per_second=1e-9, max_per_request=500)
    ops = PeerOps(storage=storage, commit=None, now_ms=now_ms, view=lambda: view, entitled=entitled,
                  anti_entropy=None, stats={}, bugs=set(), sign_root=lambda root: b"", signature_budget=budget)
    deletes = [as_entry(delete_args(BOB, [f"{i:043d}"])) for i in range(3)]
    real_verify = proofs.SignedDelete.verify
    proofs.SignedDelete.verify = lambda d: (checks.append(d), real_verify(d))[1]
    try:
        # A signed delete repeated is checked (and paid for) once.
        assert ops.replicate_delete({"messages": deletes + deletes[:1] * 5}, peer) == {"deleted": 0}
        assert len(checks) == 3
        with pytest.raises(RequestError) as refused:  # 2 more: the budget holds 1
            ops.replicate_delete({"messages": deletes[:2]}, peer)
        assert refused.value.status == Status.RATE_LIMITED and len(checks) == 3  # nothing checked
        assert ops.replicate_delete({"messages": deletes[:1]}, other) == {"deleted": 0}  # its own budget
        assert budget.refused == 1
    finally:
        proofs.SignedDelete.verify = real_verify
        storage.close()


# --------------------------------------------------------------------------- a hostile member, real network


def now_ms() -> int:
    return int(time.time() * 1000)


def db_rows(net, name: str) -> dict[str, tuple]:
    with sqlite3.connect(f"file:{Path(net.nodes[name].plan.db)}?mode=ro", uri=True) as db:
        return {h: (ts, exp, data) for h, ts, exp, data in db.execute("SELECT hash, timestamp, expiry, data FROM messages")}


async def wait_for(predicate, what: str, timeout_s: float = 15.0) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {timeout_s} s: {what}")


HOSTILE = "n02"


@asynccontextmanager
async def bobs_swarm(testnet_factory):
    """One swarm of 5 holding two of bob's messages (stored through n01, replicated to all)."""
    async with testnet_factory(nodes=5, min_swarm=5, links="direct") as net:
        bob = net.user_identity("bob")
        stored = []
        for i in range(2):
            resp = await net._pool.call("n01", "store", {"pubkey": bob.session_id, "namespace": 0,
                                                         "data": f"sealed for bob {i}".encode(), "ttl": 3_600_000,
                                                         "timestamp": now_ms()}, timeout=5)
            assert resp.status == 200, resp.body
            stored.append(resp.body["hash"])
        await wait_for(lambda: all(set(stored) <= set(db_rows(net, n)) for n in net.nodes),
                       "every member holds bob's messages")
        yield net, bob, stored


@asynccontextmanager
async def as_member(net, member: str, target: str):
    """A raw connection to ``target``, authenticated with ``member``'s key (its own handshake)."""
    rt = net.nodes[target]
    async with open_rpc(rt.plan.host, rt.port, timeout=5) as rpc:
        await auth.authenticate(rpc, net.nodes[member].plan.identity, rt.plan.ed25519_public, timeout=5)
        yield rpc


async def refused_everywhere(net, op: str, attempts: dict, status: int) -> None:
    for target in sorted(n for n in net.nodes if n != HOSTILE):
        async with as_member(net, HOSTILE, target) as rpc:
            for what, messages in attempts.items():
                resp = await rpc.call(op, {"messages": messages}, timeout=5)
                assert resp.status == status, (target, what, resp.status, resp.body)


@pytest.mark.network
async def test_a_member_cannot_delete_bobs_messages_on_any_other_member(testnet_factory):
    async with bobs_swarm(testnet_factory) as (net, bob, (m1, m2)):
        hostile = net.nodes[HOSTILE].plan.identity
        await refused_everywhere(net, "replicate_delete", {
            "unsigned": [[bob.session_id, [m1, m2]]],
            "signed by the member's own key": [as_entry(delete_args(bob, [m1, m2], key=hostile))],
            "bob's signature over another delete": [as_entry(delete_args(bob, [m2], signed=[m1]))],
            "a signed delete beside an unsigned one": [as_entry(delete_args(bob, [m1])), [bob.session_id, [m2]]],
        }, Status.UNAUTHORIZED)
        for n in net.nodes:
            assert {m1, m2} <= set(db_rows(net, n)), f"{n} lost bob's messages"

        # The proof, not the caller, is the authority: bob's own signed delete, forwarded by the
        # same member, is taken; anti-entropy then carries it on with the tombstone, and every
        # member verifies it for itself.
        async with as_member(net, HOSTILE, "n03") as rpc:
            resp = await rpc.call("replicate_delete", {"messages": [as_entry(delete_args(bob, [m1]))]}, timeout=5)
            assert resp.status == 200 and resp.body == {"deleted": 1}, resp
        await wait_for(lambda: all(m1 not in db_rows(net, n) for n in net.nodes),
                       "bob's signed delete reached every member by anti-entropy")

        # Checking bob's signatures costs the node CPU: a member may make it check at most 500 per
        # request (413), however valid each (its budget per second: the in-process test above).
        async with as_member(net, HOSTILE, "n05") as rpc:
            fakes = [as_entry(delete_args(bob, [f"{i:043d}"])) for i in range(501)]
            resp = await rpc.call("replicate_delete", {"messages": fakes}, timeout=5)
            assert resp.status == Status.TOO_LARGE and "at most 500" in resp.body["error"], resp
        assert (await net.call("n05", "info"))["stats"]["signature_checks_refused"] == 1

        # A client's delete through one node removes the message on every member at once.
        resp = await net._pool.call("n04", "delete", delete_args(bob, [m2]), timeout=5)
        assert resp.status == 200 and len(resp.body["swarm"]) == 5, resp
        assert all(r["status"] == 200 for r in resp.body["swarm"].values()), resp.body
        for n in net.nodes:
            assert m2 not in db_rows(net, n), n
        # The same store again (a relay replaying it) keeps nothing and vouches for nothing.
        resp = await net._pool.call("n01", "store", {"pubkey": bob.session_id, "namespace": 0,
                                                     "data": b"sealed for bob 1", "ttl": 3_600_000,
                                                     "timestamp": now_ms()}, timeout=5)
        assert resp.status == 200 and resp.body["hash"] == m2 and resp.body["deleted"] is True, resp
        assert "signature" not in str(resp.body) and m2 not in db_rows(net, "n01")


@pytest.mark.network
async def test_a_member_cannot_change_the_expiry_of_bobs_messages_on_any_other_member(testnet_factory):
    async with bobs_swarm(testnet_factory) as (net, bob, (m1, m2)):
        hostile = net.nodes[HOSTILE].plan.identity
        before = {n: db_rows(net, n) for n in net.nodes}
        soon = now_ms() + 600_000
        await refused_everywhere(net, "replicate_expire", {
            "unsigned": [[bob.session_id, [m1, m2], 1]],
            "signed by the member's own key": [as_entry(expire_args(bob, [m1, m2], 1, key=hostile), "expiry")],
            "bob's signature for another expiry": [as_entry(expire_args(bob, [m1, m2], 1, signed_expiry=soon),
                                                            "expiry")],
        }, Status.UNAUTHORIZED)
        assert {n: db_rows(net, n) for n in net.nodes} == before

        # Bob's own signed expiry, forwarded by the same member, is taken; beyond the window it is not.
        async with as_member(net, HOSTILE, "n03") as rpc:
            resp = await rpc.call("replicate_expire", {"messages": [as_entry(expire_args(bob, [m1], soon), "expiry")]},
                                  timeout=5)
            assert resp.status == 200 and resp.body == {"updated": 1}, resp
            far = expire_args(bob, [m2], now_ms() + MAX_TTL_MS + SLACK + 60_000)
            resp = await rpc.call("replicate_expire", {"messages": [as_entry(far, "expiry")]}, timeout=5)
            assert resp.status == Status.BAD_REQUEST, resp
        assert db_rows(net, "n03")[m1][1] == soon and db_rows(net, "n03")[m2] == before["n03"][m2]


@pytest.mark.network
async def test_a_member_cannot_replace_bobs_messages_or_plant_copies_no_store_makes(testnet_factory):
    async with bobs_swarm(testnet_factory) as (net, bob, (m1, m2)):
        before = {n: db_rows(net, n) for n in net.nodes}
        ts1, _, data1 = before["n01"][m1]
        now = now_ms()

        def wire(data: bytes, ts: int, expiry: int, h: str | None = None) -> list:
            return [bob.session_id, 0, h or crypto.message_hash(bob.session_id, 0, data), data, ts, expiry]

        planted = {"post-dated": wire(b"post-dated", now + 2 * DAY, now + 3 * DAY),
                   "backdated": wire(b"backdated", now - 20 * DAY, now + 3_600_000)}
        await refused_everywhere(net, "replicate", {
            "other content under bob's hash": [wire(b"not what bob was sent", now, now + 3_600_000, h=m1)],
            "a copy from the future": [planted["post-dated"]],
            "a life longer than any store or expire gives": [wire(b"immortal", now, now + 30 * DAY)],
        }, Status.BAD_REQUEST)
        # Taken, but only as a store would have made it: bob's message again with another
        # timestamp and a shorter life changes nothing; a backdated copy outlived its store's
        # TTL and is not kept.
        for target in sorted(n for n in net.nodes if n != HOSTILE):
            async with as_member(net, HOSTILE, target) as rpc:
                resp = await rpc.call("replicate", {"messages": [wire(data1, ts1 - 60_000, now + 15_000),
                                                                 planted["backdated"]]}, timeout=5)
                assert resp.status == 200, resp
        for n in net.nodes:
            rows = db_rows(net, n)
            assert rows[m1] == before[n][m1] and rows[m2] == before[n][m2], n
            assert not {p[2] for p in planted.values()} & set(rows), n
