"""The run report: one self-contained ``report.html`` per run directory.

A view of the run's data, never a source of it (Jepsen-style): latency over
time with fault bands, throughput over time, and a per-node state timeline
(one chart on one time axis: :mod:`chaos.report.charts`),
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
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from testnet.base.jsonl import read_jsonl

from chaos.checkers.authority import ADVERSARY_FILE, summarize_attempts
from chaos.report.timing import timing_section
from chaos.report.charts import plot_over_time
from chaos.report.model import (ALWAYS_COUNTED, NOTED_KEYS, BAD, FAILED, LOST, MAX_LISTED_MESSAGES, OUTCOMES,
                                REPORT_NAME, UNKNOWN, ReportError, checker_results, as_list, as_number, collect_sends,
                                fault_spans, message_outcomes, node_timeline, read_json, schedule_spans)


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
    parts = [f"{k}: {_short(v, 40)}" for k, v in counts.items() if v or k in ALWAYS_COUNTED]
    if not counts:  # a partial verdict: its lists are all there is to count
        parts += [f"{k}: {len(v)}" for k, v in result.items() if isinstance(v, list)]
    lat = result.get("latency_ms")
    if isinstance(lat, dict) and lat.get("count", 1):
        parts.append("latency ms " + ", ".join(f"{q} {_short(lat[q], 12)}" for q in ("p50", "p95", "p99", "max")
                                               if lat.get(q) is not None))
    parts += [f"{k}: {_short(result[k], 300)}" for k in NOTED_KEYS if result.get(k)]
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
    authority = checker_results(verdict).get("authority") or {}
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

    h_times = [t for t in (as_number(r.get("t")) for r in history) if t is not None]
    f_times = [t for t in (as_number(r.get("t")) for r in fault_records) if t is not None]
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
    node_names, users = ([str(x.get("name") if isinstance(x, dict) else x) for x in as_list(run.get(key))
                          if (x.get("name") if isinstance(x, dict) else x) is not None] for key in ("nodes", "users"))
    timeline = node_timeline(spans, node_names, run_end)

    chart = plot_over_time(sends, outcomes, history, spans, timeline, t0, run_end)

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
                    [(name, *_checker_summary(res)) for name, res in checker_results(verdict).items()]),
             '<p><a href="#flagged">Flagged messages</a>: each message a checker failed, with its journey.</p>\n'
             if verdict and verdict.get("valid") is False else "",
             "<h3>Delivery outcome per message sent</h3>\n",
             _table(("outcome", "messages"), [(o, list(outcomes.values()).count(o)) for o in OUTCOMES]),
             "<h2>Latency, throughput and node state, with faults</h2>\n",
             _img(chart, "store latency, throughput and node state over time, with fault bands"),
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
