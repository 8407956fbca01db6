"""One chaos run: expand, boot, play the schedule under a workload, heal,
wait, check, report.  Also replay (same schedule, topology, keys and
workload) and the nightly loop over the scenario library.

Order of a run (Jepsen): the schedule is written before anything starts;
faults play while users send; every fault heals; after the quiet period the
users drain their inboxes; then the checkers read the history and the
databases.  Everything lands in the run directory.
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from clients.workload import UserSpec, run_workload
from testnet import plan as P
from testnet.base.bugs import CLIENT_BUGS, check_bugs

from chaos.adversary import attacks as _adversary  # noqa: F401  registers the "adversary" fault family
from chaos.adversary import byzantine as _byzantine  # noqa: F401  registers the "byzantine" fault family
from chaos.run import disk as _disk  # noqa: F401  registers the "disk" fault family
from chaos.run.nemesis import live_swarms
from chaos.run.play import FaultLog, describe_error, play, wall_ms
from chaos.scenario import Scenario, load_scenario
from chaos.schedule import Schedule, expand

Progress = Callable[[str], None]
READY_S_PER_NODE = 0.5  # boot deadline per node, beyond the controller's default


@dataclass
class RunResult:
    run_dir: Path
    verdict: dict[str, Any]
    exit_code: int
    summary: str
    seed: int | None = None


def node_names(scenario: Scenario) -> list[str]:
    return [P.node_name(i) for i in range(1, scenario.topology.nodes + 1)]


def user_names(scenario: Scenario) -> list[str]:
    return [P.user_name(i) for i in range(1, scenario.topology.users + 1)]


def _scenario_text(scenario: Scenario) -> str:
    if scenario.source and Path(scenario.source).exists():
        return Path(scenario.source).read_text(encoding="utf-8")
    raise ValueError("scenario has no source file")


class RealProcesses:
    """Where a chaos run happens: real processes, sockets, Toxiproxy and the wall clock.
    The simulation (chaos/sim/runner.py) passes its own, with the same four members."""

    network = None  # the workload's default: TCP
    entropy = None  # the workload's default: libsodium's CSPRNG

    def open(self, opts: Any, progress: Progress) -> Any:
        from testnet.controller import open_testnet

        return open_testnet(opts, progress=progress)

    def now_ms(self) -> int:
        return wall_ms()


async def run_chaos(scenario: Scenario, *, seed: int | None = None, run_dir: Path | None = None,
                    runs_dir: Path = Path("runs"), inject_bugs: tuple[str, ...] = (),
                    schedule: Schedule | None = None, progress: Progress = print,
                    world: Any = None) -> RunResult:
    """Run ``scenario`` once; returns the verdict (also in ``verdict.json``).
    ``world`` is where it runs: real processes (default) or the simulation."""
    from testnet.controller import Options

    from chaos.checkers.verdict import exit_code, run_checks, summary

    inject_bugs = check_bugs(list(inject_bugs))
    seed = seed if seed is not None else (scenario.seed if scenario.seed is not None else secrets.randbits(31))
    schedule = schedule or expand(scenario, seed, node_names(scenario), user_names(scenario))
    topo = scenario.topology
    # A large network's boot gets time in proportion to its size (as bench boot gives it): 300
    # nodes on a busy 2-core machine took over the default 90 s.
    opts = Options(nodes=topo.nodes, users=topo.users, min_swarm=topo.min_swarm, links=topo.links, seed=seed,
                   run_dir=run_dir, runs_dir=runs_dir, inject_bugs=inject_bugs,
                   ready_timeout_s=max(Options.ready_timeout_s, READY_S_PER_NODE * topo.nodes))
    progress(f"scenario {scenario.name}, seed {seed}: {len(schedule.faults)} faults, "
             f"{topo.nodes} nodes, {topo.users} users, links {topo.links}")
    world = world or RealProcesses()
    async with world.open(opts, progress) as net:
        rd = Path(net.run_dir)
        schedule.write(rd / "schedule.json")
        try:
            (rd / "scenario.toml").write_text(_scenario_text(scenario), encoding="utf-8")
        except ValueError:
            pass
        (rd / "chaos.json").write_text(json.dumps({"scenario": scenario.name, "seed": seed,
                                                   "inject_bugs": list(inject_bugs)}, indent=2) + "\n")
        faults = FaultLog(rd / "faults.jsonl", world.now_ms)
        specs = [UserSpec(u, net.user_identity(u), net.user_host(u), net.user_links(u),
                          getattr(net, "user_link_opener", None)) for u in user_names(scenario)]
        w = scenario.workload
        async with trio.open_nursery() as nursery:
            schedule_done = trio.Event()

            async def player() -> None:
                try:
                    await play(net, schedule, faults, progress)
                finally:
                    schedule_done.set()

            async def heal_then_quiet() -> None:
                await schedule_done.wait()
                progress(f"all faults healed; quiet for {scenario.quiet_s:g} s")
                await trio.sleep(scenario.quiet_s)

            nursery.start_soon(player)
            stats = await run_workload(
                specs, net.registry_address, rd / "history.jsonl", messages=w.messages, duration_s=w.duration_s,
                rate=w.rate, namespaces=w.namespaces, seed=seed, body_bytes=w.body_bytes, drain_s=w.drain_s,
                delete_fraction=w.delete_fraction, poll_interval_s=w.poll_interval_s,
                client_bugs=[b for b in inject_bugs if b in CLIENT_BUGS], before_drain=heal_then_quiet,
                now_ms=world.now_ms, entropy=world.entropy,
                **({"network": world.network} if world.network is not None else {}))
        faults.close()
        progress(f"workload: {stats.sent} sent, {stats.ok} ok, {stats.failed} failed, {stats.unknown} unknown, "
                 f"{stats.received} received")
        before_checks = getattr(world, "before_checks", None)
        if before_checks is not None:
            await before_checks(net)  # on a cluster: the hosts' files, home for the checkers
        swarms = await live_swarms(net)
        live = {n for n, rt in net.nodes.items() if rt.state == "running"}
        verdict = run_checks(rd, checkers=scenario.checkers, swarms=swarms, live=live, swarms_source="registry",
                             now_ms=world.now_ms())
    try:
        from chaos.report.page import write_report

        write_report(rd)
    except Exception as exc:  # a report is a view: its failure must not hide the verdict
        progress(f"report failed: {type(exc).__name__}: {exc}")
    return RunResult(rd, verdict, exit_code(verdict), summary(verdict), seed)


def read_bundle(run_dir: Path) -> tuple[Scenario, Schedule, dict[str, Any]]:
    """The scenario, schedule and chaos settings a run directory was made from."""
    run_dir = Path(run_dir)
    chaos = json.loads((run_dir / "chaos.json").read_text(encoding="utf-8"))
    scenario = load_scenario(run_dir / "scenario.toml")
    schedule = Schedule.read(run_dir / "schedule.json")
    return scenario, schedule, chaos


async def replay(run_dir: Path, *, runs_dir: Path = Path("runs"), progress: Progress = print,
                 schedule: Schedule | None = None) -> tuple[RunResult, dict[str, Any]]:
    """Run the same schedule, topology, keys (same seed) and workload again; compare verdicts."""
    scenario, sched, chaos = read_bundle(run_dir)
    before = json.loads((Path(run_dir) / "verdict.json").read_text(encoding="utf-8"))
    result = await run_chaos(scenario, seed=chaos["seed"], runs_dir=runs_dir,
                             inject_bugs=tuple(chaos.get("inject_bugs") or ()), schedule=schedule or sched,
                             progress=progress)
    from chaos.checkers.verdict import harness_errors

    compare = {name: {"before": v.get("valid"), "after": result.verdict["checkers"].get(name, {}).get("valid")}
               for name, v in before.get("checkers", {}).items()}
    same = all(c["before"] == c["after"] for c in compare.values())
    # Whether each run did what it planned: a verdict from a run whose faults did not happen
    # as scheduled says less than it seems to.
    harness = {"before": harness_errors(before), "after": harness_errors(result.verdict)}
    return result, {"same": same, "checkers": compare, "harness": harness, "original": str(run_dir),
                    "replay": str(result.run_dir)}


def failing_checkers(verdict: dict[str, Any]) -> set[str]:
    return {name for name, v in verdict.get("checkers", {}).items() if v.get("valid") is False}


# The nightly job's canaries: each injected bug, run under the scenario whose
# faults let it show, must fail the checker named for it in testnet.base.bugs.  A
# canary that passes means the harness has gone blind to that kind of bug.
CANARY_SCENARIOS = {
    "client-id-in-layers": "smoke",
    "one-hop-path": "smoke",
    "skip-replication": "smoke",
    "ack-before-commit": "kill-restart",
    "ack-before-sync": "power-loss",
    "wrong-inbox": "smoke",
    "local-delete": "smoke",
    "no-node-auth": "adversary",
    "unsigned-peer-delete": "byzantine",
}


async def _nightly_entry(scenario: Scenario, *, seed: int | None, runs_dir: Path, progress: Progress, prune: bool,
                         bug: str | None = None, replay_failures: bool = False) -> dict[str, Any]:
    """One nightly run: ``status`` "pass", "fail" or "harness" (the run did not do what it
    planned — a fault failed, was skipped or came late, or the run itself broke: neither a
    pass nor a failure, with ``harness`` saying why)."""
    from testnet.base.bugs import BUGS

    from chaos.checkers.verdict import harness_errors

    entry: dict[str, Any] = {"scenario": scenario.name}
    if bug is not None:
        entry.update(inject_bug=bug, expect_failing=BUGS[bug][2])
    try:
        r = await run_chaos(scenario, seed=seed, runs_dir=runs_dir, progress=progress,
                            inject_bugs=(bug,) if bug else ())
    except Exception as exc:
        error = describe_error(exc)["error"]
        entry.update(valid="unknown", passed=False, status="harness", error=error,
                     harness=[f"the run broke: {error}"])
        return entry
    failing = sorted(failing_checkers(r.verdict))
    entry.update(seed=r.seed, valid=r.verdict.get("valid"), run_dir=str(r.run_dir), failing=failing)
    harness = harness_errors(r.verdict)
    # A plain run passes when every checker holds; a canary passes when its checker caught the bug.
    entry["passed"] = not harness and ((entry["expect_failing"] in failing) if bug else (r.exit_code == 0))
    entry["status"] = "harness" if harness else "pass" if entry["passed"] else "fail"
    if harness:
        entry["harness"] = harness
    if entry["passed"] and prune:
        shutil.rmtree(r.run_dir / "nodes", ignore_errors=True)  # keep the record, drop the bulk
        entry["pruned"] = True
    if entry["status"] == "fail" and replay_failures and bug is None:
        # Once more with the same schedule, keys and workload: does it fail the same way?
        progress(f"replaying the failing {scenario.name} run (seed {r.seed})")
        try:
            again, compare = await replay(r.run_dir, runs_dir=runs_dir / "replays", progress=progress)
            entry["replay"] = {"run_dir": str(again.run_dir), "same_verdict": compare["same"],
                               "failing": sorted(failing_checkers(again.verdict)),
                               "harness": compare["harness"]["after"]}
        except Exception as exc:
            entry["replay"] = {"error": describe_error(exc)["error"][:300]}
    return entry


async def nightly(scenarios: list[Path], *, runs_dir: Path = Path("runs/nightly"), progress: Progress = print,
                  prune: bool = True, seeds: int = 1, canaries: list[str] | None = None,
                  first_seed: int | None = None, replay_failures: bool = False) -> list[dict[str, Any]]:
    """Every scenario ``seeds`` times with fresh seeds (or ``first_seed``, +1, ...), then each
    canary bug once under its scenario.  Failing bundles are kept whole; passing ones pruned.
    With ``replay_failures`` each failing run is replayed once, to tell a reproducible
    failure from one that needed its timing."""
    results = []
    for path in scenarios:
        scenario = load_scenario(path)
        for i in range(seeds):
            seed = None if first_seed is None else first_seed + i
            results.append(await _nightly_entry(scenario, seed=seed, runs_dir=runs_dir, progress=progress,
                                                prune=prune, replay_failures=replay_failures))
    for bug in canaries or ():
        scenario = load_scenario(CANARY_SCENARIOS[bug])
        results.append(await _nightly_entry(scenario, seed=first_seed, runs_dir=runs_dir, progress=progress,
                                            prune=prune, bug=bug))
    return results
