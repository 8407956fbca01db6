"""The report's "Fault timing" section: did each fault start and heal when the schedule
said, and if one failed, what failed.

Read from faults.jsonl (each phase's ``planned`` time and ``late_ms``; an error's leaves)
and the verdict's ``faults`` part (tolerance, and why the run did not play as planned).
A bar per phase from when its work began (before the planned time when it was centred on
it: ``early_ms``) to when it took effect, against the tolerance either way (drawn when a phase
failed or came off time); a table of the same; every failed call named.  Records from before
lateness was recorded draw nothing.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

DEFAULT_TOLERANCE_MS = 1000
MAX_ROWS = 60  # faults drawn; the table lists them all


@dataclass
class Phase:
    """One phase of one fault as it played: ``phase`` "start" or "heal"; ``late_ms`` None when
    the record predates lateness; ``failed`` the error when the phase failed."""

    fault: str
    kind: str
    phase: str
    planned_ms: float | None
    late_ms: float | None
    took_ms: float | None
    failed: str | None = None
    early_ms: float = 0.0  # how long before planned its work began (a change to thousands of links)


def phases(records: Iterable[Mapping[str, Any]]) -> list[Phase]:
    """Each start, heal and failed phase of faults.jsonl, in the order written."""
    out = []
    for r in records:
        if not isinstance(r, Mapping):
            continue
        kind = r.get("phase")
        if kind not in ("start", "end", "error"):
            continue
        phase = "start" if kind == "start" else "heal" if kind == "end" else str(r.get("during") or "start")
        out.append(Phase(str(r.get("fault", "?")), str(r.get("kind") or "?"), phase, _num(r.get("planned")),
                         _num(r.get("late_ms")), _num(r.get("took_ms")),
                         str(r.get("error")) if kind == "error" else None, _num(r.get("early_ms")) or 0.0))
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def needs_plot(items: Sequence[Phase], tolerance_ms: float) -> bool:
    """Whether the lateness plot shows more than the section's sentence: a phase failed or came
    later (or began earlier) than the tolerance.  When every phase came in time, the worst lateness and the table
    say all there is, and the plot (a quarter of a report's time) is not drawn."""
    return any(p.late_ms is not None and (p.failed or p.late_ms > tolerance_ms or p.early_ms > tolerance_ms)
               for p in items)


def plot_lateness(items: Sequence[Phase], tolerance_ms: float) -> bytes | None:
    """PNG: per fault, how late its start and its heal were (s), the tolerance dashed; a failed
    phase in red.  None when no phase has a lateness."""
    timed = [p for p in items if p.late_ms is not None][: 2 * MAX_ROWS]
    if not timed:
        return None
    from matplotlib.patches import Patch

    from chaos.report.charts import figure, png

    rows = list(dict.fromkeys((p.fault, p.kind) for p in timed))
    index = {key: i for i, key in enumerate(rows)}
    fig = figure(12, 0.6 + 0.32 * len(rows) + 0.9)
    ax = fig.add_subplot()
    colours = {"start": "tab:blue", "heal": "tab:green"}
    for p in timed:
        y = index[(p.fault, p.kind)] + (-0.18 if p.phase == "start" else 0.18)
        late_s = max(p.late_ms or 0.0, 0.0) / 1000
        early_s = p.early_ms / 1000
        ax.barh(y, late_s + early_s, left=-early_s, height=0.34,
                color="tab:red" if p.failed else colours.get(p.phase, "tab:gray"))
    ax.axvline(tolerance_ms / 1000, color="black", linestyle="--", linewidth=1)
    earliest = max(p.early_ms for p in timed) / 1000
    if earliest:
        ax.axvline(-tolerance_ms / 1000, color="black", linestyle="--", linewidth=1)
        ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{fid} {kind}" for fid, kind in rows])
    ax.invert_yaxis()
    worst = max(max(p.late_ms or 0.0 for p in timed) / 1000, tolerance_ms / 1000)
    ax.set_xlim(-max(earliest, tolerance_ms / 1000) * 1.08 if earliest else 0, worst * 1.08)
    ax.set_xlabel("lateness (s): took effect minus planned; left of 0, its work began early")
    ax.set_title(f"Fault timing: each start and heal against the tolerance ({tolerance_ms / 1000:g} s)")
    ax.legend(handles=[Patch(color="tab:blue", label="start"), Patch(color="tab:green", label="heal"),
                       Patch(color="tab:red", label="failed")], loc="upper left", bbox_to_anchor=(1.01, 1))
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.12, right=0.86, bottom=0.6 / height, top=1 - 0.4 / height)
    return png(fig)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def timing_section(records: Sequence[Mapping[str, Any]], verdict: Mapping[str, Any] | None) -> str:
    """The section's HTML (empty when the run recorded no fault)."""
    items = phases(records)
    faults = (verdict or {}).get("faults") or {}
    if not items and not faults.get("why"):
        return ""
    tolerance = float(faults.get("tolerance_ms") or DEFAULT_TOLERANCE_MS)
    parts = ["<h2>Fault timing</h2>\n"]
    whys = faults.get("why") or []
    if whys:
        parts.append('<p class="invalid">The schedule did not play as planned, so this run cannot pass '
                     '(a harness error):</p>\n<ul>' + "".join(f"<li>{_e(w)}</li>" for w in whys) + "</ul>\n")
    worst = faults.get("worst")
    if worst:
        if worst.get("early_ms", 0) > worst["late_ms"]:  # a change centred on its planned time
            parts.append(f"<p>Worst timing: fault {_e(worst['fault'])} {_e(worst['kind'])}, {_e(worst['phase'])}: "
                         f"its work begun {worst['early_ms'] / 1000:.2f} s early and done "
                         f"{worst['late_ms'] / 1000:.2f} s late; tolerance {tolerance / 1000:g} s either way.</p>\n")
        else:
            parts.append(f"<p>Worst lateness: {worst['late_ms'] / 1000:.2f} s (fault {_e(worst['fault'])} "
                         f"{_e(worst['kind'])}, {_e(worst['phase'])}); tolerance {tolerance / 1000:g} s.</p>\n")
    png = None
    if needs_plot(items, tolerance):
        try:
            png = plot_lateness(items, tolerance)
        except Exception as exc:  # a view never breaks the report
            parts.append(f'<p class="note">lateness plot failed: {_e(type(exc).__name__)}: {_e(exc)}</p>\n')
    elif any(p.late_ms is not None for p in items):
        parts.append(f"<p>Every start and heal took effect within the tolerance "
                     f"({tolerance / 1000:g} s) either way.</p>\n")
    if png:
        parts.append(f'<p><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                     f'alt="fault timing"></p>\n')
    rows = "".join(
        f"<tr><td>{_e(p.fault)}</td><td>{_e(p.kind)}</td><td>{_e(p.phase)}</td><td>{_ms(p.late_ms)}</td>"
        f"<td>{_ms(p.early_ms or None)}</td>"
        f"<td>{_ms(p.took_ms)}</td><td>{_e(p.failed or '')}</td></tr>\n" for p in items)
    parts.append("<table><tr><th>fault</th><th>kind</th><th>phase</th><th>late (ms)</th>"
                 "<th>its work began early (ms)</th><th>its work took (ms)</th>"
                 f"<th>error</th></tr>\n{rows}</table>\n")
    parts.append(_failures(records))
    return "".join(parts)


def _failures(records: Sequence[Mapping[str, Any]]) -> str:
    """Every error's leaves: for a bulk Toxiproxy change, how many of how many calls failed
    and the first of them (server, call, status or why)."""
    rows = []
    for r in records:
        if not isinstance(r, Mapping) or r.get("phase") != "error":
            continue
        for leaf in r.get("failures") or []:
            if not isinstance(leaf, Mapping):
                continue
            where = ", ".join(f"{k} {leaf[k]}" for k in ("server", "call", "proxy", "status") if leaf.get(k) is not None)
            count = f"{leaf['failed']:,} of {leaf['calls']:,} calls failed" if "failed" in leaf else ""
            calls = "; ".join(f"{c.get('server')} {c.get('call')}: {c.get('reason')}"
                              for c in (leaf.get("calls_failed") or [])[:5] if isinstance(c, Mapping))
            rows.append(f"<tr><td>{_e(r.get('fault'))}</td><td>{_e(r.get('during', 'start'))}</td>"
                        f"<td>{_e(leaf.get('error', ''))}</td><td>{_e(where)}</td><td>{_e(count)}</td>"
                        f"<td>{_e(calls)}</td></tr>\n")
    if not rows:
        return ""
    return ("<h3>What failed</h3>\n<table><tr><th>fault</th><th>phase</th><th>error</th><th>where</th>"
            "<th>calls</th><th>first failed calls</th></tr>\n" + "".join(rows) + "</table>\n")
