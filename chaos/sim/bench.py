"""``swarmnet bench sim``: what the simulation buys, measured.

* speed — smoke and mixed: virtual seconds per second of the run's own CPU
  (one process is one core; boot to drained workload, checkers and report
  apart);
* command — ``swarmnet sim run mixed`` as a user runs it, from the command
  to its verdict and report: wall time against the virtual span, and where
  the wall time went (interpreter start and imports, boot to drained
  workload, checkers and teardown, report);
* explore — smoke over many seeds in worker processes: seeds per hour;
* scale — a network of ``--nodes`` (default 1,000, direct links) with a
  workload of as many messages: peak memory, wall time, verdict;
* exact — every library scenario twice, in separate processes: how many
  differ (history.jsonl, faults.jsonl).

Targets (issue "deterministic simulation"): speed >= 10, explore >= 500
seeds/hour on 2 cores, scale <= 4 GiB and valid, exact 0 differences; the
whole command in <= 1/20 of its virtual span (issue "half the work per
message").
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from chaos.scenario import library

from .jobs import run_jobs

SCALE_TOML = """name = "scale"
description = "A large network, no faults: registry, swarms and a workload at scale."
[topology]
nodes = {nodes}
min_swarm = 5
users = 10
links = "direct"
[workload]
messages = {messages}
rate = 100
drain_s = 30
[check]
quiet_s = 2
"""


def command_wall(scenario: str, seed: int, out: Path) -> dict[str, Any]:
    """``swarmnet sim run SCENARIO --seed SEED`` in a fresh process, as a user types it (it
    re-executes itself with the fixed hash seed): its wall time from start to exit, its CPU, and the
    parts of it — the run's own figures from its verdict, the report timed again on the
    finished run directory, the rest (interpreter start, imports, re-execution) by
    difference."""
    run_dir = out / f"{scenario}-{seed}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "testnet.cli", "sim", "run", scenario, "--seed", str(seed),
                           "--run-dir", str(run_dir), "--json", "--quiet"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The command's own CPU (user + system; the re-executed process is the same one): on a
    # machine other work loads, wall time measures the load as much as the command.
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    load = [round(load0, 1), round(os.getloadavg()[0], 1)]
    try:
        verdict = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"scenario": scenario, "seed": seed, "error": (done.stderr or done.stdout)[-400:], "wall_s": wall}
    sim = verdict["sim"]
    from chaos.report.page import write_report

    t1 = time.monotonic()
    write_report(run_dir)
    report = time.monotonic() - t1
    run = sim["run"]["wall_s"]
    return {"scenario": scenario, "seed": seed, "valid": verdict.get("valid"), "virtual_s": sim["virtual_s"],
            "wall_s": round(wall, 2), "wall_per_virtual": round(wall / sim["virtual_s"], 3),
            "cpu_s": round(cpu, 2), "cpu_per_virtual": round(cpu / sim["virtual_s"], 3), "load_1min": load,
            "parts_s": {"start, imports, re-exec": round(wall - sim["wall_s"], 2), "boot to drained workload": run,
                        "checkers, teardown": round(max(sim["wall_s"] - run - report, 0.0), 2),
                        "report": round(report, 2)},
            "run_cpu_s": sim["run"]["cpu_s"]}


def bench_sim(*, sections: tuple[str, ...], explore_seeds: int, jobs: int, nodes: int,
              out: Path, progress: Any = print) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if "command" in sections:
        r["command"] = command_wall("mixed", 1, out / "command")
        progress(f"command: {r['command']}")
    if "speed" in sections:
        results = run_jobs([{"scenario": name, "seed": 1, "runs_dir": str(out / "speed"), "prune": True}
                            for name in ("smoke", "mixed")], 1)
        r["speed"] = [{"scenario": name, "valid": x.get("valid"), **x.get("run", {}),
                       "virtual_per_cpu_s": round(x["run"]["virtual_s"] / x["run"]["cpu_s"], 1)}
                      for name, x in zip(("smoke", "mixed"), results)]
        progress(f"speed: {r['speed']}")
    if "explore" in sections:
        t0 = time.monotonic()
        results = run_jobs([{"scenario": "smoke", "seed": s, "runs_dir": str(out / "explore"), "prune": True}
                            for s in range(1, explore_seeds + 1)], jobs)
        wall = time.monotonic() - t0
        r["explore"] = {"seeds": len(results), "jobs": jobs, "wall_s": round(wall, 1),
                        "seeds_per_hour": round(len(results) / wall * 3600),
                        "valid": sum(1 for x in results if x.get("valid") is True)}
        progress(f"explore: {r['explore']}")
    if "scale" in sections:
        path = out / "scale.toml"
        path.write_text(SCALE_TOML.format(nodes=nodes, messages=nodes), encoding="utf-8")
        (x,) = run_jobs([{"scenario": str(path), "seed": 1, "runs_dir": str(out / "scale"), "prune": True}], 1)
        r["scale"] = {"nodes": nodes, "messages": nodes, "valid": x.get("valid"), "error": x.get("error"),
                      "max_rss_mib": x.get("max_rss_mib"), "wall_s": x.get("wall_s"), "run": x.get("run")}
        progress(f"scale: {r['scale']}")
    if "exact" in sections:
        names = [p.stem for p in library()]
        jobs_ = [{"scenario": n, "seed": 1, "runs_dir": str(out / "exact"), "prune": True, "key": f"{n}/{k}"}
                 for n in names for k in (0, 1)]
        results = run_jobs(jobs_, jobs)
        by: dict[str, list[Any]] = {}
        for x in results:
            by.setdefault(x["key"].split("/")[0], []).append(x.get("sha256"))
        differ = sorted(n for n, hs in by.items() if len(hs) != 2 or hs[0] != hs[1] or hs[0] is None)
        r["exact"] = {"scenarios": len(names), "runs": len(results), "differences": len(differ), "differ": differ,
                      "valid": {x["key"].split("/")[0]: x.get("valid") for x in results}}
        progress(f"exact: {r['exact']}")
    return r


def _command() -> click.Command:
    @click.command("sim")
    @click.option("--only", default="command,speed,explore,scale,exact", show_default=True,
                  help="sections to run, comma-separated")
    @click.option("--explore-seeds", type=int, default=20, show_default=True)
    @click.option("--jobs", type=int, default=2, show_default=True)
    @click.option("--nodes", type=int, default=1000, show_default=True,
                  help="scale section: nodes (and messages)")
    @click.option("--json", "as_json", is_flag=True)
    def bench_command(only: str, explore_seeds: int, jobs: int, nodes: int, as_json: bool) -> None:
        """The simulation's speed, exploration rate, scale and exactness, against its targets."""
        sections = tuple(s.strip() for s in only.split(",") if s.strip())
        out = Path(tempfile.mkdtemp(prefix="swarmnet-bench-sim-"))
        r = bench_sim(sections=sections, explore_seeds=explore_seeds, jobs=jobs, nodes=nodes, out=out,
                      progress=lambda m: None if as_json else click.echo(m, err=True))
        if as_json:
            click.echo(json.dumps(r, indent=2))
            return
        if "command" in r:
            c = r["command"]
            if "error" in c:
                click.echo(f"command sim run {c['scenario']}: failed: {c['error']}")
            else:
                parts = ", ".join(f"{k} {v} s" for k, v in c["parts_s"].items())
                click.echo(f"command sim run {c['scenario']} --seed {c['seed']} (whole, as a user waits for it): "
                           f"{c['virtual_s']} s virtual in {c['wall_s']} s of wall time = "
                           f"1/{1 / c['wall_per_virtual']:.1f} of its virtual span (target <= 1/20); "
                           f"{c['cpu_s']} s of CPU = 1/{1 / c['cpu_per_virtual']:.1f}; "
                           f"load {c['load_1min'][0]}-{c['load_1min'][1]}; valid {c['valid']}\n"
                           f"  wall parts: {parts}")
        for s in r.get("speed", []):
            click.echo(f"speed {s['scenario']}: {s['virtual_s']} s virtual in {s['cpu_s']} s CPU = "
                       f"{s['virtual_per_cpu_s']}x on one core (target >= 10); valid {s['valid']}")
        if "explore" in r:
            e = r["explore"]
            click.echo(f"explore smoke: {e['seeds']} seeds in {e['wall_s']} s with {e['jobs']} jobs = "
                       f"{e['seeds_per_hour']} seeds/hour (target >= 500); {e['valid']} valid")
        if "scale" in r:
            s = r["scale"]
            click.echo(f"scale: {s['nodes']} nodes, {s['messages']} messages: valid {s['valid']}, peak "
                       f"{s['max_rss_mib']} MiB, {s['wall_s']} s wall (target: 1,000 nodes in <= 4096 MiB, valid)"
                       + (f"; error {s['error']}" if s.get("error") else ""))
        if "exact" in r:
            x = r["exact"]
            click.echo(f"exact: {x['scenarios']} library scenarios twice each: {x['differences']} differ "
                       f"(target 0){': ' + ', '.join(x['differ']) if x['differ'] else ''}")
        click.echo(f"bundles: {out}")

    return bench_command


bench_command = _command()
