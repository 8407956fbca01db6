"""Shrinking a failing chaos run to the faults that matter.

Delta debugging (Zeller's ddmin) over the schedule's fault list: try
complements of ever smaller chunks, keep any smaller schedule that still
fails the same checker.  Each candidate is a fresh run; timing is not
deterministic, so a candidate counts as failing if any of ``attempts`` runs
fails — and as passing only when all of them pass.

The search itself is pure (:func:`ddmin` takes a test function), so it is
tested without processes; :func:`shrink_run` plugs fresh chaos runs into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from chaos.schedule import schedule_as_scenario, to_toml

Test = Callable[[list[int]], Awaitable[bool]]


@dataclass
class ShrinkLog:
    tried: list[dict[str, Any]] = field(default_factory=list)

    def add(self, ids: Sequence[int], failing: bool, runs: list[str]) -> None:
        self.tried.append({"faults": list(ids), "fails": failing, "runs": runs})


async def ddmin(items: list[int], fails: Test) -> list[int]:
    """A 1-minimal sublist of ``items`` for which ``fails`` holds (``fails(items)`` assumed)."""
    n = 2
    current = list(items)
    while len(current) >= 2:
        chunk = max(1, len(current) // n)
        subsets = [current[i:i + chunk] for i in range(0, len(current), chunk)]
        reduced = False
        for s in subsets:
            if await fails(s):
                current, n, reduced = s, 2, True
                break
        if not reduced:
            for s in subsets:
                complement = [x for x in current if x not in s]
                if complement and await fails(complement):
                    current, n, reduced = complement, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), n * 2)
    if len(current) == 1 and await fails([]):
        return []
    return current


def checker_to_keep(verdict: dict[str, Any], checker: str | None, run_dir: Path) -> str:
    """The failing checker a shrink (or a reproduction) must keep failing: ``checker``
    if the run failed it, else the run's first failing one; ValueError if none."""
    from chaos.run.runner import failing_checkers

    failing = failing_checkers(verdict)
    if not failing:
        raise ValueError(f"{run_dir} did not fail any checker: nothing to do")
    checker = checker or sorted(failing)[0]
    if checker not in failing:
        raise ValueError(f"{run_dir} did not fail the {checker} checker (it failed {', '.join(sorted(failing))})")
    return checker


async def shrink_run(run_dir: Path, *, attempts: int = 2, checker: str | None = None,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Find a minimal sub-schedule of ``run_dir``'s that still fails ``checker``.

    Writes ``shrink/minimal.toml`` (a runnable scenario) and ``shrink/SHRINK.md``.
    """
    from chaos.run.runner import failing_checkers, read_bundle, run_chaos

    run_dir = Path(run_dir)
    scenario, schedule, chaos = read_bundle(run_dir)
    verdict = json.loads((run_dir / "verdict.json").read_text(encoding="utf-8"))
    checker = checker_to_keep(verdict, checker, run_dir)
    out = run_dir / "shrink"
    out.mkdir(exist_ok=True)
    log = ShrinkLog()
    cache: dict[tuple[int, ...], bool] = {}

    async def fails(ids: list[int]) -> bool:
        key = tuple(sorted(ids))
        if key in cache:
            return cache[key]
        runs = []
        result = False
        for attempt in range(attempts):
            progress(f"shrink: faults {list(key) or '[]'} attempt {attempt + 1}/{attempts}")
            r = await run_chaos(scenario, seed=chaos["seed"], runs_dir=out / "runs",
                                inject_bugs=tuple(chaos.get("inject_bugs") or ()), schedule=schedule.subset(key),
                                progress=lambda m: None)
            runs.append(str(r.run_dir))
            if checker in failing_checkers(r.verdict):
                result = True
                break
        cache[key] = result
        log.add(key, result, runs)
        progress(f"shrink: faults {list(key) or '[]'} -> {'fails' if result else 'passes'}")
        return result

    ids = [f.id for f in schedule.faults]
    minimal = await ddmin(ids, fails) if ids else []
    small = schedule.subset(minimal)
    (out / "minimal.toml").write_text(to_toml(schedule_as_scenario(scenario, small)), encoding="utf-8")
    removed = [f for f in schedule.faults if f.id not in set(minimal)]
    lines = [f"# Shrinking {run_dir.name}", "",
             f"Checker: **{checker}**; {len(ids)} faults → {len(minimal)}; {len(log.tried)} candidate schedules, "
             f"up to {attempts} runs each.", "", "Kept:", ""]
    lines += [f"- fault {f.id}: {f.kind} at {f.at_s:g} s for {f.duration_s:g} s, target {dict(f.target)}"
              for f in small.faults] or ["- nothing: the bug shows without any fault"]
    lines += ["", "Removed (the failure persists without them):", ""]
    lines += [f"- fault {f.id}: {f.kind} at {f.at_s:g} s" for f in removed] or ["- nothing"]
    lines += ["", f"Run it again: `swarmnet chaos run {out / 'minimal.toml'} --seed {chaos['seed']}"
                  + "".join(f" --inject-bug {b}" for b in chaos.get("inject_bugs") or []) + "`", ""]
    (out / "SHRINK.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "shrink.json").write_text(json.dumps({"checker": checker, "original": ids, "minimal": minimal,
                                                 "tried": log.tried}, indent=2) + "\n", encoding="utf-8")
    return {"checker": checker, "original": ids, "minimal": minimal, "scenario": str(out / "minimal.toml"),
            "account": str(out / "SHRINK.md"), "candidates": len(log.tried)}
