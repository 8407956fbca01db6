"""Checkers on synthetic ground truth: histories, SQLite files and captures
built with the real crypto, each property shown able to fail."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from chaos.checkers.delivery import check_delivery, percentiles
from chaos.checkers.replication import check_replication, load_ground_truth
from chaos.checkers.unlinkability import check_unlinkability, scan_for_plaintext
from chaos.checkers.verdict import exit_code, run_checks, summary
from clients.client import ServiceNode, build_onion
from nodes.capture import CaptureFile
from testnet.base.onion import encode_reply, parse_layer
from nodes.storage import Storage, StoredMessage
from testnet.base import crypto
from testnet.base.protocol import Connection, Request, Response
from testnet.base.swarm import swarm_for

SID = {"alice": "05" + "a1" * 32, "bob": "05" + "b2" * 32, "carol": "05" + "c3" * 32}


# ---------------------------------------------------------------- delivery


def invoke(mid, frm, to, t=1000, digest="d0"):
    return {"type": "invoke", "op": "send", "process": frm, "msg_id": mid, "from": frm, "to": to,
            "namespace": 0, "body_digest": digest, "t": t, "hash": f"h-{mid}"}


def done(mid, kind="ok", t=1100, frm="alice"):
    rec = {"type": kind, "op": "send", "process": frm, "msg_id": mid, "t": t}
    if kind == "ok":
        rec["hash"] = f"h-{mid}"
    return rec


def receive(who, mid, t=1500, digest="d0", sender="alice", h=None, error=None):
    return {"type": "ok", "op": "receive", "process": who, "hash": h or f"h-{mid}", "namespace": 0,
            "msg_id": None if error else mid, "sender": None if error else SID[sender],
            "body_digest": None if error else digest, "error": error, "t": t}


def sent_ok(mid, frm="alice", to="bob", t=1000):
    return [invoke(mid, frm, to, t), done(mid, "ok", t + 100, frm)]


def test_delivery_all_delivered_is_valid_with_latency():
    h = sent_ok("m1") + sent_ok("m2", t=2000) + [receive("bob", "m1", t=1300), receive("bob", "m2", t=2500)]
    v = check_delivery(h, SID)
    assert v["valid"] is True
    assert v["counts"]["delivered"] == 2 and v["counts"]["lost"] == 0
    assert v["latency_ms"]["count"] == 2 and v["latency_ms"]["max"] == 500 and v["latency_ms"]["p50"] == 300


def test_delivery_lost():
    h = sent_ok("m1") + sent_ok("m2") + [receive("bob", "m1")]
    v = check_delivery(h, SID, now_ms=5100)
    assert v["valid"] is False and v["lost"] == ["m2"] and v["counts"]["lost"] == 1
    assert v["lost_detail"][0]["age_ms"] == 4000


def test_delivery_duplicated_under_another_hash():
    h = sent_ok("m1") + [receive("bob", "m1"), receive("bob", "m1", h="other-hash", t=1600)]
    v = check_delivery(h, SID)
    assert v["valid"] is False and v["duplicated"] == ["m1"]


def test_delivery_corrupted_digest():
    h = sent_ok("m1") + [receive("bob", "m1", digest="ff")]
    v = check_delivery(h, SID)
    assert v["valid"] is False and v["corrupted"] == ["m1"]


def test_delivery_wrong_sender():
    h = sent_ok("m1") + [receive("bob", "m1", sender="carol")]
    v = check_delivery(h, SID)
    assert v["valid"] is False and v["wrong_sender"] == ["m1"] and not v["corrupted"]


def test_delivery_misdelivered_wrong_inbox_and_wrong_opener():
    # carol's inbox served bob's message (she cannot open it), and a message to bob opened by carol.
    h = sent_ok("m1") + sent_ok("m2") + [receive("bob", "m1"), receive("carol", "m1", error="DecryptionError"),
                                         receive("carol", "m2")]
    v = check_delivery(h, SID)
    assert v["valid"] is False
    assert {(m["msg_id"], m["process"]) for m in v["misdelivered"]} == {("m1", "carol"), ("m2", "carol")}
    assert v["lost"] == ["m2"]  # bob never got it


def test_delivery_recipient_cannot_open_is_corrupted():
    h = sent_ok("m1") + [receive("bob", "m1", error="BadSignature")]
    v = check_delivery(h, SID)
    assert v["valid"] is False and v["corrupted"] == ["m1"] and not v["misdelivered"]


def test_delivery_unexpected():
    h = sent_ok("m1") + [receive("bob", "m1"), receive("bob", "never-sent")]
    v = check_delivery(h, SID)
    assert v["valid"] is False and v["unexpected"][0]["msg_id"] == "never-sent"


def test_delivery_recovered_and_unknown_are_not_failures():
    h = sent_ok("m1") + [invoke("m2", "alice", "bob"), done("m2", "info"), invoke("m3", "alice", "bob"),
                         done("m3", "info"), invoke("m4", "alice", "bob"),  # no completion at all
                         receive("bob", "m1"), receive("bob", "m2")]
    v = check_delivery(h, SID)
    assert v["valid"] is True
    assert v["recovered"] == ["m2"] and sorted(v["unknown"]) == ["m3", "m4"]


def test_delivery_failed_and_fail_but_delivered():
    h = sent_ok("m1") + [receive("bob", "m1"), invoke("m2", "alice", "bob"), done("m2", "fail")]
    assert check_delivery(h, SID)["valid"] is True
    assert check_delivery(h, SID)["failed"] == ["m2"]
    v = check_delivery(h + [receive("bob", "m2")], SID)
    assert v["valid"] is False and v["fail-but-delivered"] == ["m2"]


def test_delivery_lists_capped_counts_complete():
    h = list(itertools.chain.from_iterable(sent_ok(f"m{i}") for i in range(150)))
    v = check_delivery(h, SID)
    assert v["counts"]["lost"] == 150 and len(v["lost"]) == 100


def test_delivery_nothing_acknowledged_is_unknown():
    v = check_delivery([invoke("m1", "alice", "bob"), done("m1", "fail")], SID)
    assert v["valid"] == "unknown"


def test_percentiles_nearest_rank():
    p = percentiles(range(1, 101))
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50, 95, 99, 100)


# ---------------------------------------------------------------- replication

ALICE, BOB, CAROL = (crypto.Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
USERS = {"alice": ALICE, "bob": BOB, "carol": CAROL}
SWARMS = {"n1": 1 << 60, "n2": 1 << 60, "n3": 1 << 62, "n4": 1 << 62}
NOW = 10_000_000


def write_run(tmp_path: Path, node_entries: list[dict], ingress: dict | None = None) -> Path:
    run = {"run_id": "test", "nodes": node_entries, "ingress": ingress or {},
           "users": [{"name": n, "session_id": i.session_id, "ed25519_public": i.ed25519_public.hex(),
                      "host": f"127.0.2.{k}"} for k, (n, i) in enumerate(USERS.items(), 1)]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    return tmp_path


def bob_swarm() -> tuple[list[str], list[str]]:
    sid = swarm_for(BOB.session_id, sorted(set(SWARMS.values())))
    members = sorted(n for n, s in SWARMS.items() if s == sid)
    return members, sorted(set(SWARMS) - set(members))


def fill(tmp_path: Path, holders: dict[str, list[StoredMessage]]) -> Path:
    entries = []
    for name in SWARMS:
        d = tmp_path / "nodes" / name
        d.mkdir(parents=True, exist_ok=True)
        store = Storage(d / "db.sqlite")
        store.store_many(holders.get(name, []))
        store.close()
        entries.append({"name": name, "db": f"nodes/{name}/db.sqlite", "swarm_id": SWARMS[name], "state": "running"})
    return write_run(tmp_path, entries)


def message(i: int, t: int = NOW - 5_000) -> tuple[StoredMessage, list[dict]]:
    data = f"sealed-{i}".encode()
    h = crypto.message_hash(BOB.session_id, 0, data)
    msg = StoredMessage(BOB.session_id, 0, h, data, t, t + 3_600_000)
    history = [{**invoke(f"m{i}", "alice", "bob", t), "hash": h, "ttl_ms": 3_600_000},
               {**done(f"m{i}", "ok", t + 50), "hash": h}]
    return msg, history


def test_replication_all_members_hold_it(tmp_path):
    members, _ = bob_swarm()
    msg, hist = message(1)
    run = fill(tmp_path, {n: [msg] for n in members})
    v = check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["valid"] is True and v["counts"]["checked"] == 1


def test_replication_missing_on_live_member_fails_dead_member_excused(tmp_path):
    members, _ = bob_swarm()
    msg, hist = message(1)
    run = fill(tmp_path, {members[0]: [msg]})
    v = check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["valid"] is False and v["missing"][0]["missing_on"] == members[1:]
    v = check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS) - set(members[1:]))
    assert v["valid"] is True


def test_replication_stray_fails_only_after_grace(tmp_path):
    members, outsiders = bob_swarm()
    msg, hist = message(1)
    run = fill(tmp_path, {n: [msg] for n in members + outsiders[:1]})
    v = check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS), grace_ms=60_000)
    assert v["valid"] is True and v["stray"][0]["stray_on"] == outsiders[:1] and v["counts"]["stray"] == 1
    v = check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS), grace_ms=1_000)
    assert v["valid"] is False and v["counts"]["stray_after_grace"] == 1


def test_replication_deleted_and_expired_not_required(tmp_path):
    _msg, hist = message(1)
    _old, old_hist = message(2, t=NOW - 4_000_000)  # ttl 1 h: expired by now
    run = fill(tmp_path, {})
    deletes = [{"type": "invoke", "op": "delete", "process": "bob", "msg_id": "d1", "hashes": [hist[0]["hash"]]},
               {"type": "ok", "op": "delete", "process": "bob", "msg_id": "d1"}]
    v = check_replication(run, hist + old_hist + deletes, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["counts"]["deleted"] == 1 and v["counts"]["expired"] == 1 and v["valid"] == "unknown"
    assert check_replication(run, hist, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))["valid"] is False


def test_replication_an_acknowledged_delete_must_stay_deleted(tmp_path):
    members, _ = bob_swarm()
    gone, hist = message(1)
    kept, kept_hist = message(2)
    run = fill(tmp_path, {n: [kept] + ([gone] if n == members[-1] else []) for n in members})
    delete = [{"type": "invoke", "op": "delete", "process": "bob", "id": "bob-del-1", "hashes": [gone.hash]}]
    ok = delete + [{"type": "ok", "op": "delete", "process": "bob", "id": "bob-del-1"}]
    v = check_replication(run, hist + kept_hist + ok, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["valid"] is False and v["counts"]["resurrected"] == 1
    assert v["resurrected"][0]["held_by"] == [members[-1]]
    assert "deleted but still held: 1" in summary({"valid": False, "checkers": {"replication": v}})
    # A dead holder is excused (it may still learn of the delete); an unknown-outcome delete proves nothing.
    v = check_replication(run, hist + kept_hist + ok, now_ms=NOW, swarms=SWARMS, live=set(SWARMS) - {members[-1]})
    assert v["counts"]["resurrected"] == 0
    # Only the recipient's delete counts: alice (handed bob's message by a broken node) deletes nothing.
    by_alice = [dict(r, process="alice") for r in ok]
    v = check_replication(run, hist + kept_hist + by_alice, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["counts"]["deleted"] == 0 and v["counts"]["resurrected"] == 0
    info = delete + [{"type": "info", "op": "delete", "process": "bob", "id": "bob-del-1"}]
    v = check_replication(run, hist + kept_hist + info, now_ms=NOW, swarms=SWARMS, live=set(SWARMS))
    assert v["valid"] is True and v["counts"]["deleted"] == 1 and v["counts"]["resurrected"] == 0


# ---------------------------------------------------------------- unlinkability


class NodeSim:
    """An honest node for the capture: opens its layer, relays, answers; records its bytes."""

    ids = itertools.count(1)

    def __init__(self, root: Path, k: int) -> None:
        self.name = f"n{k}"
        self.identity = crypto.Identity.from_seed(bytes([100 + k]) * 32)
        self.host, self.port = f"127.0.1.{k}", 20_000 + k
        d = root / "nodes" / self.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "seed").write_text(self.identity.seed.hex() + "\n")
        self.capture = CaptureFile(str(d / "capture.bin"))
        self.wire = ServiceNode(self.identity.ed25519_public.hex(), self.identity.x25519_public.hex(),
                                self.host, self.port, 0)

    def entry(self) -> dict:
        return {"name": self.name, "host": self.host, "port": self.port, "ed25519_public": self.wire.ed25519_public,
                "x25519_public": self.wire.x25519_public, "db": f"nodes/{self.name}/db.sqlite", "swarm_id": 0}

    def record(self, cid, direction, local, remote, data: bytes) -> None:
        half = len(data) // 2  # split frames across records: the checker must reassemble them
        self.capture.record(cid, direction, local, remote, data[:half])
        self.capture.record(cid, direction, local, remote, data[half:])

    def serve(self, net: dict, eph: bytes, blob: bytes, remote, local) -> dict:
        cid = next(self.ids)
        self.record(cid, "in", local, remote, Connection().send(Request(5, "onion", {"ephemeral_key": eph, "data": blob})))
        plaintext, key = crypto.open_layer_keyed(blob, self.identity.x25519_secret, eph)
        kind, what = parse_layer(plaintext)
        if kind == "relay":
            nxt = net[what[0]]
            out_cid, mine, theirs = next(self.ids), (self.host, 40_000 + cid), (nxt.host, nxt.port)
            self.record(out_cid, "out", mine, theirs,
                        Connection().send(Request(9, "onion", {"ephemeral_key": what[1], "data": what[2]})))
            body = nxt.serve(net, what[1], what[2], mine, theirs)
            self.record(out_cid, "in", mine, theirs, Connection().send(Response(9, 200, body)))
        else:
            op, args = what
            answer = {"hash": crypto.message_hash(args["pubkey"], 0, args["data"])} if op == "store" else {"messages": []}
            body = {"data": encode_reply(key, 200, answer)}
        self.record(cid, "out", local, remote, Connection().send(Response(5, 200, body)))
        return body


@pytest.fixture
def net(tmp_path):
    nodes = [NodeSim(tmp_path, k) for k in range(1, 6)]
    yield {n.wire.ed25519_public: n for n in nodes}, nodes, tmp_path
    for n in nodes:
        n.capture.close()


def send(net_map, nodes, root, *, hops, extra=None, via_ingress=None, op="store", who=ALICE, to=BOB, mid="m1"):
    """One onion request from ``who``; returns its history records."""
    data = crypto.seal_message(who, to.session_id, b"hello " + mid.encode())
    if op == "store":
        args = {"pubkey": to.session_id, "namespace": 0, "data": data, "ttl": 60_000, "timestamp": 1}
    else:
        args = {"pubkey": who.session_id, "namespace": 0, "last_hash": "", "timestamp": 1,
                "pubkey_ed25519": who.ed25519_public.hex(), "signature": b"s" * 64}
    path, target = [nodes[i].wire for i in hops[:-1]], nodes[hops[-1]].wire
    eph, blob, _key = build_onion(path, target, op, args, extra)
    first = net_map[(path[0] if path else target).ed25519_public]
    host = next(u["host"] for u in json.loads((root / "run.json").read_text())["users"]
                if u["session_id"] == who.session_id)
    if via_ingress:  # through Toxiproxy: the node sees the proxy's address on a per-user port
        remote, local = ("127.0.3.99", 33_000), (first.host, via_ingress)
    else:
        remote, local = (host, 50_000), (first.host, first.port)
    first.serve(net_map, eph, blob, remote, local)
    for n in nodes:
        n.capture.flush()
    name = {ALICE.session_id: "alice", BOB.session_id: "bob"}
    h = crypto.message_hash(to.session_id, 0, data)
    return [{**invoke(mid, name[who.session_id], name[to.session_id]), "hash": h}, {**done(mid), "hash": h}] \
        if op == "store" else []


def test_unlinkability_honest_path_only_guard_and_target_collude(net):
    net_map, nodes, root = net
    write_run(root, [n.entry() for n in nodes])
    hist = send(net_map, nodes, root, hops=[0, 1, 2, 3])
    send(net_map, nodes, root, hops=[4, 1, 2, 3], op="retrieve")  # alice reads her own inbox
    v = check_unlinkability(root, hist)
    assert v["valid"] is True, v["linked"]
    m = v["messages"][0]
    assert m["paths_seen"] == 1 and m["linked_by"] == {}
    assert m["min_collusion"] == {"nodes": ["n1", "n4"], "roles": ["guard", "target"], "size": 2}
    assert v["sender_id_seen_by"] == []  # her own retrieve names her only as its account
    assert v["per_node"]["n1"]["clients_seen"] == {"alice": 1}


def test_unlinkability_guard_known_by_ingress_port(net):
    net_map, nodes, root = net
    write_run(root, [n.entry() for n in nodes], ingress={"n2": {"alice": 31_002}})
    hist = send(net_map, nodes, root, hops=[1, 0, 4, 2], via_ingress=31_002)
    v = check_unlinkability(root, hist)
    assert v["valid"] is True
    assert v["messages"][0]["min_collusion"]["nodes"] == ["n2", "n3"]


def test_unlinkability_one_hop_path_links(net):
    net_map, nodes, root = net
    write_run(root, [n.entry() for n in nodes])
    hist = send(net_map, nodes, root, hops=[2])
    v = check_unlinkability(root, hist)
    assert v["valid"] is False
    assert list(v["linked"][0]["linked_by"]) == ["n3"]
    assert v["linked"][0]["linked_by"]["n3"]["sender_end"] == ["address of alice"]
    assert v["messages"][0]["min_collusion"]["size"] == 1


def test_unlinkability_client_id_in_layers_links_at_target(net):
    net_map, nodes, root = net
    write_run(root, [n.entry() for n in nodes])
    hist = send(net_map, nodes, root, hops=[0, 1, 2, 3], extra={"client": ALICE.session_id})
    v = check_unlinkability(root, hist)
    assert v["valid"] is False
    assert v["linked"][0]["linked_by"]["n4"] == {"sender_end": ["id of alice"], "recipient_end": ["id of bob"]}
    assert "n1" not in v["linked"][0]["linked_by"]  # the guard sees alice, never bob
    assert {s["node"] for s in v["sender_id_seen_by"]} == {"n1", "n2", "n3", "n4"}


def test_unlinkability_without_captures_is_unknown(tmp_path):
    write_run(tmp_path, [{"name": "n1", "db": "nodes/n1/db.sqlite"}])
    v = check_unlinkability(tmp_path, [])
    assert v["valid"] == "unknown" and "n1" in v["nodes_missing_capture"]


def test_scan_for_plaintext_finds_canaries_in_db_and_log(tmp_path):
    d = tmp_path / "nodes" / "n1"
    d.mkdir(parents=True)
    store = Storage(d / "db.sqlite")
    store.store(StoredMessage(BOB.session_id, 0, "h1", b"xx CANARY-DB xx", 1, 10**13))
    store.close()
    (d / "node.log").write_text('{"event": "x", "note": "CANARY-LOG CANARY-LOG"}\n')
    write_run(tmp_path, [{"name": "n1", "db": "nodes/n1/db.sqlite", "log": "nodes/n1/node.log"}])
    found = scan_for_plaintext(tmp_path, {"db": b"CANARY-DB", "log": b"CANARY-LOG", "absent": b"NOPE"})
    assert {(f["kind"], f["needle"]) for f in found} == {("db", "db"), ("log", "log")}
    assert next(f for f in found if f["needle"] == "log")["count"] == 2
    assert load_ground_truth(tmp_path).users["bob"] == BOB.session_id


# ---------------------------------------------------------------- combined verdict


def test_run_checks_writes_verdict_and_exit_codes(tmp_path):
    members, _ = bob_swarm()
    msg, hist = message(1)
    run = fill(tmp_path, {n: [msg] for n in members})
    lines = hist + [{"type": "ok", "op": "receive", "process": "bob", "hash": msg.hash, "namespace": 0,
                     "msg_id": "m1", "sender": ALICE.session_id, "body_digest": "d0", "error": None, "t": NOW}]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn": ')
    v = run_checks(run, checkers=("delivery", "replication"), swarms=SWARMS, live=set(SWARMS), now_ms=NOW)
    assert v["valid"] is True and exit_code(v) == 0
    assert json.loads((run / "verdict.json").read_text())["checkers"]["delivery"]["valid"] is True
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))  # never received
    v = run_checks(run, checkers=("delivery", "replication"), swarms=SWARMS, live=set(SWARMS), now_ms=NOW)
    assert v["valid"] is False and exit_code(v) == 1 and "lost: 1" in summary(v)
    v = run_checks(run, checkers=("unlinkability",), now_ms=NOW)  # no captures: cannot judge
    assert exit_code(v) == 2 and "unlinkability: unknown" in summary(v)


def test_foreign_messages_are_not_judged_but_undecryptable_ones_are():
    from chaos.checkers.delivery import check_delivery

    users = {"alice": "05" + "aa" * 32, "bob": "05" + "bb" * 32}
    base = [
        {"t": 1, "type": "invoke", "op": "send", "process": "alice", "msg_id": "alice-1", "from": "alice",
         "to": "bob", "body_digest": "d1", "hash": "h1"},
        {"t": 2, "type": "ok", "op": "send", "process": "alice", "msg_id": "alice-1", "hash": "h1"},
        {"t": 3, "type": "ok", "op": "receive", "process": "bob", "hash": "h1", "msg_id": "alice-1",
         "sender": users["alice"], "body_digest": "d1", "error": None},
    ]
    foreign = {"t": 4, "type": "ok", "op": "receive", "process": "bob", "hash": "hx", "msg_id": None,
               "sender": users["alice"], "body_digest": "zz", "error": None, "foreign": True}
    v = check_delivery(base + [foreign], users)
    assert v["valid"] is True and v["counts"]["foreign"] == 1
    broken = dict(foreign, foreign=False, error="DecryptionError", sender=None)
    assert check_delivery(base + [broken], users)["valid"] is False


def test_fault_record_and_summary_say_how_the_schedule_played(tmp_path):
    from chaos.checkers.verdict import fault_record, summary

    assert fault_record(tmp_path) is None
    schedule = {"faults": [{"id": i, "kind": k} for i, k in
                           enumerate(["kill", "blackhole", "leave", "latency", "pause", "halves"], start=1)]}
    (tmp_path / "schedule.json").write_text(json.dumps(schedule))
    rows = [{"fault": 1, "kind": "kill", "phase": "start", "late_ms": 40},
            {"fault": 1, "kind": "kill", "phase": "end", "late_ms": 300},
            {"fault": 2, "kind": "blackhole", "phase": "error", "during": "start", "late_ms": 5200,
             "error": "BatchError: 3 of 40 Toxiproxy calls failed: 127.9.8.3:8474 cannot connect (refused) x3",
             "failures": [{"error": "BatchError: ...", "failed": 3, "calls": 40}]},
            {"fault": 3, "kind": "leave", "phase": "skipped", "error": "no such node"},
            {"fault": 4, "kind": "latency", "phase": "start", "late_ms": 45_000},
            {"fault": 4, "kind": "latency", "phase": "end", "late_ms": 900},
            {"fault": 5, "kind": "pause", "phase": "start", "late_ms": 10}]  # 5 never healed, 6 never started
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = fault_record(tmp_path)
    assert (rec["planned"], rec["started"], rec["healed"]) == (6, 3, 2)
    assert [e["fault"] for e in rec["errors"]] == [2] and [e["fault"] for e in rec["skipped"]] == [3]
    assert rec["late"] == [{"fault": 4, "kind": "latency", "phase": "start", "late_ms": 45_000}]
    assert rec["worst"] == {"fault": 4, "kind": "latency", "phase": "start", "late_ms": 45_000}
    assert rec["unplayed"] == [{"fault": 5, "kind": "pause", "why": "never healed"},
                               {"fault": 6, "kind": "halves", "why": "never started"}]
    assert rec["valid"] == "unknown" and rec["why"] == [
        "fault 2 blackhole: failed to start: BatchError: 3 of 40 Toxiproxy calls failed: 127.9.8.3:8474 "
        "cannot connect (refused) x3",
        "fault 3 leave: skipped: no such node",
        "fault 4 latency: started 45.00 s late (tolerance 1.00 s)",
        "fault 5 pause: never healed", "fault 6 halves: never started"]
    text = summary({"valid": "unknown", "faults": rec, "checkers": {}})
    assert text.startswith("verdict: unknown\nfaults: 3 of 6 started, 2 healed, 1 skipped, 1 failed; worst lateness "
                           "45.00 s (fault 4 latency, start; tolerance 1 s)\nharness error:")
    assert "  fault 4 latency: started 45.00 s late" in text and "sub-exception" not in text
    # On time and complete: valid; a record from before lateness was recorded is not judged late.
    rows = [{"fault": 1, "kind": "kill", "phase": "start", "late_ms": 999}, {"fault": 1, "kind": "kill", "phase": "end"}]
    (tmp_path / "schedule.json").write_text(json.dumps({"faults": [{"id": 1, "kind": "kill"}]}))
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = fault_record(tmp_path)
    assert rec["valid"] is True and rec["why"] == [] and rec["worst"]["late_ms"] == 999


def test_a_run_that_did_not_play_its_schedule_is_unknown_whatever_the_checkers_say(tmp_path):
    members, _ = bob_swarm()
    msg, hist = message(1)
    run = fill(tmp_path, {n: [msg] for n in members})
    got = {"type": "ok", "op": "receive", "process": "bob", "hash": msg.hash, "namespace": 0, "msg_id": "m1",
           "sender": ALICE.session_id, "body_digest": "d0", "error": None, "t": NOW}
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist + [got]))
    (run / "schedule.json").write_text(json.dumps({"faults": [{"id": 1, "kind": "kill"}]}))
    start = json.dumps({"fault": 1, "kind": "kill", "phase": "start", "late_ms": 0}) + "\n"
    (run / "faults.jsonl").write_text(start + json.dumps({"fault": 1, "kind": "kill", "phase": "end", "late_ms": 0})
                                      + "\n")
    check = {"checkers": ("delivery", "replication"), "swarms": SWARMS, "live": set(SWARMS), "now_ms": NOW}
    v = run_checks(run, **check)
    assert v["valid"] is True and v["faults"]["valid"] is True
    (run / "faults.jsonl").write_text(start)  # the heal never happened: a pass is not earned
    v = run_checks(run, **check)
    assert v["valid"] == "unknown" and exit_code(v) == 2 and v["faults"]["why"] == ["fault 1 kill: never healed"]
    assert "harness error" in summary(v)
    # Nor is a failure: a checker that failed still says so, but the run is unknown.
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
    v = run_checks(run, **check)
    assert v["valid"] == "unknown" and v["checkers"]["delivery"]["valid"] is False and exit_code(v) == 2


def test_capture_frames_cut_a_capture_as_capture_messages_does(tmp_path):
    """The undecoded reader the unlinkability checker uses: the same frames, connections and
    statistics as nodes.capture.capture_messages, so decoding only some changes nothing."""
    from collections import Counter

    from nodes.capture import capture_frames, capture_messages
    from testnet.base.protocol import decode_body, encode_frame

    path = tmp_path / "capture.bin"
    cap = CaptureFile(str(path), now_ms=itertools.count(1000).__next__)
    a, b = (("127.0.0.1", 1), ("127.0.0.2", 2)), (("127.0.0.1", 1), ("127.0.0.3", 3))
    onion = encode_frame({"id": 1, "op": "onion", "args": {"ephemeral_key": b"k" * 32, "data": b"x" * 40}})
    store = encode_frame({"id": 2, "op": "store", "args": {"data": b"onion"}})
    answer = encode_frame({"id": 1, "status": 200, "body": {"data": b"r"}})
    cap.record(1, "in", *a, onion[:7])  # a frame cut over two reads
    cap.record(1, "in", *a, onion[7:] + store)
    cap.record(1, "out", *a, answer)
    cap.record(2, "in", *b, b"\xff\xff\xff\xff broken")  # announces a frame past the limit
    cap.record(2, "in", *b, store)  # the stream is read no further
    cap.record(2, "out", *b, encode_frame({"id": 9, "status": 421, "body": None}))
    cap.close()
    with open(path, "ab") as f:
        f.write(b"\x93\x01\x02\x03")  # a record of the wrong shape
        f.write(b"\x96\xcd")  # torn
    want_stats, got_stats = Counter(), Counter()
    want = list(capture_messages(str(path), stats=want_stats))
    got = [(*rest, decode_body(body)) for *rest, body in capture_frames(str(path), stats=got_stats)]
    assert got == want and len(want) == 4
    assert got_stats == want_stats == Counter(bad_records=1, broken_streams=1)
