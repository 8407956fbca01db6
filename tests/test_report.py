"""The run report: plots embedded, tables right, any input missing or torn still gives a report."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.report import (BAD, DELIVERED, FAILED, LOST, NOT_DELIVERED, UNKNOWN, ReportError, fault_spans,
                          message_outcomes, node_timeline, read_jsonl, write_report)

T0 = 1_700_000_000_000
N_SENDS = 36
LOST_IDS = ["m005", "m012", "m020"]
UNKNOWN_IDS = ["m007", "m030"]
FAILED_IDS = ["m015"]
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _history() -> list[dict]:
    """36 sends every 250 ms; lost ones are acknowledged but never received."""
    recs = []
    for i in range(N_SENDS):
        mid, t = f"m{i:03d}", T0 + 250 * i
        users = ("u1", "u2") if i % 2 else ("u2", "u1")
        recs.append({"t": t, "process": users[0], "type": "invoke", "op": "send", "msg_id": mid,
                     "from": users[0], "to": users[1], "namespace": 0, "body_digest": "00" * 16})
        latency = 20 + 3 * i
        kind = "info" if mid in UNKNOWN_IDS else "fail" if mid in FAILED_IDS else "ok"
        done = {"t": t + latency, "process": users[0], "type": kind, "op": "send", "msg_id": mid,
                "latency_ms": latency, "attempts": 1}
        if kind != "ok":
            done["error"] = "timeout"
        recs.append(done)
        if kind == "ok" and mid not in LOST_IDS:
            recs.append({"t": t + 400, "type": "ok", "op": "receive", "process": users[1], "hash": f"h{i}",
                         "namespace": 0, "msg_id": mid, "sender": "05ab", "body_digest": "00" * 16, "error": None})
    recs.append({"t": T0 + 250 * N_SENDS + 2000, "type": "info", "op": "workload-end"})
    return recs


FAULTS = [
    {"t": T0 + 2000, "fault": 1, "kind": "kill", "phase": "start", "targets": {"nodes": ["n02"]}},
    {"t": T0 + 4000, "fault": 1, "kind": "kill", "phase": "end", "targets": {"nodes": ["n02"]}},
    {"t": T0 + 5000, "fault": 2, "kind": "halves", "phase": "start",
     "targets": {"nodes": ["n03", "n04"], "links": 12}},
    {"t": T0 + 7000, "fault": 2, "kind": "halves", "phase": "end", "targets": {"nodes": ["n03", "n04"]},
     "error": "<script>alert(1)</script>"},
]

VERDICT = {"valid": False, "checkers": {
    "delivery": {"valid": False, "counts": {"sent": N_SENDS, "lost": len(LOST_IDS), "unknown": 2},
                 "lost": LOST_IDS, "duplicated": [], "corrupted": [], "misdelivered": [], "unknown": UNKNOWN_IDS,
                 "latency_ms": {"p50": 70, "p95": 120, "p99": 125, "max": 125}},
    "replication": {"valid": True},
    "unlinkability": {"valid": "unknown"}}}


def _jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> None:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in IMG.findall(text)]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    run_dir = tmp_path_factory.mktemp("run")
    _jsonl(run_dir / "history.jsonl", _history())
    _jsonl(run_dir / "faults.jsonl", FAULTS)
    (run_dir / "verdict.json").write_text(json.dumps(VERDICT))
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "r-42", "seed": 7, "nodes": [{"name": f"n{i:02d}"} for i in range(1, 5)],
        "users": [{"name": "u1"}, {"name": "u2"}]}))
    (run_dir / "schedule.json").write_text(json.dumps({"scenario": "kill-restart", "seed": 7, "faults": []}))
    path = write_report(run_dir)
    assert path == run_dir / "report.html" and path.is_file()
    assert not (run_dir / "report.html.tmp").exists()
    return path.read_text(encoding="utf-8")


def test_report_embeds_three_png_plots(full_report: str) -> None:
    images = _images(full_report)
    assert len(images) == 3
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images)


def test_report_tables(full_report: str) -> None:
    assert "<td>kill</td>" in full_report and "<td>halves</td>" in full_report
    assert f"<td>lost</td><td>{len(LOST_IDS)}</td>" in full_report
    assert f"<td>{UNKNOWN}</td><td>{len(UNKNOWN_IDS)}</td>" in full_report
    assert f"<td>messages sent</td><td>{N_SENDS}</td>" in full_report
    assert "<td>sends fail</td><td>1</td>" in full_report
    assert "<td>scenario</td><td>kill-restart</td>" in full_report
    assert "<td>r-42</td>" in full_report and "INVALID" in full_report
    for mid in LOST_IDS:
        assert f"<td>{mid}</td><td>lost</td>" in full_report
    # the fault table: start/end in seconds since the first history record, targets summarised
    assert "<td>2</td><td>halves</td><td>5.0</td><td>7.0</td><td>healed</td>" in full_report
    assert "links: 12" in full_report


def test_report_escapes_text(full_report: str) -> None:
    assert "<script>" not in full_report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in full_report


def test_history_only_run_dir_still_reports(tmp_path: Path) -> None:
    _jsonl(tmp_path / "history.jsonl", _history(), extra_lines=('{"t": 1, "op": "se',))  # torn last line
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert len(_images(text)) == 3
    assert "no verdict" in text
    assert f"<td>messages sent</td><td>{N_SENDS}</td>" in text
    # without a verdict, unreceived acknowledged messages are "not delivered", not "lost"
    assert f"<td>{NOT_DELIVERED}</td><td>{len(LOST_IDS)}</td>" in text
    assert "<td>lost</td><td>0</td>" in text


def test_malformed_fault_lines_are_skipped(tmp_path: Path) -> None:
    _jsonl(tmp_path / "history.jsonl", _history())
    _jsonl(tmp_path / "faults.jsonl", FAULTS[:2], extra_lines=("", "   ", "{not json", "[1, 2]", '"kill"'))
    assert len(read_jsonl(tmp_path / "faults.jsonl")) == 2
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert len(_images(text)) == 3
    assert text.count("<td>kill</td>") == 1 and "<td>halves</td>" not in text


def test_write_report_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ReportError):
        write_report(tmp_path / "missing")


def test_outcomes_default_from_receives_and_completions() -> None:
    out = message_outcomes(_history(), None)
    assert out["m000"] == DELIVERED
    assert all(out[m] == NOT_DELIVERED for m in LOST_IDS)
    assert all(out[m] == UNKNOWN for m in UNKNOWN_IDS)
    assert out["m015"] == FAILED
    assert len(out) == N_SENDS


def test_outcomes_follow_the_verdict_lists() -> None:
    verdict = {"checkers": {"delivery": {"lost": LOST_IDS, "duplicated": ["m001"], "corrupted": [{"msg_id": "m002"}],
                                         "recovered": ["m007"]}}}
    out = message_outcomes(_history(), verdict)
    assert all(out[m] == LOST for m in LOST_IDS)
    assert out["m001"] == BAD and out["m002"] == BAD
    assert out["m007"] == DELIVERED and out["m030"] == UNKNOWN


def test_outcomes_agree_with_the_delivery_checker() -> None:
    from chaos.checkers.delivery import check_delivery

    history = _history()
    delivery = check_delivery(history, {"u1": "05ab", "u2": "05ab"})
    out = message_outcomes(history, {"valid": delivery["valid"], "checkers": {"delivery": delivery}})
    assert sorted(m for m, o in out.items() if o == LOST) == LOST_IDS
    assert sorted(m for m, o in out.items() if o == UNKNOWN) == UNKNOWN_IDS
    assert [m for m, o in out.items() if o == FAILED] == FAILED_IDS


def test_capped_lost_list_still_counts_every_lost_message() -> None:
    # the checker lists only the first LIST_CAP ids; the rest are known lost from its counts
    verdict = {"checkers": {"delivery": {"counts": {"lost": 3}, "lost": LOST_IDS[:1], "unknown": UNKNOWN_IDS}}}
    out = message_outcomes(_history(), verdict)
    assert all(out[m] == LOST for m in LOST_IDS)
    # a checker that crashed judged nothing: fall back to what the history shows
    crashed = {"checkers": {"delivery": {"valid": "unknown", "error": "KeyError: 'x'"}}}
    assert all(message_outcomes(_history(), crashed)[m] == NOT_DELIVERED for m in LOST_IDS)


def test_fault_spans_pair_by_id_and_open_ones_last_to_the_end() -> None:
    recs = FAULTS + [
        {"t": T0 + 8000, "fault": 3, "kind": "pause", "phase": "start", "targets": {"nodes": ["n09"]}},
        {"t": T0 + 9000, "fault": 4, "kind": "clock-skew", "phase": "skipped", "targets": {}},
        {"t": T0 + 9500, "fault": 3, "kind": "pause", "phase": "error", "error": "SIGCONT failed"},
    ]
    spans = {s.fault: s for s in fault_spans(recs)}
    assert spans["1"].interval(T0 + 99_000) == (T0 + 2000, T0 + 4000) and spans["1"].status == "healed"
    assert spans["3"].interval(T0 + 99_000) == (T0 + 8000, T0 + 99_000)
    assert spans["3"].status == "error" and spans["3"].errors == ["SIGCONT failed"]
    assert spans["4"].status == "skipped" and spans["4"].interval(T0 + 99_000) is None

    rows = node_timeline(list(spans.values()), ["n01", "n02", "n03", "n04"], T0 + 99_000)
    assert list(rows) == ["n01", "n02", "n03", "n04", "n09"]
    assert rows["n01"] == []
    assert rows["n02"] == [("killed", T0 + 2000, T0 + 4000)]
    assert rows["n03"] == [("partitioned", T0 + 5000, T0 + 7000)]
    assert rows["n09"] == [("paused", T0 + 8000, T0 + 99_000)]


def test_importing_the_module_does_not_load_matplotlib() -> None:
    code = "import sys, chaos.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
