"""swarmnet trace on simulated runs: for each injectable bug, the journey of a
message its checker flagged shows the step where the bug acted.

One module fixture makes every run at once in the deterministic simulation
(two worker processes, a few virtual seconds each): five bugs alone on five
quiet nodes, ack-before-commit with one node killed, no-node-auth under a
stranger's node ops, and the same quiet network with no bug (where a
journey must find nothing).  Each test takes a message from the run's
verdict (where the checker that caught the bug lists it), rebuilds its
journey from the run directory alone and asserts the step, the node and the
finding; the verdict and the journey are read independently (the journey
never reads the checkers' lists of flagged messages).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from chaos.trace.journey import all_journeys, journey, load_run
from chaos.sim.jobs import run_jobs
from chaos.trace.view import render_html, render_text, run_trace_events, trace
from chaos.trace.events import problems

def scenario_text(name: str, description: str, checkers: list[str], *, extra_workload: str = "",
                  faults: str = "") -> str:
    """A 5-node scenario: three seconds of sends by 3 users, then the given faults and checkers."""
    return f"""
name = "trace-{name}"
description = "{description}"

[topology]
nodes = 5
min_swarm = 3
users = 3

[workload]
rate = 8
duration_s = 3
{extra_workload}drain_s = 4
{faults}
[check]
quiet_s = 1
checkers = {json.dumps(checkers)}
"""


# scenario -> its text: what each bug needs to show
SCENARIOS = {
    "quiet": scenario_text("quiet", "Three seconds of sends and deletes on 5 nodes, no fault: what an injected bug "
                           "does alone.", ["delivery", "replication", "unlinkability"],
                           extra_workload="delete_fraction = 0.3\n"),
    "kill": scenario_text("kill", "Three seconds of sends on 5 nodes; n01 killed -9 at 2 s and restarted 1 s later.",
                          ["delivery", "replication"], faults="""
[[faults.timeline]]
at_s = 2
duration_s = 1
kind = "kill"
target = { node = "n01" }
"""),
    "stranger": scenario_text("stranger", "A stranger's node ops (the adversary's 'stranger' attack) while users "
                              "send.", ["delivery", "replication", "authority"], faults="""
[[faults.timeline]]
at_s = 0.5
duration_s = 3
kind = "adversary"
params = { attacks = ["stranger"], interval_s = 0.5 }
"""),
}

# run name -> (scenario, injected bugs)
RUNS = {
    "skip-replication": ("quiet", ["skip-replication"]),
    "wrong-inbox": ("quiet", ["wrong-inbox"]),
    "one-hop-path": ("quiet", ["one-hop-path"]),
    "client-id-in-layers": ("quiet", ["client-id-in-layers"]),
    "local-delete": ("quiet", ["local-delete"]),
    "ack-before-commit": ("kill", ["ack-before-commit"]),
    "no-node-auth": ("stranger", ["no-node-auth"]),
    "no bug": ("quiet", []),
}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trace-bugs")
    scenarios = {}
    for name, text in SCENARIOS.items():
        scenarios[name] = base / f"{name}.toml"
        scenarios[name].write_text(text, encoding="utf-8")
    jobs = [{"scenario": str(scenarios[sc]), "seed": 1, "inject_bugs": bugs,
             "runs_dir": str(base / name.replace(" ", "-"))} for name, (sc, bugs) in RUNS.items()]
    results = run_jobs(jobs, 2)
    by_runs_dir = {str(Path(r["run_dir"]).parent): r for r in results if r.get("run_dir")}
    out = {}
    for name, job in zip(RUNS, jobs):
        r = by_runs_dir.get(job["runs_dir"])
        assert r is not None, (name, results)
        out[name] = Path(r["run_dir"])
        out[name + ":result"] = r
    return out


_loaded: dict[Path, object] = {}


def _run(run_dirs, name):
    """The run's verdict, checked to have caught its bug, and the run read once for journeys."""
    rd = run_dirs[name]
    if rd not in _loaded:
        _loaded[rd] = load_run(rd)
    return json.loads((rd / "verdict.json").read_text()), _loaded[rd]


def _failing(run_dirs, name, checker):
    r = run_dirs[name + ":result"]
    assert r["valid"] is False and checker in r["failing"], r
    return _run(run_dirs, name)


def kinds(j):
    return [(f["kind"], f["node"]) for f in j["findings"]]


def test_skip_replication_the_target_acknowledged_and_no_copy_ever_left_it(run_dirs):
    verdict, run = _failing(run_dirs, "skip-replication", "replication")
    flagged = verdict["checkers"]["replication"]["missing"][0]
    j = journey(run, flagged["msg_id"])
    target = j["sent"]["target"]
    commit = next(c for c in j["commits"] if c["node"] == target and c["status"] == 200)
    assert (commit["node"], commit["status"], commit["source"]) == (target, 200, "capture")
    assert commit["swarm"] == {target: 200}  # its answer: only itself
    assert j["copies"] == []  # no replicate, no anti-entropy: the only copy is the target's own row
    assert {s["node"] for s in j["storage"] if s["row"]} == {target}
    lacking = {s["node"] for s in j["storage"] if s["member"] and not s["row"] and not s["deleted_t"]}
    assert lacking == set(j["swarm"]["members"]) - {target} and set(flagged["missing_on"]) <= lacking
    assert sorted(kinds(j)) == [("acked-alone", target), ("no-copies", target)]  # in time order, which the wire may set either way
    assert "no copy of it ever left" in render_text(j)


def test_wrong_inbox_another_users_retrieve_returned_it(run_dirs):
    verdict, run = _failing(run_dirs, "wrong-inbox", "delivery")
    flagged = next(m for m in verdict["checkers"]["delivery"]["misdelivered"] if m["msg_id"])
    j = journey(run, flagged["msg_id"])
    intruder = flagged["process"]
    assert intruder != j["to"]
    wrong = [r for r in j["retrieves"] if r["user"] == intruder]
    assert wrong and all(r["foreign"] for r in wrong)
    held = {s["node"] for s in j["storage"] if s["row"]} | {c["node"] for c in j["commits"]} | \
        {x["node"] for x in j["copies"] if x["arrived"]}
    assert wrong[0]["node"] in held  # a node that held it answered the intruder's own signed retrieve
    assert any(r["user"] == intruder and r["error"] for r in j["receives"])  # it did not open for them
    assert ("foreign-retrieve", wrong[0]["node"]) in kinds(j)
    assert not any(r["foreign"] for r in j["retrieves"] if r["user"] == j["to"])


def test_one_hop_path_the_target_got_it_straight_from_the_sender(run_dirs):
    verdict, run = _failing(run_dirs, "one-hop-path", "unlinkability")
    flagged = verdict["checkers"]["unlinkability"]["linked"][0]
    j = journey(run, flagged["msg_id"])
    (a,) = [a for a in j["attempts"] if a["in_history"]]
    target = j["sent"]["target"]
    (hop,) = a["hops"]
    assert (hop["node"], hop["role"], hop["from"]) == (target, "target", j["from"])
    assert hop["links"] and set(flagged["linked_by"]) == {target}
    assert a["hops"][0]["node"] not in j["sent"]["path"]  # the client's record names a path it never used
    assert kinds(j) == [("short-path", target), ("linked", target)]


def test_client_id_in_layers_every_layer_names_the_sender(run_dirs):
    verdict, run = _failing(run_dirs, "client-id-in-layers", "unlinkability")
    flagged = verdict["checkers"]["unlinkability"]["linked"][0]
    j = journey(run, flagged["msg_id"])
    (a,) = [a for a in j["attempts"] if a["in_history"]]
    sender, recipient = j["from"], j["to"]
    assert [h["role"] for h in a["hops"]] == ["guard", "relay", "relay", "target"]  # the path itself is right
    assert all(sender in h["names"] for h in a["hops"])
    assert [h["links"] for h in a["hops"]] == [False, False, False, True]
    assert recipient in a["hops"][-1]["names"] and {a["hops"][-1]["node"]} == set(flagged["linked_by"])
    assert kinds(j) == [("names-sender", a["hops"][0]["node"]), ("linked", a["target"])]


def test_local_delete_removed_it_at_one_node_while_the_others_kept_rows(run_dirs):
    verdict, run = _failing(run_dirs, "local-delete", "replication")
    flagged = verdict["checkers"]["replication"]["resurrected"][0]
    j = journey(run, flagged["msg_id"])
    (d,) = j["deletes"]
    assert d["done"] == "ok" and d["user"] == j["to"]
    (removed,) = d["removed"]  # at the delete's target only; no replicate_delete anywhere
    assert (removed["node"], removed["via"], removed["by"]) == (d["target"], "delete", j["to"])
    assert d["answer"] == {d["target"]: 200}  # its answer names no other member
    rows = {s["node"] for s in j["storage"] if s["row"]}
    assert rows == set(flagged["held_by"]) >= set(j["swarm"]["members"]) - {d["target"]}
    assert not any(s["deleted_t"] for s in j["storage"])  # and remembered nothing
    assert kinds(j)[:2] == [("delete-alone", d["target"]), ("resurrected", sorted(rows)[0])]


def test_ack_before_commit_in_simulation_the_killed_target_had_the_only_copy(run_dirs):
    verdict, run = _failing(run_dirs, "ack-before-commit", "delivery")
    lost = [journey(run, m) for m in verdict["checkers"]["delivery"]["lost"]]
    j = next(j for j in lost if j["commits"] and j["commits"][0]["source"] == "capture")
    target = j["sent"]["target"]
    assert j["commits"][0]["swarm"] == {target: 200} and j["copies"] == []
    assert not any(s["row"] or s["deleted_t"] for s in j["storage"])
    assert j["trail"]["ends_at"] == target and "listed only itself" in j["trail"]["why"]
    kill = next(f for f in j["faults"] if f["kind"] == "kill")
    assert kill["targets"]["nodes"] == [target] and f"{target} held a copy and has no row now" in kill["touches"]
    assert ("acked-alone", target) in kinds(j)
    assert j["simulated"] and not any("-9" in u for u in j["unknowns"])  # a simulated kill loses no capture


def test_no_node_auth_a_strangers_replicate_delete_removed_an_acknowledged_message(run_dirs):
    verdict, run = _failing(run_dirs, "no-node-auth", "authority")
    assert "delivery" in verdict["checkers"] and verdict["checkers"]["delivery"]["valid"] is False
    j = journey(run, verdict["checkers"]["delivery"]["lost"][0])
    assert j["sent"]["done"] == "ok" and any(c["status"] == 200 for c in j["commits"])
    (d,) = j["deletes"]
    assert d["id"] is None  # no user's delete named it
    assert d["removed"] and all((x["via"], x["by"], x["authenticated"], x["status"]) ==
                                ("replicate_delete", "adversary", False, 200) for x in d["removed"])
    assert {x["node"] for x in d["removed"]} == {s["node"] for s in j["storage"] if s["deleted_t"]}
    assert not any(s["row"] for s in j["storage"])
    adversary = next(f for f in j["faults"] if f["kind"] == "adversary")
    assert any("removed by a replicate_delete from adversary" in t for t in adversary["touches"])
    assert ("stranger-delete", d["removed"][0]["node"]) in kinds(j)
    assert "no user's delete named it" in j["trail"]["why"]
    # The adversary's own record agrees, when it keeps one: its accepted stranger replicate_deletes there.
    log = run_dirs["no-node-auth"] / "adversary.jsonl"
    if log.exists():
        accepted = {r.get("node") for r in map(json.loads, log.read_text().splitlines())
                    if r.get("op") == "replicate_delete" and r.get("as") == "stranger" and r.get("status") == 200}
        assert {x["node"] for x in d["removed"]} <= accepted


def test_without_a_bug_no_journey_finds_anything(run_dirs):
    verdict, run = _run(run_dirs, "no bug")
    assert verdict["valid"] is True
    journeys = all_journeys(run)
    assert len(journeys) > 15
    assert [f for j in journeys for f in j["findings"]] == []
    assert not any(h["links"] for j in journeys for a in j["attempts"] for h in a["hops"])
    doc = run_trace_events(run, journeys)
    assert problems(doc) == []


def test_a_simulated_run_traces_the_same_after_it_is_moved(run_dirs, tmp_path):
    rd = run_dirs["local-delete"]
    verdict, run = _run(run_dirs, "local-delete")
    mid = verdict["checkers"]["replication"]["resurrected"][0]["msg_id"]
    before = journey(run, mid)
    moved = tmp_path / "elsewhere" / "x"
    shutil.move(rd, moved)  # the old path is gone: nothing may be read from it (config.json holds absolute paths)
    try:
        after = journey(load_run(moved), mid)
        out = CliRunner().invoke(trace, [str(moved), mid])
    finally:
        shutil.move(moved, rd)
    assert after == before
    assert out.exit_code == 0 and "delete-alone" in out.output and "virtual" in out.output


def test_the_html_view_is_one_offline_page_with_a_lane_per_track(run_dirs, tmp_path):
    from html.parser import HTMLParser

    verdict, run = _run(run_dirs, "local-delete")
    mid = verdict["checkers"]["replication"]["resurrected"][0]["msg_id"]
    page = tmp_path / "j.html"
    out = CliRunner().invoke(trace, [str(run_dirs["local-delete"]), mid, "--html", str(page)])
    assert out.exit_code == 0, out.output
    text = page.read_text()
    j = journey(run, mid)
    assert text == render_html(j)

    class Shapes(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.refs = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.refs += [v for k, v in attrs if k in ("src", "href")]

    shapes = Shapes()
    shapes.feed(text)
    assert "script" not in shapes.tags and shapes.refs == []  # nothing fetched, nothing run
    steps = shapes.tags.count("rect") + shapes.tags.count("circle")
    assert steps == len(j["events"]) and shapes.tags.count("svg") == 1
    assert all(f">{track}</text>" in text for track in {e["track"] for e in j["events"]})
    assert "delete-alone" in text and "resurrected" in text and "trail ends at" in text
