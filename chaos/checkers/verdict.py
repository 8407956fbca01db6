"""Run the checkers over a run directory and combine their verdicts.

``run_checks`` writes ``verdict.json`` (shape in CHECKERS.md) into the run
directory; ``summary`` is its one-screen text view; ``exit_code`` is Jepsen's
convention: 0 valid, 1 invalid, 2 unknown.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from testnet.base.jsonl import read_jsonl

from .authority import check_authority
from .delivery import HostilePeriod, check_delivery
from .replication import (ReplicationError, check_replication, current_swarms_from_registry, live_nodes,
                          load_ground_truth)
from .unlinkability import check_unlinkability

__all__ = ["CheckError", "CHECKERS", "HISTORY_FILE", "LATE_TOLERANCE_MS", "VERDICT_FILE", "read_history", "combine",
           "fault_record", "harness_errors", "run_checks", "summary", "exit_code"]

CHECKERS = ("delivery", "replication", "unlinkability", "authority")
HISTORY_FILE = "history.jsonl"
VERDICT_FILE = "verdict.json"
FAULTS_FILE = "faults.jsonl"


class CheckError(Exception):
    """The checks cannot run: unknown checker name, or no run in the directory."""


read_history = read_jsonl  # history records, as every tool reads them
def combine(verdicts: Mapping[str, Mapping[str, Any]]) -> bool | str:
    """False if any checker is invalid, else "unknown" if any is unknown (or none ran), else True."""
    values = [v.get("valid") for v in verdicts.values()]
    if any(v is False for v in values):
        return False
    if not values or any(v is not True for v in values):
        return "unknown"
    return True


def _swarms_from_run(truth: Any) -> dict[str, int | None]:
    return {name: n.get("swarm_id") for name, n in truth.nodes.items()}


LATE_TOLERANCE_MS = 1000  # a fault started or healed later than this did not happen when the schedule said


def _planned_faults(run_dir: Path) -> dict[str, str] | None:
    """Fault id -> kind, from schedule.json (None when the run has none)."""
    try:
        schedule = json.loads((run_dir / "schedule.json").read_text(encoding="utf-8"))
        return {str(f["id"]): str(f.get("kind")) for f in schedule["faults"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _secs(ms: Any) -> str:
    return f"{ms / 1000:.2f} s"


def hostile_periods(run_dir: Path, truth: Any) -> list[HostilePeriod]:
    """The byzantine faults' hostile members and when, from faults.jsonl (start to end; a
    fault with no end recorded lasts to the end of the run)."""
    path = run_dir / FAULTS_FILE
    if not path.is_file():
        return []
    keys = {name: str(n.get("ed25519_public", ""))[:16] for name, n in truth.nodes.items()}
    periods: dict[str, HostilePeriod] = {}
    for r in read_jsonl(path):
        if r.get("kind") != "byzantine" or not isinstance(r.get("t"), int):
            continue
        fid, nodes = str(r.get("fault")), (r.get("targets") or {}).get("nodes") or []
        if r.get("phase") == "start":
            # Armed before the start is recorded (``took_ms`` earlier), a second of slack.
            took = r.get("took_ms") if isinstance(r.get("took_ms"), int) else 0
            periods[fid] = HostilePeriod(frozenset(keys[n] for n in nodes if n in keys), r["t"] - took - 1000)
        elif r.get("phase") in ("end", "error") and fid in periods:
            periods[fid] = HostilePeriod(periods[fid].keys, periods[fid].start_ms, r["t"])
    return list(periods.values())


def fault_record(run_dir: Path, tolerance_ms: int = LATE_TOLERANCE_MS) -> dict[str, Any] | None:
    """How the schedule played, from faults.jsonl and schedule.json (None for runs without
    faults.jsonl): counts, every skipped or failed fault with what failed, each phase's
    lateness and the worst, and whether the run did what it planned (``valid``: true, or
    "unknown" with the reasons in ``why``).  A phase recorded without lateness (runs from
    before it was recorded) is not judged late."""
    path = run_dir / FAULTS_FILE
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    planned = _planned_faults(run_dir)
    out: dict[str, Any] = {"planned": None if planned is None else len(planned), "started": 0, "healed": 0,
                           "skipped": [], "errors": [], "late": [], "unplayed": [], "worst": None,
                           "tolerance_ms": tolerance_ms}
    seen: dict[str, set[str]] = {}  # fault id -> phases recorded
    for r in rows:
        phase, fid, kind = r.get("phase"), str(r.get("fault")), r.get("kind")
        seen.setdefault(fid, set()).add(str(phase))
        late = r.get("late_ms")
        early = r.get("early_ms") if isinstance(r.get("early_ms"), (int, float)) else 0
        during = {"start": "start", "end": "heal"}.get(str(phase), r.get("during"))
        if isinstance(late, (int, float)) and phase in ("start", "end", "error"):
            # Off time either way: the work finished late, or (centred on its planned time) began early.
            off = max(late, early)
            if out["worst"] is None or off > max(out["worst"]["late_ms"], out["worst"].get("early_ms", 0)):
                out["worst"] = {"fault": r.get("fault"), "kind": kind, "phase": during, "late_ms": late,
                                **({"early_ms": early} if early else {})}
            if phase != "error" and off > tolerance_ms:
                out["late"].append({"fault": r.get("fault"), "kind": kind, "phase": during, "late_ms": late,
                                    **({"early_ms": early} if early > tolerance_ms else {})})
        if phase == "start":
            out["started"] += 1
        elif phase == "end":
            out["healed"] += 1
        elif phase == "skipped":
            out["skipped"].append({"fault": r.get("fault"), "kind": kind, "error": str(r.get("error", ""))[:300]})
        elif phase == "error":
            out["errors"].append({"fault": r.get("fault"), "kind": kind, "during": r.get("during", "start"),
                                  "error": str(r.get("error", ""))[:600],
                                  "failures": list(r.get("failures") or [])[:20]})
    for fid, kind in (planned or {}).items():
        phases = seen.get(fid, set())
        if not phases:
            out["unplayed"].append({"fault": int(fid) if fid.isdigit() else fid, "kind": kind, "why": "never started"})
        elif "start" in phases and not phases & {"end", "error"}:
            out["unplayed"].append({"fault": int(fid) if fid.isdigit() else fid, "kind": kind, "why": "never healed"})
    why = [f"fault {e['fault']} {e['kind']}: failed to {e['during']}: {e['error'][:300]}" for e in out["errors"]]
    why += [f"fault {e['fault']} {e['kind']}: skipped: {e['error'][:200]}" for e in out["skipped"]]
    why += [f"fault {e['fault']} {e['kind']}: {'started' if e['phase'] == 'start' else 'healed'} "
            + (f"{_secs(e['late_ms'])} late" if e["late_ms"] > tolerance_ms else "")
            + (" and " if e["late_ms"] > tolerance_ms and "early_ms" in e else "")
            + (f"beginning {_secs(e['early_ms'])} early" if "early_ms" in e else "")
            + f" (tolerance {_secs(tolerance_ms)})" for e in out["late"]]
    why += [f"fault {e['fault']} {e['kind']}: {e['why']}" for e in out["unplayed"]]
    out["valid"] = True if not why else "unknown"
    out["why"] = why
    return out


def run_checks(run_dir: str | Path, *, checkers: Iterable[str] = CHECKERS, swarms: Mapping[str, int | None] | None = None,
               live: Iterable[str] | None = None, now_ms: int | None = None,
               history: Sequence[Mapping[str, Any]] | None = None, write: bool = True,
               swarms_source: str = "caller") -> dict[str, Any]:
    """Run ``checkers`` on ``run_dir`` and write ``verdict.json`` there (unless ``write`` is False).

    ``swarms`` (node name -> swarm id) and ``live`` (node names) describe the
    network now; without them the registry is asked, and if it cannot be,
    run.json's last recorded swarm ids and node states are used (the verdict
    says which in ``replication.swarms_source``).  ``now_ms`` defaults to the
    wall clock.  A checker that raises is recorded as unknown with its error.
    ``swarms_source`` names where given ``swarms`` came from, for the verdict.
    """
    run_dir = Path(run_dir)
    names = list(dict.fromkeys(checkers))
    unknown = [c for c in names if c not in CHECKERS]
    if unknown:
        raise CheckError(f"unknown checkers {unknown}; known: {list(CHECKERS)}")
    if not (run_dir / "run.json").is_file():
        raise CheckError(f"{run_dir} is not a run directory (no run.json)")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if history is None:
        history = read_history(run_dir / HISTORY_FILE)
    truth = load_ground_truth(run_dir)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            if name == "delivery":
                results[name] = check_delivery(history, truth.users, hostile=hostile_periods(run_dir, truth))
            elif name == "replication":
                source = swarms_source
                if swarms is None:
                    try:
                        swarms, source = current_swarms_from_registry(run_dir), "registry"
                    except ReplicationError:
                        swarms, source = _swarms_from_run(truth), "run.json"
                live_set = set(live) if live is not None else live_nodes(truth, swarms.keys())
                results[name] = check_replication(run_dir, history, now_ms=now_ms, swarms=swarms, live=live_set,
                                                  hostile=hostile_periods(run_dir, truth))
                results[name]["swarms_source"] = source
            elif name == "authority":
                results[name] = check_authority(run_dir)
            else:
                results[name] = check_unlinkability(run_dir, history)
        except Exception as exc:  # a checker that cannot judge says so rather than sinking the others
            results[name] = {"checker": name, "valid": "unknown", "error": f"{type(exc).__name__}: {exc}"[:500]}
    valid = combine(results)
    faults = fault_record(run_dir)
    if faults is not None and faults["valid"] is not True:
        # The schedule did not play as planned: a checker that held did not hold under the faults
        # planned, and one that failed may have failed by the harness's own doing (a heal that
        # never happened leaves a partition in place).  The checkers' own verdicts stay below.
        valid = "unknown"
    verdict = {"valid": valid, "run_id": truth.run.get("run_id"), "checked_ms": now_ms,
               "history_records": len(history), "checkers": results}
    lost = (truth.run.get("cluster") or {}).get("lost_hosts")
    if lost:
        # A cluster host lost mid-run took its nodes' ground truth with it: what came home can
        # still show a violation, never that the run was valid.
        verdict["lost_hosts"] = lost
        if verdict["valid"] is True:
            verdict["valid"] = "unknown"
    if faults is not None:
        verdict["faults"] = faults
    if write:
        tmp = run_dir / f".{VERDICT_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(verdict, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / VERDICT_FILE)
    return verdict


def exit_code(verdict: Mapping[str, Any]) -> int:
    """Jepsen's exit code: 0 valid, 1 invalid, 2 unknown."""
    valid = verdict.get("valid")
    return 0 if valid is True else 1 if valid is False else 2


def _word(valid: Any) -> str:
    return "valid" if valid is True else "INVALID" if valid is False else "unknown"


def _ids(items: Any, n: int = 5) -> str:
    ids = [str(i.get("msg_id") or i.get("hash")) if isinstance(i, dict) else str(i) for i in items or ()]
    return ", ".join(ids[:n]) + (" …" if len(ids) > n else "")


def summary(verdict: Mapping[str, Any]) -> str:
    """A readable one-screen view of a verdict (no message contents)."""
    lines = [f"verdict: {_word(verdict.get('valid'))}" + (f"  (run {verdict['run_id']})" if verdict.get("run_id") else "")]
    for host, info in (verdict.get("lost_hosts") or {}).items():
        lines.append(f"host {host} lost mid-run ({info.get('reason')}): {', '.join(info.get('nodes') or [])} went "
                     "with it; their data could not be checked")
    f = verdict.get("faults")
    if f:
        lines += faults_summary(f)
    checkers = verdict.get("checkers") or {}
    d = checkers.get("delivery")
    if d:
        c = d.get("counts", {})
        lines.append(f"\ndelivery: {_word(d.get('valid'))}" + (f"  error: {d['error']}" if d.get("error") else ""))
        if c:
            lines.append(f"  sent {c.get('sent', 0)}, acknowledged {c.get('acknowledged', 0)}, "
                         f"delivered {c.get('delivered', 0)}, recovered {c.get('recovered', 0)}, "
                         f"unknown {c.get('unknown', 0)}, failed {c.get('failed', 0)}")
            if c.get("honestly_vouched", c.get("acknowledged")) != c.get("acknowledged"):
                lines.append(f"  vouched for by an honest member {c.get('honestly_vouched', 0)}; only by hostile "
                             f"ones and never delivered (not owed) {c.get('unvouched', 0)}")
            for k in ("lost", "duplicated", "corrupted", "wrong_sender", "misdelivered", "unexpected",
                      "fail-but-delivered"):
                if c.get(k):
                    lines.append(f"  {k}: {c[k]}  [{_ids(d.get(k))}]")
            lat = d.get("latency_ms") or {}
            if lat.get("count"):
                lines.append(f"  latency ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}")
    r = checkers.get("replication")
    if r:
        c = r.get("counts", {})
        lines.append(f"\nreplication: {_word(r.get('valid'))}" + (f"  error: {r['error']}" if r.get("error") else ""))
        if c:
            lines.append(f"  checked {c.get('checked', 0)} of {c.get('acknowledged', 0)} acknowledged "
                         f"(expired {c.get('expired', 0)}, deleted {c.get('deleted', 0)}); swarms from "
                         f"{r.get('swarms_source', 'caller')}")
            lines.append(f"  missing on a live swarm member: {c.get('missing', 0)}"
                         + (f"  [{_ids(r.get('missing'))}]" if c.get("missing") else ""))
            lines.append(f"  stray outside the swarm: {c.get('stray', 0)} ({c.get('stray_after_grace', 0)} after grace)")
            if c.get("resurrected"):
                lines.append(f"  deleted but still held: {c['resurrected']}  [{_ids(r.get('resurrected'))}]")
            bad = {n: v for n, v in (r.get("per_node") or {}).items() if v.get("missing") or v.get("stray")}
            if bad:
                lines.append("  by node: " + ", ".join(f"{n} -{v['missing']}/+{v['stray']}" for n, v in sorted(bad.items())))
            if r.get("unreadable_nodes"):
                lines.append(f"  unreadable databases: {', '.join(sorted(r['unreadable_nodes']))}")
    u = checkers.get("unlinkability")
    if u:
        c = u.get("counts", {})
        lines.append(f"\nunlinkability: {_word(u.get('valid'))}" + (f"  error: {u['error']}" if u.get("error") else ""))
        if c:
            lines.append(f"  messages {c.get('messages', 0)}, traced to their target {c.get('traced', 0)}, "
                         f"linked by one node {c.get('linked_by_single_node', 0)}")
            for j in (u.get("linked") or [])[:5]:
                lines.append(f"  {j['msg_id']}: linked by {', '.join(sorted(j['linked_by']))}")
            hist = (u.get("collusion") or {}).get("min_size_histogram") or {}
            if hist:
                lines.append("  smallest colluding set (size: messages): "
                             + ", ".join(f"{k}: {v}" for k, v in hist.items()))
            seen = u.get("sender_id_seen_by") or []
            if seen:
                lines.append("  sender ids seen by: " + ", ".join(
                    sorted({f"{s['node']}({s['user']}, {s['where']})" for s in seen})[:8]))
            for f in u.get("findings") or []:
                lines.append(f"  finding: {f}")
            if u.get("nodes_missing_capture"):
                names = sorted(u["nodes_missing_capture"])
                lines.append(f"  nodes without a capture ({len(names)}): {', '.join(names[:10])}"
                             + (" …" if len(names) > 10 else ""))
    a = checkers.get("authority")
    if a:
        lines += authority_summary(a)
    return "\n".join(lines)


def harness_errors(verdict: Mapping[str, Any]) -> list[str]:
    """Why the run did not do what it planned (empty: it did, or it had no schedule)."""
    f = verdict.get("faults") or {}
    return list(f.get("why") or ()) if f.get("valid", True) is not True else []


def faults_summary(f: Mapping[str, Any]) -> list[str]:
    """The faults' lines of :func:`summary`: counts, worst lateness, and why the schedule did
    not play as planned, if it did not."""
    planned = f.get("planned")
    line = (f"faults: {f['started']}" + (f" of {planned}" if planned is not None else "") + " started, "
            f"{f['healed']} healed")
    if f.get("skipped"):
        line += f", {len(f['skipped'])} skipped"
    if f.get("errors"):
        line += f", {len(f['errors'])} failed"
    worst = f.get("worst")
    if worst is not None:
        tolerance = f"tolerance {f.get('tolerance_ms', LATE_TOLERANCE_MS) / 1000:g} s"
        if worst.get("early_ms", 0) > worst["late_ms"]:  # a change centred on its planned time
            line += (f"; worst timing: fault {worst['fault']} {worst['kind']}, {worst['phase']}, its work begun "
                     f"{worst['early_ms'] / 1000:.2f} s early and done {worst['late_ms'] / 1000:.2f} s late "
                     f"({tolerance} either way)")
        else:
            line += (f"; worst lateness {worst['late_ms'] / 1000:.2f} s (fault {worst['fault']} {worst['kind']}, "
                     f"{worst['phase']}; {tolerance})")
    lines = [line]
    if f.get("valid", True) is not True:
        lines.append("harness error: the schedule did not play as planned, so the run is neither a pass nor a "
                     "failure (the checkers' own verdicts follow):")
        lines += [f"  {why}" for why in (f.get("why") or ())[:10]]
    return lines


def authority_summary(a: Mapping[str, Any]) -> list[str]:
    """The authority checker's lines of :func:`summary`."""
    lines = [f"\nauthority: {_word(a.get('valid'))}" + (f"  error: {a['error']}" if a.get("error") else "")]
    if a.get("note"):
        lines.append(f"  {a['note']}")
    c = a.get("counts") or {}
    if not c.get("attempts") and not (a.get("floods") or {}).get("waves"):
        return lines
    per_attack = ", ".join(f"{name} {sum(o['attempts'] for o in ops.values())}"
                           for name, ops in (a.get("attacks") or {}).items())
    lines.append(f"  adversary attempts {c.get('attempts', 0)} ({per_attack}): refused {c.get('refused', 0)}, "
                 f"accepted {c.get('accepted', 0)}, unanswered {c.get('unanswered', 0)}; "
                 f"status as the rule says {c.get('as_wanted', 0)} of {c.get('wanted', 0)}")
    for key, what in (("accepted", "accepted though it must be refused"), ("leaked", "returned what it must withhold")):
        for r in (a.get(key) or [])[:5]:
            lines.append(f"  {what}: {r.get('attack')} {r.get('op')} ({r.get('variant') or r.get('as')}) "
                         f"at {r.get('node')} for {r.get('victim')}: status {r.get('status')}"
                         + (f", exposed {r['exposed']}" if r.get("exposed") else "")
                         + (f", effect {r['effect']}" if r.get("effect") else ""))
    if c.get("planted_tried"):
        lines.append(f"  planted messages held by a node: {c.get('planted', 0)} of {c['planted_tried']} tried"
                     + ("  [" + ", ".join(f"{p['hash'][:12]} on {','.join(p['held_by'][:3])}"
                                          for p in (a.get("planted") or [])[:3]) + "]" if c.get("planted") else ""))
    if c.get("rehomed"):
        lines.append(f"  let through by the rehoming rule (not a violation): {c['rehomed']}")
    f = a.get("floods") or {}
    if f.get("waves"):
        lines.append(f"  floods: {f['waves']} waves, {f.get('opened', 0)} of {f.get('connections', 0)} connections "
                     f"opened, {f.get('closed_by_node', 0)} closed by the node"
                     + (" (answers " + ", ".join(f"{k}: {v}" for k, v in sorted(f["statuses"].items())) + ")"
                        if f.get("statuses") else "")
                     + f"; probes failed {f.get('probes_failed', 0)} of {f.get('probes', 0)}")
    if a.get("errors"):
        lines.append(f"  adversary errors: {len(a['errors'])} ({a['errors'][0][:80]})")
    return lines
