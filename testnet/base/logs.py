"""What every swarmnet child process shares: JSON-line logs, the readiness
line, and dying with its parent.

Logs are JSON lines (``{"t": ms, "level", "proc", "event", ...}``) in the
process's own file.  Callers log events and identifiers (hashes, key
prefixes, addresses) — never message data, plaintext or secrets.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import trio

from .meter import COUNTS


class JsonFormatter(logging.Formatter):
    def __init__(self, proc: str) -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        COUNTS["log_lines"] += 1
        entry: dict[str, Any] = {
            "t": int(record.created * 1000),
            "level": record.levelname.lower(),
            "proc": self.proc,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(path: str | None, proc: str, level: int = logging.INFO) -> logging.Logger:
    """Route the root logger to ``path`` as JSON lines (stderr when ``None``)."""
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(proc))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(proc)


def event(logger: logging.Logger, what: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``name`` plus identifier fields."""
    if logger.isEnabledFor(level):
        logger.log(level, what, extra={"fields": fields})


def announce_listening(addresses: list[tuple[str, int]]) -> None:
    """The readiness line the controller waits for (see PROTOCOL.md)."""
    line = json.dumps({"event": "listening", "addresses": [list(a) for a in addresses], "pid": os.getpid()})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def watch_parent(parent_pid: int | None, cancel_scope: trio.CancelScope, interval_s: float = 0.5) -> None:
    """Cancel ``cancel_scope`` once ``parent_pid`` is gone (or we were re-parented).

    Where the kernel gives a pidfd (Linux 5.3+), wait for it to become readable — the
    process has exited — without waking until then (500 nodes polling every 2 s were a
    sixth of an idle network's CPU); elsewhere, poll every ``interval_s``."""
    if not parent_pid:
        return
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        cancel_scope.cancel()  # gone already
        return
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        cancel_scope.cancel()
        return
    while True:
        if not pid_alive(parent_pid) or (os.getppid() != parent_pid and os.getppid() == 1):
            cancel_scope.cancel()
            return
        await trio.sleep(interval_s)


async def exit_on_signals(cancel_scope: trio.CancelScope) -> None:
    """SIGTERM or SIGINT means a graceful stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            cancel_scope.cancel()
            return


def wall_ms() -> int:
    return int(time.time() * 1000)
