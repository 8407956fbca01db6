"""One trio run made exact: virtual time and a seeded scheduler.

trio picks the order of each batch of runnable tasks with its module-level
``random.Random`` (``trio._core._run._r``); with
``_ALLOW_DETERMINISTIC_SCHEDULING`` set, each batch is first sorted by task
creation order, then shuffled with that generator — what Hypothesis and
pytest-trio rely on.  Seeding it, and running on ``MockClock`` with autojump
(idle time costs nothing), makes a program's interleaving a function of the
seed.  These are private names of trio: pyproject pins the versions this is
tested with, and tests/test_sim.py checks the property this relies on
(two runs of one seed give byte-identical histories, in separate processes
with different hash seeds).

Other orderings that could differ between runs, and what neutralises them:

* deadline ties — trio breaks them by ``id()`` of the cancel scope (a
  memory address), but every scope whose deadline has passed is cancelled in
  the same pass, and cancelling only reschedules tasks: they land in one
  batch, which is sorted by creation order before the seeded shuffle;
* ``task._notify_queues`` (a set) — the same: notifying reschedules, the
  batch sort fixes the order;
* string hashing (set and dict iteration in node code) — simulated runs
  execute with a fixed ``PYTHONHASHSEED`` (workers are started with it,
  ``swarmnet sim run`` re-executes itself with it);
* worker threads run in real time — none are used inside a simulated run
  (the registry keeps no state file there; checkers run after the run);
* wall-clock reads and OS randomness — every node, registry, client and
  controller call goes through the seams (clock, rng, randbytes, network)
  the simulation fills in; tests/test_sim.py fails if nodes/, clients/ or
  the registry read them directly.
"""

from __future__ import annotations

import os
import sys
import functools
import math
from typing import Any, Awaitable, Callable

import trio
from trio._core import MockClock  # trio.testing's, without trio.testing (which imports pytest when it can)
from trio._core import _run as _trio_run

HASH_SEED = "0"


def sim_clock() -> MockClock:
    """trio's ``MockClock`` with autojump at rate 0, read without the real clock.

    trio and every timeout in the network ask for the time about half a million times
    in a run of mixed, and ``MockClock`` answers each by reading ``perf_counter`` and
    adding 0 × the real time elapsed to its virtual base (``x + 0.0 == x``): at rate 0
    the base alone is the time, the same float.  Its autojump asks the loop for a full
    ``current_statistics()`` (task counts, the I/O backend's figures) only to read the
    next deadline.  ``MockClock`` cannot be subclassed (and trio checks that the clock it
    autojumps is one), so this one's methods are replaced on the instance; ``jump``
    (autojump's, the simulated wire's) still moves the base.  trio's private names, as
    :func:`run_exact`'s: pyproject pins the versions."""
    clock = MockClock(rate=0.0, autojump_threshold=0)
    clock.current_time = functools.partial(getattr, clock, "_virtual_base")  # type: ignore[method-assign]

    def deadline_to_sleep_time(deadline: float) -> float:
        return 0 if deadline <= clock._virtual_base else 999999999  # MockClock's, at rate 0

    def autojump() -> None:
        jump = _trio_run.GLOBAL_RUN_CONTEXT.runner.deadlines.next_deadline() - clock._virtual_base
        if 0 < jump < math.inf:
            clock.jump(jump)

    clock.deadline_to_sleep_time = deadline_to_sleep_time  # type: ignore[method-assign]
    clock._autojump = autojump  # type: ignore[method-assign]
    return clock


def run_exact(main: Callable[[], Awaitable[Any]], seed: int) -> Any:
    """``trio.run(main)`` on virtual time with the scheduler seeded by ``seed``."""
    _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True
    _trio_run._r.seed(seed)
    return trio.run(main, clock=sim_clock())


def ensure_hash_seed() -> None:
    """Re-execute this command with a fixed ``PYTHONHASHSEED`` unless it already has it."""
    if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
        os.environ["PYTHONHASHSEED"] = HASH_SEED
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
