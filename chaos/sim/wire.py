"""Time on the simulated wire and disk: how long a hop and a sync take.

A real network never delivers instantly, and the order in which concurrent
messages arrive is what exposes a race.  So every simulated connection
delivers each chunk written to it after a delay (:class:`Wire`), and every
simulated sync takes a duration (:meth:`WireModel.sync_time`); both come from a
:class:`Profile`, picked by a scenario (``[sim] wire = "..."``):

* ``loopback`` (the default) — the figures measured on this machine between
  real processes on 127.0.0.0/8, with and without a Toxiproxy proxy on the
  way (README, "Time on the simulated wire and disk", says how);
* ``wide-area`` — nodes spread over data centres: tens of milliseconds a
  hop, a few of jitter;
* ``instant`` — no time at all (the simulation before it had a wire model:
  hops and syncs take 0 virtual ms outside faults).

Model.  A *route* is one caller's way to one listener: a simulated Toxiproxy
link (its proxy's listen address), or a direct connection between two hosts.
Each route gets a base one-way delay drawn once from the profile's range,
from the run's seed alone (where the nodes are is part of the plan; a variant
keeps it).  Each chunk adds jitter drawn from the variant's stream
(:class:`Profile` says how), each draw cut at ``JITTER_CAP`` times its mean.
A chunk never overtakes an earlier one of the same connection (TCP keeps
order), nor does its end of stream; chunks of different connections do.
A latency fault's toxic adds on top, where Toxiproxy puts it.

Cost.  Deliveries wait in one heap and are handed over from the loop's own
hook, with the clock jumped to them when all else waits (:class:`Wire`): a
chunk costs no task step of its own, and what a delivered chunk wakes (a
reader, a proxy's forwarding) is what an instant delivery wakes too.
"""

from __future__ import annotations

import heapq
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

import trio
import trio.testing
from trio._core import _run as _trio_run

from testnet.base.turn import at_turn_end

log = logging.getLogger("chaos.sim.wire")

JITTER_CAP = 8.0  # a jitter draw is at most this many times its mean


@dataclass(frozen=True)
class Profile:
    """Delays in ms.  A route's one-way base is drawn from ``direct_ms`` or (through a
    simulated Toxiproxy proxy) ``proxied_ms``; each chunk adds jitter: exponential of mean
    ``jitter_ms``, and with probability ``tail_p`` a second one of mean ``tail_ms`` (a busy
    machine's stalls: the measured round trips have a tight body and a long tail).  A
    disk's sync takes a base drawn from ``sync_ms`` plus exponential jitter of mean
    ``sync_jitter_ms``."""

    name: str
    direct_ms: tuple[float, float]
    proxied_ms: tuple[float, float]
    jitter_ms: float
    tail_p: float
    tail_ms: float
    sync_ms: tuple[float, float]
    sync_jitter_ms: float


# Fitted to what was measured on this 2-core machine under its usual load (README, "Time
# on the simulated wire and disk"): rpc round trips between real processes over loopback,
# direct (p10/p50/p90/p99 0.79/1.07/3.15/7.8 ms) and through a real Toxiproxy proxy
# (0.99/1.24/3.2/9 ms), the model giving 0.79/1.05/2.99/7.5 and 0.99/1.25/3.19/7.7; and
# what synchronous=FULL adds to a SQLite commit in WAL mode (p10/p50/p90 0.5-1.1/1.4-4/
# 3.8-8.7 ms).
LOOPBACK = Profile("loopback", direct_ms=(0.30, 0.45), proxied_ms=(0.40, 0.55), jitter_ms=0.12,
                   tail_p=0.15, tail_ms=1.8, sync_ms=(0.5, 1.0), sync_jitter_ms=1.5)
# Nodes spread over regions: one-way delays of 5-80 ms between data centres, a ms of
# queueing and now and then 10 more; a cloud volume's syncs.
WIDE_AREA = Profile("wide-area", direct_ms=(5.0, 80.0), proxied_ms=(5.0, 80.0), jitter_ms=1.0,
                    tail_p=0.05, tail_ms=10.0, sync_ms=(1.0, 4.0), sync_jitter_ms=2.0)
INSTANT = Profile("instant", direct_ms=(0.0, 0.0), proxied_ms=(0.0, 0.0), jitter_ms=0.0, tail_p=0.0,
                  tail_ms=0.0, sync_ms=(0.0, 0.0), sync_jitter_ms=0.0)
PROFILES = {p.name: p for p in (LOOPBACK, WIDE_AREA, INSTANT)}
DEFAULT_PROFILE = LOOPBACK.name


class WireModel:
    """A profile's draws for one run: per-route bases from ``seed``, per-chunk and
    per-sync jitter from the streams given (the variant's)."""

    def __init__(self, profile: Profile, seed: int, jitter: random.Random) -> None:
        self.profile = profile
        self.seed = seed
        self._jitter = jitter
        self._bases: dict[str, float] = {}

    @property
    def instant(self) -> bool:
        return self.profile == INSTANT

    def base_s(self, route: str, *, proxied: bool) -> float:
        """The route's one-way base delay (s): the same for every connection of the route."""
        base = self._bases.get(route)
        if base is None:
            lo, hi = self.profile.proxied_ms if proxied else self.profile.direct_ms
            base = self._bases[route] = random.Random(f"{self.seed}/wire/{route}").uniform(lo, hi) / 1000
        return base

    def jitter_s(self) -> float:
        p, r = self.profile, self._jitter
        ms = min(r.expovariate(1.0), JITTER_CAP) * p.jitter_ms
        if r.random() < p.tail_p:
            ms += min(r.expovariate(1.0), JITTER_CAP) * p.tail_ms
        return ms / 1000

    def sync_time(self, rng: random.Random) -> Callable[[], float]:
        """One disk's sync durations (s): a base drawn once for the disk, jitter per sync."""
        lo, hi = self.profile.sync_ms
        base = rng.uniform(lo, hi) / 1000
        mean = self.profile.sync_jitter_ms / 1000

        def draw() -> float:
            return base + (min(rng.expovariate(1.0), JITTER_CAP) * mean if mean else 0.0)

        return draw


class Wire(trio.abc.Instrument):
    """Chunks in flight, delivered on the virtual clock (:meth:`attach` first).

    Strategy: no task and no deadline of its own.  At the end of each loop turn (trio's
    ``before_io_wait``, after :func:`testnet.base.turn.at_turn_end`'s work), chunks due
    are handed over; and when nothing is runnable and no deadline of trio's comes first,
    the clock jumps to the next delivery, as trio's autojump would jump to a deadline, and
    it is handed over at once.  The readers it wakes run in that same turn: a delivery
    costs what an instant one does (the reader's wake-up), not a timer task's step and the
    two turns of a jump to a deadline."""

    def __init__(self, model: WireModel) -> None:
        self.model = model
        self._heap: list[tuple[float, int, Any, bytes | None]] = []
        self._seq = 0
        self._clock: Any = None
        self.delivered = 0
        self.jumps = 0

    def attach(self) -> None:
        """Start delivering in this trio run (its clock must be trio's MockClock, as the
        simulation's is).  Call once, from inside the run."""
        clock = trio.lowlevel.current_clock()
        if not isinstance(clock, trio.testing.MockClock):
            raise RuntimeError("the simulated wire needs trio's MockClock")
        self._clock = clock
        at_turn_end(_nothing)  # the end-of-turn hook exists before ours: its work runs first
        trio.lowlevel.add_instrument(self)

    def send(self, pipe: Any, data: bytes | None) -> None:
        """Deliver ``data`` (``None``: the end of stream) into ``pipe`` after its route's
        delay, never before what was sent into it earlier."""
        at = trio.current_time() + pipe.base_s + self.model.jitter_s()
        if at < pipe.last_at:
            at = pipe.last_at
        pipe.last_at = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, pipe, data))

    def before_io_wait(self, timeout: float) -> None:
        heap = self._heap
        if not heap:
            return
        until = self._clock.current_time()
        first = heap[0][0]
        if first > until:
            if _busy():
                return
            if first - until > trio.lowlevel.current_statistics().seconds_to_next_deadline:
                return  # a deadline of trio's comes first: its autojump goes there
            self._clock.jump(first - until)
            self.jumps += 1
            until = first
        while heap and heap[0][0] <= until:
            _, _, pipe, data = heapq.heappop(heap)
            self.delivered += 1
            try:
                pipe.arrive(data)
            except BaseException:  # noqa: BLE001 - trio would drop the instrument: the wire must go on
                log.exception("simulated delivery failed")

    def statistics(self) -> dict[str, Any]:
        return {"profile": self.model.profile.name, "in_flight": len(self._heap), "delivered": self.delivered,
                "jumps": self.jumps}


def _nothing() -> None:
    pass


def _busy() -> bool:
    """Whether a task is runnable or waits for the loop to go idle (trio wakes those before
    it jumps the clock).  trio's own names, private: pyproject pins its versions."""
    runner = getattr(_trio_run.GLOBAL_RUN_CONTEXT, "runner", None)
    return runner is None or bool(runner.runq) or bool(runner.waiting_for_idle)


def model_for(name: str, seed: int, jitter: random.Random) -> WireModel:
    try:
        return WireModel(PROFILES[name], seed, jitter)
    except KeyError:
        raise ValueError(f"unknown wire profile {name!r}; known: {', '.join(PROFILES)}") from None
