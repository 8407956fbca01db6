"""Work deferred to the end of the event loop's turn: what the tasks of one
turn queued is done once, together, before trio waits for I/O again.

trio runs its loop in turns: it waits for I/O, then runs every task that is
runnable at that moment once, then waits again.  Frames answered in one turn
on one connection, copies stored in one turn, copies for one peer queued in
one turn — each is one piece of work if it is done after the turn's tasks
have all run, and many if each task does its own at once.  Doing it in a
task of its own instead (woken by the others) costs a turn more, and the
writers that run in that turn miss the batch.

:func:`at_turn_end` runs a callback there, through trio's public instrument
hook ``before_io_wait`` (called once per turn, just before the wait).  A
callback may queue more callbacks (a group commit answers requests whose
frames must then be written): they run in the same pass.  A callback may
wake tasks (``Event.set``, ``nursery.start_soon``): trio chose how long to
wait before the callbacks ran, so if it was about to sleep and a task is now
runnable, the loop is poked awake at once (never in the simulation, whose
virtual clock never sleeps).  Callbacks run outside any task: they must not
await, and an exception one raises is logged and goes no further (its owner
handles its own errors).  Order is the order of queueing, so a seeded
simulation replays it.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio
from trio._core import _run as _trio_run

log = logging.getLogger("testnet.base.turn")

TurnCallback = Callable[[], None]


def _runnable() -> bool:
    """Whether a task is runnable now.  trio has no public way to ask; its run queue is
    private (pyproject pins trio's versions, as for the simulation's scheduler)."""
    runner = getattr(_trio_run.GLOBAL_RUN_CONTEXT, "runner", None)
    runq = getattr(runner, "runq", None)
    return True if runq is None else bool(runq)


def _nothing() -> None:
    pass


class _TurnEnd(trio.abc.Instrument):
    __slots__ = ("due", "token")

    def __init__(self) -> None:
        self.due: list[TurnCallback] = []
        self.token = trio.lowlevel.current_trio_token()

    def before_io_wait(self, timeout: float) -> None:
        if not self.due:
            return
        while self.due:
            due, self.due = self.due, []
            for fn in due:
                try:
                    fn()
                except BaseException:  # noqa: BLE001 - trio would remove the instrument: keep the loop's hook
                    log.exception("end-of-turn callback %r failed", fn)
        if timeout > 0 and _runnable():
            # A task made runnable now would otherwise wait for the next I/O event.
            self.token.run_sync_soon(_nothing)


_TURN_END: trio.lowlevel.RunVar[_TurnEnd] = trio.lowlevel.RunVar("swarmnet_turn_end")


def at_turn_end(fn: TurnCallback) -> None:
    """Call ``fn()`` once, after the tasks runnable in this turn of the loop have run and
    before the loop waits for I/O again (see the module doc).  Call from inside a trio run."""
    try:
        te = _TURN_END.get()
    except LookupError:
        te = _TurnEnd()
        trio.lowlevel.add_instrument(te)
        _TURN_END.set(te)
    te.due.append(fn)
