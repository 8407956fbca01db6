"""Chaos on real networks: every nemesis starts and heals; a short chaos run
with a real fault passes and writes its bundle; replay runs it again."""

import json

import pytest

from chaos.run.nemesis import inject
from chaos.run.runner import replay, run_chaos
from chaos.scenario import NEMESES, load_scenario
from chaos.schedule import Fault
from testnet.controller import open_testnet
from testnet.fixtures import requires_toxiproxy

pytestmark = [pytest.mark.network, requires_toxiproxy]


async def proxy_state(net):
    """(toxics, disabled links) the faults hold now, whether the links' proxies are made yet
    or not; the proxies made are checked to be exactly as the faults want them."""
    faulted = net.api.faulted()
    for name, proxy in (await net.api.proxies()).items():
        want = faulted.get(name) or {"enabled": True, "toxics": []}
        assert (proxy["enabled"], sorted(t["name"] for t in proxy["toxics"])) == (want["enabled"], want["toxics"])
    return sum(len(f["toxics"]) for f in faulted.values()), sum(not f["enabled"] for f in faulted.values())


async def test_every_nemesis_starts_and_heals(tmp_path):
    async with open_testnet(nodes=6, users=2, min_swarm=3, seed=4, check=False, run_dir=tmp_path / "run") as net:
        targets = {
            "isolate": {"node": "n02"}, "split-swarm": {"swarm-of-user": "alice", "pick": 1},
            "halves": {"side_a": ["n01", "n02", "n03"], "side_b": ["n04", "n05", "n06"]},
            "bridge": {"side_a": ["n01", "n02"], "side_b": ["n04", "n05"], "bridge": "n03"},
            "one-way": {"side_a": ["n01", "n02", "n03"], "side_b": ["n04", "n05", "n06"]},
            "kill": {"node": "n03"}, "pause": {"node": "n04"}, "join": {"new": 1}, "leave": {"node": "n05"},
            "clock-skew": {"node": "n01"}, "adversary": {},
            "power-loss": {"nodes": ["n02", "n06"]}, "disk-full": {"node": "n01"}, "disk-error": {"node": "n01"},
            "disk-slow": {"node": "n01"}, "corrupt": {"node": "n01"},
        }
        for i, kind in enumerate(NEMESES, start=1):
            family, params = NEMESES[kind]
            target = targets.get(kind, {"node-links": "n01"})
            fault = Fault(i, 0, 0.1, kind, target, params)
            before_nodes = set(net.nodes)
            async with inject(net, fault) as desc:
                if family in ("link", "partition"):
                    toxics, disabled = await proxy_state(net)
                    assert toxics + disabled > 0, kind
                    assert desc["proxies"] > 0
                elif kind == "kill":
                    assert net.nodes["n03"].state == "killed"
                elif kind == "pause":
                    assert net.nodes["n04"].state == "paused"
                elif kind == "join":
                    assert len(net.nodes) == len(before_nodes) + 1
                elif kind == "leave":
                    assert "n05" not in net.nodes
                elif kind == "clock-skew":
                    assert (await net.call("n01", "info"))["clock_offset_ms"] == params["offset_ms"]
                elif kind == "power-loss":  # both stopped at once, on what their disks had synced
                    assert {net.nodes[n].state for n in ("n02", "n06")} <= {"killed", "exited"}
                elif family == "disk":
                    state = await net.admin("n01", "admin_disk", action="status")
                    assert state["full"] or state["errors"] or state["sync_ms"] or state["corrupt_rate"], kind
            # Healed.
            assert await proxy_state(net) == (0, 0), kind
            assert all(rt.state == "running" for rt in net.nodes.values()), kind
            if kind == "clock-skew":
                assert (await net.call("n01", "info"))["clock_offset_ms"] == 0
            if kind == "join":
                assert set(net.nodes) == before_nodes
            if family == "disk" and kind != "power-loss":
                state = await net.admin("n01", "admin_disk", action="status")
                assert not (state["full"] or state["errors"] or state["sync_ms"] or state["corrupt_rate"]), kind
            if kind == "adversary":  # stopped: its summary is in what it yielded, its record in the run
                records = [json.loads(line) for line in open(net.run_dir / "adversary.jsonl")]
                assert desc["attempts"] == sum(r["op"] not in ("error", "skipped", "flood") for r in records)
                assert desc["errors"] == 0, [r for r in records if r["op"] == "error"]
        await net.wait_ready(20)

        # A link that vanishes while its fault starts (its node left) is skipped, and
        # everything the fault did apply is healed (found by the mixed scenario, seed 12).
        await net.api.delete_proxy("n01->n02")
        for i, kind in enumerate(("blackhole", "isolate"), start=100):
            family, params = NEMESES[kind]
            fault = Fault(i, 0, 0.1, kind, {"node-links": "n02"} if family == "link" else {"node": "n02"}, params)
            async with inject(net, fault) as desc:
                assert desc["proxies"] > 0 and sum(await proxy_state(net)) > 0
            assert await proxy_state(net) == (0, 0), kind


SHORT = {
    "name": "short",
    "topology": {"nodes": 6, "min_swarm": 3, "users": 3},
    "workload": {"rate": 10, "duration_s": 5, "drain_s": 10},
    "faults": {"timeline": [{"at_s": 1, "duration_s": 2, "kind": "kill",
                             "target": {"swarm-of-user": "alice", "count": 1}}]},
    "check": {"quiet_s": 2},
}


async def test_short_chaos_run_with_a_kill_passes_and_replays(tmp_path):
    src = tmp_path / "short.toml"
    from chaos.schedule import to_toml
    src.write_text(to_toml(SHORT))
    scenario = load_scenario(src)
    result = await run_chaos(scenario, seed=12, run_dir=tmp_path / "bundle", progress=lambda m: None)
    assert result.exit_code == 0, result.summary
    rd = result.run_dir
    for f in ("run.json", "schedule.json", "history.jsonl", "faults.jsonl", "verdict.json", "report.html"):
        assert (rd / f).exists(), f
    records = [json.loads(l) for l in (rd / "faults.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["start", "end"]
    # Each phase's planned time and lateness are recorded; the heal is planned at the schedule's end.
    assert records[1]["planned"] - records[0]["planned"] == 2000
    # Late is when the phase took effect (the restarted node runs), done is later still (it is ready).
    assert all(0 <= r["late_ms"] <= r["t"] - r["planned"] + 20 and r["took_ms"] >= 0 for r in records)
    f = result.verdict["faults"]
    assert (f["planned"], f["started"], f["healed"], f["skipped"], f["errors"], f["valid"]) == (1, 1, 1, [], [], True)
    assert f["worst"]["late_ms"] == max(r["late_ms"] for r in records)
    assert "faults: 1 of 1 started, 1 healed; worst lateness" in result.summary
    again, compare = await replay(rd, runs_dir=tmp_path / "replays", progress=lambda m: None)
    assert json.loads((again.run_dir / "schedule.json").read_text()) == json.loads((rd / "schedule.json").read_text())
    assert json.loads((again.run_dir / "run.json").read_text())["nodes"][0]["ed25519_public"] == \
        json.loads((rd / "run.json").read_text())["nodes"][0]["ed25519_public"]
    assert compare["checkers"]["delivery"]["after"] is True, again.summary


TINY = {
    "name": "tiny",
    "topology": {"nodes": 5, "min_swarm": 3, "users": 2, "links": "direct"},
    "workload": {"rate": 10, "duration_s": 2, "drain_s": 1},
    "faults": {"timeline": [{"at_s": 0.3, "duration_s": 0.5, "kind": "pause", "target": {"node": "n01"}},
                            {"at_s": 0.6, "duration_s": 0.5, "kind": "clock-skew", "target": {"node": "n02"}}]},
    "check": {"quiet_s": 0.5, "checkers": ["replication"]},
}


async def test_shrink_drops_faults_the_failure_does_not_need(tmp_path):
    # skip-replication fails the replication checker with or without faults: the minimal schedule is empty.
    from chaos.schedule import to_toml
    from chaos.run.shrink import shrink_run

    src = tmp_path / "tiny.toml"
    src.write_text(to_toml(TINY))
    result = await run_chaos(load_scenario(src), seed=3, run_dir=tmp_path / "bundle", inject_bugs=("skip-replication",),
                             progress=lambda m: None)
    assert result.exit_code == 1, result.summary
    out = await shrink_run(result.run_dir, attempts=1, progress=lambda m: None)
    assert out["checker"] == "replication" and out["original"] == [1, 2] and out["minimal"] == []
    minimal = load_scenario(out["scenario"])
    assert minimal.topology.nodes == 5 and not minimal.timeline
    account = (result.run_dir / "shrink" / "SHRINK.md").read_text()
    assert "nothing: the bug shows without any fault" in account and "--inject-bug skip-replication" in account
