"""Disk faults in the simulation (nodes/disk.py through chaos/run/disk.py): every disk
fault in a few virtual seconds, exact across processes, nothing acknowledged lost; and
the canary ack-before-sync caught by delivery under a swarm-wide power loss."""

import json
import textwrap
from pathlib import Path

from chaos.sim.jobs import run_jobs

DISKS = textwrap.dedent("""
    name = "sim-disks"
    description = "Each disk fault, then a torn power loss of a whole swarm."

    [topology]
    nodes = 12
    min_swarm = 4
    users = 3

    [workload]
    rate = 12
    duration_s = 10

    [[faults.timeline]]
    at_s = 1
    duration_s = 3
    kind = "disk-full"
    target = { "swarm-of-user" = "alice", count = 1 }

    [[faults.timeline]]
    at_s = 1.5
    duration_s = 3
    kind = "disk-error"
    target = { "swarm-of-user" = "bob", count = 1 }
    params = { ops = ["write", "sync"] }

    [[faults.timeline]]
    at_s = 2
    duration_s = 3
    kind = "disk-slow"
    target = { "swarm-of-user" = "carol", count = 2 }
    params = { sync_ms = 300 }

    [[faults.timeline]]
    at_s = 2
    duration_s = 3
    kind = "corrupt"
    target = { "swarm-of-user" = "bob", count = 1 }
    params = { rate = 0.2 }

    [[faults.timeline]]
    at_s = 6
    duration_s = 2
    kind = "power-loss"
    target = { "swarm-of-user" = "alice", count = 99 }
    params = { torn = true, seed = 5 }

    [check]
    quiet_s = 10
""")


def test_disk_faults_are_exact_and_lose_nothing_acknowledged_and_the_canary_is_caught(tmp_path):
    scenario = tmp_path / "sim-disks.toml"
    scenario.write_text(DISKS, encoding="utf-8")
    job = {"scenario": str(scenario), "seed": 3, "runs_dir": str(tmp_path / "runs")}
    # The canary under the library's power-loss (a whole swarm loses power while users send).
    canary = {"scenario": "power-loss", "seed": 1, "inject_bugs": ["ack-before-sync"],
              "runs_dir": str(tmp_path / "canary")}
    results = run_jobs([job, job, canary], 2)  # job i to worker i mod 2: the two runs of job in two processes
    bad = next(r for r in results if r["run_dir"].startswith(canary["runs_dir"]))
    first, second = (r for r in results if r is not bad)
    for r in (first, second):
        assert r.get("valid") is True, r
    assert first["sha256"] == second["sha256"]  # same seed, same faults, same bytes lost
    faults = [json.loads(line) for line in (Path(first["run_dir"]) / "faults.jsonl").read_text().splitlines()]
    assert {f["kind"] for f in faults if f["phase"] == "start"} == {
        "disk-full", "disk-error", "disk-slow", "corrupt", "power-loss"}
    assert bad.get("valid") is False and "delivery" in bad["failing"], bad
    # Its journey shows the write that was acknowledged and lost: each member's own record of the loss.
    from chaos.trace.journey import journey, load_run

    verdict = json.loads((Path(bad["run_dir"]) / "verdict.json").read_text())
    lost = verdict["checkers"]["delivery"]["lost"][0]
    j = journey(load_run(Path(bad["run_dir"])), lost)
    assert j["sent"]["done"] == "ok" and j["losses"], j["losses"]
    assert {x["node"] for x in j["losses"]} == set(j["swarm"]["members"])  # the whole rack lost it
    assert any(e["kind"] == "lost" and "never synced" in e["text"] for e in j["events"])
    assert "never synced" in j["trail"]["why"]
