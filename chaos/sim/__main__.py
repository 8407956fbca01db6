"""``python -m chaos.sim worker``: run the simulated chaos runs given as a JSON
list on stdin, one after another in this process, and print one JSON line per
run (used by ``swarmnet sim explore|shrink|reproduce``)."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from chaos.checkers.verdict import harness_errors
    from chaos.run.runner import failing_checkers
    from chaos.scenario import load_scenario
    from chaos.schedule import Schedule

    from .runner import run_sim

    t0 = time.monotonic()
    out: dict[str, Any] = {"seed": job["seed"], "variant": job.get("variant", 0), "key": job.get("key")}
    try:
        schedule = Schedule.read(Path(job["schedule"])) if job.get("schedule") else None
        if schedule is not None and job.get("faults") is not None:
            schedule = schedule.subset(tuple(job["faults"]))
        result = run_sim(load_scenario(job["scenario"]), job["seed"], variant=job.get("variant", 0),
                         runs_dir=Path(job.get("runs_dir", "runs")), inject_bugs=tuple(job.get("inject_bugs") or ()),
                         schedule=schedule, progress=lambda m: None)
    except Exception as exc:  # a crashed run is reported, and the next one still runs
        out.update(valid=None, error=f"{type(exc).__name__}: {exc}"[:500], wall_s=round(time.monotonic() - t0, 2))
        return out
    sim = result.verdict["sim"]
    out.update(valid=result.verdict.get("valid"), failing=sorted(failing_checkers(result.verdict)),
               harness=harness_errors(result.verdict),
               run_dir=str(result.run_dir), wall_s=sim["wall_s"], virtual_s=sim["virtual_s"], sha256=sim["sha256"],
               run=sim["run"], max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if job.get("prune") and out["valid"] is True:
        shutil.rmtree(result.run_dir / "nodes", ignore_errors=True)  # keep the record, drop the bulk
    return out


def main(argv: list[str]) -> int:
    if argv[:1] != ["worker"]:
        print("usage: python -m chaos.sim worker < jobs.json", file=sys.stderr)
        return 2
    for job in json.load(sys.stdin):
        print(json.dumps(run_job(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
