"""JSON-lines files (histories, fault logs, attack logs): read them, forgiving a torn last line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Every JSON-object line of ``path`` (history, faults): blank, torn (a kill -9
    mid-write), malformed or non-object lines are skipped; a missing file reads as []."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return parse_lines(text.splitlines())


def parse_lines(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The JSON objects among ``lines``; blank, malformed and non-object lines are skipped."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
