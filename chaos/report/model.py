"""What a run report shows, read from a run directory's records: each message's
outcome (from the history and the verdict), the fault spans (from faults.jsonl
or the planned schedule) and each node's state over time.  Plain data, no
drawing: :mod:`chaos.report.charts` draws it, :mod:`chaos.report.page` lays it out,
and the web page (:mod:`chaos.web`) serves it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from chaos.scenario import NEMESES

REPORT_NAME = "report.html"

# Delivery outcome per sent message, in plotting order (worst drawn last, on top).
DELIVERED = "delivered"
NOT_DELIVERED = "not delivered"
UNKNOWN = "unknown/info"
FAILED = "failed"
LOST = "lost"
BAD = "duplicated/corrupted/misdelivered"
OUTCOMES = (DELIVERED, NOT_DELIVERED, FAILED, UNKNOWN, BAD, LOST)
MAX_LISTED_MESSAGES = 200  # problem messages listed by id (the plot shows all of them)

# outcome -> (colour, marker)
# Delivery checker lists that put a message in BAD (chaos/checkers/delivery.py FAILURE_OUTCOMES).
_BAD_LISTS = ("duplicated", "corrupted", "misdelivered", "wrong_sender", "fail-but-delivered")
# Checker counts shown even when zero; other keys worth a reader's eye.
ALWAYS_COUNTED = ("sent", "acknowledged", "lost", "checked", "missing", "messages", "traced")
NOTED_KEYS = ("error", "unreadable_nodes", "nodes_missing_capture", "findings")

# Node state drawn for a fault of a given kind; families fill in the rest.
_KIND_STATE = {"kill": "killed", "pause": "paused", "leave": "left", "clock-skew": "skewed", "join": "joined"}
_FAMILY_STATE = {"partition": "partitioned", "link": "link fault", "clock": "skewed"}

class ReportError(Exception):
    """The report could not be written; the message names the run dir or file."""


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing, malformed or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ids(items: Any) -> set[str]:
    """Message ids of a verdict list; entries may be ids or objects with a "msg_id"."""
    return {str(m) for m in (i.get("msg_id") if isinstance(i, dict) else i for i in as_list(items)) if m is not None}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def checker_results(verdict: Mapping[str, Any] | None) -> dict[str, Any]:
    checkers = verdict.get("checkers") if verdict else None
    return checkers if isinstance(checkers, dict) else {}


@dataclass
class Send:
    """One send operation: invoke and completion times (ms), completion type, latency (ms)."""

    msg_id: str
    invoke_ms: float | None = None
    done_ms: float | None = None
    result: str | None = None  # "ok" | "fail" | "info" | None (no completion recorded)
    latency_ms: float | None = None
    sender: str | None = None
    recipient: str | None = None


def collect_sends(history: Iterable[Mapping[str, Any]]) -> dict[str, Send]:
    """Send operations by msg_id (as text), in invoke order."""
    sends: dict[str, Send] = {}
    for r in history:
        if r.get("op") != "send" or r.get("msg_id") is None:
            continue
        s = sends.setdefault(str(r["msg_id"]), Send(str(r["msg_id"])))
        t = as_number(r.get("t"))
        if r.get("type") == "invoke":
            s.invoke_ms = t
            s.sender = None if r.get("from") is None else str(r["from"])
            s.recipient = None if r.get("to") is None else str(r["to"])
        elif r.get("type") in ("ok", "fail", "info"):
            s.result, s.done_ms, s.latency_ms = str(r["type"]), t, as_number(r.get("latency_ms"))
    for s in sends.values():
        if s.invoke_ms is None and s.done_ms is not None and s.latency_ms is not None:
            s.invoke_ms = s.done_ms - s.latency_ms
    return sends


def message_outcomes(history: Sequence[Mapping[str, Any]], verdict: Mapping[str, Any] | None) -> dict[str, str]:
    """Outcome (one of ``OUTCOMES``) of every message sent in ``history``, by msg_id as text.

    The delivery checker's lists win (wrong_sender and fail-but-delivered count
    as BAD).  They are capped (chaos.checkers.delivery.LIST_CAP), so past the cap
    an acknowledged, never-received message is still "lost" when the checker
    ran; with no delivery verdict it is "not delivered".  Otherwise a message is
    "delivered" if a receive record names it, else by its send completion.
    """
    delivery = checker_results(verdict).get("delivery")
    delivery = delivery if isinstance(delivery, dict) and not delivery.get("error") else {}
    judged = "lost" in delivery or isinstance(delivery.get("counts"), dict)
    bad = set().union(*(_ids(delivery.get(k)) for k in _BAD_LISTS))
    lost = _ids(delivery.get("lost"))
    unknown = _ids(delivery.get("unknown"))
    recovered = _ids(delivery.get("recovered"))
    received = {str(r["msg_id"]) for r in history
                if r.get("op") == "receive" and r.get("type", "ok") == "ok" and r.get("msg_id") is not None}
    out = {}
    for mid, s in collect_sends(history).items():
        if mid in bad:
            out[mid] = BAD
        elif mid in lost:
            out[mid] = LOST
        elif mid in recovered or mid in received:
            out[mid] = DELIVERED
        elif s.result == "fail":
            out[mid] = FAILED
        elif mid in unknown or s.result in ("info", None):
            out[mid] = UNKNOWN
        else:
            out[mid] = LOST if judged else NOT_DELIVERED
    return out


@dataclass
class FaultSpan:
    """One injection of a fault: start/end ms (None = never started / never healed), status, targets."""

    fault: str
    kind: str
    start_ms: float | None = None
    end_ms: float | None = None
    status: str = "not healed"  # "healed" | "not healed" (lasts to the end of the run) | "skipped" | "error"
    targets: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        """Node names the targets mention ("node", "nodes", "new")."""
        out: list[str] = []
        for key in ("node", "nodes", "new"):
            v = self.targets.get(key)
            for name in (v if isinstance(v, list) else [v]):
                if isinstance(name, str) and name not in out:
                    out.append(name)
        return out

    def interval(self, run_end_ms: float) -> tuple[float, float] | None:
        """(start, end) ms as drawn; an unhealed fault lasts to ``run_end_ms``."""
        if self.start_ms is None:
            return None
        return self.start_ms, max(self.start_ms, self.end_ms if self.end_ms is not None else run_end_ms)


def fault_spans(records: Iterable[Mapping[str, Any]]) -> list[FaultSpan]:
    """faults.jsonl records paired into spans: a start opens, the next end of the same fault id closes.

    An error after a start keeps the span open (a failed heal leaves the fault
    in place); a skipped or error record with no open span is a span of its own
    with no interval.
    """
    spans: list[FaultSpan] = []
    open_: dict[str, FaultSpan] = {}
    recs = sorted((r for r in records if isinstance(r, Mapping)), key=lambda r: as_number(r.get("t")) or 0.0)
    for r in recs:
        fid, kind, phase, t = str(r.get("fault", "?")), str(r.get("kind") or "?"), r.get("phase"), as_number(r.get("t"))
        targets = r.get("targets") if isinstance(r.get("targets"), dict) else {}
        span = open_.get(fid)
        if phase == "start":
            if span is not None:  # started again without an end: the first lasted until now
                span.end_ms, span.status = t, "no end (started again)"
            span = open_[fid] = FaultSpan(fid, kind, start_ms=t, targets=dict(targets))
            spans.append(span)
        elif phase == "end":
            if span is None:
                span = FaultSpan(fid, kind, end_ms=t, status="end without start", targets=dict(targets))
                spans.append(span)
            else:
                span.end_ms = t
                if span.status == "not healed":
                    span.status = "healed"
                del open_[fid]
        elif phase in ("skipped", "error"):
            if span is None:
                span = FaultSpan(fid, kind, status=str(phase), targets=dict(targets))
                spans.append(span)
            elif phase == "error":
                span.status = "error"
            for key, value in targets.items():
                span.targets.setdefault(key, value)
        else:
            continue
        if r.get("error") is not None:
            span.errors.append(str(r["error"]))
    return spans


def schedule_spans(schedule: Mapping[str, Any] | None, t0_ms: float) -> list[FaultSpan]:
    """Planned faults of schedule.json as spans from ``t0_ms`` (used when faults.jsonl is absent)."""
    out = []
    faults = schedule.get("faults") if schedule else None
    for f in as_list(faults):
        if not isinstance(f, dict) or as_number(f.get("at_s")) is None:
            continue
        start = t0_ms + 1000 * as_number(f["at_s"])
        end = start + 1000 * (as_number(f.get("duration_s")) or 0.0)
        target = f.get("target") if isinstance(f.get("target"), dict) else {}
        out.append(FaultSpan(str(f.get("id", "?")), str(f.get("kind") or "?"), start, end, "planned", dict(target)))
    return out


def node_state(kind: str) -> str:
    """The state a node is drawn in while a fault of ``kind`` targets it."""
    if kind in _KIND_STATE:
        return _KIND_STATE[kind]
    family = NEMESES.get(kind, ("",))[0]
    return _FAMILY_STATE.get(family, kind)


def node_timeline(spans: Sequence[FaultSpan], nodes: Sequence[str],
                  run_end_ms: float) -> dict[str, list[tuple[str, float, float]]]:
    """Per node (``nodes`` first, then any other node a fault names): [(state, start ms, end ms)]."""
    rows: dict[str, list[tuple[str, float, float]]] = {n: [] for n in nodes}
    for span in spans:
        iv = span.interval(run_end_ms)
        for name in span.nodes:
            row = rows.setdefault(name, [])
            if iv is not None:
                row.append((node_state(span.kind), iv[0], iv[1]))
    return rows
