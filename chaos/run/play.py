"""Playing a schedule: each fault started at its planned time and healed at its planned
end, and ``faults.jsonl``, the record of what really happened and when (shape in RUNDIR.md).

Each phase of a fault — its start, its heal — is recorded with the time the schedule
gave it (``planned``), how late it took effect (``late_ms``: minus planned; a restarted or
added node takes effect when it runs, before it is ready — see ``nemesis.took_effect`` —
anything else when its work is done) and how long its whole work took (``took_ms``).
A change to thousands of links takes a second or more of Toxiproxy calls whatever is done,
so its work is centred on the planned time: the nemesis is entered early, estimates its
work from the rate this run's bulk calls last had, begins half of it before the planned
time and records how early (``early_ms``); the verdict holds early to the same tolerance
as late.  A fault that failed is recorded with what failed: an
exception group is opened into its leaves, and a leaf that is a bulk Toxiproxy change
says how many of how many calls failed, on which server, which call, and why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import trio

from testnet import links as L

from chaos.run.nemesis import PREPARE_S, HealFailed, NemesisError, PhaseClock, inject, playing, prepares
from chaos.schedule import Fault, Schedule

Progress = Callable[[str], None]
ON_TIME_S = 0.001  # a start later than this shortens the fault, so that it still heals at its planned end
MAX_LEAVES = 20  # errors of one fault recorded in full (their count is always complete)
MAX_CALLS_SHOWN = 10  # failed calls of one bulk change listed (their count is always complete)


def wall_ms() -> int:
    return int(time.time() * 1000)


class FaultLog:
    """faults.jsonl: what actually happened, when."""

    def __init__(self, path: Path, now_ms: Callable[[], int] = wall_ms) -> None:
        self._f = open(path, "a", encoding="utf-8")
        self.now_ms = now_ms

    def write(self, fault: Fault, phase: str, **extra: Any) -> None:
        rec = {"t": self.now_ms(), "fault": fault.id, "kind": fault.kind, "phase": phase, **extra}
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def error_leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside ``exc``: exception groups (trio's nurseries) and failed heals opened
    down to the exceptions that were raised for a reason (a task cancelled because another
    failed is not one, when there is another)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [leaf for sub in exc.exceptions for leaf in error_leaves(sub)]
        reasons = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
        return reasons or leaves
    if isinstance(exc, HealFailed) and exc.errors:
        return [leaf for sub in exc.errors for leaf in error_leaves(sub)]
    return [exc]


def describe_leaf(exc: BaseException) -> dict[str, Any]:
    """One error as faults.jsonl records it: ``error`` ("Type: message") and, for a Toxiproxy
    error, ``server``, ``call``, ``proxy``, ``status``; for a bulk change, ``failed`` of
    ``calls`` and the first failed calls (``calls_failed``)."""
    text = str(exc) or {"TooSlowError": "a deadline passed", "Cancelled": "cancelled"}.get(type(exc).__name__, "")
    out: dict[str, Any] = {"error": (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:600]}
    if isinstance(exc, L.BatchError):
        out.update(failed=len(exc.failures), calls=exc.calls,
                   calls_failed=[f.to_json() for f in exc.failures[:MAX_CALLS_SHOWN]])
    elif isinstance(exc, L.LinkError):
        out.update({k: v for k, v in (("server", exc.server), ("call", exc.call), ("proxy", exc.proxy),
                                      ("status", exc.status)) if v is not None})
    return out


def describe_error(exc: BaseException) -> dict[str, Any]:
    """``{"error": one line naming every leaf (or the first few and how many), "failures":
    [describe_leaf ...]}`` — never an exception group's "N sub-exceptions"."""
    leaves = error_leaves(exc)
    described = [describe_leaf(leaf) for leaf in leaves]
    if isinstance(exc, HealFailed) and exc.errors:  # what was being healed, then why not
        head = f"{exc}: "
    else:
        head = ""
    if len(described) == 1:
        text = head + described[0]["error"]
    else:
        text = head + f"{len(described)} errors: " + "; ".join(
            f"({i}) {d['error'][:200]}" for i, d in enumerate(described[:3], start=1)) + (
            f"; and {len(described) - 3} more" if len(described) > 3 else "")
    return {"error": text[:900], "failures": described[:MAX_LEAVES]}


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _early(clock: PhaseClock) -> dict[str, int]:
    """``early_ms``: how long before its planned time the phase's work began, when it did."""
    if clock.began is None or clock.planned is None:
        return {}
    early = _ms(clock.planned - clock.began)
    return {"early_ms": early} if early > 0 else {}


def _late(late_s: float) -> str:
    return f" {late_s:.2f} s late" if late_s >= 0.1 else ""


async def play(net: Any, schedule: Schedule, log: FaultLog, progress: Progress) -> None:
    """Start each fault at its time, heal it at its planned end; returns when all are healed
    (or failed, each recorded with what failed)."""
    t0 = trio.current_time()
    t0_ms = log.now_ms()

    async def one(fault: Fault) -> None:
        start_at, heal_at = t0 + fault.at_s, t0 + fault.end_s
        planned = {"start": t0_ms + _ms(fault.at_s), "heal": t0_ms + _ms(fault.end_s)}
        early = prepares(net, fault)
        await trio.sleep_until(max(t0, start_at - PREPARE_S) if early else start_at)
        during, began = "start", trio.current_time()
        targets: dict[str, Any] = {}
        clock = PhaseClock(start_at if early else None)
        # A phase took effect when its nemesis says (took_effect: a restarted node runs), else
        # when its work was done; its lateness is measured there, its work (took_ms) to the end.
        # A phase whose work began before its planned time (PhaseClock.begin: thousands of
        # links) also records how early (early_ms).
        with playing(clock):
            try:
                async with inject(net, fault) as targets:
                    now = trio.current_time()
                    late = (clock.effect if clock.effect is not None else now) - start_at
                    began = clock.began if clock.began is not None else max(began, start_at)
                    log.write(fault, "start", planned=planned["start"], late_ms=_ms(late), took_ms=_ms(now - began),
                              **_early(clock), targets=targets)
                    progress(f"fault {fault.id} {fault.kind} started{_late(late)}: {_short(targets)}")
                    if clock.heal_estimate is not None:  # centre the heal's work on the planned end too
                        await trio.sleep_until(heal_at - PREPARE_S)
                        await trio.sleep_until(heal_at - min(PREPARE_S, clock.heal_estimate() / 2))
                    else:  # healed at the planned end: a late start shortens the fault rather than moving it
                        await trio.sleep(max(0.0, fault.duration_s - late) if late > ON_TIME_S else fault.duration_s)
                    during, began = "heal", trio.current_time()
                    clock.planned, clock.effect, clock.heal_estimate = heal_at, None, None
                    clock.began = began if began < heal_at else None
                now = trio.current_time()
                late = (clock.effect if clock.effect is not None else now) - heal_at
                log.write(fault, "end", planned=planned["heal"], late_ms=_ms(late), took_ms=_ms(now - began),
                          **_early(clock), targets=targets)
            except Exception as exc:  # a controller error must not end the run unhealed
                now = trio.current_time()
                late_ms = _ms(now - (start_at if during == "start" else heal_at))
                if during == "start" and isinstance(exc, (NemesisError, LookupError, ValueError)):
                    log.write(fault, "skipped", planned=planned["start"], error=str(exc)[:300])
                    progress(f"fault {fault.id} {fault.kind} skipped: {exc}")
                    return
                desc = describe_error(exc)
                log.write(fault, "error", during=during, planned=planned[during], late_ms=late_ms,
                          took_ms=_ms(now - began), **({"targets": targets} if targets else {}), **desc)
                progress(f"fault {fault.id} {fault.kind} failed to {during}: {desc['error']}")

    async with trio.open_nursery() as nursery:
        for fault in schedule.faults:
            nursery.start_soon(one, fault)


def _short(targets: dict[str, Any]) -> str:
    parts = []
    for k, v in targets.items():
        if isinstance(v, list):
            v = ",".join(map(str, v[:6])) + ("…" if len(v) > 6 else "")
        parts.append(f"{k}={v}")
    return " ".join(parts)
