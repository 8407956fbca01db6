"""One stored run as its page shows it: verdict per checker, faults as they
played, flagged messages, and a message's journey.  Read-only: the journey
is built by the harness's own tracer (in a child process with a deadline,
as the report does) from the run directory as it is.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from testnet.base.jsonl import read_jsonl

from . import harness
from .runs import RunRow

MAX_FLAGGED = 500  # flagged messages listed on the page (the report lists them all)
JOURNEY_TIMEOUT_S = 30.0
MESSAGE_KEY = re.compile(r"^[A-Za-z0-9+/=_.:-]{1,128}$")  # a msg_id (alice-3) or a message hash (base64)
FILES = ("report.html", "history.jsonl", "faults.jsonl", "adversary.jsonl", "verdict.json", "schedule.json",
         "scenario.toml", "chaos.json", "nightly.json")


class BadMessageKey(ValueError):
    """Not a message id or hash."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _counts(result: Any) -> dict[str, Any]:
    counts = result.get("counts") if isinstance(result, dict) else None
    return {k: v for k, v in (counts or {}).items() if isinstance(v, (int, float)) and v} if counts else {}


def disk_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def run_detail(path: Path, row: RunRow) -> dict[str, Any]:
    """Everything the run's page shows but the report (served as it is)."""
    verdict = _read_json(path / "verdict.json")
    verdict = verdict if isinstance(verdict, dict) else None
    history = read_jsonl(path / "history.jsonl")
    spans = harness.fault_spans(read_jsonl(path / "faults.jsonl"))
    t0 = min((r["t"] for r in history if isinstance(r.get("t"), int)), default=None)
    if t0 is None:
        t0 = min((s.start_ms for s in spans if s.start_ms is not None), default=row.started_ms or 0)
    checkers = []
    for name, result in ((verdict or {}).get("checkers") or {}).items():
        checkers.append({"name": name, "valid": result.get("valid") if isinstance(result, dict) else None,
                         "counts": _counts(result),
                         "error": result.get("error") if isinstance(result, dict) else None})
    flagged: dict[str, Any] = {"messages": [], "unlisted": [], "unjudged": [], "total": 0}
    if verdict is not None:
        outcomes = harness.message_outcomes(history, verdict)
        found = harness.flagged_messages(verdict, history, [m for m, o in outcomes.items() if o == harness.LOST])
        flagged = {"total": len(found.messages), "unlisted": found.unlisted, "unjudged": found.unjudged,
                   "messages": [{"key": m.key, "msg_id": m.msg_id, "hash": m.hash,
                                 "flags": [f"{f.checker}: {f.outcome}" + (f" ({f.detail})" if f.detail else "")
                                           for f in m.flags]} for m in found.messages[:MAX_FLAGGED]]}
    run = _read_json(path / "run.json") or {}
    return {
        "row": row.to_json(), "path": str(path),
        "checkers": checkers, "verdict_faults": (verdict or {}).get("faults"),
        "faults": [{"fault": s.fault, "kind": s.kind, "family": harness.family_of(s.kind), "status": s.status,
                    "start_s": None if s.start_ms is None else round((s.start_ms - t0) / 1000, 1),
                    "end_s": None if s.end_ms is None else round((s.end_ms - t0) / 1000, 1),
                    "targets": {k: v for k, v in s.targets.items()}, "errors": s.errors} for s in spans],
        "flagged": flagged,
        "history_records": len(history),
        "nodes": [n.get("name") for n in run.get("nodes") or [] if isinstance(n, dict)],
        "files": [f for f in FILES if (path / f).is_file()],
        "disk_bytes": disk_bytes(path),
    }


def check_message_key(key: str) -> str:
    key = key.strip()
    if not MESSAGE_KEY.match(key):
        raise BadMessageKey("a message is named by its msg_id (e.g. alice-3) or its hash (or a unique start of it)")
    return key


def journey_html(path: Path, key: str, *, timeout_s: float = JOURNEY_TIMEOUT_S) -> dict[str, Any]:
    """The journey of message ``key`` as the report shows it inline: ``{"html", "css", "outcomes"}``,
    or ``{"error"}`` saying why it could not be built (unknown message, unreadable run, too slow)."""
    built = harness.build_journeys(path, [key], timeout_s=timeout_s)
    j = built.built.get(key)
    if isinstance(j, dict):
        try:
            return {"key": key, "html": harness.render_html_body(j), "css": harness.JOURNEY_CSS,
                    "outcomes": j.get("outcomes"), "msg_id": j.get("msg_id"), "hash": j.get("hash"),
                    "seconds": round(built.seconds, 2)}
        except Exception as exc:  # a renderer's bug is reported, never a 500
            return {"key": key, "error": f"the journey could not be shown: {type(exc).__name__}: {exc}"}
    return {"key": key, "error": str(j) if j is not None else (built.stopped or "no journey was built")}
