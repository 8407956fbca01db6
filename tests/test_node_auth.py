"""Node-to-node ops only from registered service nodes, only for their swarms'
accounts (nodes/auth.py): the handshake and entitlement rules as plain calls,
then the raw-socket attacks against a real network."""

import sqlite3
import time
from pathlib import Path

import pytest
import trio

from nodes import auth
from nodes.core import SwarmView
from testnet.base import crypto
from testnet.base.protocol import RequestError, Status
from testnet.base.rpc import open_rpc
from testnet.base.swarm import swarm_for

NODE_A = crypto.Identity.from_seed(bytes([1]) * 32)
NODE_B = crypto.Identity.from_seed(bytes([2]) * 32)
A, B = NODE_A.ed25519_public.hex(), NODE_B.ed25519_public.hex()
ALICE = crypto.Identity.from_seed(bytes([9]) * 32).session_id


def status_of(fn, *args) -> int:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.status


def fixed_bytes(n: int) -> bytes:
    return bytes(range(n))


# --------------------------------------------------------------------------- handshake, pure


def test_handshake_accepts_a_registered_node_signing_this_receivers_challenge():
    session: dict = {}
    challenge = auth.hello(session, B, fixed_bytes)["challenge"]
    caller = auth.check_auth(session, auth.auth_args(NODE_A, B, challenge), B, {A}.__contains__)
    assert caller == A and session[auth.SESSION_NODE] == A
    assert auth.authenticated_node(session, {A}.__contains__) == A
    # Deregistered since: the connection no longer speaks for a service node.
    assert status_of(auth.authenticated_node, session, set().__contains__) == Status.UNAUTHORIZED


def test_handshake_refusals():
    registered = {A, B}.__contains__
    # No hello on this connection: nothing to sign.
    assert status_of(auth.check_auth, {}, auth.auth_args(NODE_A, B, b"x" * 32), B, registered) == Status.UNAUTHORIZED
    # Signed for another receiver (a relayed handshake), or another challenge (a replay).
    session: dict = {}
    challenge = auth.hello(session, B, fixed_bytes)["challenge"]
    assert status_of(auth.check_auth, session, auth.auth_args(NODE_A, A, challenge), B, registered) == 401
    session = {}
    auth.hello(session, B, fixed_bytes)
    assert status_of(auth.check_auth, session, auth.auth_args(NODE_A, B, b"\0" * 32), B, registered) == 401
    # A challenge is good for one attempt: a second try (even a right one) is refused.
    session = {}
    challenge = auth.hello(session, B, fixed_bytes)["challenge"]
    with pytest.raises(RequestError):
        auth.check_auth(session, auth.auth_args(NODE_A, B, b"\0" * 32), B, registered)
    assert status_of(auth.check_auth, session, auth.auth_args(NODE_A, B, challenge), B, registered) == 401
    # A valid signature by a key the registry does not list.
    session = {}
    challenge = auth.hello(session, B, fixed_bytes)["challenge"]
    assert status_of(auth.check_auth, session, auth.auth_args(NODE_A, B, challenge), B, {B}.__contains__) == 401
    # Malformed arguments are a 400, never an exception.
    for bad in ({}, {"ed25519_public": 5, "signature": b""}, {"ed25519_public": "zz" * 32, "signature": b"s"}):
        session = {}
        auth.hello(session, B, fixed_bytes)
        assert status_of(auth.check_auth, session, bad, B, registered) in (400, 401)
    assert auth.SESSION_NODE not in session


# --------------------------------------------------------------------------- entitlement, pure


def view(height: int, swarms: dict[str, int]) -> SwarmView:
    return SwarmView.from_registry({"height": height, "nodes": [
        {"ed25519_public": k, "x25519_public": "00" * 32, "host": "127.0.0.1", "port": 1, "swarm_id": s}
        for k, s in swarms.items()]}, A)


def test_entitlement_current_swarm_past_swarm_and_registry_history():
    low, high = 0, 2**63
    alice_swarm = swarm_for(ALICE, [low, high])
    other = high if alice_swarm == low else low
    e = auth.Entitlements()
    e.update(view(1, {A: alice_swarm, B: other}))
    assert e.may_hold(A, ALICE) and not e.may_hold(B, ALICE)
    assert e.member_of(A, alice_swarm) and not e.member_of(B, alice_swarm)
    e.require_accounts(A, [ALICE])
    assert status_of(e.require_accounts, B, [ALICE]) == Status.FORBIDDEN
    assert status_of(e.require_swarm, B, alice_swarm) == Status.FORBIDDEN
    # A moves away from alice's swarm: it may still push (rehome) what it held, nothing else.
    e.update(view(2, {A: other, B: alice_swarm}))
    assert e.may_hold(A, ALICE, rehoming=True) and not e.may_hold(A, ALICE) and e.may_hold(B, ALICE)
    e.require_accounts(A, [ALICE], rehoming=True)
    assert status_of(e.require_accounts, A, [ALICE]) == Status.FORBIDDEN
    assert not e.member_of(A, alice_swarm)
    # A node that started later learns the past from the registry's history.
    fresh = auth.Entitlements()
    fresh.update(view(2, {A: other, B: alice_swarm}))
    assert not fresh.may_hold(A, ALICE, rehoming=True)
    fresh.add_history([{"height": 1, "swarms": {A: alice_swarm, B: other}}, {"bad": "entry"}, 7])
    assert fresh.may_hold(A, ALICE, rehoming=True)
    # The registry sends each past assignment as its differences from the list it comes with.
    told = auth.Entitlements()
    C = "cc" * 32
    told.update(view(13, {A: other, B: alice_swarm, C: other}))
    told.add_history([{"height": 12, "differ": {C: None}}, {"height": 11, "differ": {A: alice_swarm, C: None}}])
    assert told.may_hold(A, ALICE, rehoming=True) and not told.may_hold(C, ALICE, rehoming=True)
    assert not told.may_hold(A, ALICE)
    # Equal assignments are kept once in a process, however many nodes remember them.
    again = auth.Entitlements()
    again.update(view(13, {A: other, B: alice_swarm, C: other}))
    again.add_history([{"height": 11, "differ": {A: alice_swarm, C: None}}])
    assert again._past[11] is told._past[11]
    # History is bounded: old assignments are forgotten.
    small = auth.Entitlements(max_past=2)
    small.update(view(1, {A: alice_swarm, B: other}))
    for h in range(2, 6):
        small.update(view(h, {A: other, B: alice_swarm, **({C: other} if h % 2 else {})}))
    assert not small.may_hold(A, ALICE, rehoming=True)


# --------------------------------------------------------------------------- real network


def now_ms() -> int:
    return int(time.time() * 1000)


def db_hashes(net, name: str) -> set[str]:
    with sqlite3.connect(f"file:{Path(net.nodes[name].plan.db)}?mode=ro", uri=True) as db:
        return {h for (h,) in db.execute("SELECT hash FROM messages")}


async def handshake(rpc, identity: crypto.Identity, receiver: str, challenge: bytes | None = None):
    hi = await rpc.call("node_hello", {}, timeout=5)
    assert hi.status == 200 and hi.body["ed25519_public"] == receiver
    return await rpc.call("node_auth", auth.auth_args(identity, receiver, challenge or hi.body["challenge"]),
                          timeout=5)


@pytest.mark.network
async def test_strangers_and_other_swarms_cannot_list_read_or_delete_an_account(testnet_factory):
    async with testnet_factory(nodes=8, min_swarm=2, links="direct") as net:
        swarms = {rt.plan.ed25519_public: name for name, rt in net.nodes.items()}
        body = await net.call("registry", "get_service_nodes", {})
        by_name = {swarms[n["ed25519_public"]]: n["swarm_id"] for n in body["nodes"]}
        ids = sorted(set(by_name.values()))
        assert len(ids) == 2
        bob = net.user_identity("bob")
        bob_swarm = swarm_for(bob.session_id, ids)
        members = sorted(n for n, s in by_name.items() if s == bob_swarm)
        outsiders = sorted(n for n, s in by_name.items() if s != bob_swarm)
        target = members[0]
        stored = []
        for i in range(2):
            data = f"sealed {i}".encode()
            resp = await net._pool.call(target, "store", {"pubkey": bob.session_id, "namespace": 0, "data": data,
                                                          "ttl": 3_600_000, "timestamp": now_ms()}, timeout=5)
            assert resp.status == 200, resp.body
            stored.append(resp.body["hash"])
        for m in members:
            with trio.fail_after(10):
                while not set(stored) <= db_hashes(net, m):
                    await trio.sleep(0.1)

        plan = net.nodes[target].plan
        host, port = plan.host, net.nodes[target].port
        t_ed = plan.ed25519_public
        deletes = {"messages": [[bob.session_id, stored]]}
        async with open_rpc(host, port, local_host="127.0.0.201") as rpc:
            # A stranger, with only the documented framing.
            for op, args in [("ae_digest", {"swarm_id": bob_swarm, "digests": {}}),
                             ("ae_hashes", {"buckets": {bob.session_id: [0]}}),
                             ("ae_fetch", {"hashes": stored}),
                             ("replicate_delete", deletes),
                             ("replicate_expire", {"messages": [[bob.session_id, stored, 1]]}),
                             ("replicate", {"messages": []})]:
                resp = await rpc.call(op, args, timeout=5)
                assert resp.status == Status.UNAUTHORIZED, (op, resp.status, resp.body)
            # A user's own key is no service node's.
            assert (await handshake(rpc, bob, t_ed)).status == Status.UNAUTHORIZED
            assert (await rpc.call("replicate_delete", deletes, timeout=5)).status == Status.UNAUTHORIZED

        # A registered node of another swarm: authenticated, not entitled.
        liar = net.nodes[outsiders[0]].plan.identity
        async with open_rpc(host, port, local_host="127.0.0.202") as rpc:
            resp = await handshake(rpc, liar, t_ed)
            assert resp.status == 200 and resp.body == {"node": liar.ed25519_public.hex()}
            for op, args in [("ae_digest", {"swarm_id": bob_swarm, "digests": {}}),
                             ("ae_hashes", {"buckets": {bob.session_id: [0]}}),
                             ("replicate_delete", deletes),
                             ("replicate_expire", {"messages": [[bob.session_id, stored, 1]]})]:
                resp = await rpc.call(op, args, timeout=5)
                assert resp.status == Status.FORBIDDEN, (op, resp.status, resp.body)
            fetched = await rpc.call("ae_fetch", {"hashes": stored}, timeout=5)
            assert fetched.status == 200 and fetched.body["messages"] == []

        # A handshake signed for another node (relayed), or replayed on a second connection.
        other_member = net.nodes[members[1]].plan
        async with open_rpc(host, port, local_host="127.0.0.203") as rpc:
            first = await rpc.call("node_hello", {}, timeout=5)
            member = net.nodes[members[2]].plan.identity
            relayed = auth.auth_args(member, other_member.ed25519_public, first.body["challenge"])
            assert (await rpc.call("node_auth", relayed, timeout=5)).status == Status.UNAUTHORIZED
        async with open_rpc(host, port, local_host="127.0.0.204") as rpc:
            assert (await handshake(rpc, member, t_ed, challenge=first.body["challenge"])).status == 401

        # Nor can a stranger become a service node: the registry takes only staked keys.
        from testnet.base.records import register_args
        resp = await net._pool.call("registry", "register",
                                    register_args(NODE_A, "127.0.0.206", 4000, now_ms()), timeout=5)
        assert resp.status == Status.FORBIDDEN, resp

        for m in members:
            assert set(stored) <= db_hashes(net, m), f"{m} lost bob's messages"

        # The positive control: a member of bob's swarm may do exactly this — reading, and
        # deleting with bob's signed request (without it, tests/test_node_authority.py).
        async with open_rpc(host, port, local_host="127.0.0.205") as rpc:
            assert (await handshake(rpc, member, t_ed)).status == 200
            got = await rpc.call("ae_fetch", {"hashes": stored}, timeout=5)
            assert got.status == 200 and sorted(m[2] for m in got.body["messages"]) == sorted(stored)
            signed = [bob.session_id, stored, bob.ed25519_public.hex(),
                      bob.sign(crypto.delete_signature_message(stored))]
            resp = await rpc.call("replicate_delete", {"messages": [signed]}, timeout=5)
            assert resp.status == 200 and resp.body == {"deleted": 2}
        assert not set(stored) & db_hashes(net, target)
