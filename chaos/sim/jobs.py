"""Simulated runs in worker processes: each worker (``python -m chaos.sim
worker``) takes a list of jobs on stdin and prints one JSON result per line."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from typing import Any

from .determinism import HASH_SEED


def _spawn_worker(jobs: list[dict[str, Any]]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": HASH_SEED}
    proc = subprocess.Popen([sys.executable, "-m", "chaos.sim", "worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(jobs))
    proc.stdin.close()
    return proc


def run_jobs(jobs: list[dict[str, Any]], workers: int, on_result: Any = None,
             stop_when: Any = None) -> list[dict[str, Any]]:
    """Run simulated runs in ``workers`` processes (job i to worker i mod n); their results.
    ``stop_when(result)`` true stops every worker (by pid) after that result."""
    procs = [_spawn_worker(jobs[i::workers]) for i in range(min(workers, len(jobs)))]
    results: list[dict[str, Any]] = []
    try:
        sel = selectors.DefaultSelector()
        for p in procs:
            sel.register(p.stdout, selectors.EVENT_READ, p)
        open_count = len(procs)
        while open_count:
            for key, _ in sel.select():
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_count -= 1
                    continue
                r = json.loads(line)
                results.append(r)
                if on_result:
                    on_result(r)
                if stop_when is not None and stop_when(r):
                    return results
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # our own child, by its pid
            p.wait()
