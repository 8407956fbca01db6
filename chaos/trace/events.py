"""Journeys in the Trace Event Format: the JSON that Perfetto (ui.perfetto.dev)
and chrome://tracing open.  Checked in Chromium 156 (Debian) offline: its
DevTools trace engine imports a whole run's file (2,498 complete events, each
an entry, no warning) and the Performance panel draws a lane per node, user
and fault under their names; it does not draw instant events.  That build
has no chrome://tracing page (listed, but it does not load), and Perfetto's
UI needs the network: neither was looked at.

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {"run_id", "origin_ms", "messages"}}

Tracks: process 1 "nodes" has a thread per node, process 2 "users" a thread
per user, process 3 "faults" a thread per fault (its band).  A journey event
with an end is a complete event (``ph: "X"``, ``ts`` and ``dur`` in µs since
``origin_ms``), one without is a thread-scoped instant (``ph: "i"``).
Concurrent spans on one track (many messages through one node) never
partly overlap on a thread: they go to extra lanes, threads named
``n05 #2`` sorted under ``n05``.  Metadata events (``ph: "M"``) name every
process and thread used.  Each event's ``args`` carry the message id, hash
and the journey's text for that step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["NODES_PID", "USERS_PID", "FAULTS_PID", "trace_events", "write_trace_events", "problems"]

NODES_PID, USERS_PID, FAULTS_PID = 1, 2, 3
LANE_STRIDE = 1000  # tid = track index * LANE_STRIDE + lane
SHARED_KINDS = {"retrieve", "delete", "removed", "copy", "fault"}


def _track_kind(track: str, users: set[str]) -> int:
    """Faults are named "fault <id>"; users are named by the caller; every other track is a node."""
    if track.startswith("fault "):
        return FAULTS_PID
    return USERS_PID if track in users else NODES_PID


def trace_events(journeys: Sequence[Mapping[str, Any]], *, nodes: Iterable[str] = (), users: Iterable[str] = (),
                 origin_ms: int | None = None, run_id: str | None = None,
                 extra: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One Trace Event Format document for ``journeys`` (their ``events``).

    ``nodes`` and ``users`` name the tracks to show even when empty (and tell
    users from nodes); ``extra`` adds events of the same shape as a journey's
    (``t``, ``end_t``?, ``track``, ``kind``, ``text``) that belong to no
    message, e.g. node restarts.  A fault shared by many journeys is drawn once.
    """
    nodes, users = set(nodes), set(users)
    flat: list[tuple[dict[str, Any], list[Mapping[str, Any]]]] = []
    shared: dict[tuple, list[Mapping[str, Any]]] = {}
    for j in journeys:
        for e in j.get("events") or ():
            if e["kind"] in SHARED_KINDS:
                # One step of many messages (a retrieve that returned 50, a batch of copies, a fault): drawn once.
                key = (e["track"], e["kind"], e["t"], e.get("end_t"), e["text"])
                if key not in shared:
                    shared[key] = []
                    flat.append((dict(e), shared[key]))
                if e["kind"] != "fault":
                    shared[key].append(j)
            else:
                flat.append((dict(e), [j]))
    flat += [(dict(e), []) for e in extra]
    if origin_ms is None:
        origin_ms = min((e["t"] for e, _ in flat), default=0)

    for e, _ in flat:
        if _track_kind(e["track"], users) == NODES_PID:
            nodes.add(e["track"])
    order = {NODES_PID: sorted(nodes), USERS_PID: sorted(users),
             FAULTS_PID: sorted({e["track"] for e, _ in flat if e["track"].startswith("fault ")},
                                key=lambda s: int(s.split()[1]) if s.split()[1].isdigit() else 0)}
    index = {(pid, name): i + 1 for pid, names in order.items() for i, name in enumerate(names)}

    out: list[dict[str, Any]] = []
    lanes: dict[tuple[int, str], list[int]] = {}  # (pid, track) -> end (µs) of each lane's last span
    used: dict[tuple[int, int], str] = {}
    fault_names: dict[str, str] = {}
    for e, js in sorted(flat, key=lambda x: (x[0]["t"], -(x[0].get("end_t") or x[0]["t"]))):
        pid = _track_kind(e["track"], users)
        base = index[(pid, e["track"])] * LANE_STRIDE
        ts = (e["t"] - origin_ms) * 1000
        args: dict[str, Any] = {"text": e["text"]}
        if len(js) == 1:
            j = js[0]
            args.update(msg_id=j.get("msg_id"), hash=j.get("hash"))
            name = f"{j.get('msg_id') or (j.get('hash') or '')[:8]} {e['kind']}"
        elif js:
            args.update(msg_ids=[j.get("msg_id") for j in js], hashes=[j.get("hash") for j in js])
            name = f"{e['kind']} ({len(js)} messages)"
        else:
            name = e["text"]
        if pid == FAULTS_PID:
            fault_names[e["track"]] = f"{e['track']}: {e['text']}"
        if "end_t" in e:
            dur = max(1, (e["end_t"] - e["t"]) * 1000)  # a same-millisecond step still shows
            track_lanes = lanes.setdefault((pid, e["track"]), [])
            lane = next((k for k, end in enumerate(track_lanes) if end <= ts), None)
            if lane is None:
                lane = len(track_lanes)
                track_lanes.append(0)
            track_lanes[lane] = ts + dur
            tid = base + lane
            out.append({"name": name, "cat": e["kind"], "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid,
                        "args": args})
        else:
            tid = base
            out.append({"name": name, "cat": e["kind"], "ph": "i", "s": "t", "ts": ts, "pid": pid, "tid": tid,
                        "args": args})
        label = fault_names.get(e["track"], e["track"]) if pid == FAULTS_PID else e["track"]
        lane_no = tid - base
        used[(pid, tid)] = label if lane_no == 0 else f"{label} #{lane_no + 1}"

    meta: list[dict[str, Any]] = []
    for pid, pname in ((NODES_PID, "nodes"), (USERS_PID, "users"), (FAULTS_PID, "faults")):
        if not any(p == pid for p, _ in used):
            continue
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": pname}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
    for (pid, tid), tname in sorted(used.items()):
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": tname}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return {"traceEvents": meta + out, "displayTimeUnit": "ms",
            "otherData": {"run_id": run_id, "origin_ms": origin_ms, "messages": len(journeys),
                          "generator": "swarmnet trace"}}


def write_trace_events(path: str | Path, doc: Mapping[str, Any]) -> int:
    """Write ``doc`` as compact JSON; returns its size in bytes."""
    text = json.dumps(doc, separators=(",", ":"))
    Path(path).write_text(text, encoding="utf-8")
    return len(text.encode())


REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "i": {"name", "ph", "ts", "pid", "tid", "s"},
            "M": {"name", "ph", "pid", "tid", "args"}}


def problems(doc: Any) -> list[str]:
    """What is wrong with ``doc`` as a Trace Event Format JSON object, as far as the events this module writes
    go (empty when it is fine): required fields per phase, int pids and tids, µs that are numbers, a name for
    every process and thread used, and spans on one thread that nest or follow each other (the legacy
    importer draws partly overlapping complete events on one row wrongly)."""
    out: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not an object with a traceEvents list"]
    if doc.get("displayTimeUnit") not in ("ms", "ns"):
        out.append("displayTimeUnit must be ms or ns")
    named_pids, named_tids, used = set(), set(), set()
    spans: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for i, e in enumerate(doc["traceEvents"]):
        ph = e.get("ph") if isinstance(e, dict) else None
        if ph not in REQUIRED:
            out.append(f"event {i}: ph {ph!r} not one of X, i, M")
            continue
        missing = REQUIRED[ph] - set(e)
        if missing:
            out.append(f"event {i} ({ph}): missing {sorted(missing)}")
            continue
        if not all(isinstance(e[k], int) and not isinstance(e[k], bool) for k in ("pid", "tid")):
            out.append(f"event {i}: pid/tid must be ints")
        if ph == "M":
            if e["name"] == "process_name":
                named_pids.add(e["pid"])
            elif e["name"] == "thread_name":
                named_tids.add((e["pid"], e["tid"]))
            if e["name"] in ("process_name", "thread_name") and not isinstance(e["args"].get("name"), str):
                out.append(f"event {i}: {e['name']} without args.name")
            continue
        if not isinstance(e["ts"], (int, float)) or e["ts"] < 0:
            out.append(f"event {i}: ts must be a non-negative number of µs")
        if ph == "X":
            if not isinstance(e["dur"], (int, float)) or e["dur"] < 0:
                out.append(f"event {i}: dur must be a non-negative number of µs")
            else:
                spans.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
        if ph == "i" and e["s"] not in ("g", "p", "t"):
            out.append(f"event {i}: instant scope {e['s']!r}")
        used.add((e["pid"], e["tid"]))
    for pid, tid in sorted(used, key=str):
        if pid not in named_pids:
            out.append(f"pid {pid} has no process_name")
        if (pid, tid) not in named_tids:
            out.append(f"pid {pid} tid {tid} has no thread_name")
    for key, ss in spans.items():
        ss.sort()
        for (a0, a1), (b0, b1) in zip(ss, ss[1:]):
            if b0 < a1 and b1 > a1:
                out.append(f"{key}: spans {a0}-{a1} and {b0}-{b1} overlap without nesting")
                break
    return out
