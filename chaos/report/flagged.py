"""The run report's "Flagged messages" section: every message a checker
failed the run for, each with its journey inline.

Which messages: what the verdict's failure lists name (delivery's
``FAILURE_OUTCOMES``; replication's ``missing``, ``stray`` past its grace on
a live node, ``resurrected``; unlinkability's ``linked``; authority's
``planted``), grouped per message.  Past a verdict list's cap (100) the
counts say how many more; lost messages past it are known from the history.

The first ``MAX_JOURNEYS`` come with their journey: :func:`chaos.trace.journey.journey`
on one :func:`chaos.trace.journey.load_run` of the run directory, shown with the
views ``swarmnet trace`` uses (:func:`chaos.trace.view.render_html_body`):
findings, lanes, the text timeline; the rest are listed with their
``swarmnet trace`` command.  Replaying the captures is the cost (about as
long as the unlinkability checker's replay), so the tracing runs in a child
process stopped after ``TRACE_TIMEOUT_S``; what did not arrive by then is
listed by id.  The report is a view: a journey that cannot be built says
why, and the section never breaks the report.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from chaos.report.model import as_list

MAX_JOURNEYS = 50  # flagged messages shown with their journey; the rest by id
MAX_LISTED = 1000  # flagged messages listed by id past the journeys
TRACE_TIMEOUT_S = 5.0  # the tracer (one capture replay, the journeys) is stopped after this; the rest by id

CHECKER_ORDER = ("delivery", "replication", "unlinkability", "authority")

CSS = """.flagged details{border:1px solid #ddd;border-radius:4px;margin:.3em 0;padding:.2em .6em}
.flagged details[open]{background:#fcfcfc}.flagged summary{cursor:pointer;font-size:.92em}
.flagged .lanes{overflow-x:auto}.flagged .why{color:#b00}.flagged code{font-size:.9em}
.flagged summary code{font-size:1em;font-weight:bold}
.flagged td code{white-space:nowrap}.flagged pre{white-space:pre-wrap}"""


@dataclass(frozen=True)
class Flag:
    """One checker's judgement of one message: its outcome ("lost", "missing", ...) and what it names."""

    checker: str
    outcome: str
    detail: str = ""


@dataclass
class FlaggedMessage:
    """A message some checker flagged; ``key`` is what ``swarmnet trace`` takes (a msg_id, else its hash)."""

    key: str
    msg_id: str | None
    hash: str | None
    flags: list[Flag] = field(default_factory=list)


@dataclass
class Flagged:
    """The flagged messages of a verdict, in checker order, and what its capped lists left out."""

    messages: list[FlaggedMessage]
    unlisted: list[str]  # "replication missing: 266 more than verdict.json lists"
    unjudged: list[str]  # checkers that could not judge ("authority: KeyError: ...")


def _nodes(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, dict)) else str(value)


def _delivery_detail(outcome: str, entry: Any, lost: Mapping[str, Any]) -> str:
    if outcome == "misdelivered" and isinstance(entry, dict):
        return f"received by {entry.get('process')} ({entry.get('reason')}); meant for {entry.get('to') or '?'}"
    if outcome == "unexpected" and isinstance(entry, dict):
        return f"received by {entry.get('process')}: no send in the history has this id"
    if outcome == "lost":
        d = lost.get(str(entry))
        age = d.get("age_ms") if isinstance(d, dict) else None
        return "acknowledged, never received" + (f" (checked {age / 1000:.1f} s after its ack)" if isinstance(
            age, (int, float)) else "")
    return {"duplicated": "received more than once", "corrupted": "received with another digest, or unopenable",
            "wrong_sender": "opened with another sender's Session ID",
            "fail-but-delivered": "the client was told it failed, yet it was received"}.get(outcome, "")


def _entries(name: str, result: Mapping[str, Any], lost_ids: Sequence[str]) -> Iterable[tuple[Any, Flag]]:
    """(verdict entry, flag) for each failure a checker lists; entries are ids or objects with msg_id/hash."""
    if name == "delivery":
        from chaos.checkers.delivery import FAILURE_OUTCOMES

        lost = {str(d.get("msg_id")): d for d in as_list(result.get("lost_detail")) if isinstance(d, dict)}
        for outcome in FAILURE_OUTCOMES:
            for e in as_list(result.get(outcome)):
                yield e, Flag(name, outcome, _delivery_detail(outcome, e, lost))
        listed = {str(e) for e in as_list(result.get("lost"))}
        for mid in lost_ids:  # past the list's cap: acknowledged, never received (chaos.report.page.message_outcomes)
            if mid not in listed:
                yield mid, Flag(name, "lost", "acknowledged, never received")
    elif name == "replication":
        for e in as_list(result.get("missing")):
            if isinstance(e, dict):
                on, members = as_list(e.get("missing_on")), as_list(e.get("members"))
                yield e, Flag(name, "missing", f"not on {_nodes(on)} ({len(on)} of {len(members)} members of its swarm)"
                              + (f"; unreadable: {_nodes(e['unreadable'])}" if e.get("unreadable") else ""))
        for e in as_list(result.get("stray")):
            if isinstance(e, dict) and e.get("after_grace") and e.get("stray_on_live"):
                yield e, Flag(name, "stray", f"on {_nodes(e['stray_on_live'])}, outside its swarm, past the grace")
        for e in as_list(result.get("resurrected")):
            if isinstance(e, dict):
                yield e, Flag(name, "resurrected", f"still on {_nodes(e.get('held_by'))} after an ok delete")
    elif name == "unlinkability":
        for e in as_list(result.get("linked")):
            if isinstance(e, dict):
                yield e, Flag(name, "linked", f"linked by {_nodes(sorted(e.get('linked_by') or {}))} alone")
    elif name == "authority":
        for e in as_list(result.get("planted")):
            if isinstance(e, dict):
                yield e, Flag(name, "planted", f"planted by the adversary ({e.get('attack')} {e.get('op')}, "
                                               f"answered {e.get('status')}); held by {_nodes(e.get('held_by'))}")


# verdict count -> the list it caps, per checker (every stray is listed; only those past the grace fail)
_CAPPED = {"delivery": {k: k for k in ("duplicated", "corrupted", "wrong_sender", "misdelivered", "unexpected",
                                       "fail-but-delivered")},
           "replication": {"missing": "missing", "resurrected": "resurrected", "stray_after_grace": "stray"},
           "unlinkability": {"linked_by_single_node": "linked"}, "authority": {"planted": "planted"}}


def flagged_messages(verdict: Mapping[str, Any] | None, history: Iterable[Mapping[str, Any]],
                     lost_ids: Sequence[str] = ()) -> Flagged:
    """Every message a checker of ``verdict`` failed, once each with all its flags, in checker order.

    ``lost_ids``: every acknowledged, never-received message (the delivery list stops at its cap).
    """
    checkers = verdict.get("checkers") if isinstance(verdict, Mapping) else None
    checkers = checkers if isinstance(checkers, dict) else {}
    msg_of = {str(r["hash"]): str(r["msg_id"]) for r in history
              if r.get("op") == "send" and r.get("msg_id") is not None and isinstance(r.get("hash"), str)}
    sent = set(msg_of.values()) | {str(r["msg_id"]) for r in history if r.get("op") == "send"
                                   and r.get("msg_id") is not None}
    by_key: dict[str, FlaggedMessage] = {}
    unlisted: list[str] = []
    unjudged: list[str] = []
    names = [n for n in CHECKER_ORDER if n in checkers] + sorted(set(checkers) - set(CHECKER_ORDER))
    for name in names:
        result = checkers[name]
        if not isinstance(result, dict):
            continue
        if result.get("error"):
            unjudged.append(f"{name}: {result['error']}")
            continue
        for entry, flag in _entries(name, result, lost_ids if name == "delivery" else ()):
            mid = entry.get("msg_id") if isinstance(entry, dict) else entry
            h = entry.get("hash") if isinstance(entry, dict) else None
            mid = None if mid is None else str(mid)
            mid = mid if mid is not None else msg_of.get(str(h)) if h is not None else None
            # `swarmnet trace` finds a msg_id of a send, else a hash a node saw.
            key = mid if mid is not None and (mid in sent or h is None) else h
            if key is None:
                continue
            m = by_key.setdefault(str(key), FlaggedMessage(str(key), mid, None if h is None else str(h)))
            m.hash = m.hash or (None if h is None else str(h))
            if flag not in m.flags:
                m.flags.append(flag)
        counts = result.get("counts") if isinstance(result.get("counts"), dict) else {}
        for count, list_name in _CAPPED.get(name, {}).items():
            listed = [e for e in as_list(result.get(list_name)) if count != "stray_after_grace"
                      or isinstance(e, dict) and e.get("after_grace")]
            n = counts.get(count)
            if isinstance(n, int) and n > len(listed):
                unlisted.append(f"{name} {list_name}: {n - len(listed)} more than verdict.json lists")
    return Flagged(list(by_key.values()), unlisted, unjudged)


# ---------------------------------------------------------------- journeys


def trace_keys(run_dir: Path, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
    """One load of ``run_dir``, then each key's journey: ``{"key", "journey"}`` or ``{"key", "error"}``.
    If the run cannot be read, one ``{"error"}`` instead."""
    from chaos.trace import journey as jn

    try:
        run = jn.load_run(run_dir)
    except Exception as exc:  # whatever broke is the message: a report is a view
        yield {"error": f"the run directory could not be read for tracing: {type(exc).__name__}: {exc}"}
        return
    for key in keys:
        try:
            yield {"key": key, "journey": jn.journey(run, key)}
        except Exception as exc:
            yield {"key": key, "error": f"{type(exc).__name__}: {exc}"}


@dataclass
class Journeys:
    """Journeys built (key -> journey, or why not), and why the rest were not (None: all were tried)."""

    built: dict[str, dict[str, Any] | str]
    stopped: str | None
    seconds: float


def build_journeys(run_dir: Path, keys: Sequence[str], *, timeout_s: float = TRACE_TIMEOUT_S) -> Journeys:
    """The journeys of ``keys``, traced in a child process (:func:`trace_keys`, one JSON line each) that is
    killed after ``timeout_s``: a big run's replay, a crash or a hang in the tracer cost the report at most
    that, and whatever arrived in time is kept.  Never raises."""
    started = time.monotonic()
    if not keys:
        return Journeys({}, None, 0.0)
    job = json.dumps({"run_dir": str(run_dir), "keys": list(keys)})
    stopped = None
    try:
        done = subprocess.run([sys.executable, "-m", __name__], input=job.encode(), capture_output=True,
                              timeout=timeout_s, check=False)
        out = done.stdout
        if done.returncode:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            stopped = f"the tracer exited with status {done.returncode}" + (f": {tail[0][:300]}" if tail else "")
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed the child (by its pid) and reaped it
        out = exc.stdout or b""
        stopped = f"tracing took over {timeout_s:g} s"
    except OSError as exc:
        out, stopped = b"", f"the tracer could not be started: {exc}"
    built: dict[str, dict[str, Any] | str] = {}
    for line in (out.decode(errors="replace") if isinstance(out, bytes) else out).splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if "key" in r:
            built[str(r["key"])] = r["journey"] if isinstance(r.get("journey"), dict) else str(r.get("error"))
        elif "error" in r:
            stopped = str(r["error"])
    return Journeys(built, stopped, time.monotonic() - started)


def _main() -> int:
    """The child of :func:`build_journeys`: a job {"run_dir", "keys"} on stdin, JSON lines on stdout."""
    job = json.loads(sys.stdin.read())
    for r in trace_keys(Path(job["run_dir"]), [str(k) for k in job["keys"]]):
        sys.stdout.write(json.dumps(r, default=str) + "\n")
        sys.stdout.flush()  # what is written before a kill is kept
    return 0


# ---------------------------------------------------------------- html


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _command(run_dir: Path, key: str) -> str:
    import shlex

    return f"swarmnet trace {shlex.quote(str(run_dir))} {shlex.quote(key)}"


def _flags_text(m: FlaggedMessage) -> str:
    return "; ".join(f"{f.checker}: {f.outcome}" for f in m.flags)


def _summary(m: FlaggedMessage, j: dict[str, Any] | str | None) -> str:
    head = f"<code>{_e(m.key)}</code>"
    if isinstance(j, dict):
        head += f" {_e(j['from'] or '?')} → {_e(j['to'] or '?')}"
    parts = [head, f"<b>{_e(_flags_text(m))}</b>"]
    if isinstance(j, dict):
        kinds = list(dict.fromkeys(f["kind"] for f in j["findings"]))
        if kinds:
            parts.append("findings: " + _e(", ".join(kinds)))
        touched = [f"{f['fault']} {f['kind']}" for f in j["faults"] if f["touches"]]
        if touched:
            parts.append("faults: " + _e(", ".join(touched)))
        parts.append(f"trail ends at {_e(j['trail']['ends_at'] or '?')}")
    elif isinstance(j, str):
        parts.append('<span class="why">no journey</span>')
    return " — ".join(parts)


def _entry(m: FlaggedMessage, j: dict[str, Any] | str, run_dir: Path, render: Callable[[Any], str]) -> str:
    rows = "".join(f"<tr><td>{_e(f.checker)}</td><td>{_e(f.outcome)}</td><td>{_e(f.detail)}</td></tr>"
                   for f in m.flags)
    out = [f"<details><summary>{_summary(m, j)}</summary>\n",
           f"<table><tr><th>checker</th><th>outcome</th><th>what it found</th></tr>{rows}</table>\n"]
    if isinstance(j, dict):
        try:
            out.append(f'<div class="lanes">{render(j)}</div>\n')
        except Exception as exc:  # a renderer's bug must not cost the report
            out.append(f'<p class="why">the journey could not be shown: {_e(type(exc).__name__)}: {_e(exc)}</p>\n')
    else:
        out.append(f'<p class="why">the journey could not be built: {_e(j)}</p>\n')
    out.append(f'<p class="note">the same from a shell: <code>{_e(_command(run_dir, m.key))}</code> '
               f"(add <code>--html FILE</code> for a page of its own)</p></details>\n")
    return "".join(out)


def flagged_section(run_dir: Path, verdict: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]],
                    lost_ids: Sequence[str] = (), *, max_journeys: int = MAX_JOURNEYS,
                    timeout_s: float = TRACE_TIMEOUT_S) -> str:
    """The "Flagged messages" section as HTML (styled by ``CSS``); never raises."""
    head = '<h2 id="flagged">Flagged messages'
    try:
        flagged = flagged_messages(verdict, history, lost_ids)
    except Exception as exc:
        return f'{head}</h2>\n<p class="why">could not be listed: {_e(type(exc).__name__)}: {_e(exc)}</p>\n'
    msgs = flagged.messages
    parts = [f'<div class="flagged">{head} ({len(msgs)}{"+" if flagged.unlisted else ""})</h2>\n']
    if not msgs and not flagged.unlisted:
        parts.append("<p>No message was flagged by any checker.</p>\n")
    else:
        parts.append("<p>Each message a checker failed the run for, with its journey rebuilt from this run "
                     "directory (every node's capture opened with its own key, the databases, the history and the "
                     "faults), as <code>swarmnet trace</code> shows it: what failed, where, and under which fault. "
                     "Click a message to open it; hover a step in its lanes for its text.</p>\n")
    parts += [f'<p class="note">not judged by {_e(u)}</p>\n' for u in flagged.unjudged]
    shown = msgs[:max_journeys]
    try:
        from chaos.trace.view import JOURNEY_CSS, render_html_body
    except Exception as exc:  # a broken tracer must not cost the report
        journeys = Journeys({}, f"the tracer could not be imported: {type(exc).__name__}: {exc}", 0.0)
    else:
        parts.append(f"<style>{JOURNEY_CSS}</style>\n")
        journeys = build_journeys(run_dir, [m.key for m in shown], timeout_s=timeout_s)
    with_journey = [m for m in shown if m.key in journeys.built]
    for m in with_journey:
        parts.append(_entry(m, journeys.built[m.key], run_dir, render_html_body))
    rest = [m for m in msgs if m.key not in journeys.built]
    if rest:
        why = journeys.stopped or f"journeys are shown for the first {max_journeys}"
        parts.append(f"<p>{len(rest)} more flagged message(s) listed by id ({_e(why)}); see each with "
                     f"<code>{_e(_command(run_dir, 'ID'))}</code>:</p>\n<table><tr><th>message</th><th>flagged</th>"
                     f"<th>command</th></tr>\n")
        parts += [f"<tr><td>{_e(m.key)}</td><td>{_e(_flags_text(m))}</td><td><code>{_e(_command(run_dir, m.key))}"
                  f"</code></td></tr>\n" for m in rest[:MAX_LISTED]]
        parts.append("</table>\n")
        if len(rest) > MAX_LISTED:
            parts.append(f'<p class="note">first {MAX_LISTED} listed.</p>\n')
    parts += [f'<p class="note">{_e(u)} (its lists stop at 100; the counts are complete): every message\'s '
              f'outcome and where its trail ends with <code>{_e(_command(run_dir, "--all"))}</code></p>\n'
              for u in flagged.unlisted]
    if shown:
        parts.append(f'<p class="note">journeys traced in {journeys.seconds:.1f} s.</p>\n')
    parts.append("</div>\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.exit(_main())
