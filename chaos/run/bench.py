"""``swarmnet bench faults``: how late each kind of fault starts and heals on a large network.

A real chaos run (Toxiproxy links, real processes, the workload and every checker) of a
library scenario's topology and workload — ``large`` by default, 300 nodes and 92,100
links — under a timeline of every nemesis kind of the library, once each, one after the
other: link faults on every link (the worst case: a toxic on each made proxy), partitions
across random halves of the network, process and clock faults on a random node.  It prints
per kind the worst lateness of its start and of its heal over the seeds run, what failed,
and each run's verdict; ``--json`` gives the same as data.  Exit 0 when every fault of every
run came on time and none failed, else 2 (the runs' harness errors).  Run it alone: a
300-node run takes most of this machine for a few minutes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from testnet.base.jsonl import read_jsonl

from chaos.run.play import describe_error
from chaos.scenario import NEMESES, Scenario, ScenarioError, load_scenario
from chaos.schedule import to_toml

# A target per kind, as the generator would pick it, but as large as the kind allows.
TARGETS: dict[str, dict[str, Any]] = {"join": {"new": 1}}
for _kind, (_family, _) in NEMESES.items():
    if _family == "link":
        TARGETS[_kind] = {"all-links": True}


def every_fault_scenario(base: Scenario, kinds: list[str], *, start_s: float, interval_s: float,
                         duration_s: float) -> dict[str, Any]:
    """``base``'s topology and workload under one fault of each kind, ``interval_s`` apart (a TOML-able dict)."""
    timeline = [{"at_s": round(start_s + i * interval_s, 3), "duration_s": duration_s, "kind": kind,
                 "target": TARGETS.get(kind, {}), "params": dict(NEMESES[kind][1])} for i, kind in enumerate(kinds)]
    t, w = base.topology, base.workload
    return {"name": f"{base.name}-every-fault",
            "description": f"{base.name}'s network under one fault of each kind (swarmnet bench faults)",
            "topology": {"nodes": t.nodes, "min_swarm": t.min_swarm, "users": t.users, "links": t.links},
            "workload": {"rate": w.rate, "duration_s": round(start_s + len(kinds) * interval_s + 2, 3),
                         "namespaces": list(w.namespaces), "body_bytes": w.body_bytes, "drain_s": w.drain_s,
                         "delete_fraction": w.delete_fraction, "poll_interval_s": w.poll_interval_s},
            "faults": {"timeline": timeline}, "check": {"quiet_s": base.quiet_s, "checkers": list(base.checkers)}}


def lateness_by_kind(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind, over every run: the worst start and heal lateness (ms), the most any phase's
    work began early (ms: centred on its planned time), and the failures."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        for r in run["faults"]:
            k = out.setdefault(r.get("kind"), {"start_ms": None, "heal_ms": None, "early_ms": None, "errors": [],
                                               "runs": 0})
            phase = {"start": "start_ms", "end": "heal_ms"}.get(r.get("phase"))
            if r.get("phase") == "start":
                k["runs"] += 1
            if phase and isinstance(r.get("late_ms"), (int, float)):
                k[phase] = max(k[phase] or 0, r["late_ms"])
            if phase and isinstance(r.get("early_ms"), (int, float)):
                k["early_ms"] = max(k["early_ms"] or 0, r["early_ms"])
            if r.get("phase") in ("error", "skipped"):
                k["errors"].append(f"seed {run['seed']}: {r.get('during', r['phase'])}: {str(r.get('error'))[:200]}")
    return out


@click.command("faults")
@click.option("--scenario", "base_name", default="large", show_default=True,
              help="whose topology and workload (a library name or TOML file)")
@click.option("--seeds", type=click.IntRange(1, 20), default=1, show_default=True, help="runs, seeds N, N+1, ...")
@click.option("--first-seed", type=int, default=1, show_default=True)
@click.option("--kind", "kinds", multiple=True, type=click.Choice(list(NEMESES)), help="only these kinds")
@click.option("--interval", "interval_s", type=float, default=4.0, show_default=True, help="s between faults")
@click.option("--duration", "duration_s", type=float, default=2.5, show_default=True, help="s each fault lasts")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs/bench-faults"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_command(base_name: str, seeds: int, first_seed: int, kinds: tuple[str, ...], interval_s: float,
                  duration_s: float, runs_dir: Path, as_json: bool) -> None:
    """Each nemesis kind's worst start and heal lateness on a large network (real processes)."""
    from chaos.checkers.verdict import harness_errors
    from chaos.run.runner import run_chaos

    try:
        base = load_scenario(base_name)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{base.name}-every-fault.toml"
    path.write_text(to_toml(every_fault_scenario(base, list(kinds) or list(NEMESES), start_s=3.0,
                                                 interval_s=interval_s, duration_s=duration_s)), encoding="utf-8")
    scenario = load_scenario(path)
    start = time.monotonic()

    def say(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    runs = []
    for seed in range(first_seed, first_seed + seeds):
        try:
            result = trio.run(lambda: run_chaos(scenario, seed=seed, runs_dir=runs_dir, progress=say))
        except Exception as exc:  # a run that could not be made (a boot that failed) is a harness error
            error = describe_error(exc)["error"]
            say(f"seed {seed}: the run failed: {error}")
            runs.append({"seed": seed, "run_dir": None, "valid": "unknown", "worst": None,
                         "harness": [f"the run failed: {error}"], "faults": []})
            continue
        runs.append({"seed": seed, "run_dir": str(result.run_dir), "valid": result.verdict.get("valid"),
                     "worst": (result.verdict.get("faults") or {}).get("worst"),
                     "harness": harness_errors(result.verdict),
                     "faults": read_jsonl(result.run_dir / "faults.jsonl")})
    kinds_out = lateness_by_kind(runs)
    summary = {"scenario": base.name, "nodes": base.topology.nodes, "seeds": [r["seed"] for r in runs],
               "kinds": kinds_out, "runs": [{k: v for k, v in r.items() if k != "faults"} for r in runs]}
    (runs_dir / "bench-faults.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        def s(ms: Any) -> str:
            return "-" if ms is None else f"{ms / 1000:.2f}"

        click.echo(f"{base.name} ({base.topology.nodes} nodes), seeds {', '.join(str(r['seed']) for r in runs)}: "
                   "worst lateness per fault kind (s; done minus planned; early: its work begun before planned)")
        click.echo(f"  {'kind':12} {'start':>7} {'heal':>7} {'early':>7}  errors")
        for kind in NEMESES:
            k = kinds_out.get(kind)
            if k is not None:
                click.echo(f"  {kind:12} {s(k['start_ms']):>7} {s(k['heal_ms']):>7} {s(k['early_ms']):>7}  "
                           f"{'; '.join(k['errors'][:2]) or '-'}")
        for r in runs:
            w = r["worst"]
            click.echo(f"seed {r['seed']}: verdict {r['valid']}; worst "
                       + (f"{w['late_ms'] / 1000:.2f} s (fault {w['fault']} {w['kind']}, {w['phase']})" if w else "-")
                       + (f"; harness errors: {'; '.join(r['harness'][:3])}" if r["harness"] else "")
                       + f"  {r['run_dir'] or ''}")
    sys.exit(2 if any(r["harness"] for r in runs) else 0)
