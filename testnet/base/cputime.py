"""CPU time of whole processes, read from the kernel (psutil): what benchmarks
report per store, per boot or per idle second, summed over every process of a
network.  For where one process's own CPU goes, see :mod:`.cpuprofile`."""

from __future__ import annotations

import psutil


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total
