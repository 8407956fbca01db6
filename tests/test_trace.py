"""swarmnet trace: a message's journey rebuilt from a run directory alone.

One small real run is built once for the module (7 nodes, direct links, the
ack-before-commit bug, every node killed -9 and restarted once the sends are
done, so the last acknowledged messages are lost); the journeys of a
delivered and of a lost message are checked against what really happened,
and the Trace Event Format output is validated structurally.  The rest are
pure tests on synthetic inputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from chaos.trace.journey import FaultBand, journey, load_faults, load_run
from chaos.trace.view import render_text, run_trace_events, trace
from chaos.trace.events import FAULTS_PID, NODES_PID, USERS_PID, problems, trace_events
from clients.workload import UserSpec, run_workload
from testnet.controller import open_testnet

# The structural Trace Event Format check lives with the writer (chaos.trace.events.problems).
validate_trace_events = problems


# ---------------------------------------------------------------- one real run for the module

MESSAGES = 20
RATE = 3.0  # ~6.7 s of sends: the first ones are committed (3 s write-behind) before the kill, the last are not


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    rd = tmp_path_factory.mktemp("trace") / "run"
    info = {}

    async def build() -> None:
        async with open_testnet(nodes=7, users=3, min_swarm=3, links="direct", seed=5, check=False,
                                inject_bugs=("ack-before-commit",), run_dir=rd) as net:
            specs = [UserSpec(u.name, net.user_identity(u.name), net.user_host(u.name), net.user_links(u.name))
                     for u in net.plan.users]
            faults = open(rd / "faults.jsonl", "a", encoding="utf-8")

            async def kill_everything() -> None:
                # As the chaos runner would log it (RUNDIR/CHECKERS: faults.jsonl start/end with targets).
                names = sorted(net.nodes)
                faults.write(json.dumps({"t": int(time.time() * 1000), "fault": 1, "kind": "kill",
                                         "phase": "start", "targets": {"nodes": names}}) + "\n")
                for name in names:
                    await net.node_kill(name)
                for name in names:
                    await net.node_restart(name)
                faults.write(json.dumps({"t": int(time.time() * 1000), "fault": 1, "kind": "kill",
                                         "phase": "end", "targets": {"nodes": names}}) + "\n")
                faults.close()

            info["stats"] = await run_workload(specs, net.registry_address, rd / "history.jsonl",
                                               messages=MESSAGES, rate=RATE, seed=3, drain_s=2.0,
                                               before_drain=kill_everything)

    started = time.monotonic()
    trio.run(build)
    print(f"built the trace run in {time.monotonic() - started:.1f} s: {info['stats']}")
    return rd


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def _outcome(run, wanted: str) -> list[str]:
    from chaos.trace.journey import all_journeys

    return [j["msg_id"] for j in all_journeys(run) if j["outcomes"] == [wanted]]


@pytest.mark.network
def test_a_delivered_message_has_its_whole_journey(run):
    delivered = _outcome(run, "delivered")
    assert delivered, "the run delivered nothing"
    j = journey(run, delivered[0])
    sent = j["sent"]
    assert sent["done"] == "ok" and sent["attempts"] >= 1
    # The attempt the client was told about: hops in the path's order, then the target.
    told = [a for a in j["attempts"] if a["in_history"]]
    assert len(told) == 1, j["attempts"]
    hops = told[0]["hops"]
    assert len(hops) >= 4 and [h["node"] for h in hops] == sent["path"] + [sent["target"]]
    assert [h["role"] for h in hops] == ["guard", "relay", "relay", "target"]
    assert hops[0]["from"] == j["from"] and all(h["seen"] == "capture" for h in hops)
    assert all(h["arrived_t"] <= h["replied_t"] for h in hops)
    assert [h["arrived_t"] for h in hops] == sorted(h["arrived_t"] for h in hops)
    # The target's commit, and a copy on every member of the recipient's swarm.
    commit = next(c for c in j["commits"] if c["node"] == sent["target"])
    assert commit["status"] == 200
    members = set(j["swarm"]["members"])
    assert len(members) >= 3
    held = {commit["node"]} | {c["node"] for c in j["copies"] if c["arrived"]}
    assert members <= held, (members, j["copies"])
    assert {s["node"] for s in j["storage"] if s["row"]} >= members
    # The retrieve that returned it, and the receive the history recorded.
    first = [r for r in j["retrieves"] if r["first"]]
    assert len(first) == 1 and first[0]["user"] == j["to"] and first[0]["node"] in members
    assert [r["user"] for r in j["receives"]] == [j["to"]]
    assert j["trail"]["ends_at"] == j["to"]
    assert [e["t"] for e in j["events"]] == sorted(e["t"] for e in j["events"])
    text = render_text(j)
    assert f"message {j['msg_id']}" in text and "trail ends at" in text and sent["target"] in text


@pytest.mark.network
def test_a_lost_message_says_where_its_trail_ends(run):
    lost = _outcome(run, "lost")
    assert lost, "nothing was lost: the kill came too late"
    journeys = [journey(run, m) for m in lost]
    # The earliest lost message: its target's capture was flushed long before the kill.
    j = min(journeys, key=lambda j: j["sent"]["done_t"])
    target = j["sent"]["target"]
    assert j["commits"] and j["commits"][0]["node"] == target and j["commits"][0]["swarm"] == {target: 200}
    assert j["commits"][0]["source"] == "capture"
    assert not any(s["row"] for s in j["storage"]) and not any(c["arrived"] for c in j["copies"])
    assert j["trail"]["ends_at"] == target
    assert "no node has a row" in j["trail"]["why"] and "listed only itself" in j["trail"]["why"]
    kill = next(f for f in j["faults"] if f["fault"] == 1)
    assert f"{target} held a copy and has no row now" in kill["touches"]
    assert any("committed" in u for u in j["unknowns"])
    # Found by its hash and by a prefix of it, too.
    assert journey(run, j["hash"])["msg_id"] == j["msg_id"]
    assert journey(run, j["hash"][:10])["msg_id"] == j["msg_id"]


@pytest.mark.network
def test_the_whole_run_as_trace_events_is_valid(run, tmp_path):
    from chaos.trace.journey import all_journeys

    js = all_journeys(run)
    doc = run_trace_events(run, js)
    assert validate_trace_events(doc) == []
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    reread = json.loads(path.read_text())
    assert reread["displayTimeUnit"] == "ms"
    names = {e["args"]["name"] for e in reread["traceEvents"] if e["name"] == "thread_name"}
    assert {"alice", "bob", "carol"} <= {n.split(" #")[0] for n in names}
    assert any(n.startswith("fault 1: kill") for n in names)
    pids = {e["pid"] for e in reread["traceEvents"]}
    assert pids == {NODES_PID, USERS_PID, FAULTS_PID}


@pytest.mark.network
def test_cli_text_json_and_trace_events(run_dir, run, tmp_path):
    mid = _outcome(run, "delivered")[0]
    cli = CliRunner()
    out = cli.invoke(trace, [str(run_dir), mid])
    assert out.exit_code == 0, out.output
    assert "timeline" in out.output and "trail ends at" in out.output
    tf = tmp_path / "one.json"
    out = cli.invoke(trace, [str(run_dir), mid, "--json", "--trace-events", str(tf)])
    assert out.exit_code == 0, out.output
    j = json.loads(out.stdout)
    assert j["schema"] == 1 and j["msg_id"] == mid
    assert validate_trace_events(json.loads(tf.read_text())) == []
    out = cli.invoke(trace, [str(run_dir), "--all"])
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == MESSAGES
    out = cli.invoke(trace, [str(run_dir), "no-such-message"])
    assert out.exit_code == 1 and "no message" in out.output


# ---------------------------------------------------------------- pure tests


def band(kind, family, targets, start=100, end=200):
    return FaultBand(1, kind, family, start, end, targets)


def test_fault_bands_touch_the_right_nodes_and_links():
    kill = band("kill", "process", {"nodes": ["n02"]})
    assert kill.touches_node("n02") and not kill.touches_node("n03")
    assert not kill.touches_link("n01", "n02")  # a dead node is the node's fault, not its links'
    isolate = band("isolate", "partition", {"nodes": ["n03"]})
    assert isolate.touches_link("n03", "n05") and isolate.touches_link("n05", "n03")
    assert not isolate.touches_node("n03") and not isolate.touches_link("n01", "n02")
    one_way = band("one-way", "partition", {"side_a": ["n01"], "side_b": ["n02"], "one_way": True})
    assert one_way.touches_link("n01", "n02") and not one_way.touches_link("n02", "n01")
    assert not one_way.touches_link("alice", "n02", src_is_user=True)
    halves = band("halves", "partition", {"side_a": ["n01"], "side_b": ["n02"], "one_way": False})
    assert halves.touches_link("n02", "n01")
    latency = band("latency", "link", {"links": [["n01", "n02"]]})
    assert latency.touches_link("n01", "n02") and not latency.touches_link("n02", "n01")
    assert band("latency", "link", {"all_links": True}).touches_link("alice", "n09", src_is_user=True)
    assert kill.active(150) and kill.active(50, 100) and not kill.active(201, 300)
    assert band("kill", "process", {}, end=None).active(10_000)


def test_faults_jsonl_becomes_bands(tmp_path):
    p = tmp_path / "faults.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"t": 10, "fault": 1, "kind": "kill", "phase": "start", "targets": {"nodes": ["n01"]}},
        {"t": 12, "fault": 2, "kind": "latency", "phase": "start", "targets": {"links": [["n01", "n02"]]}},
        {"t": 20, "fault": 1, "kind": "kill", "phase": "end", "targets": {"nodes": ["n01"]}},
        {"t": 21, "fault": 3, "kind": "pause", "phase": "skipped", "error": "no such node"},
    ]) + "\n{torn")
    bands = load_faults(p)
    assert [(b.fault, b.kind, b.family, b.start_t, b.end_t) for b in bands] == \
        [(1, "kill", "process", 10, 20), (2, "latency", "link", 12, None)]
    assert bands[0].describe() == "kill n01" and bands[1].describe() == "latency n01->n02"


def _j(mid, events):
    return {"msg_id": mid, "hash": mid.upper(), "events": events}


def test_trace_events_lanes_shared_steps_and_metadata():
    retrieve = {"t": 1000, "end_t": 1005, "track": "n01", "kind": "retrieve", "text": "retrieve by bob returned it"}
    fault = {"t": 990, "end_t": 2000, "track": "fault 4", "kind": "fault", "text": "kill n02"}
    a = _j("alice-1", [{"t": 1000, "end_t": 1010, "track": "n01", "kind": "hop", "text": "guard"},
                       {"t": 999, "end_t": 1011, "track": "alice", "kind": "send", "text": "send"},
                       {"t": 1012, "track": "bob", "kind": "receive", "text": "received"}, retrieve, fault])
    b = _j("alice-2", [{"t": 1002, "end_t": 1008, "track": "n01", "kind": "hop", "text": "relay"}, retrieve, fault])
    doc = trace_events([a, b], nodes=["n01", "n02"], users=["alice", "bob"], origin_ms=900, run_id="r")
    assert validate_trace_events(doc) == []
    ev = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    hops = [e for e in ev if e["cat"] == "hop"]
    assert len({e["tid"] for e in hops}) == 2 and {e["pid"] for e in hops} == {NODES_PID}
    shared = [e for e in ev if e["cat"] == "retrieve"]
    assert len(shared) == 1 and shared[0]["args"]["msg_ids"] == ["alice-1", "alice-2"]
    assert len([e for e in ev if e["cat"] == "fault"]) == 1
    send = next(e for e in ev if e["cat"] == "send")
    assert (send["pid"], send["ts"], send["dur"]) == (USERS_PID, 99_000, 12_000)
    receive = next(e for e in ev if e["cat"] == "receive")
    assert receive["ph"] == "i" and receive["s"] == "t"
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert "n01" in names.values() and "n01 #2" in names.values() and "fault 4: kill n02" in names.values()


def test_the_validator_catches_what_perfetto_would_not_open():
    bad = {"traceEvents": [{"name": "x", "ph": "X", "ts": 0, "pid": 1, "tid": 1},
                           {"name": "y", "ph": "X", "ts": 0, "dur": 10, "pid": 1, "tid": "a"}],
           "displayTimeUnit": "ms"}
    problems = validate_trace_events(bad)
    assert any("missing ['dur']" in p for p in problems) and any("pid/tid must be ints" in p for p in problems)
    assert any("no process_name" in p for p in problems)


def test_the_wire_pass_keys_blobs_as_the_checker_does():
    from chaos.trace.captures import blob_digest
    from chaos.checkers import unlinkability

    assert blob_digest(b"layer") == unlinkability._digest(b"layer")  # hops are joined by these digests


def test_the_wire_pass_names_copies_and_their_peers(tmp_path):
    import msgpack

    from chaos.trace.captures import NodeKeys, replay_captures
    from testnet.base import crypto
    from testnet.base.protocol import Request, Response, encode_message

    ids = {n: crypto.Identity.from_seed(bytes([i]) * 32) for i, n in enumerate(["n01", "n02", "n03"], 1)}
    local, inbound, outbound = ["127.0.1.1", 4000], ["127.0.0.1", 51000], ["127.0.3.1", 30003]
    msg = ["05" + "ab" * 32, 0, "HASH1", b"data", 1, 2]
    stranger = ["127.0.5.9", 52000]
    records = [
        [1000, 1, "in", local, inbound, encode_message(Request(1, "node_auth", {
            "ed25519_public": ids["n02"].ed25519_public.hex(), "signature": b"s" * 64}))],
        [1000, 1, "out", local, inbound, encode_message(Response(1, 200, {"node": ids["n02"].ed25519_public.hex()}))],
        [1001, 1, "in", local, inbound, encode_message(Request(2, "replicate", {"messages": [msg]}))],
        [1003, 1, "out", local, inbound, encode_message(Response(2, 200, {"stored": 1}))],
        [1004, 2, "out", ["127.0.1.1", 40001], outbound, encode_message(Request(1, "replicate", {"messages": [msg]}))],
        [1009, 2, "in", ["127.0.1.1", 40001], outbound, encode_message(Response(1, 504, {"error": "timeout"}))],
        # A stranger claims n03's key, is refused, and pushes a copy anyway: it is no node.
        [1010, 3, "in", local, stranger, encode_message(Request(1, "node_auth", {
            "ed25519_public": ids["n03"].ed25519_public.hex(), "signature": b"f" * 64}))],
        [1010, 3, "out", local, stranger, encode_message(Response(1, 401, {"error": "bad signature"}))],
        [1011, 3, "in", local, stranger, encode_message(Request(2, "replicate", {"messages": [msg]}))],
        [1012, 3, "out", local, stranger, encode_message(Response(2, 200, {"stored": 1}))],
    ]
    capture = tmp_path / "capture.bin"
    capture.write_bytes(b"".join(msgpack.packb(r, use_bin_type=True) for r in records))
    keys = {n: NodeKeys(n, i.ed25519_public.hex(), i.x25519_secret, capture if n == "n01" else tmp_path / "none")
            for n, i in ids.items()}
    rp = replay_captures(keys, [], user_hosts={}, ingress={}, hosts={},
                         peer_of_remote=lambda r: {("127.0.3.1", 30003): "n03"}.get(r))
    got = [(c.node, c.side, c.peer, c.t, c.reply_t, c.status, c.authenticated, c.remote)
           for c in sorted(rp.copies["HASH1"], key=lambda c: c.t)]
    assert got == [("n01", "received", "n02", 1001, 1003, 200, True, "127.0.0.1"),
                   ("n01", "sent", "n03", 1004, 1009, 504, None, None),
                   ("n01", "received", None, 1011, 1012, 200, False, "127.0.5.9")]
    from chaos.trace.journey import caller_name

    names = [caller_name(c) for c in sorted(rp.copies["HASH1"], key=lambda c: c.t)]
    assert names == ["n02", "n03", "stranger 127.0.5.9"]
    assert rp.missing == {"n02": "no capture file", "n03": "no capture file"} and rp.span["n01"] == (1000, 1012)


def test_a_target_that_names_its_peers_failures_is_not_found_to_have_kept_its_copy():
    from types import SimpleNamespace

    from chaos.trace.trail import findings

    def j(answer):
        return {"from": "alice", "to": "bob", "sent": None, "attempts": [], "copies": [], "retrieves": [],
                "deletes": [], "swarm": {"members": ["n01", "n02", "n03"]},
                "commits": [{"node": "n01", "t": 10, "acked_t": 12, "status": 200, "swarm": answer,
                             "source": "capture"}],
                "storage": [{"node": n, "row": n == "n01", "deleted_t": None, "member": True}
                            for n in ("n01", "n02", "n03")]}

    run = SimpleNamespace(users={"alice": "05..", "bob": "05.."})
    # Links down: no byte left n01, and its answer says so: 502 for both peers.
    assert findings(run, j({"n01": 200, "n02": 502, "n03": 502})) == []
    alone = findings(run, j({"n01": 200}))
    assert [(f["kind"], f["node"]) for f in alone] == [("no-copies", "n01"), ("acked-alone", "n01")]
    claimed = findings(run, j({"n01": 200, "n02": 200, "n03": 502}))  # a 200 for a copy no capture shows
    assert [f["kind"] for f in claimed] == ["no-copies"] and "n02 n03" in claimed[0]["text"]
