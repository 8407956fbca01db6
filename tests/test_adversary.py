"""The adversary nemesis and the authority checker: pure parts (what it knows,
the frames it sends, the checker's rules on synthetic records) and one real
network that must refuse every attempt."""

import json

import pytest
import trio

from chaos.adversary.model import FRAMES, HistoryTail, Knowledge, NetView, adversary_host, measure, planned_hosts
from chaos.checkers.authority import ADVERSARY_FILE, check_authority, summarize_attempts
from chaos.checkers.verdict import summary
from chaos.report.page import adversary_section
from nodes.auth import Assignment
from testnet.base.protocol import BadFrame, Connection, RemoteProtocolError

ALICE = "05" + "11" * 32
BOB = "05" + "22" * 32


def test_adversary_addresses_are_in_the_runs_block_outside_the_planned_ones(tmp_path):
    from testnet.plan import plan_network

    assert adversary_host((70, 32), 0) == "127.70.32.16" and adversary_host((255, 248), 15) == "127.255.248.31"
    with pytest.raises(ValueError):
        adversary_host((70, 32), 16)
    mine = {adversary_host((70, 32), h) for h in range(16)}
    for links, nodes in (("toxiproxy", 254), ("direct", 254)):
        plan = plan_network(nodes=nodes, users=254, min_swarm=3, seed=1, links=links, run_dir=tmp_path,
                            run_id="r", block=(70, 32))
        hosts = planned_hosts(plan)
        assert plan.registry_host in hosts and not mine & hosts


def test_history_tail_reads_only_new_complete_lines_and_knowledge_keeps_a_window(tmp_path):
    path = tmp_path / "history.jsonl"
    tail = HistoryTail(path)
    assert tail.read_new() == []  # no file yet
    invoke = {"type": "invoke", "op": "send", "to": "alice", "hash": "h1"}
    path.write_text(json.dumps(invoke) + "\n" + '{"type": "invoke", "op": "send", "to": "bob", "ha')
    know = Knowledge({"alice": ALICE, "bob": BOB})
    know.learn_history(tail.read_new(), now=100.0)
    assert know.recent(ALICE, 100.0) == ["h1"] and know.recent(BOB, 100.0) == []
    with path.open("a") as f:  # the torn line completes
        f.write('sh": "h2"}\n' + json.dumps({"type": "ok", "op": "send", "to": "alice", "hash": "h3"}) + "\n")
    know.learn_history(tail.read_new(), now=105.0)
    assert know.recent(BOB, 105.0) == ["h2"] and know.recent(ALICE, 105.0) == ["h1"]  # ok records add nothing
    assert know.recent(ALICE, 111.0) == [] and know.latest(ALICE) == ["h1"]  # out of the delete window, still known
    know.learn(ALICE, [f"x{i}" for i in range(300)], 120.0, "listed")
    assert len(know.latest(ALICE, 1000)) == 200 and know.learned == {"history": 2, "listed": 300}
    assert know.name(ALICE) == "alice" and know.name("05" + "33" * 32).startswith("listed:")
    know.mine.add("planted-by-me")
    know.learn(BOB, ["planted-by-me"], 130.0, "listed")  # never its own plants: they are the evidence
    assert "planted-by-me" not in know.latest(BOB, 1000)


def test_net_view_says_when_a_push_might_pass_as_rehoming():
    a, b = "aa" * 32, "bb" * 32
    body = {"nodes": [{"ed25519_public": a, "host": "127.0.0.1", "port": 1, "swarm_id": 0},
                      {"ed25519_public": b, "host": "127.0.0.2", "port": 2, "swarm_id": 1 << 63}],
            "history": [{"height": 1, "swarms": {a: 0, b: None}}]}
    view = NetView.from_registry(body)
    assert view.swarm_ids == [0, 1 << 63] and view.members(0) == [a]
    in_b = next(pk for pk in (f"05{i:02x}" + "00" * 31 for i in range(256)) if view.swarm_of(pk) == 1 << 63)
    # At height 1 there was one swarm: every account was a's.
    assert view.may_rehome(a, in_b) and not view.may_rehome(b, in_b)
    assert not NetView(view.nodes, (Assignment(5, {a: 0, b: 1 << 63}),)).may_rehome(a, in_b)
    cut_short = NetView(view.nodes, tuple(Assignment(h, {a: 0, b: 1 << 63}) for h in range(16)))
    assert cut_short.may_rehome(a, in_b)  # the registry's history may have forgotten more


def test_measure_counts_what_a_reply_gave_away_and_what_it_did():
    assert measure("ae_hashes", 200, {"hashes": {ALICE: ["a", "b"], BOB: ["c"]}}) == (3, 0)
    assert measure("ae_fetch", 200, {"messages": [[1], [2]]}) == (2, 0)
    assert measure("ae_digest", 200, {"buckets": {ALICE: [[1, "d"]]}}) == (1, 0)
    assert measure("replicate_delete", 200, {"deleted": 4}) == (0, 4)
    assert measure("delete", 200, {"deleted": ["a"], "swarm": {}}) == (0, 1)
    assert measure("replicate_delete", 401, {"error": "x"}) == (0, 0)
    assert measure("retrieve", None, None) == (0, 0)


def test_frames_are_the_faults_they_claim():
    for variant, data, eof, want in FRAMES:
        conn = Connection()
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        if want == 413:
            with pytest.raises(RemoteProtocolError) as err:
                conn.next_event()
            assert err.value.status == 413, variant
        elif variant == "truncated":
            with pytest.raises(RemoteProtocolError, match="inside a frame"):
                conn.next_event()
        else:
            ev = conn.next_event()
            assert isinstance(ev, BadFrame) and ev.status == want, (variant, ev)


def rec(attack, op, status, *, expect="refuse", want=401, **kw):
    return {"t": 1, "fault": 1, "attack": attack, "op": op, "expect": expect, "want": want, "status": status,
            "node": "n01", "as": "stranger", "victim": "alice", **kw}


REFUSED = [rec("stranger", "replicate_delete", 401, effect=0), rec("stranger", "ae_hashes", 401),
           rec("liar", "ae_fetch", 200, expect="withhold", want=200, exposed=0, **{"as": "n02"}),
           rec("liar", "replicate", 200, expect="rehoming", want=200, planted=["p-rehomed"]),
           rec("abuse", "store", 406, want=406, planted=["p-store"]),
           rec("frames", "frame", None, want=400, error="no answer in time"),
           {"attack": "flood", "op": "flood", "expect": "serve", "connections": 10, "opened": 10,
            "closed_by_node": 4, "statuses": {"429": 4}, "probe_status": 200},
           {"attack": "liar", "op": "skipped", "why": "one swarm only"}]


def write_run(tmp_path, records=None, schedule_kinds=("adversary",)):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "nodes": [{"name": "n01"}], "users": []}))
    (tmp_path / "schedule.json").write_text(json.dumps({"faults": [{"kind": k} for k in schedule_kinds]}))
    if records is not None:
        (tmp_path / ADVERSARY_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_authority_holds_when_everything_is_refused(tmp_path):
    v = check_authority(write_run(tmp_path, REFUSED), held={"n01": ["p-rehomed", "other"]})
    assert v["valid"] is True, v
    c = v["counts"]
    assert (c["attempts"], c["refused"], c["accepted"], c["unanswered"]) == (6, 4, 0, 1)
    assert (c["rehomed"], c["skipped"]) == (1, 1)
    assert (c["wanted"], c["as_wanted"]) == (6, 5)  # the frame nobody answered had a status to give
    assert c["planted_tried"] == 1 and c["planted"] == 0  # a rehomed push is the protocol's, not a violation
    assert v["attacks"]["stranger"]["replicate_delete"] == {"attempts": 1, "statuses": {"401": 1}, "as_wanted": 1,
                                                            "accepted": 0, "leaked": 0}
    assert v["floods"] == {"waves": 1, "connections": 10, "opened": 10, "closed_by_node": 4, "probes": 1,
                           "probes_failed": 0, "statuses": {"429": 4}}
    text = summary({"valid": True, "checkers": {"authority": v}})
    assert "authority: valid" in text and "accepted 0" in text and "4 closed by the node (answers 429: 4)" in text
    html = adversary_section(REFUSED, {"checkers": {"authority": v}})
    assert "<h2>Adversary</h2>" in html and "replicate_delete" in html and "401: 1" in html


@pytest.mark.parametrize("bad, count", [
    (rec("stranger", "replicate_delete", 200, effect=3), "accepted"),
    (rec("liar", "ae_fetch", 200, expect="withhold", want=200, exposed=2), "leaked"),
    (rec("stranger", "replicate", 401, planted=["p-bad"]), "planted"),  # refused, yet the node holds it
])
def test_authority_fails_on_an_accepted_op_a_leak_or_a_planted_message(tmp_path, bad, count):
    v = check_authority(write_run(tmp_path, REFUSED + [bad]), held={"n01": ["p-bad"], "n02": ["p-bad"]})
    assert v["valid"] is False and v["counts"][count] == 1, v["counts"]
    if count == "planted":
        assert v["planted"] == [{"hash": "p-bad", "attack": "stranger", "op": "replicate", "victim": "alice",
                                 "status": 401, "held_by": ["n01", "n02"]}]
    else:
        assert v[count][0]["op"] == bad["op"]
        assert "must" in summary({"valid": False, "checkers": {"authority": v}})


def test_authority_without_an_adversary_is_skipped_and_without_answers_unknown(tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    assert check_authority(write_run(tmp_path / "a", schedule_kinds=("kill",)))["skipped"] is True
    assert check_authority(write_run(tmp_path / "b"))["valid"] == "unknown"  # scheduled, left no record
    silent = [rec("stranger", "replicate_delete", None, error="ConnectError")]
    assert check_authority(write_run(tmp_path / "c", silent))["valid"] == "unknown"
    assert summarize_attempts(silent + [{"attack": "x", "op": "error", "error": "boom"}])["errors"] == ["x: boom"]


# ---------------------------------------------------------------- a real network


@pytest.mark.network
async def test_an_honest_network_refuses_every_attack(tmp_path):
    from chaos.adversary import attacks  # noqa: F401  registers the adversary's fault family with inject
    from chaos.checkers.verdict import run_checks
    from chaos.run.nemesis import inject, live_swarms
    from chaos.scenario import NEMESES
    from chaos.schedule import Fault
    from clients.workload import UserSpec, run_workload
    from testnet.controller import open_testnet

    # 8 nodes, swarms of at least 2: two swarms, so the liar has one it is not in.
    async with open_testnet(nodes=8, users=3, min_swarm=2, links="direct", seed=5, check=False,
                            run_dir=tmp_path / "run") as net:
        specs = [UserSpec(u.name, net.user_identity(u.name), net.user_host(u.name), net.user_links(u.name))
                 for u in net.plan.users]
        params = {**NEMESES["adversary"][1], "interval_s": 0.15, "flood_connections": 60, "flood_hold_s": 1.0}
        async with inject(net, Fault(1, 0, 60, "adversary", {}, params)) as desc:
            stats = await run_workload(specs, net.registry_address, net.run_dir / "history.jsonl", messages=100,
                                       rate=20, seed=3, drain_s=6, delete_fraction=0.3)
        assert stats.ok >= 95, stats
        assert desc["attempts"] > 200 and desc["accepted"] == 0 and desc["leaked"] == 0, desc
        swarms = await live_swarms(net)
        live = {n for n, rt in net.nodes.items() if rt.state == "running"}
        verdict = await trio.to_thread.run_sync(lambda: run_checks(net.run_dir, swarms=swarms, live=live))
    assert verdict["valid"] is True, summary(verdict)
    a = verdict["checkers"]["authority"]
    ops = {(attack, op) for attack, by_op in a["attacks"].items() for op in by_op}
    assert {("stranger", op) for op in ("replicate_delete", "replicate_expire", "replicate", "ae_digest", "ae_hashes",
                                        "ae_fetch", "node_auth", "register", "deregister", "stake")} <= ops
    assert {("liar", op) for op in ("replicate_delete", "replicate_expire", "ae_digest", "ae_hashes",
                                    "ae_fetch")} <= ops
    assert {("signatures", "retrieve"), ("signatures", "delete"), ("signatures", "expire"), ("abuse", "store"),
            ("frames", "frame")} <= ops
    c = a["counts"]
    assert c["unanswered"] <= c["attempts"] // 50 and c["planted_tried"] > 5 and c["planted"] == 0  # 2 s deadlines
    # Every refusal names its reason: 401 strangers, 403 the liar, 400/406/413 bad input (the liar's
    # pushes that may pass as rehoming want no status: every node was in the boot's single swarm).
    assert c["as_wanted"] == c["wanted"] - c["unanswered"] and c["wanted"] >= 0.9 * c["attempts"], \
        json.dumps(a["attacks"])
    assert a["floods"]["waves"] >= 1 and a["floods"]["probes_failed"] == 0


async def test_frames_and_a_flood_at_an_in_process_server(nursery):
    from functools import partial

    from chaos.adversary.raw import flood, send_frame
    from testnet.base.net import TCP
    from testnet.base.rpc import serve

    async def handler(req, peer):
        return 200, {"op": req.op}

    [(host, port)] = await nursery.start(partial(serve, handler, [("127.0.0.1", 0)]))
    for variant, data, eof, want in FRAMES:
        out = await send_frame(TCP, host, port, "127.0.0.1", data, eof=eof, timeout_s=2.0)
        assert out["status"] == want, (variant, out)
        assert out.get("connection_goes_on", True), variant  # a bad body spoils only itself
    out = await flood(TCP, host, port, ["127.0.0.1"], "127.0.0.1", connections=24, hold_s=0.6, timeout_s=2.0)
    assert (out["opened"], out["connect_failed"], out["probe_status"]) == (24, 0, 200), out


TINY = {
    "name": "tiny-adversary",
    "topology": {"nodes": 8, "min_swarm": 2, "users": 3},
    "workload": {"rate": 10, "duration_s": 6, "drain_s": 8, "delete_fraction": 0.3},
    "faults": {"timeline": [{"at_s": 0.2, "duration_s": 7, "kind": "adversary",
                             "params": {"interval_s": 0.2, "flood_connections": 300, "flood_hold_s": 1.0}}]},
    "check": {"quiet_s": 1},
}


@pytest.mark.parametrize("bug", [None, "no-node-auth"])
def test_the_adversary_in_the_simulation(tmp_path, bug):
    # Virtual time and seeded everything: the same verdicts on every machine, in seconds.
    from chaos.scenario import load_scenario
    from chaos.schedule import to_toml
    from chaos.sim.runner import run_sim

    src = tmp_path / "tiny.toml"
    src.write_text(to_toml(TINY))
    result = run_sim(load_scenario(src), 3, run_dir=tmp_path / "run", inject_bugs=(bug,) if bug else (),
                     progress=lambda m: None)
    checkers = result.verdict["checkers"]
    a = checkers["authority"]
    assert a["counts"]["attempts"] > 150 and a["floods"]["statuses"].get("429", 0) > 0, a["counts"]
    if bug is None:
        assert result.verdict["valid"] is True, result.summary
    else:
        assert a["valid"] is False and a["counts"]["accepted"] > 50 and a["counts"]["planted"] > 0, a["counts"]
        assert checkers["delivery"]["counts"]["lost"] > 0
