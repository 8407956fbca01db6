"""What this process did, counted — so a benchmark can say where the CPU per
message goes, not only how much there is.

``COUNTS`` is one process-wide counter the transport, storage, capture and
logging increment as they work (a few tens of ns each):

* ``frames_in`` / ``frames_out`` — protocol frames read and written;
* ``recv_calls`` / ``send_calls`` — socket reads and writes made (each is a
  syscall; a read may carry many frames, a write many queued frames);
* ``loop_wakeups`` — returns from the event loop's wait for I/O (epoll);
* ``tasks_started`` — trio tasks spawned;
* ``sqlite_transactions``, ``log_lines``, ``capture_bytes``.

``loop_wakeups`` and ``tasks_started`` come from :class:`LoopMeter`, a trio
instrument, counted only while it is installed (:func:`install` …
:func:`uninstall`): trio's instrument calls cost a few per cent of a busy
node's CPU, so nodes install it only for a benchmark's measured window.

``ROLE`` names what the running task is doing for the network (``guard``,
``relay``, ``target``, ``replica``, …); handlers set it, tasks inherit it from
the task that spawned them, and the CPU sampler
(:mod:`testnet.base.cpuprofile`) charges each sample to it.  Code of the
event loop itself runs outside any task and counts as ``loop``.
"""

from __future__ import annotations

import collections
import contextvars

import trio

COUNTS: collections.Counter[str] = collections.Counter()
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("swarmnet_role", default="loop")


class LoopMeter(trio.abc.Instrument):
    def after_io_wait(self, timeout: float) -> None:
        COUNTS["loop_wakeups"] += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        COUNTS["tasks_started"] += 1


_METER = LoopMeter()


def install() -> None:
    """Count loop wake-ups and task spawns of the running trio loop (idempotent)."""
    trio.lowlevel.add_instrument(_METER)


def uninstall() -> None:
    try:
        trio.lowlevel.remove_instrument(_METER)
    except KeyError:
        pass


def snapshot() -> dict[str, int]:
    return dict(COUNTS)
