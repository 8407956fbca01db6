"""``swarmnet sim run|replay|explore|shrink|reproduce``: chaos scenarios in the
deterministic simulation.  Exit codes as ``swarmnet chaos``: 0 valid, 1
invalid (or, for replay, not identical), 2 unknown / bad input.

Every simulated run happens in a process of its own (trio's scheduler state
is per process): ``run`` and ``replay`` run in this one, ``explore``,
``shrink`` and ``reproduce`` start one worker process per job
(``python -m chaos.sim``) and read one JSON line per run from it;
``explore`` and ``nightly`` with ``--cluster`` run the seeds as Ray tasks
over a cluster's cores instead (:mod:`.cluster`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from chaos.run.cli import fail, progress
from chaos.scenario import ScenarioError, load_scenario
from testnet.base.bugs import UnknownBug

from .determinism import ensure_hash_seed
from .jobs import run_jobs


def _seeds(text: str) -> list[int]:
    """``A..B`` (inclusive) or ``A,B,C``."""
    try:
        if ".." in text:
            a, b = text.split("..", 1)
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give A..B or A,B,C") from None


@click.group()
def sim() -> None:
    """Chaos scenarios in one process on virtual time: exact replay from a seed, fast, large."""


@sim.command("run")
@click.argument("scenario")
@click.option("--seed", type=int, default=None, help="run seed (keys, schedule, workload); default: the scenario's, else 1")
@click.option("--variant", type=int, default=0, show_default=True, help="interleaving: nonces, jitter, scheduler")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--inject-bug", "bugs", multiple=True, help="break the system on purpose (see `swarmnet bugs`)")
@click.option("--json", "as_json", is_flag=True, help="print the verdict as JSON")
@click.option("--quiet", is_flag=True)
def run_cmd(scenario: str, seed: int | None, variant: int, run_dir: Path | None, runs_dir: Path,
            bugs: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Run SCENARIO (a TOML file or a library name) in the simulation."""
    ensure_hash_seed()
    from .runner import run_sim

    try:
        sc = load_scenario(scenario)
        seed = seed if seed is not None else (sc.seed if sc.seed is not None else 1)
        result = run_sim(sc, seed, variant=variant, run_dir=run_dir, runs_dir=runs_dir, inject_bugs=bugs,
                         progress=progress(quiet))
    except (ScenarioError, UnknownBug, ValueError) as exc:
        fail(str(exc))
        return
    s = result.verdict["sim"]
    if as_json:
        click.echo(json.dumps(result.verdict, indent=2))
    else:
        click.echo(result.summary)
        click.echo(f"sim: seed {s['seed']} variant {s['variant']}: {s['virtual_s']} s virtual in {s['wall_s']} s "
                   f"wall ({s['speedup']}x); history {s['sha256']['history.jsonl'][:16]}, "
                   f"faults {(s['sha256']['faults.jsonl'] or '-')[:16]}")
        click.echo(f"bundle: {result.run_dir}")
    sys.exit(result.exit_code)


@sim.command("replay")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--quiet", is_flag=True)
def replay_cmd(run_dir: Path, quiet: bool) -> None:
    """Run a simulated RUN_DIR again from its seed; say "identical" or show the first difference."""
    ensure_hash_seed()
    from chaos.checkers.verdict import harness_errors
    from chaos.run.runner import read_bundle

    from .runner import first_difference, run_sim

    try:
        scenario, schedule, chaos = read_bundle(run_dir)
        verdict = json.loads((run_dir / "verdict.json").read_text(encoding="utf-8"))
        original = verdict["sim"]
    except (OSError, KeyError, ValueError) as exc:
        fail(f"{run_dir} is not a simulated run's bundle: {exc}")
        return
    n = 1
    while (run_dir / f"replay-{n}").exists():
        n += 1
    result = run_sim(scenario, chaos["seed"], variant=original.get("variant", 0), run_dir=run_dir / f"replay-{n}",
                     inject_bugs=tuple(chaos.get("inject_bugs") or ()), schedule=schedule, progress=progress(quiet))
    diff = first_difference(run_dir, result.run_dir)
    harness = harness_errors(result.verdict)
    if harness:  # a faithful replay of a run that did not do what it planned is no better than it
        click.echo("the schedule did not play as planned (a harness error, neither pass nor fail):\n  "
                   + "\n  ".join(harness[:5]))
    if diff is None:
        click.echo(f"identical: history.jsonl and faults.jsonl of {result.run_dir} match the original byte for byte "
                   f"({result.verdict['sim']['sha256']['history.jsonl'][:16]})")
        sys.exit(2 if harness else 0)
    click.echo(f"DIFFERENT: {diff['file']} line {diff['line']}\n  original: {diff['original']}\n"
               f"  replay:   {diff['replay']}")
    sys.exit(1)


CLUSTER_HELP = ("run the seeds as Ray tasks on the cluster at HOST:PORT (its head) instead of local workers; "
                "needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see README, 'Running on a cluster')")


def _run_jobs(todo: list[dict[str, Any]], jobs: int, cluster: str | None, show: Any) -> tuple[list, dict[str, Any]]:
    """The jobs' results, from local workers or the cluster; and where they ran."""
    if not cluster:
        return run_jobs(todo, max(1, jobs), show), {"jobs": max(1, jobs)}
    from testnet.cluster.driver import ClusterError

    from .cluster import run_jobs_cluster

    try:
        results, where = run_jobs_cluster(cluster, todo, show, progress=lambda m: click.echo(m, err=True))
    except ClusterError as exc:
        fail(str(exc))
        raise
    return results, {"cluster": cluster, **where}


def _where(where: dict[str, Any]) -> str:
    return f"{where['jobs']} jobs" if "jobs" in where else f"{len(where['hosts'])} hosts, {where['cores']} cores"


@sim.command("explore")
@click.argument("scenario")
@click.option("--seeds", "seeds_text", required=True, help="A..B (inclusive) or A,B,C")
@click.option("--variants", type=int, default=1, show_default=True,
              help="interleavings per seed (variant 0..N-1: same plan, other nonces, jitter and scheduling)")
@click.option("--jobs", type=int, default=os.cpu_count() or 1, show_default=True, help="worker processes")
@click.option("--inject-bug", "bugs", multiple=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs/explore"), show_default=True)
@click.option("--keep-passing", is_flag=True, help="keep the bundles of passing runs (default: verdict only)")
@click.option("--cluster", metavar="HOST:PORT", envvar="SWARMNET_CLUSTER", default=None, help=CLUSTER_HELP)
@click.option("--json", "as_json", is_flag=True)
def explore_cmd(scenario: str, seeds_text: str, variants: int, jobs: int, bugs: tuple[str, ...], runs_dir: Path,
                keep_passing: bool, cluster: str | None, as_json: bool) -> None:
    """Run SCENARIO in the simulation for many seeds; list the failing ones with their checker and bundle."""
    try:
        sc = load_scenario(scenario)
    except ScenarioError as exc:
        fail(str(exc))
        return
    seeds = _seeds(seeds_text)
    t0 = time.monotonic()
    todo = [{"scenario": sc.source or scenario, "seed": s, "variant": v, "inject_bugs": list(bugs),
             "runs_dir": str(runs_dir), "prune": not keep_passing} for s in seeds for v in range(max(1, variants))]

    def show(r: dict[str, Any]) -> None:
        if not as_json:
            mark = ("HARN" if r.get("harness") else "ok  " if r.get("valid") is True else
                    "FAIL" if r.get("valid") is False else "??  ")
            click.echo(f"{mark} seed {r['seed']} variant {r['variant']}: "
                       f"{', '.join(r.get('failing') or []) or r.get('error') or _harness(r) or 'valid'}  "
                       f"({r.get('wall_s', '?')} s{', on ' + r['host'] if r.get('host') else ''})", err=True)

    results, where = _run_jobs(todo, jobs, cluster, show)
    wall = time.monotonic() - t0
    failing = sorted((r for r in results if r.get("valid") is not True), key=lambda r: (r["seed"], r["variant"]))
    summary = {"scenario": sc.name, "seeds": len(seeds), "variants": variants, "ran": len(results), "failing": failing,
               "wall_s": round(wall, 1), "seeds_per_hour": round(len(results) / wall * 3600) if wall else None,
               "where": where}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{sc.name}: {len(results)} runs in {wall:.1f} s ({summary['seeds_per_hour']} per hour, "
                   f"{_where(where)}); {len(failing)} failing")
        for r in failing:
            click.echo(f"  seed {r['seed']} variant {r['variant']}: "
                       f"{', '.join(r.get('failing') or []) or r.get('error') or _harness(r)}  {r.get('run_dir')}")
    sys.exit(1 if failing else 0)


@sim.command("shrink")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--checker", default=None, help="the checker that must keep failing (default: the first failing)")
def shrink_cmd(run_dir: Path, checker: str | None) -> None:
    """Minimise a failing simulated run's fault list; each candidate is judged by one exact run."""
    from .explore import shrink_sim

    try:
        out = shrink_sim(run_dir, checker=checker, progress=progress(False))
    except ValueError as exc:
        fail(str(exc))
        return
    click.echo(f"{out['checker']}: {len(out['original'])} faults -> {len(out['minimal'])} "
               f"({out['candidates']} exact runs); minimal scenario: {out['scenario']}\n"
               f"run it: {out['command']}")


@sim.command("reproduce")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--seeds", "variants", type=int, default=200, show_default=True, help="interleavings to try")
@click.option("--jobs", type=int, default=os.cpu_count() or 1, show_default=True)
def reproduce_cmd(run_dir: Path, variants: int, jobs: int) -> None:
    """Run a real run's topology, schedule and workload in the simulation under many interleavings
    until one fails the same checker; that one replays exactly from then on."""
    from .explore import reproduce

    try:
        out = reproduce(run_dir, variants=variants, jobs=jobs, progress=progress(False))
    except ValueError as exc:
        fail(str(exc))
        return
    if out["found"] is None:
        click.echo(f"not reproduced in {out['tried']} interleavings of seed {out['seed']} "
                   f"(checker {out['checker']})")
        sys.exit(1)
    f = out["found"]
    click.echo(f"reproduced: {out['checker']} fails with seed {out['seed']} variant {f['variant']} "
               f"after {out['tried']} interleavings: {f['run_dir']}\n"
               f"replay it: swarmnet sim replay {f['run_dir']}")


@sim.command("nightly")
@click.option("--seeds", type=int, default=10, show_default=True, help="seeds per library scenario")
@click.option("--first-seed", type=int, default=1, show_default=True)
@click.option("--jobs", type=int, default=os.cpu_count() or 1, show_default=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs/sim-nightly"), show_default=True)
@click.option("--cluster", metavar="HOST:PORT", envvar="SWARMNET_CLUSTER", default=None, help=CLUSTER_HELP)
def nightly_cmd(seeds: int, first_seed: int, jobs: int, runs_dir: Path, cluster: str | None) -> None:
    """The nightly sweep in simulation: every library scenario over SEEDS seeds, then every canary
    (each injectable bug under its canary scenario must fail its checker here too)."""
    from chaos.run.runner import CANARY_SCENARIOS
    from chaos.scenario import library
    from testnet.base.bugs import BUGS

    t0 = time.monotonic()
    sweep = [{"scenario": p.stem, "seed": s, "runs_dir": str(runs_dir), "prune": True, "key": p.stem}
             for p in library() for s in range(first_seed, first_seed + seeds)]
    canaries = [{"scenario": CANARY_SCENARIOS[b], "seed": first_seed, "inject_bugs": [b], "runs_dir": str(runs_dir),
                 "key": f"canary:{b}"} for b in sorted(BUGS)]

    def show(r: dict[str, Any]) -> None:
        click.echo(f"{r['key']} seed {r['seed']}: "
                   f"{', '.join(r.get('failing') or []) or r.get('error') or _harness(r) or 'valid'}", err=True)

    results, where = _run_jobs(sweep + canaries, jobs, cluster, show)
    # A run that did not do what it planned (a fault failed, was skipped or came late; or the
    # run broke) is a harness error: neither pass nor fail, listed first.
    harness = sorted((r for r in results if r.get("harness") or r.get("valid") is None),
                     key=lambda r: (r["key"], r["seed"]))
    failing = sorted((r for r in results if not r["key"].startswith("canary:") and r.get("valid") is not True
                      and r not in harness), key=lambda r: (r["key"], r["seed"]))
    blind = sorted(r["key"][7:] for r in results if r["key"].startswith("canary:") and r not in harness
                   and BUGS[r["key"][7:]][2] not in (r.get("failing") or []))
    wall = time.monotonic() - t0
    summary = {"seeds": seeds, "first_seed": first_seed, "runs": len(results), "harness_errors": harness,
               "failing": failing, "canaries_blind": blind, "wall_s": round(wall, 1),
               "seeds_per_hour": round(len(results) / wall * 3600) if wall else None, "where": where}
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "nightly.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    click.echo(f"sim nightly: {len(sweep)} runs, {len(failing)} failing, {len(harness)} harness errors; "
               f"{len(canaries)} canaries, {len(blind)} blind{': ' + ', '.join(blind) if blind else ''}; "
               f"{summary['wall_s']} s ({summary['seeds_per_hour']} runs per hour, {_where(where)})")
    for r in harness:
        click.echo(f"  HARNESS {r['key']} seed {r['seed']}: {r.get('error') or _harness(r)}  {r.get('run_dir')}")
    for r in failing:
        click.echo(f"  FAIL    {r['key']} seed {r['seed']}: {', '.join(r.get('failing') or []) or r.get('error')}  "
                   f"{r.get('run_dir')}")
    sys.exit(1 if failing or blind else 2 if harness else 0)


def _harness(r: dict[str, Any]) -> str:
    """A job's harness errors in a line ("" if none)."""
    whys = r.get("harness") or []
    return ("harness error: " + "; ".join(w[:120] for w in whys[:2])) if whys else ""
