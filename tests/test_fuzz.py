"""Every handler validates every argument: the fuzzer's generator and judge as plain
calls, the validators it made us add, its detector shown failing on purpose against an
in-process server, then a Hypothesis property over a real network, with a fake peer
answering garbage to one node per swarm (chaos/fuzz*.py)."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chaos.fuzz import model as fuzz
from chaos.fuzz.model import Draw, Frame, NodeInfo, RandomDraw, World, judge
from chaos.fuzz.frames import PeerScript, make_frame, make_registry_frame
from chaos.fuzz.peer import start_fake_peers
from chaos.fuzz.run import (MAX_BODY, Budget, FuzzConn, Fuzzer, Tally, exited_nodes, integrity_check, keep_alive,
                            open_connections, pump, restore, scan_logs, send_all, source_hosts, world_of)
from nodes import core
from testnet.base.onion import encode_reply
from nodes.replication import GroupCommit
from nodes.server import ADMIN_OPS, CLIENT_OPS, HANDSHAKE_OPS, NODE_OPS
from nodes.storage import Storage, StorageError, StoredMessage
from testnet.base import crypto
from testnet.fixtures import running_testnet
from testnet.base.protocol import RequestError, Status
from testnet.base.protocol import Request
from testnet.registry import RegistryState, _Server, parse_poll_args
from testnet.base.rpc import Peer, serve

NOW = 1_700_000_000_000
EXAMPLES = 300  # about 10 frames each: a few thousand frames, ~15 s on a shared 2-core machine
KEYS = [crypto.Identity.from_seed(bytes([i]) * 32) for i in range(1, 7)]
ACCOUNTS = [crypto.Identity.from_seed(bytes([100 + i]) * 32) for i in range(12)]


def status_of(fn, *args) -> int:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.status


def toy_world(port: int = 1, nodes: int = 6) -> World:
    infos = [NodeInfo(f"n{i:02d}", KEYS[i], "127.0.0.1", port, (i % 2) * 2**63) for i in range(nodes)]
    return World.build(infos, ACCOUNTS, "right-token")


# --------------------------------------------------------------------------- validators the fuzzer made us add


def test_replicated_messages_refuse_what_sqlite_or_the_hash_cannot_take():
    acc = ACCOUNTS[0].session_id
    good = [acc, 0, crypto.message_hash(acc, 0, b"d"), b"d", NOW, NOW + 60_000]
    assert core.message_from_wire(good).timestamp == NOW
    assert core.message_from_wire([acc.upper(), *good[1:]]).pubkey == acc
    for at, bad in ((1, True), (4, 2**63), (4, 2**64 - 1), (4, True), (4, -1), (5, 2**63), (5, 0), (2, 7),
                    (3, "d")):
        item = list(good)
        item[at] = bad
        # namespace True used to reach message_hash (CryptoError), times >= 2**63 SQLite
        # (OverflowError in the group commit task: the node died).
        assert status_of(core.message_from_wire, item) == Status.BAD_REQUEST, (at, bad)
    for shape in (good[:5], good + [0], {str(i): v for i, v in enumerate(good)}, "abcdef"):
        assert status_of(core.message_from_wire, shape) == Status.BAD_REQUEST


def test_bucket_numbers_and_clock_offsets_stay_inside_int64():
    pk = ACCOUNTS[0].session_id
    assert core.ae_buckets_args({"buckets": {pk: [0, core.MAX_BUCKET]}}) == {pk: [0, core.MAX_BUCKET]}
    assert (core.MAX_BUCKET + 1) * 5000 < 2**63  # the last bucket's end time fits
    for b in (core.MAX_BUCKET + 1, 2**63 - 1, -1, True):
        assert status_of(core.ae_buckets_args, {"buckets": {pk: [b]}}) == Status.BAD_REQUEST
    assert core.clock_offset(-30_000) == -30_000
    for offset in (core.MAX_CLOCK_OFFSET_MS + 1, -(10**15), 2**63, True, 1.5, "5"):
        with pytest.raises(RequestError):
            core.clock_offset(offset)
    with pytest.raises(core.ConfigError):
        core.clock_offset(10**15, core.ConfigError)


def test_loopback_addresses_are_canonical_ascii_ipv4():
    assert core.loopback_address(["127.0.0.1", 0], "a") == ("127.0.0.1", 0)
    assert core.loopback_address(["127.9.8.7", 65535], "a") == ("127.9.8.7", 65535)
    # "²".isdigit() is True and int("²") raises ValueError: it used to be a 500.
    for host in ("127.0.0.²", "127.0.0.١", "١٢٧.0.0.1", "127.1", "127.0.0.01", "127.0.0.256", "10.0.0.1", "::1",
                 "localhost", "", "127.0.0.1 "):
        assert status_of(core.loopback_address, [host, 1], "a") == Status.BAD_REQUEST, host
    for value in (["127.0.0.1", 65536], ["127.0.0.1", True], ["127.0.0.1"], "127.0.0.1", [1, "127.0.0.1"]):
        assert status_of(core.loopback_address, value, "a") == Status.BAD_REQUEST


def test_registry_names_stray_keys_of_both_types_without_sorting_them_together():
    # sorted({"x", b"y"}) raises TypeError: a bytes key beside a str key used to be a 500.
    state = RegistryState()
    assert status_of(state.register, {"x": 1, b"y": 2}, NOW) == Status.BAD_REQUEST
    assert status_of(state.stake, {"ed25519_public": "a" * 64, b"k": 1}) == Status.BAD_REQUEST
    assert status_of(parse_poll_args, {"since_height": 1, b"k": 1, "z": 2}) == Status.BAD_REQUEST


async def test_the_registry_never_stringifies_a_nested_argument():
    # str() of a list nested 990 deep (msgpack decodes it) raises RecursionError: the log
    # line of register/deregister made that a 500.
    deep = None
    for _ in range(fuzz.MAX_NESTING):
        deep = [deep]
    msgpack.unpackb(msgpack.packb({"id": 1, "op": "register", "args": {"ed25519_public": deep}}))  # a valid frame
    server = _Server(RegistryState(), None)
    peer = Peer(("127.0.0.1", 1), ("127.0.0.1", 2), 1)
    for op in ("register", "deregister"):
        with pytest.raises(RequestError) as info:
            await server.handle(Request(1, op, {"ed25519_public": deep}), peer)
        assert info.value.status == Status.BAD_REQUEST


def test_storage_refuses_times_beyond_int64_as_its_own_error():
    store = Storage(":memory:")
    acc = ACCOUNTS[0].session_id
    msg = StoredMessage(acc, 0, "h", b"", 2**63, 2**63 + 1)
    with pytest.raises(StorageError):  # not OverflowError: the node's loops survive it
        store.store(msg)
    with pytest.raises(StorageError):
        store.delete(acc, ["h"], tombstone_until=2**63)
    assert store.ae_hashes({acc: [2**62, core.MAX_BUCKET + 1]}) == {acc: []}


async def test_one_writers_bad_batch_fails_only_that_writer():
    store = Storage(":memory:")
    acc = ACCOUNTS[0].session_id
    good = StoredMessage(acc, 0, crypto.message_hash(acc, 0, b"ok"), b"ok", NOW, NOW + 1)
    bad = StoredMessage(acc, 0, "h", b"", -1, 1)
    commit = GroupCommit(store)
    outcome = {}

    async def write(name, msgs):
        try:
            outcome[name] = await commit.commit(msgs)
        except StorageError:
            outcome[name] = "failed"

    async with trio.open_nursery() as writers:  # both join one group commit (one loop turn)
        writers.start_soon(write, "good", [good])
        writers.start_soon(write, "bad", [bad])
    assert outcome == {"good": [True], "bad": "failed"}
    assert store.count() == 1
    assert commit.commits == 1  # the good one, alone after the shared transaction failed


async def test_writes_of_one_loop_turn_share_one_transaction():
    store = Storage(":memory:")
    acc = ACCOUNTS[0].session_id
    msgs = [StoredMessage(acc, 0, crypto.message_hash(acc, 0, b"%d" % i), b"%d" % i, NOW, NOW + 1) for i in range(4)]
    commit = GroupCommit(store)
    outcome = {}

    async def write(i):
        outcome[i] = await commit.commit([msgs[i]])

    async with trio.open_nursery() as writers:
        for i in range(3):
            writers.start_soon(write, i)
    await write(3)  # a later turn: a transaction of its own
    await write(0)  # a duplicate: not new
    assert outcome == {0: [False], 1: [True], 2: [True], 3: [True]}
    assert commit.commits == 3 and store.count() == 4


def test_a_peers_malformed_anti_entropy_answers_are_502s_never_exceptions():
    """Anti-entropy read a peer's answers with .get() and dict(): a float body killed the node."""
    acc = ACCOUNTS[0].session_id
    assert core.ae_digest_reply({"buckets": {acc: [[5, "d"], [6, "e"]]}}) == {acc: {5: "d", 6: "e"}}
    assert core.ae_hashes_reply({"hashes": {acc: ["h1", "h2"]}}) == {acc: ["h1", "h2"]}
    msg = [acc, 0, crypto.message_hash(acc, 0, b"x"), b"x", NOW, NOW + 1]
    assert [m.hash for m in core.ae_fetch_reply({"messages": [msg]})] == [msg[2]]
    for body in (1.5, [], None, {}, {"buckets": []}, {"buckets": {acc: [[5]]}}, {"buckets": {acc: [[2**63, "d"]]}},
                 {"buckets": {acc: [["5", "d"]]}}, {"buckets": {"zz": []}}, {"buckets": {acc: [[[1], "d"]]}}):
        assert status_of(core.ae_digest_reply, body) == Status.BAD_GATEWAY, body
    for body in ("x", {"hashes": []}, {"hashes": {acc: "h"}}, {"hashes": {acc: [1]}}, {"hashes": {"zz": []}}):
        assert status_of(core.ae_hashes_reply, body) == Status.BAD_GATEWAY, body
    for body in (None, {"messages": None}, {"messages": [msg[:5]]}, {"messages": [msg[:4] + [2**63, 2**64 - 1]]}):
        assert status_of(core.ae_fetch_reply, body) == Status.BAD_GATEWAY, body


def test_a_fake_peer_passes_the_handshake_and_answers_each_step():
    world = toy_world()
    script = PeerScript(RandomDraw(3), world, world.nodes[0], world.nodes[2])
    steps = Counter()
    for i in range(400):
        op = ("node_hello", "node_auth", "ae_digest", "ae_hashes", "ae_fetch", "replicate", "onion")[i % 7]
        args = {"buckets": {a.session_id: [1] for a in ACCOUNTS[:3]}} if op == "ae_hashes" else \
            {"hashes": list(script.offered)[:3]} if op == "ae_fetch" else {}
        status, body = script.reply(op, args, NOW)
        msgpack.packb(body, use_bin_type=True)  # an answer the server can send
        if op == "node_hello" and isinstance(body, dict) and len(body.get("challenge", b"")) == 32:
            assert body["ed25519_public"] == world.nodes[2].ed25519_public
            steps["hello"] += 1
        if op == "onion":
            assert status == 400  # relayed back to the fuzzer as it is: must not look like the victim's 500
        try:
            steps[op] += bool({"ae_digest": core.ae_digest_reply, "ae_hashes": core.ae_hashes_reply,
                               "ae_fetch": core.ae_fetch_reply}.get(op, lambda b: None)(body))
        except RequestError:
            steps["refused"] += 1
    # Mostly right, so that a round goes on to the next step; sometimes wrong at each.
    assert steps["hello"] > 30 and steps["ae_digest"] > 20 and steps["ae_hashes"] > 20 and steps["ae_fetch"] > 10, steps
    assert steps["refused"] > 10


# --------------------------------------------------------------------------- the generator and the judge


def test_generator_makes_well_framed_requests_for_every_op():
    world, draw, ops, keyed, kinds = toy_world(), RandomDraw(7), Counter(), Counter(), Counter()
    for i in range(3000):
        kind = ("anon", "member", "stranger", "registry")[i % 4]
        f = make_registry_frame(draw, world, NOW) if kind == "registry" else \
            make_frame(draw, world, world.nodes[i % 6], kind, NOW)
        body = msgpack.packb({"id": i, "op": f.op, "args": f.args}, use_bin_type=True)
        assert len(body) <= MAX_BODY
        # A well-framed request: the node's own decoder reads it with its id.
        assert msgpack.unpackb(body, raw=False, strict_map_key=True)["id"] == i
        assert 0 < len(f.op) <= 64 and isinstance(f.args, dict)
        ops[f.op] += 1
        kinds[(f.kind, f.expect is not None)] += 1
        keyed[f.reply_key is not None] += 1
        if f.op == "admin_stop":
            assert f.args.get("token") != world.admin_token  # never stops a node
    served = CLIENT_OPS | NODE_OPS | HANDSHAKE_OPS | ADMIN_OPS | set(fuzz.REGISTRY_OPS)
    assert served <= set(ops), served - set(ops)
    assert sum(v for op, v in ops.items() if op not in served) > 50  # unknown ops too
    assert keyed[True] > 100  # onion layers the fuzzer can open the answers of
    assert world.listen_budget >= 0


def test_judge_catches_500s_unlisted_statuses_broken_rules_and_sealed_500s():
    plain = Frame("n01", "anon", "store", {})
    assert judge(plain, 400, {"error": "x"}).problem is None
    assert "500" in judge(plain, 500, {"error": "internal error"}).problem
    assert "not in PROTOCOL" in judge(plain, 418, None).problem
    strict = Frame("n01", "anon", "replicate", {}, expect=frozenset({401}))
    assert judge(strict, 401, {}).problem is None
    assert "allow only [401]" in judge(strict, 200, {}).problem
    key = bytes(range(32))
    sealed = Frame("n01", "anon", "onion", {}, reply_key=key, inner_op="store", pubkey=ACCOUNTS[0].session_id)
    ok = judge(sealed, 200, {"data": encode_reply(key, 200, {"hash": "h"})})
    assert ok.problem is None and ok.inner_status == 200 and ok.stored == (ACCOUNTS[0].session_id, "h")
    assert "inner 500" in judge(sealed, 200, {"data": encode_reply(key, 500, {})}).problem
    assert "does not open" in judge(sealed, 200, {"data": b"\0" * 60}).problem


def test_log_scan_and_integrity_check_can_fail(tmp_path):
    clean, bad = tmp_path / "a.log", tmp_path / "b.log"
    clean.write_text('{"level": "info", "event": "listening"}\n')
    bad.write_text('{"level": "info"}\n{"level": "error", "event": "handler for \'x\' failed", '
                   '"exc": "Traceback (most recent call last):"}\n')
    hits = scan_logs([clean, bad])
    assert [(h["file"], h["line"]) for h in hits] == [(str(bad), 2)]
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
    assert integrity_check(db) == "ok"
    data = bytearray(db.read_bytes())
    for page in range(1, len(data) // 4096):
        data[page * 4096] = 0x0E  # no such b-tree page type
    db.write_bytes(bytes(data))
    assert integrity_check(db) != "ok"


# --------------------------------------------------------------------------- the detector, made to fail


async def broken_handler(req, peer):
    """A node with one unchecked argument: a 500 for most stores (what the fuzzer must catch)."""
    if req.op == "store":
        if req.args["ttl"] + 1 > 0:  # KeyError, TypeError: unchecked
            raise RequestError(Status.BAD_REQUEST, "no")
    raise RequestError(Status.NOT_FOUND, "unknown op")


async def test_the_fuzzer_reports_the_500_and_its_frame():
    async with trio.open_nursery() as nursery:
        ((host, port),) = await nursery.start(lambda task_status: serve(broken_handler, [("127.0.0.1", 0)],
                                                                        task_status=task_status))
        world = toy_world(port, nodes=1)
        tally = Tally()
        conns = await open_connections(world, nursery, tally, iter(["127.0.0.1"] * 4), anon_per_node=1)
        budget = Budget(300)
        async with trio.open_nursery() as pumps:
            for w in range(4):
                pumps.start_soon(pump, Fuzzer(world, tally, timeout_s=5), conns[0], RandomDraw(w), budget)
        nursery.cancel_scope.cancel()
    assert tally.sent == 300 and tally.answered == 300 and tally.dropped == 0
    assert tally.statuses[500] > 0 and tally.failure_count >= tally.statuses[500]
    found = [f for f in tally.failures if f["problem"].startswith("500")]
    assert found and all(f["op"] == "store" for f in found)
    assert "store {" in found[0]["frame"]  # the args that did it


async def test_the_fuzzer_reports_a_dropped_connection_and_its_lost_requests():
    async def hang_up(stream):
        await stream.receive_some(10)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, hang_up, [listener])
        port = listener.socket.getsockname()[1]
        world, tally = toy_world(port, nodes=1), Tally()
        conn = await FuzzConn.open("127.0.0.1", port, None, name="c", kind="anon", target=world.nodes[0], tally=tally)
        nursery.start_soon(conn.run)
        frames = [Frame("n00", "anon", "info", {}) for _ in range(3)]
        await send_all(Fuzzer(world, tally, timeout_s=5), [(conn, f) for f in frames])
        nursery.cancel_scope.cancel()
    assert tally.dropped == 1 and tally.answered == 0 and tally.lost == 3
    assert any(f["problem"] == "connection closed by the other end" for f in tally.failures)


# --------------------------------------------------------------------------- the property, against real nodes


class HypothesisDraw(Draw):
    """Choices from Hypothesis (so a failure shrinks); bulk bytes from a stream it seeds."""

    def __init__(self, data) -> None:
        self.data = data
        self.rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="bytes seed"))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def binary(self, size: int) -> bytes:
        return self.data.draw(st.binary(min_size=size, max_size=size)) if size <= 4 else self.rng.randbytes(size)

    def text(self, max_size: int) -> str:
        return self.data.draw(st.text(max_size=max_size))


@pytest.mark.network
async def test_no_frame_gets_a_500_a_hang_up_or_kills_a_node(tmp_path):
    """Any frames, on any kind of connection (nobody, a member of the swarm, a node of
    another swarm, the registry): every answer is a listed status other than 500 (an
    onion target's sealed one too), exactly one per request, no connection closes; and
    afterwards every node runs, its database is intact and no log holds a traceback."""
    async with running_testnet(tmp_path, nodes=6, min_swarm=1, users=1, capture=False) as net:
        world = await world_of(net, seed=1)
        assert len({n.swarm_id for n in world.nodes}) == 2  # members and strangers both exist
        tally, links = Tally(), Tally()  # all examples' answers; the connections' own events
        async with trio.open_nursery() as nursery:
            conns = await open_connections(world, nursery, links, source_hosts(net.plan.block),
                                           anon_per_node=1, registry=net.registry_address)
            nursery.start_soon(keep_alive, conns)
            # Meanwhile, in each swarm, one node does anti-entropy with a fake peer answering garbage.
            assert len(await start_fake_peers(net, world, nursery, links.peer_replies,
                                              source_hosts(net.plan.block, first=240), seed=1)) == 2
            assert Counter(c.kind for c in conns) == {"anon": 6, "member": 6, "stranger": 6, "registry": 1}
            started = time.monotonic()

            # No shrinking: each attempt is real I/O (minutes), and the failure already names
            # the frame that did it.
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=(Phase.explicit, Phase.generate),
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(st.data())
            def batch(data):
                draw = HypothesisDraw(data)
                pairs = []
                for _ in range(draw.integer(1, 20)):
                    conn = draw.choice(conns)
                    now = int(time.time() * 1000)
                    frame = make_registry_frame(draw, world, now) if conn.kind == "registry" else \
                        make_frame(draw, world, conn.target, conn.kind, now)
                    pairs.append((conn, frame))
                example = Tally()
                trio.from_thread.run(send_all, Fuzzer(world, example, timeout_s=40), pairs)
                tally.merge(example)
                assert example.failure_count == 0, example.failures
                assert links.failure_count == 0, links.failures

            await trio.to_thread.run_sync(batch)
            print(f"{tally.sent} frames in {time.monotonic() - started:.1f} s; fake peers: {links.peer_replies}")
            for conn in conns:
                await conn.aclose()
            nursery.cancel_scope.cancel()
        assert tally.sent >= 2000, tally.sent
        assert tally.failure_count == 0, tally.failures
        assert tally.unanswered == tally.lost == links.dropped == links.unmatched == 0
        # The deep paths were reached: signed ops and node ops past validation, refusals of
        # non-members, sealed onion answers.
        for key in ("replicate 200", "ae_fetch 200", "node_hello 200"):
            assert tally.op_status[key] > 0, key
        assert tally.kind_status["stranger 403"] > 0 and tally.kind_status["anon 401"] > 0
        assert sum(tally.inner_status.values()) > 0
        assert links.peer_replies["ae_digest"] > 0
        await restore(net, links)
        assert links.failure_count == 0, links.failures
        assert exited_nodes(net) == []
        assert {name: integrity_check(rt.plan.db) for name, rt in net.nodes.items()} == \
            {name: "ok" for name in net.nodes}
        assert scan_logs(net.run_dir.rglob("*.log")) == []


def test_a_node_listens_on_loopback_or_its_own_cluster_address_only():
    assert core.listen_address(["10.213.47.11", 0], "a", "10.213.47.11") == ("10.213.47.11", 0)
    assert core.listen_address(["127.0.0.1", 5], "a", "10.213.47.11") == ("127.0.0.1", 5)
    for host, own in (("10.213.47.12", "10.213.47.11"), ("0.0.0.0", "10.213.47.11"), ("10.213.47.11", "127.1.1.1")):
        assert status_of(core.listen_address, [host, 1], "a", own) == Status.BAD_REQUEST, host
    assert status_of(core.listen_address, ["10.213.47.11", 70000], "a", "10.213.47.11") == Status.BAD_REQUEST
