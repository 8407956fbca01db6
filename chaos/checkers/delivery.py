"""The delivery checker: every acknowledged message reaches its recipient
exactly once, intact, from the right sender.

Jepsen style: it only reads a history (format: /work CHECKERS.md, written by
``clients.workload``) and the ground truth (user name -> Session ID) and
returns a verdict; it never talks to the network.  The outcomes are those of
Jepsen's queue and set checkers: lost, duplicated, unexpected, recovered,
plus corrupted, misdelivered, failed, fail-but-delivered and unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["DeliveryError", "LIST_CAP", "FAILURE_OUTCOMES", "HostilePeriod", "check_delivery", "capped",
           "honestly_vouched", "percentiles"]

LIST_CAP = 100  # ids listed per outcome; counts are always complete

# Outcomes that make the verdict invalid.
FAILURE_OUTCOMES = ("lost", "duplicated", "corrupted", "wrong_sender", "misdelivered", "unexpected",
                    "fail-but-delivered")
# Outcomes reported for information only.  "unvouched": acknowledged (ok) but no honest
# member's signed result vouched for it, and never delivered — only hostile members said
# they held it (a hostile target may acknowledge what it never kept).
INFO_OUTCOMES = ("delivered", "recovered", "unknown", "failed", "unvouched")


@dataclass(frozen=True)
class HostilePeriod:
    """Members that were hostile (by the 16-hex-digit prefix of their ed25519 key, as a
    send's ``vouched`` names them) from ``start_ms`` to ``end_ms`` (None: to the end)."""

    keys: frozenset[str]
    start_ms: int
    end_ms: int | None = None

    def covers(self, key: str, t0: int | None, t1: int | None) -> bool:
        """Whether ``key`` was hostile at some time of [t0, t1] (unknown times: the whole run)."""
        if key[:16] not in self.keys:
            return False
        return (t1 is None or t1 >= self.start_ms) and (t0 is None or self.end_ms is None or t0 <= self.end_ms)


class DeliveryError(Exception):
    """The history or the user table cannot be checked (not a list of records, ...)."""


def capped(items: Sequence[Any], cap: int = LIST_CAP) -> list[Any]:
    """The first ``cap`` items as a list (the caller reports the full count)."""
    return list(items[:cap])


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """count, mean, p50, p95, p99 (nearest rank) and max of ``values``; None fields when empty."""
    xs = sorted(values)
    if not xs:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}

    def rank(p: float) -> float:
        return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]

    return {"count": len(xs), "mean": round(sum(xs) / len(xs), 1), "p50": rank(50), "p95": rank(95),
            "p99": rank(99), "max": xs[-1]}


@dataclass
class _Sent:
    msg_id: str
    sender: str | None = None
    recipient: str | None = None
    digest: str | None = None
    invoke_t: int | None = None
    done: str | None = None  # "ok" | "fail" | "info" | None (no completion: unknown)
    done_t: int | None = None
    vouched: list[str] | None = None  # members whose signed result vouched for the store (ok)
    hashes: set[str] = field(default_factory=set)
    deliveries: list[dict[str, Any]] = field(default_factory=list)


def _collect_sends(history: Sequence[Mapping[str, Any]]) -> tuple[dict[str, _Sent], dict[str, str]]:
    """Sends by msg_id, and message hash -> msg_id (from invokes and ok completions)."""
    sends: dict[str, _Sent] = {}
    by_hash: dict[str, str] = {}
    for r in history:
        if r.get("op") != "send" or r.get("msg_id") is None:
            continue
        mid = str(r["msg_id"])
        s = sends.setdefault(mid, _Sent(mid))
        kind = r.get("type")
        if kind == "invoke":
            s.sender, s.recipient = r.get("from") or r.get("process"), r.get("to")
            s.digest, s.invoke_t = r.get("body_digest"), r.get("t")
        elif kind in ("ok", "fail", "info"):
            # Several completions would be a workload bug; the most definite one wins.
            if s.done != "ok":
                s.done, s.done_t = kind, r.get("t")
                if kind == "ok" and isinstance(r.get("vouched"), list):
                    s.vouched = [str(k) for k in r["vouched"]]
        if isinstance(r.get("hash"), str):
            s.hashes.add(r["hash"])
            by_hash.setdefault(r["hash"], mid)
    return sends, by_hash


def honestly_vouched(vouched: Sequence[str] | None, t0: int | None, t1: int | None,
                     hostile: Sequence[HostilePeriod]) -> bool:
    """Whether an honest member's signed result (``vouched``: key prefixes) vouched for a
    store made between ``t0`` and ``t1`` (an ok recorded without ``vouched`` — an older
    history — is taken as vouched)."""
    if vouched is None:
        return True
    return any(not any(p.covers(k, t0, t1) for p in hostile) for k in vouched)


def _honestly_vouched(s: _Sent, hostile: Sequence[HostilePeriod]) -> bool:
    return honestly_vouched(s.vouched, s.invoke_t, s.done_t, hostile)


def check_delivery(history: Sequence[Mapping[str, Any]], users: Mapping[str, str], *,
                   now_ms: int | None = None, hostile: Sequence[HostilePeriod] = ()) -> dict[str, Any]:
    """Judge delivery from ``history`` and ``users`` (name -> Session ID).

    ``now_ms`` is the end of the observation (default: the last record's
    ``t``); each lost message's age at that time (ms since its ack) is
    reported.  ``hostile``: the members hostile when (byzantine faults): a
    message only they vouched for is not owed (``unvouched`` when never
    delivered).  Returns the verdict described in CHECKERS.md.
    """
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
        raise DeliveryError("history must be a sequence of records")
    if not isinstance(users, Mapping):
        raise DeliveryError("users must map user name -> Session ID")
    history = [r for r in history if isinstance(r, Mapping)]
    sends, by_hash = _collect_sends(history)
    end_ms = now_ms if now_ms is not None else max((r["t"] for r in history if isinstance(r.get("t"), int)),
                                                   default=None)

    misdelivered: list[dict[str, Any]] = []
    unexpected: list[dict[str, Any]] = []
    receives = 0
    foreign = 0
    rejected = 0
    for r in history:
        if r.get("op") != "receive" or r.get("type", "ok") != "ok":
            continue
        if r.get("foreign"):
            # Opened and signed for this user, but not sent by the workload
            # (`swarmnet send`, the controller's readiness check): not ours to judge.
            foreign += 1
            continue
        receives += 1
        who, h, mid = r.get("process"), r.get("hash"), r.get("msg_id")
        seen = {"msg_id": mid, "hash": h, "process": who, "t": r.get("t")}
        if r.get("rejected"):
            # The client refused a copy whose content is not its hash's for this account.
            owner = sends.get(by_hash.get(h, ""))
            if owner is not None and owner.recipient == who:
                rejected += 1  # this user's own message, altered by a node: no delivery
            else:
                misdelivered.append({**seen, "msg_id": owner.msg_id if owner else None,
                                     "to": owner.recipient if owner else None, "reason": "another account's message"})
            continue
        if mid is None and r.get("error") is not None:
            # Could not open: sealed to someone else (wrong inbox) or mangled.
            owner = sends.get(by_hash.get(h, ""))
            if owner is not None and owner.recipient == who:
                owner.deliveries.append({**r, "_opened": False})
            else:
                misdelivered.append({**seen, "msg_id": owner.msg_id if owner else None,
                                     "to": owner.recipient if owner else None, "reason": "does not open"})
            continue
        s = sends.get(str(mid)) if mid is not None else None
        if s is None or s.invoke_t is None and s.done is None:
            unexpected.append(seen)
            continue
        if s.recipient is not None and who != s.recipient:
            misdelivered.append({**seen, "to": s.recipient, "reason": "opened by a non-recipient"})
            continue
        s.deliveries.append({**r, "_opened": True})

    out: dict[str, list[Any]] = {k: [] for k in (*FAILURE_OUTCOMES, *INFO_OUTCOMES)}
    lost_detail: list[dict[str, Any]] = []
    latencies: list[float] = []
    for s in sends.values():
        if s.deliveries:
            if len(s.deliveries) > 1:
                out["duplicated"].append(s.msg_id)
            bad_digest = any(not d["_opened"] or d.get("body_digest") != s.digest for d in s.deliveries)
            want_sender = users.get(s.sender) if s.sender is not None else None
            if bad_digest:
                out["corrupted"].append(s.msg_id)
            elif any(d.get("sender") != want_sender for d in s.deliveries):
                out["wrong_sender"].append(s.msg_id)
            first = min((d.get("t") for d in s.deliveries if isinstance(d.get("t"), int)), default=None)
            if first is not None and s.invoke_t is not None:
                latencies.append(first - s.invoke_t)
            out[{"ok": "delivered", "fail": "fail-but-delivered"}.get(s.done or "", "recovered")].append(s.msg_id)
        elif s.done == "ok" and not _honestly_vouched(s, hostile):
            out["unvouched"].append(s.msg_id)
        elif s.done == "ok":
            out["lost"].append(s.msg_id)
            lost_detail.append({"msg_id": s.msg_id, "from": s.sender, "to": s.recipient,
                                "hash": next(iter(sorted(s.hashes)), None), "acked_t": s.done_t,
                                "age_ms": None if end_ms is None or s.done_t is None else end_ms - s.done_t})
        elif s.done == "fail":
            out["failed"].append(s.msg_id)
        else:
            out["unknown"].append(s.msg_id)
    out["misdelivered"] = misdelivered
    out["unexpected"] = unexpected

    counts = {k: len(v) for k, v in out.items()}
    counts.update(sent=len(sends), acknowledged=sum(1 for s in sends.values() if s.done == "ok"),
                  honestly_vouched=sum(1 for s in sends.values() if s.done == "ok" and _honestly_vouched(s, hostile)),
                  receives=receives,
                  foreign=foreign, rejected_copies=rejected)
    failed = any(counts[k] for k in FAILURE_OUTCOMES)
    if failed:
        valid: bool | str = False
    elif counts["acknowledged"] == 0:
        valid = "unknown"  # nothing acknowledged: nothing was promised, nothing to judge
    else:
        valid = True
    verdict: dict[str, Any] = {"checker": "delivery", "valid": valid, "counts": counts}
    for k, v in out.items():
        verdict[k] = capped(v)
    verdict["lost_detail"] = capped(lost_detail)
    verdict["latency_ms"] = percentiles(latencies)
    verdict["end_ms"] = end_ms
    return verdict
