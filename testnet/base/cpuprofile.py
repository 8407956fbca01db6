"""A CPU-time sampling profiler for one process: where its CPU goes, by Python stack.

``SIGPROF`` fires after every ``interval_s`` of this process's CPU time
(user + system, ``ITIMER_PROF``), so only time on a core is sampled: a
process that waits for a core (30 node processes on 2 cores) or in
``epoll_wait`` is never sampled, unlike wall-clock profilers.  The kernel
checks the timer only at its scheduler tick, so signals come late and
coalesce (counting one per signal at 2 ms lost half the CPU here); each
sample is therefore weighted by the process CPU time (``process_time``)
since the previous one, and the weights sum to the CPU the process used.
Time inside a C call (a syscall, SQLite, libsodium) is charged to the Python
line that made the call, once it returns.  The handler runs between bytecodes
of the main thread and costs a few µs per sample.

The output is the "collapsed stacks" format of flame-graph tools
(``outer;...;inner WEIGHT`` per line, the weight in µs of CPU), one file per
process.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Callable

DEFAULT_INTERVAL_S = 0.005


class CpuSampler:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, tag: Callable[[], str] | None = None) -> None:
        """``tag``, when given, names what the process was doing at each sample (e.g. the
        running task's role); it becomes the outermost frame, ``role:<tag>``."""
        self.interval_s = interval_s
        self.tag = tag
        self.counts: collections.Counter[tuple[object, ...]] = collections.Counter()  # CPU seconds
        self._previous: object = None
        self._last = 0.0

    def _on_sigprof(self, signum: int, frame: FrameType | None) -> None:
        now = time.process_time()
        stack: list[object] = []
        while frame is not None:
            stack.append(frame.f_code)
            frame = frame.f_back
        if self.tag is not None:
            stack.append("role:" + self.tag())
        self.counts[tuple(stack)] += now - self._last
        self._last = now

    @property
    def total_s(self) -> float:
        return sum(self.counts.values())

    def start(self) -> None:
        self._last = time.process_time()
        self._previous = signal.signal(signal.SIGPROF, self._on_sigprof)
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, self._previous or signal.SIG_DFL)  # type: ignore[arg-type]

    def collapsed(self) -> list[str]:
        """One ``outer;...;inner WEIGHT`` line per distinct stack (frames as ``file:qualname``, the weight
        in µs of CPU)."""
        names: dict[object, str] = {}

        def name(code: object) -> str:
            n = names.get(code)
            if n is None:
                n = names[code] = (f"{_short(code.co_filename)}:{code.co_qualname}" if isinstance(code, CodeType)
                                   else str(code))
            return n

        return [";".join(name(c) for c in reversed(stack)) + f" {round(w * 1e6)}" for stack, w in self.counts.items()]

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text("\n".join(self.collapsed()) + "\n", encoding="utf-8")


def arm_on_signals(path: str | os.PathLike[str], interval_s: float = DEFAULT_INTERVAL_S,
                   tag: Callable[[], str] | None = None, on_start: Callable[[], None] | None = None,
                   on_stop: Callable[[], None] | None = None) -> CpuSampler:
    """A sampler another process drives by pid: ``SIGUSR1`` starts it afresh, ``SIGUSR2`` stops it
    and writes ``path`` (so a benchmark profiles exactly its measured window).  ``on_start`` and
    ``on_stop`` run in the signal handler too (e.g. to switch other accounting on and off).
    Call from the main thread before the event loop starts."""
    sampler = CpuSampler(interval_s, tag)

    def started(signum: int, frame: FrameType | None) -> None:
        if on_start is not None:
            on_start()
        sampler.counts.clear()
        sampler.start()

    def stopped(signum: int, frame: FrameType | None) -> None:
        sampler.stop()
        if on_stop is not None:
            on_stop()
        sampler.write(path)

    signal.signal(signal.SIGUSR1, started)
    signal.signal(signal.SIGUSR2, stopped)
    return sampler


def _short(filename: str) -> str:
    """``.../site-packages/trio/_core/_run.py`` → ``trio/_core/_run.py``; project files relative to it."""
    for marker in ("/site-packages/", "/lib/python3."):
        i = filename.find(marker)
        if i >= 0:
            rest = filename[i + len(marker):]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    root = str(Path(__file__).resolve().parents[2]) + "/"
    return filename[len(root):] if filename.startswith(root) else filename
