"""The run report: one self-contained ``report.html`` per run directory.

A view of the run's data, never a source of it (Jepsen-style): latency over
time with fault bands, throughput over time, and a per-node state timeline,
plus tables of the verdict, the faults (and how late each started and healed:
:mod:`chaos.report.timing`) and the run facts, and every message a
checker flagged with its journey inline (:mod:`chaos.report.flagged`).  Every
input is optional and read defensively, so a half-finished run (harness
killed, no verdict yet) still gets a report.  Plots are PNGs embedded as base64 data
URIs; all text is escaped; the history carries no plaintext, nor does the
report.  matplotlib is imported inside the plot functions: importing this
module stays cheap for the CLI.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from testnet.base.jsonl import read_jsonl

from chaos.checkers.authority import ADVERSARY_FILE, summarize_attempts
from chaos.report.timing import timing_section
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

# outcome -> (colour, marker)
_OUTCOME_STYLE = {DELIVERED: ("tab:green", "o"), NOT_DELIVERED: ("tab:gray", "o"), FAILED: ("tab:purple", "s"),
                  UNKNOWN: ("tab:orange", "^"), BAD: ("black", "D"), LOST: ("red", "x")}

# Delivery checker lists that put a message in BAD (chaos/checkers/delivery.py FAILURE_OUTCOMES).
_BAD_LISTS = ("duplicated", "corrupted", "misdelivered", "wrong_sender", "fail-but-delivered")
# Checker counts shown even when zero; other keys worth a reader's eye.
_ALWAYS_COUNTED = ("sent", "acknowledged", "lost", "checked", "missing", "messages", "traced")
_NOTED_KEYS = ("error", "unreadable_nodes", "nodes_missing_capture", "findings")

# Node state drawn for a fault of a given kind; families fill in the rest.
_KIND_STATE = {"kill": "killed", "pause": "paused", "leave": "left", "clock-skew": "skewed", "join": "joined"}
_FAMILY_STATE = {"partition": "partitioned", "link": "link fault", "clock": "skewed"}
_STATE_COLOUR = {"killed": "tab:red", "paused": "tab:orange", "left": "tab:brown", "skewed": "tab:purple",
                 "partitioned": "tab:blue", "link fault": "tab:cyan", "joined": "tab:green"}

MAX_BINS = 20_000  # throughput bins at most (1 s each up to ~5.5 h of run)
MAX_LISTED_MESSAGES = 200  # problem messages listed by id (the plot shows all of them)


class ReportError(Exception):
    """The report could not be written; the message names the run dir or file."""


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing, malformed or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ids(items: Any) -> set[str]:
    """Message ids of a verdict list; entries may be ids or objects with a "msg_id"."""
    return {str(m) for m in (i.get("msg_id") if isinstance(i, dict) else i for i in _list(items)) if m is not None}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _checkers(verdict: Mapping[str, Any] | None) -> dict[str, Any]:
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
        t = _num(r.get("t"))
        if r.get("type") == "invoke":
            s.invoke_ms = t
            s.sender = None if r.get("from") is None else str(r["from"])
            s.recipient = None if r.get("to") is None else str(r["to"])
        elif r.get("type") in ("ok", "fail", "info"):
            s.result, s.done_ms, s.latency_ms = str(r["type"]), t, _num(r.get("latency_ms"))
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
    delivery = _checkers(verdict).get("delivery")
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
    recs = sorted((r for r in records if isinstance(r, Mapping)), key=lambda r: _num(r.get("t")) or 0.0)
    for r in recs:
        fid, kind, phase, t = str(r.get("fault", "?")), str(r.get("kind") or "?"), r.get("phase"), _num(r.get("t"))
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
    for f in _list(faults):
        if not isinstance(f, dict) or _num(f.get("at_s")) is None:
            continue
        start = t0_ms + 1000 * _num(f["at_s"])
        end = start + 1000 * (_num(f.get("duration_s")) or 0.0)
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


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: nightly runs are headless
    from matplotlib.figure import Figure  # a bare Figure keeps pyplot's global state out of it

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    # Same side margins on every plot (no tight bbox) so their time axes line up on the page.
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.6 / height, top=1 - 0.4 / height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def kind_colours(spans: Sequence[FaultSpan]) -> dict[str, Any]:
    """One colour per fault kind, the same in every report (known kinds by their NEMESES order)."""
    from matplotlib import colormaps

    # 18 strong colours (pale ones vanish under a translucent band); process and
    # partition faults, the common ones, take the most distinct.
    palette = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
    order = {"process": 0, "partition": 1, "clock": 2, "link": 3}
    known = sorted(NEMESES, key=lambda k: order.get(NEMESES[k][0], 4))
    extra = sorted({s.kind for s in spans} - set(known))
    return {k: palette[i % len(palette)] for i, k in enumerate(known + extra)}


def _bands(ax: Any, spans: Sequence[FaultSpan], t0: float, run_end: float, colours: Mapping[str, Any]) -> list[Any]:
    """Shade each fault's interval; returns one legend handle per kind drawn."""
    from matplotlib.patches import Patch

    drawn: dict[str, Any] = {}
    for span in spans:
        iv = span.interval(run_end)
        if iv is None:
            continue
        ax.axvspan((iv[0] - t0) / 1000, (iv[1] - t0) / 1000, color=colours[span.kind], alpha=0.25, lw=0)
        drawn.setdefault(span.kind, Patch(color=colours[span.kind], alpha=0.4, label=f"fault: {span.kind}"))
    return [drawn[k] for k in sorted(drawn)]


def _legend(ax: Any, handles: list[Any]) -> None:
    if handles:  # outside the axes, on the right margin _png leaves for it
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _plain_log_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # 1-2-5 ticks labelled as plain numbers: a run's latencies often span less than one decade.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_latency(sends: Mapping[str, Send], outcomes: Mapping[str, str], spans: Sequence[FaultSpan],
                 t0: float, run_end: float) -> bytes:
    """PNG: store latency (ms, log) per message at its invoke time, over fault bands."""
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    handles = _bands(ax, spans, t0, run_end, kind_colours(spans))
    any_point = False
    for outcome in OUTCOMES:
        pts = [((s.invoke_ms - t0) / 1000, max(s.latency_ms, 0.1)) for mid, s in sends.items()
               if outcomes.get(mid) == outcome and s.invoke_ms is not None and s.latency_ms is not None]
        if not pts:
            continue
        any_point = True
        colour, marker = _OUTCOME_STYLE[outcome]
        xs, ys = zip(*pts)
        size = 30 if outcome in (LOST, BAD) else 12
        handles.insert(0, ax.scatter(xs, ys, s=size, c=colour, marker=marker, label=f"{outcome} ({len(pts)})",
                                     alpha=0.8, linewidths=1.2 if marker == "x" else 0))
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    if not any_point:
        ax.set_ylim(1, 1000)
        ax.text(0.5, 0.5, "no completed sends", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    ax.set_xlabel("time since first history record (s)")
    ax.set_ylabel("store latency (ms)")
    ax.set_title("Store latency by delivery outcome, with faults")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, handles)
    return _png(fig)


def plot_throughput(history: Sequence[Mapping[str, Any]], spans: Sequence[FaultSpan],
                    t0: float, run_end: float) -> bytes:
    """PNG: sends acknowledged and receives per second (1 s bins, wider past MAX_BINS), over fault bands."""
    bin_s = max(1, math.ceil((run_end - t0) / 1000 / MAX_BINS))  # a stray far-off "t" must not eat memory
    n_bins = int((run_end - t0) // (1000 * bin_s)) + 1
    acks, recvs = [0.0] * n_bins, [0.0] * n_bins
    for r in history:
        t = _num(r.get("t"))
        if t is None or r.get("type") != "ok" or r.get("op") not in ("send", "receive"):
            continue
        i = min(max(int((t - t0) // (1000 * bin_s)), 0), n_bins - 1)
        (acks if r["op"] == "send" else recvs)[i] += 1 / bin_s
    fig = _figure(11, 3.4)
    ax = fig.add_subplot()
    handles = _bands(ax, spans, t0, run_end, kind_colours(spans))
    xs = [i * bin_s for i in range(n_bins + 1)]
    (l1,) = ax.plot(xs, acks + acks[-1:], drawstyle="steps-post", color="tab:blue", label="sends acknowledged/s")
    (l2,) = ax.plot(xs, recvs + recvs[-1:], drawstyle="steps-post", color="tab:green", label="receives/s")
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since first history record (s)")
    ax.set_ylabel("messages per second")
    ax.set_title(f"Throughput ({bin_s} s bins), with faults")
    ax.grid(True, alpha=0.3)
    _legend(ax, [l1, l2] + handles)
    return _png(fig)


NODE_ROWS_ALL = 40  # above this many nodes the state chart shows only those with a state to show


def plot_nodes(timeline: Mapping[str, Sequence[tuple[str, float, float]]], t0: float, run_end: float) -> bytes:
    """PNG: one row per node, a bar per interval the node was killed, paused, skewed, partitioned, left."""
    from matplotlib.patches import Patch

    names = list(timeline)
    hidden = 0
    if len(names) > NODE_ROWS_ALL:  # a large network: only the nodes something happened to
        shown = [n for n in names if timeline[n]]
        hidden, names = len(names) - len(shown), shown
    fig = _figure(11, max(2.0, 0.32 * len(names) + 1.2))
    ax = fig.add_subplot()
    used: set[str] = set()
    for row, name in enumerate(reversed(names)):
        states = sorted({s for s, _, _ in timeline[name]})
        lane = 0.8 / max(len(states), 1)  # overlapping states get their own lane within the row
        for state, start, end in timeline[name]:
            y = row - 0.4 + lane * states.index(state)
            ax.broken_barh([((start - t0) / 1000, max((end - start) / 1000, 0.05))], (y, lane),
                           facecolors=_STATE_COLOUR.get(state, "tab:gray"))
            used.add(state)
    ax.set_yticks(range(len(names)), list(reversed(names)), fontsize=7 if len(names) > 30 else 9)
    ax.set_ylim(-0.6, max(len(names), 1) - 0.4)
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    if not names:
        ax.text(0.5, 0.5, "no nodes known", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlabel("time since first history record (s)")
    ax.set_title("Node state over time" + (f" ({hidden} nodes without a fault not shown)" if hidden else ""))
    ax.grid(True, axis="x", alpha=0.3)
    _legend(ax, [Patch(color=_STATE_COLOUR.get(s, "tab:gray"), label=s) for s in sorted(used)])
    return _png(fig)


# ---------------------------------------------------------------- html

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;font-size:.9em;vertical-align:top}th{background:#f3f3f3}
.valid{color:#070}.invalid{color:#b00;font-weight:bold}.unknown{color:#a60}img{max-width:100%}
.note{color:#666;font-size:.85em}"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def _valid_text(valid: Any) -> tuple[str, str]:
    if valid is True:
        return "valid", "valid"
    if valid is False:
        return "INVALID", "invalid"
    return ("unknown", "unknown") if valid is not None else ("no verdict", "unknown")


def _secs(ms: float | None, t0: float) -> str:
    return "" if ms is None else f"{(ms - t0) / 1000:.1f}"


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _targets_summary(targets: Mapping[str, Any]) -> str:
    parts = []
    for key, value in targets.items():
        if key == "nodes" and isinstance(value, list):
            shown = ", ".join(map(str, value[:8])) + (f", … ({len(value)})" if len(value) > 8 else "")
            parts.append(f"nodes: {shown}")
        else:
            parts.append(f"{key}: {_short(value, 60)}")
    return "; ".join(parts)


def _checker_summary(result: Any) -> tuple[str, str]:
    """(valid, key counts) of one checker result: non-zero counts, latency, errors and findings."""
    if not isinstance(result, dict):
        return "?", _short(result)
    counts = result.get("counts") if isinstance(result.get("counts"), dict) else {}
    parts = [f"{k}: {_short(v, 40)}" for k, v in counts.items() if v or k in _ALWAYS_COUNTED]
    if not counts:  # a partial verdict: its lists are all there is to count
        parts += [f"{k}: {len(v)}" for k, v in result.items() if isinstance(v, list)]
    lat = result.get("latency_ms")
    if isinstance(lat, dict) and lat.get("count", 1):
        parts.append("latency ms " + ", ".join(f"{q} {_short(lat[q], 12)}" for q in ("p50", "p95", "p99", "max")
                                               if lat.get(q) is not None))
    parts += [f"{k}: {_short(result[k], 300)}" for k in _NOTED_KEYS if result.get(k)]
    return _valid_text(result.get("valid"))[0], "; ".join(parts)


def adversary_section(records: Sequence[Mapping[str, Any]], verdict: Mapping[str, Any] | None) -> str:
    """The adversary's attempts and how the nodes answered them (adversary.jsonl), by attack and op;
    empty when the run had no adversary."""
    if not records:
        return ""
    s = summarize_attempts(records)
    c, f = s["counts"], s["floods"]
    rows = [(attack, op, e["attempts"], ", ".join(f"{k}: {v}" for k, v in sorted(e["statuses"].items())),
             e["as_wanted"], e["accepted"], e["leaked"])
            for attack, ops in s["attacks"].items() for op, e in ops.items()]
    parts = ["<h2>Adversary</h2>\n",
             f"<p>{_e(c['attempts'])} attempts: {_e(c['refused'])} refused, {_e(c['accepted'])} accepted that "
             f"must be refused, {_e(c['leaked'])} that gave away what they must withhold, "
             f"{_e(c['unanswered'])} unanswered; {_e(c['rehomed'])} let through by the rehoming rule.</p>\n",
             _table(("attack", "op", "attempts", "answers (status: n)", "as expected", "accepted", "leaked"), rows)]
    authority = _checkers(verdict).get("authority") or {}
    planted = (authority.get("counts") or {}).get("planted")
    if s["planted_hashes"]:
        parts.append(f"<p>Messages it tried to plant: {len(s['planted_hashes'])}; held by a node afterwards: "
                     f"{_e('not checked' if planted is None else planted)}.</p>\n")
    if f["waves"]:
        parts.append(f"<p>Connection floods: {_e(f['waves'])} waves, {_e(f['opened'])} of {_e(f['connections'])} "
                     f"connections opened, {_e(f['closed_by_node'])} closed by the node (answers: "
                     f"{_e(', '.join(f'{k}: {v}' for k, v in sorted(f['statuses'].items())) or 'none')}); "
                     f"probes of the flooded node "
                     f"failed {_e(f['probes_failed'])} of {_e(f['probes'])}.</p>\n")
    if s["accepted"] or s["leaked"]:
        bad = (s["accepted"] + s["leaked"])[:MAX_LISTED_MESSAGES]
        parts.append(_table(("attack", "op", "variant", "node", "as", "victim", "status", "exposed", "effect"),
                            [(r.get("attack"), r.get("op"), r.get("variant") or "", r.get("node"), r.get("as"),
                              r.get("victim") or "", r.get("status"), r.get("exposed", ""), r.get("effect", ""))
                             for r in bad]))
    return "".join(parts)


def _img(png: bytes, alt: str) -> str:
    return f'<p><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_e(alt)}"></p>\n'


def _flagged(run_dir: Path, verdict: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]],
             lost_ids: Sequence[str], trace_timeout_s: float | None) -> str:
    """The "Flagged messages" section (chaos.report.flagged), or why it is missing: a view never breaks the report."""
    try:
        from chaos.report.flagged import CSS, TRACE_TIMEOUT_S, flagged_section

        return f"<style>{CSS}</style>\n" + flagged_section(run_dir, verdict, history, lost_ids,
                                                           timeout_s=trace_timeout_s or TRACE_TIMEOUT_S)
    except Exception as exc:
        return (f'<h2 id="flagged">Flagged messages</h2>\n<p>could not be built: {_e(type(exc).__name__)}: '
                f'{_e(exc)}</p>\n')


def write_report(run_dir: Path, *, trace_timeout_s: float | None = None) -> Path:
    """Write ``report.html`` into ``run_dir`` from whatever of history.jsonl, faults.jsonl,
    verdict.json, run.json and schedule.json it holds; returns the report's path.
    ``trace_timeout_s``: how long the flagged messages' journeys may take (default: the
    report's own budget, chaos.report.flagged.TRACE_TIMEOUT_S)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"report: {run_dir} is not a run directory")
    notes: list[str] = []
    history = read_jsonl(run_dir / "history.jsonl")
    fault_records = read_jsonl(run_dir / "faults.jsonl")
    verdict = read_json(run_dir / "verdict.json")
    run = read_json(run_dir / "run.json") or {}
    schedule = read_json(run_dir / "schedule.json")
    for name, data in (("history.jsonl", history), ("verdict.json", verdict)):
        if not data:
            notes.append(f"{name} is missing, empty or unreadable.")

    h_times = [t for t in (_num(r.get("t")) for r in history) if t is not None]
    f_times = [t for t in (_num(r.get("t")) for r in fault_records) if t is not None]
    t0 = min(h_times) if h_times else min(f_times, default=0.0)
    run_end = max(h_times + f_times, default=t0)
    spans = fault_spans(fault_records)
    if not fault_records and schedule:
        spans = schedule_spans(schedule, t0)
        if spans:
            notes.append("faults.jsonl has no records: fault bands show the planned schedule, not what ran.")
    run_end = max([run_end] + [s.end_ms for s in spans if s.end_ms is not None])

    sends = collect_sends(history)
    outcomes = message_outcomes(history, verdict)
    node_names, users = ([str(x.get("name") if isinstance(x, dict) else x) for x in _list(run.get(key))
                          if (x.get("name") if isinstance(x, dict) else x) is not None] for key in ("nodes", "users"))
    timeline = node_timeline(spans, node_names, run_end)

    pngs = [
        (plot_latency(sends, outcomes, spans, t0, run_end), "store latency with fault bands"),
        (plot_throughput(history, spans, t0, run_end), "throughput with fault bands"),
        (plot_nodes(timeline, t0, run_end), "node state timeline"),
    ]

    results = [s.result for s in sends.values()]
    receives = sum(1 for r in history if r.get("op") == "receive" and r.get("type", "ok") == "ok")
    scenario = schedule.get("scenario") if schedule else None
    seed = run.get("seed", schedule.get("seed") if schedule else None)
    run_id = run.get("run_id", run_dir.name)
    facts = [
        ("run id", run_id), ("seed", "" if seed is None else seed), ("scenario", scenario or ""),
        ("nodes", f"{len(timeline)}: " + _short(", ".join(timeline), 600) if timeline else "0"),
        ("users", f"{len(users)}: " + _short(", ".join(users), 600) if users else "0"),
        ("duration (s)", f"{(run_end - t0) / 1000:.1f}"),
        ("messages sent", len(sends)), ("sends ok", results.count("ok")), ("sends fail", results.count("fail")),
        ("sends info (unknown)", results.count("info")), ("sends with no completion", results.count(None)),
        ("receives", receives), ("faults injected", sum(1 for s in spans if s.start_ms is not None)),
    ]
    overall, css = _valid_text(verdict.get("valid") if verdict else None)

    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>swarmnet run {_e(run_id)}</title>"
             f"<style>{_CSS}</style></head><body>\n",
             f"<h1>swarmnet chaos run {_e(run_id)}</h1>\n",
             f'<p>Verdict: <span class="{css}">{_e(overall)}</span></p>\n',
             "<h2>Run</h2>\n", _table(("fact", "value"), facts),
             "<h2>Verdict</h2>\n",
             _table(("checker", "valid", "counts"),
                    [(name, *_checker_summary(res)) for name, res in _checkers(verdict).items()]),
             '<p><a href="#flagged">Flagged messages</a>: each message a checker failed, with its journey.</p>\n'
             if verdict and verdict.get("valid") is False else "",
             "<h3>Delivery outcome per message sent</h3>\n",
             _table(("outcome", "messages"), [(o, list(outcomes.values()).count(o)) for o in OUTCOMES]),
             "<h2>Latency and faults</h2>\n", _img(*pngs[0]),
             "<h2>Throughput</h2>\n", _img(*pngs[1]),
             "<h2>Node state</h2>\n", _img(*pngs[2]),
             "<h2>Faults</h2>\n",
             _table(("id", "kind", "start (s)", "end (s)", "status", "targets", "errors"),
                    [(s.fault, s.kind, _secs(s.start_ms, t0), _secs(s.end_ms, t0), s.status,
                      _targets_summary(s.targets), "; ".join(s.errors)) for s in spans]),
             timing_section(fault_records, verdict),
             adversary_section(read_jsonl(run_dir / ADVERSARY_FILE), verdict)]
    rank = {BAD: 0, LOST: 1, UNKNOWN: 2, FAILED: 3}  # violations first, in case the list is cut
    problems = sorted(((mid, o) for mid, o in outcomes.items() if o in rank), key=lambda p: rank[p[1]])
    if problems:
        parts.append(f"<h2>Problem messages ({len(problems)})</h2>\n")
        parts.append(_table(("msg_id", "outcome", "from", "to", "invoke (s)", "completion", "latency (ms)"),
                            [(mid, o, sends[mid].sender or "", sends[mid].recipient or "",
                              _secs(sends[mid].invoke_ms, t0), sends[mid].result or "none",
                              "" if sends[mid].latency_ms is None else f"{sends[mid].latency_ms:.0f}")
                             for mid, o in problems[:MAX_LISTED_MESSAGES]]))
        if len(problems) > MAX_LISTED_MESSAGES:
            parts.append(f'<p class="note">first {MAX_LISTED_MESSAGES} listed.</p>\n')
    parts.append(_flagged(run_dir, verdict, history, [m for m, o in outcomes.items() if o == LOST], trace_timeout_s))
    parts += [f'<p class="note">{_e(n)}</p>\n' for n in notes]
    parts.append("</body></html>\n")

    out = run_dir / REPORT_NAME
    tmp = run_dir / (REPORT_NAME + ".tmp")
    try:
        tmp.write_text("".join(parts), encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees a half-written report
    except OSError as exc:
        raise ReportError(f"report: cannot write {out}: {exc}") from None
    return out
