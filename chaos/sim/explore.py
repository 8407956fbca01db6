"""Shrinking and reproducing with exact runs.

Shrinking (:func:`shrink_sim`) is the chaos shrinker's delta debugging
(:func:`chaos.run.shrink.ddmin`) with one exact simulated run per candidate: no
attempts, no flakiness.  Reproducing (:func:`reproduce`) takes any run's
bundle — a real one too — and tries its topology, schedule and workload
(same seed) under many interleavings (variants) until one fails the same
checker; that bundle then replays exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import trio

from chaos.run.runner import read_bundle
from chaos.schedule import schedule_as_scenario, to_toml
from chaos.run.shrink import checker_to_keep, ddmin

from .jobs import run_jobs


def _bundle(run_dir: Path) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    scenario, schedule, chaos = read_bundle(run_dir)
    verdict = json.loads((run_dir / "verdict.json").read_text(encoding="utf-8"))
    return scenario, schedule, chaos, verdict


def shrink_sim(run_dir: Path, *, checker: str | None = None,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
    run_dir = Path(run_dir)
    scenario, schedule, chaos, verdict = _bundle(run_dir)
    checker = checker_to_keep(verdict, checker, run_dir)
    variant = (verdict.get("sim") or {}).get("variant", 0)
    out = run_dir / "shrink"
    out.mkdir(exist_ok=True)
    tried: list[dict[str, Any]] = []

    async def fails(ids: list[int]) -> bool:
        job = {"scenario": str(run_dir / "scenario.toml"), "seed": chaos["seed"], "variant": variant,
               "inject_bugs": list(chaos.get("inject_bugs") or ()), "schedule": str(run_dir / "schedule.json"),
               "faults": sorted(ids), "runs_dir": str(out / "runs"), "prune": True}
        (r,) = await trio.to_thread.run_sync(run_jobs, [job], 1)
        result = checker in (r.get("failing") or [])
        tried.append({"faults": sorted(ids), "fails": result, "run": r.get("run_dir")})
        progress(f"shrink: faults {sorted(ids) or '[]'} -> {'fails' if result else 'passes'}")
        return result

    ids = [f.id for f in schedule.faults]
    minimal = trio.run(ddmin, ids, fails) if ids else []
    small = schedule.subset(tuple(minimal))
    (out / "minimal.toml").write_text(to_toml(schedule_as_scenario(scenario, small)), encoding="utf-8")
    (out / "shrink.json").write_text(json.dumps({"checker": checker, "original": ids, "minimal": minimal,
                                                 "variant": variant, "tried": tried}, indent=2) + "\n",
                                     encoding="utf-8")
    command = (f"swarmnet sim run {out / 'minimal.toml'} --seed {chaos['seed']} --variant {variant}"
               + "".join(f" --inject-bug {b}" for b in chaos.get("inject_bugs") or ()))
    return {"checker": checker, "original": ids, "minimal": minimal, "scenario": str(out / "minimal.toml"),
            "candidates": len(tried), "command": command}


def reproduce(run_dir: Path, *, variants: int = 200, jobs: int = 2, checker: str | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    run_dir = Path(run_dir)
    scenario, schedule, chaos, verdict = _bundle(run_dir)
    checker = checker_to_keep(verdict, checker, run_dir)
    out = run_dir / "reproduce"
    todo = [{"scenario": str(run_dir / "scenario.toml"), "seed": chaos["seed"], "variant": v,
             "inject_bugs": list(chaos.get("inject_bugs") or ()), "schedule": str(run_dir / "schedule.json"),
             "runs_dir": str(out), "prune": True} for v in range(variants)]
    tried = [0]

    def seen(r: dict[str, Any]) -> None:
        tried[0] += 1
        progress(f"variant {r['variant']}: {', '.join(r.get('failing') or []) or r.get('error') or 'valid'}")

    results = run_jobs(todo, jobs, seen, stop_when=lambda r: checker in (r.get("failing") or []))
    found = sorted((r for r in results if checker in (r.get("failing") or [])), key=lambda r: r["variant"])
    return {"checker": checker, "seed": chaos["seed"], "tried": tried[0], "found": found[0] if found else None}
