"""``swarmnet sim run``: a chaos scenario in the simulation, exactly.

The run is :func:`chaos.run.runner.run_chaos` itself — same schedule expansion,
nemeses, workload, checkers and report — given :class:`SimProcesses` as its
world.  One seed fixes everything: keys, schedule, workload, every nonce,
every jitter and the scheduler's choices.  The verdict records the SHA-256
of ``history.jsonl`` and ``faults.jsonl`` and the virtual and wall time, so
a replay can say "identical" or show the first difference.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from chaos.run.runner import RunResult, run_chaos
from chaos.scenario import Scenario
from chaos.schedule import Schedule

from .determinism import run_exact
from .testnet import SimWorld, open_sim_testnet

EXACT_FILES = ("history.jsonl", "faults.jsonl")
FULL_GC_EVERY = 1000  # younger collections per full one during a simulated run (CPython's default: 10)
YOUNG_GC_EVERY = 5000  # allocations (net) per young collection during a simulated run (CPython's default: 700)


class SimProcesses:
    """The simulation as a chaos run's world (see :class:`chaos.run.runner.RealProcesses`)."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.network = world.net

    def open(self, opts: Any, progress: Callable[[str], None]) -> Any:
        return open_sim_testnet(opts, self.world, progress=progress)

    def now_ms(self) -> int:
        return self.world.now_ms()

    def entropy(self, user: str) -> Any:
        return self.world.randbytes("user", user)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_sim(scenario: Scenario, seed: int, *, variant: int = 0, runs_dir: Path = Path("runs"),
            run_dir: Path | None = None, inject_bugs: tuple[str, ...] = (), schedule: Schedule | None = None,
            progress: Callable[[str], None] = print) -> RunResult:
    """Run ``scenario`` in the simulation with ``seed`` (and ``variant``, see
    :class:`SimWorld`): a fresh trio run, so call it from sync code, once per process
    when runs must compare (trio's scheduler state is per process)."""
    world = SimWorld(seed, variant, wire=scenario.wire)
    clock: dict[str, float] = {}
    t0 = time.monotonic()
    cpu0 = time.process_time()

    def phases(msg: str) -> None:
        # The run_chaos line that follows the drained workload: the simulated run proper
        # ends here; checking and the report (real work, no virtual time) come after.
        if msg.startswith("workload:"):
            import trio

            clock.update(run_virtual=trio.current_time(), run_wall=time.monotonic() - t0,
                         run_cpu=time.process_time() - cpu0)
        progress(msg)

    async def main() -> RunResult:
        import trio

        result = await run_chaos(scenario, seed=seed, run_dir=run_dir, runs_dir=runs_dir, inject_bugs=inject_bugs,
                                 schedule=schedule, progress=phases, world=SimProcesses(world))
        clock["virtual_s"] = trio.current_time()
        return result

    # The whole network's long-lived state (views, stores, connections) is one heap here:
    # each full collection walks all of it, and they came often while it grew (a third of a
    # 600-node run's CPU).  Young garbage is still collected, in larger batches (a young
    # collection's cost is mostly its fixed walk of the survivors); full passes are rare,
    # and what was imported before the run (modules, classes, functions: most of a small
    # network's heap) is frozen out of every pass.
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_EVERY, thresholds[1], FULL_GC_EVERY)
    try:
        result = run_exact(main, world.scheduler_seed)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()  # a worker's next run must not keep this one's heap out of reach
    wall = time.monotonic() - t0
    run_wall, run_cpu = clock.get("run_wall", wall), clock.get("run_cpu", wall)
    sim = {"seed": seed, "variant": variant, "wire": scenario.wire, "virtual_s": round(clock["virtual_s"], 3), "wall_s": round(wall, 3),
           "speedup": round(clock["virtual_s"] / wall, 1) if wall > 0 else None,
           # boot -> workload drained, without checkers and report
           "run": {"virtual_s": round(clock.get("run_virtual", clock["virtual_s"]), 3), "wall_s": round(run_wall, 3),
                   "cpu_s": round(run_cpu, 3),
                   "speedup": round(clock.get("run_virtual", 0) / run_wall, 1) if run_wall > 0 else None},
           "sha256": {name: digest(result.run_dir / name) for name in EXACT_FILES}}
    path = result.run_dir / "verdict.json"
    verdict = json.loads(path.read_text(encoding="utf-8"))
    verdict["sim"] = sim
    path.write_text(json.dumps(verdict, indent=2) + "\n", encoding="utf-8")
    result.verdict["sim"] = sim
    return result


def first_difference(a: Path, b: Path) -> dict[str, Any] | None:
    """Where two runs' exact files first differ (``None`` when identical)."""
    for name in EXACT_FILES:
        la = (a / name).read_text(encoding="utf-8").splitlines() if (a / name).is_file() else []
        lb = (b / name).read_text(encoding="utf-8").splitlines() if (b / name).is_file() else []
        for i in range(max(len(la), len(lb))):
            x = la[i] if i < len(la) else None
            y = lb[i] if i < len(lb) else None
            if x != y:
                return {"file": name, "line": i + 1, "original": x, "replay": y}
    return None
