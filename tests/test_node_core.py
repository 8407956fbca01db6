"""Pure tests of the node's rules and the onion layer format."""

import pytest

from nodes import core
from nodes.core import NodeRecord, SwarmView, TokenBucket
from testnet.base.onion import LayerError, decode_reply, encode_relay, encode_reply, encode_request, parse_layer
from testnet.base import crypto
from testnet.base.protocol import RequestError, Status

ALICE = crypto.Identity.from_seed(bytes(range(32)))
NOW = 1_700_000_000_000


def store_args(**over):
    args = {"pubkey": ALICE.session_id, "namespace": 0, "data": b"x", "ttl": 60_000, "timestamp": NOW}
    args.update(over)
    return args


def status_of(fn, *a):
    with pytest.raises(RequestError) as info:
        fn(*a)
    return info.value.status


def test_store_rules():
    msg = core.validate_store(store_args(), NOW)
    assert msg.hash == crypto.message_hash(ALICE.session_id, 0, b"x") and msg.expiry == NOW + 60_000
    assert status_of(core.validate_store, store_args(data=b"x" * 76_801), NOW) == Status.TOO_LARGE
    assert core.validate_store(store_args(data=b"x" * 76_800), NOW)
    assert status_of(core.validate_store, store_args(ttl=9_999), NOW) == Status.BAD_REQUEST
    assert status_of(core.validate_store, store_args(ttl=14 * 86_400_000 + 1), NOW) == Status.BAD_REQUEST
    assert status_of(core.validate_store, store_args(timestamp=NOW + 10_001), NOW) == Status.CLOCK_OUT_OF_RANGE
    assert core.validate_store(store_args(timestamp=NOW - 10_000), NOW)
    for bad in ({"pubkey": "05zz"}, {"data": "text"}, {"ttl": True}, {"namespace": 1 << 20}):
        assert status_of(core.validate_store, store_args(**bad), NOW) == Status.BAD_REQUEST


def signed_retrieve(identity, ts, ns=0, account=None):
    sig = crypto.sign_request(identity, crypto.retrieve_signature_message(ns, ts))
    return {"pubkey": account or identity.session_id, "namespace": ns, "timestamp": ts,
            "pubkey_ed25519": identity.ed25519_public.hex(), "signature": sig, "last_hash": ""}


def test_retrieve_signature_and_clock():
    assert core.validate_retrieve(signed_retrieve(ALICE, NOW), NOW) == (ALICE.session_id, 0, None)
    assert core.validate_retrieve(signed_retrieve(ALICE, NOW, ns=3), NOW)[1] == 3
    mallory = crypto.Identity.from_seed(bytes(32))
    # Mallory signs correctly with her key but asks for Alice's account.
    assert status_of(core.validate_retrieve, signed_retrieve(mallory, NOW, account=ALICE.session_id), NOW) == 401
    args = signed_retrieve(ALICE, NOW)
    args["signature"] = bytes(64)
    assert status_of(core.validate_retrieve, args, NOW) == 401
    assert status_of(core.validate_retrieve, signed_retrieve(ALICE, NOW - 60_001), NOW) == Status.CLOCK_OUT_OF_RANGE


def test_replicated_message_hash_must_match():
    msg = core.validate_store(store_args(), NOW)
    assert core.message_from_wire(core.message_to_wire(msg)) == msg
    wire = core.message_to_wire(msg)
    wire[3] = b"y"
    assert status_of(core.message_from_wire, wire) == Status.BAD_REQUEST
    assert status_of(core.message_from_wire, [1, 2]) == Status.BAD_REQUEST


def test_swarm_view_and_421():
    nodes = [NodeRecord(f"{i:064x}", f"{i:064x}", "127.0.0.1", 1000 + i, 0 if i < 3 else 2**63) for i in range(6)]
    view = SwarmView(7, {n.ed25519_public: n for n in nodes}, me=nodes[0].ed25519_public)
    assert view.my_swarm == 0 and len(view.peers()) == 2
    target = view.swarm_of(ALICE.session_id)
    assert view.is_mine(ALICE.session_id) == (target == 0)
    err = view.wrong_swarm(ALICE.session_id)
    assert err.status == 421 and err.body["swarm_id"] == target
    assert {n["ed25519_public"] for n in err.body["nodes"]} == {n.ed25519_public for n in nodes if n.swarm_id == target}


def test_swarm_view_follows_a_registry_delta_from_its_own_height_only():
    wire = [NodeRecord(f"{i:064x}", f"{i:064x}", "127.0.0.1", 1000 + i, 0 if i < 3 else 2**63).to_wire()
            for i in range(6)]
    view = SwarmView.from_registry({"height": 7, "nodes": wire}, wire[0]["ed25519_public"])
    moved = dict(wire[3], swarm_id=0)
    new = dict(wire[0], ed25519_public=f"{9:064x}", port=2000)
    after = view.apply_delta({"height": 9, "since_height": 7, "nodes": [moved, new],
                              "removed": [wire[1]["ed25519_public"], f"{8:064x}"]})
    whole = SwarmView.from_registry({"height": 9, "nodes": [w for w in wire if w is not wire[1] and w is not wire[3]]
                                     + [moved, new]}, view.me)
    assert after == whole and after.height == 9 and len(after.peers()) == 3
    assert len(view.nodes) == 6 and view.height == 7  # the old view is left as it was
    with pytest.raises(ValueError):
        after.apply_delta({"height": 10, "since_height": 8, "nodes": [], "removed": []})


def test_token_bucket():
    bucket = TokenBucket(burst=3, per_second=1.0)
    assert [bucket.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow("b", 0.0)  # per source
    assert bucket.allow("a", 1.01) and not bucket.allow("a", 1.02)


def test_onion_layers_parse_and_reject():
    assert parse_layer(encode_request("store", {"a": 1})) == ("request", ("store", {"a": 1}))
    assert parse_layer(encode_relay("ab" * 32, b"e" * 32, b"blob")) == ("relay", ("ab" * 32, b"e" * 32, b"blob"))
    for bad in (b"\xc1", b"\x90", encode_relay("ab", b"e" * 32, b"x"), b"\x81\xa1x\x01"):
        with pytest.raises(LayerError):
            parse_layer(bad)
    key = bytes(32)
    assert decode_reply(key, encode_reply(key, 421, {"nodes": []})) == (421, {"nodes": []})
    with pytest.raises(crypto.CryptoError):
        decode_reply(bytes([1]) * 32, encode_reply(key, 200, None))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(core.ConfigError):
        core.NodeConfig.load(tmp_path / "missing.json")
    with pytest.raises(core.ConfigError, match="unknown injected bugs"):
        core.NodeConfig.from_dict({"name": "n", "seed_file": "s", "listen": [["127.0.0.1", 0]], "db": "d",
                                   "registry": ["127.0.0.1", 1], "inject_bugs": ["nope"]})
    base = {"name": "n", "seed_file": "s", "listen": [["127.0.0.1", 0]], "db": "d", "registry": ["127.0.0.1", 1]}
    assert core.NodeConfig.from_dict({**base, "replica_commit_window_ms": 3}).replica_commit_window_ms == 3.0
    for bad in (-1, "soon", float("nan"), 5000):
        with pytest.raises(core.ConfigError, match="replica_commit_window_ms"):
            core.NodeConfig.from_dict({**base, "replica_commit_window_ms": bad})


def test_batches_keep_to_the_wire_budget():
    from nodes.core import batches

    sizes = [100, 300, 50, 600, 1000, 10]
    out = list(batches(sizes, lambda n: n, budget=500, max_count=3))
    assert out == [[100, 300, 50], [600], [1000], [10]]  # too big alone still travels, alone
    assert [len(b) for b in batches(range(7), lambda n: 1, budget=100, max_count=3)] == [3, 3, 1]
    assert list(batches([], lambda n: n)) == []
    from nodes.core import fitting
    assert fitting(sizes, lambda n: n, budget=500) == [100, 300, 50]
    assert fitting([900, 1], lambda n: n, budget=500) == [900] and fitting([], lambda n: n) == []
