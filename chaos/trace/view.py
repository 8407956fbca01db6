"""``swarmnet trace RUN_DIR (MSG_ID | HASH)``: one message's journey, rebuilt
from the run directory alone (see :mod:`chaos.trace.journey` for how, and for the
``--json`` shape; :mod:`chaos.trace.events` for ``--trace-events``).

    swarmnet trace runs/<run-id> bob-3                      # readable timeline
    swarmnet trace runs/<run-id> J3/Sdt5E --json            # the journey as JSON
    swarmnet trace runs/<run-id> bob-3 --trace-events t.json     # open in ui.perfetto.dev
    swarmnet trace runs/<run-id> --all --trace-events run.json   # every message of the run
    swarmnet trace runs/<run-id> --all                      # one line per message: outcome, where its trail ends
    swarmnet trace runs/<run-id> bob-3 --html bob-3.html    # one self-contained page: lanes, findings, the text

Only this module prints; :func:`render_text` and :func:`render_html` (its body, :func:`render_html_body`,
is also the run report's inline journey) are views of the journey data.
"""

from __future__ import annotations

import bisect
import html
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import click

from chaos.trace.journey import FaultBand, Run, TraceError, all_journeys, journey, load_run
from chaos.trace.events import trace_events, write_trace_events

__all__ = ["render_text", "render_line", "render_html", "render_html_body", "render_lanes", "JOURNEY_CSS",
           "trace", "run_trace_events"]


def _dt(t: int | None, t0: int) -> str:
    return "      ?" if t is None else f"{(t - t0) / 1000:+7.3f}s"


def _clock(t: int) -> str:
    return datetime.fromtimestamp(t / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _hop_line(h: Mapping[str, Any], t0: int) -> str:
    who = f"{h['node']:>5} {h['role']:<6}"
    if h["seen"] != "capture":
        return f"{who} in no capture (its layer opened with its own key: the request was bound for it)"
    parts = [f"from {h['from'] or '?':<6}", f"in {_dt(h['arrived_t'], t0)}"]
    if h["forwarded_t"] is not None or h["role"] != "target":
        parts.append(f"fwd {_dt(h['forwarded_t'], t0)}" if h["forwarded_t"] is not None else "fwd      none")
        if h["forwarded_t"] is not None:
            ans = "none" if h["answer_t"] is None else f"{_dt(h['answer_t'], t0)} ({h['answer_status']})"
            parts.append(f"answer {ans}")
    out = "none" if h["replied_t"] is None else f"{_dt(h['replied_t'], t0)} ({h['status']})"
    parts.append(f"out {out}")
    if h["spent_ms"] is not None:
        parts.append(f"{h['spent_ms']} ms" + (f" (own {h['own_ms']} ms)" if h["own_ms"] is not None else ""))
    if h["error"]:
        parts.append(h["error"])
    return f"{who} " + "  ".join(parts)


def render_text(j: Mapping[str, Any]) -> str:
    """The journey as a person reads it: header, timeline (attempts with their hops), storage, faults, trail."""
    s = j["sent"] or {}
    events = j["events"]
    t0 = s.get("invoke_t") or (events[0]["t"] if events else 0)
    lines = [f"message {j['msg_id'] or '(not in the history)'}  hash {j['hash']}",
             f"{j['from'] or '?'} -> {j['to'] or '?'}  namespace {j['namespace'] if j['namespace'] is not None else '?'}"
             f"  outcome: {', '.join(j['outcomes']) or '?'}"]
    sw = j["swarm"]
    if sw["members"]:
        lines.append(f"{j['to']}'s swarm {sw['id']}: {' '.join(sw['members'])} (from the {sw['source']})")
    if s:
        told = f"client: {s['done'] or 'no completion'}"
        if s["done"] == "ok":
            told += (f" after {s['attempts']} attempt(s), {s['latency_ms']} ms; told path {' '.join(s['path'])},"
                     f" target {s['target']}, members " + " ".join(f"{k}:{v}" for k, v in s["swarm"].items()))
        elif s.get("error"):
            told += f": {s['error']}"
        lines.append(told)
    lines += ["", f"timeline (times from {'the invoke' if s.get('invoke_t') else 'the first event'}, {_clock(t0)}"
              + (", virtual: a simulated run)" if j.get("simulated") else ")")]
    attempts = {a["n"]: a for a in j["attempts"]}
    for e in events:
        if e["kind"] == "hop":
            continue  # shown under their attempt
        span = f" (until {_dt(e['end_t'], t0).strip()})" if "end_t" in e and e["end_t"] != e["t"] else ""
        lines.append(f"  {_dt(e['t'], t0)}  {e['track']:<8} {e['text']}{span}")
        if e["kind"] == "attempt":
            for h in attempts[e["attempt"]]["hops"]:
                lines.append(f"{'':22}{_hop_line(h, t0)}")
    st = j["storage"]
    rows = [x["node"] for x in st if x["row"]]
    tombs = [x["node"] for x in st if x["deleted_t"]]
    lacking = [x["node"] for x in st if x["member"] and not x["row"] and not x["deleted_t"] and x["row"] is not None]
    strays = [x["node"] for x in st if x["row"] and not x["member"]]
    unreadable = [x["node"] for x in st if x["row"] is None]
    lines += ["", "storage at the end (node databases):",
              f"  rows on: {' '.join(rows) or 'none'}" + (f"; outside the swarm: {' '.join(strays)}" if strays else ""),
              f"  tombstones on: {' '.join(tombs) or 'none'}",
              f"  swarm members with neither: {' '.join(lacking) or 'none'}"]
    if unreadable:
        lines.append(f"  unreadable: {' '.join(unreadable)}")
    if j["missed_retrieves"]:
        lines.append(f"  {j['to']}'s retrieves that did not return it: " + ", ".join(
            f"{n} x{m['count']} since {_dt(m['since_t'], t0).strip()}" for n, m in sorted(j["missed_retrieves"].items())))
    if j["faults"]:
        lines += ["", "faults active during the journey:"]
        for f in j["faults"]:
            band = FaultBand(f["fault"], f["kind"], f["family"], f["start_t"], f["end_t"], f["targets"])
            end = "never healed" if f["end_t"] is None else _dt(f["end_t"], t0).strip()
            lines.append(f"  fault {f['fault']} {band.describe()}  {_dt(f['start_t'], t0).strip()} .. {end}"
                         + ("" if f["touches"] else ": touched nothing on this message's trail"))
            lines += [f"      {t}" for t in f["touches"]]
    if j["findings"]:
        lines += ["", "findings (steps that broke a rule of the protocol):"]
        lines += [f"  {_dt(f['t'], t0).strip():>9}  {f['kind']:<16} {f['text']}" for f in j["findings"]]
    tr = j["trail"]
    lines += ["", f"trail ends at {tr['ends_at'] or '?'}" + (f" ({_dt(tr['t'], t0).strip()})" if tr["t"] else "")
              + f": {tr['why']}"]
    if j["unknowns"]:
        lines += ["", "cannot tell:"] + [f"  - {u}" for u in j["unknowns"]]
    return "\n".join(lines)


KIND_COLOURS = {"send": "#4e79a7", "attempt": "#76b7b2", "hop": "#59a14f", "commit": "#edc948", "copy": "#b07aa1",
                "retrieve": "#9c755f", "receive": "#4e79a7", "delete": "#e15759", "removed": "#e15759",
                "fault": "#bab0ac", "lost": "#e15759"}


def _axis(events: list[Mapping[str, Any]]) -> tuple[list[float], Any]:
    """x (0..1) of each event, and of any time: each step gets its own slot, in timeline order (under virtual
    time many steps share one millisecond), and a gap between steps is drawn by its logarithm, so that a hop
    of 1 ms and a retrieve seconds later both show, in order, on one line (the ticks give the real times)."""
    pos: list[float] = []
    for i, e in enumerate(events):
        gap = e["t"] - events[i - 1]["t"] if i else 0
        pos.append(pos[-1] + 1 + 4 * math.log10(1 + gap) if i else 0.0)
    span = max(pos[-1] if pos else 0, 1.0)

    starts = [e["t"] for e in events]  # in time order (chaos.trace.journey.timeline)

    def at(t: int) -> float:  # the last step at or before t (a span covers the steps inside it)
        return pos[max(bisect.bisect_right(starts, t) - 1, 0)] / span if pos else 0.0

    return [p / span for p in pos], at


JOURNEY_CSS = "pre{font-size:12px}.f{background:#fde;padding:.3em 1em}"  # what render_html_body's classes need


def render_lanes(j: Mapping[str, Any]) -> str:
    """The journey's lanes as one inline SVG (no script): a lane per user, node and fault on a step axis,
    each step's text in its tooltip."""
    events = j["events"]
    t0 = (j["sent"] or {}).get("invoke_t") or (events[0]["t"] if events else 0)
    users = {j["from"], j["to"]} | {r["user"] for r in j["receives"]} | {r["user"] for r in j["retrieves"]}
    order: dict[str, int] = {}
    for e in sorted(events, key=lambda e: (0 if e["track"] in users else 2 if e["track"].startswith("fault ")
                                           else 1, e["track"])):
        order.setdefault(e["track"], len(order))
    xs, at = _axis(events)
    left, width, row = 150, 1000, 22
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{row * len(order) + 40}" '
           f'font-family="monospace" font-size="12">']
    for track, i in order.items():
        y = 20 + i * row
        out.append(f'<text x="4" y="{y + 15}">{html.escape(track)}</text>'
                   f'<line x1="{left}" x2="{left + width}" y1="{y + row - 1}" y2="{y + row - 1}" stroke="#eee"/>')
    last_tick = -1e9
    for e, x in zip(events, xs):
        if x * width - last_tick >= 80:
            last_tick = x * width
            out.append(f'<text x="{left + x * width:.1f}" y="12" fill="#888">{(e["t"] - t0) / 1000:+.3f}s</text>')
    for e, x in zip(events, xs):
        y = 20 + order[e["track"]] * row
        a, b = left + x * width, left + at(e.get("end_t", e["t"])) * width
        colour = KIND_COLOURS.get(e["kind"], "#333")
        tip = html.escape(f"{(e['t'] - t0) / 1000:+.3f}s {e['track']}: {e['text']}")
        if "end_t" in e and b > a:
            out.append(f'<rect x="{a:.1f}" y="{y + 4}" width="{b - a:.1f}" height="{row - 8}" fill="{colour}" '
                       f'opacity="0.7"><title>{tip}</title></rect>')
        else:
            out.append(f'<circle cx="{a:.1f}" cy="{y + row / 2}" r="5" fill="{colour}"><title>{tip}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def render_html_body(j: Mapping[str, Any]) -> str:
    """The journey as an HTML fragment (styled by ``JOURNEY_CSS``): the findings, the lanes, the text view.
    The body of :func:`render_html`'s page, and what the run report shows inline per flagged message."""
    found = "".join(f"<li><b>{html.escape(f['kind'])}</b> at {html.escape(str(f['node']))}: "
                    f"{html.escape(f['text'])}</li>" for f in j["findings"])
    return ((f'<div class="f">findings<ul>{found}</ul></div>' if found else "")
            + "<p>lanes: one slot per step in timeline order, gaps drawn by their logarithm; hover a step for "
              "its text</p>" + render_lanes(j) + "<pre>" + html.escape(render_text(j)) + "</pre>")


def render_html(j: Mapping[str, Any]) -> str:
    """The journey as one self-contained HTML page (no script, nothing fetched): a lane per user, node and
    fault on a step axis (each step's text in its tooltip), the findings, and the text view."""
    title = f"{j['msg_id'] or j['hash']}: {', '.join(j['outcomes'])}"
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;margin:1em}" + JOURNEY_CSS + "</style></head><body><h2>"
            + html.escape(title) + "</h2>" + render_html_body(j) + "</body></html>")


def render_line(j: Mapping[str, Any]) -> str:
    """One line per message for ``--all``."""
    a = len(j["attempts"])
    return (f"{j['msg_id'] or j['hash'][:12]:<12} {','.join(j['outcomes']):<18} {j['from'] or '?':>6} -> "
            f"{j['to'] or '?':<6} attempts {a}  copies {sum(1 for x in j['copies'] if x['arrived'])}  "
            f"ends at {j['trail']['ends_at'] or '?'}: {j['trail']['why']}")


def run_trace_events(run: Run, journeys: list[dict[str, Any]]) -> dict[str, Any]:
    """The Trace Event Format document for ``journeys`` of ``run``, node restarts included."""
    extra = []
    for node, events in run.logs.items():
        starts = [e for e in events if e.get("event") == "listening"]
        for e in starts[1:]:
            extra.append({"t": e["t"], "track": node, "kind": "restart", "text": f"{node} restarted"})
        for e in events:
            if e.get("event") == "rehomed":
                extra.append({"t": e["t"], "track": node, "kind": "rehomed",
                              "text": f"rehomed {e.get('messages')} message(s) to swarm {e.get('swarm_id')}"})
    started = run.run.get("started_ms") if isinstance(run.run.get("started_ms"), int) else None
    return trace_events(journeys, nodes=run.nodes, users=run.users, run_id=run.run.get("run_id"),
                        origin_ms=started, extra=extra)


@click.command("trace")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("message", required=False)
@click.option("--all", "every", is_flag=True, help="every message of the run (one line each, or all of them as JSON / trace events)")
@click.option("--json", "as_json", is_flag=True, help="print the journey (a list with --all) as JSON")
@click.option("--trace-events", "trace_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="also write the journey(s) in the Trace Event Format (open in ui.perfetto.dev, or in Chrome "
                   "DevTools' Performance panel: it draws the spans, not the instants)")
@click.option("--html", "html_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="also write the journey as one self-contained HTML page (one message only)")
def trace(run_dir: Path, message: str | None, every: bool, as_json: bool, trace_file: Path | None,
          html_file: Path | None) -> None:
    """A message's journey in RUN_DIR: attempts and hops (from each node's capture, opened with its own
    key), commit, copies, storage, retrieves, deletes, and the faults that touched it.

    MESSAGE is a msg_id from history.jsonl, a message hash, or a unique start of a hash.
    """
    if every == (message is not None):
        raise click.UsageError("give a MESSAGE (msg_id or hash) or --all, not both")
    if every and html_file is not None:
        raise click.UsageError("--html is for one message")
    started = time.monotonic()
    try:
        run = load_run(run_dir)
        journeys = all_journeys(run) if every else [journey(run, message)]
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None
    if trace_file is not None:
        size = write_trace_events(trace_file, run_trace_events(run, journeys))
        click.echo(f"trace events: {trace_file} ({size:,} bytes, {len(journeys)} message(s), "
                   f"{time.monotonic() - started:.1f} s); open in https://ui.perfetto.dev", err=True)
    if html_file is not None:
        html_file.write_text(render_html(journeys[0]), encoding="utf-8")
        click.echo(f"html: {html_file}", err=True)
    if as_json:
        click.echo(json.dumps(journeys if every else journeys[0], indent=1, default=str))
    elif every:
        for j in journeys:
            click.echo(render_line(j))
    else:
        click.echo(render_text(journeys[0]))
