"""Work deferred to the end of the event loop's turn: what the tasks of one
turn queued is done once, together, before trio waits for I/O again; and
timers for work that has no task to wait in (:class:`Timers`).

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

import collections
import logging
import math
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


class Timer:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """Callbacks at deadlines for code that runs without a task of its own (a request
    answered from callbacks still owes its caller an answer in time), all run by one task
    (:meth:`run`, started in its owner's nursery).

    Strategy: the task sleeps until the earliest timer not cancelled; a timer cancelled
    meanwhile (nearly all are: the work ended in time) is skipped when that deadline comes,
    and the task sleeps on until the next live one.  So the task wakes about once per
    delay while timers come and go, and never per timer; no deadline is moved when a
    timer is cancelled (a move is a push on trio's heap).  Timers are kept in a queue in
    deadline order: appended, when (as for an owner with one delay) each ends after the
    ones made before it."""

    def __init__(self) -> None:
        self._queue: collections.deque[Timer] = collections.deque()
        self._scope: trio.CancelScope | None = None

    def call_after(self, delay_s: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn()`` after ``delay_s`` s unless the timer returned is cancelled first."""
        timer = Timer(trio.current_time() + delay_s, fn)
        queue = self._queue
        if queue and timer.deadline < queue[-1].deadline:
            # A shorter delay than an earlier timer's: kept in order (linear, so rare by design).
            i = len(queue)
            while i and queue[i - 1].deadline > timer.deadline:
                i -= 1
            queue.insert(i, timer)
        else:
            queue.append(timer)
        scope = self._scope
        if scope is not None and timer.deadline < scope.deadline:
            scope.deadline = timer.deadline
        return timer

    def _next_deadline(self) -> float:
        queue = self._queue
        while queue and queue[0].cancelled:
            queue.popleft()
        return queue[0].deadline if queue else math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            queue = self._queue
            while queue and queue[0].deadline <= now:
                timer = queue.popleft()
                if not timer.cancelled:
                    timer.cancelled = True
                    try:
                        timer.fn()
                    except Exception:
                        log.exception("timer callback %r failed", timer.fn)
