"""The run report: plots embedded, tables right, any input missing or torn still gives a report."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.report.model import (BAD, DELIVERED, FAILED, LOST, NOT_DELIVERED, UNKNOWN, ReportError, fault_spans,
                                message_outcomes, node_timeline)
from chaos.report.page import read_jsonl, write_report

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
    path = write_report(run_dir, trace_timeout_s=300)
    assert path == run_dir / "report.html" and path.is_file()
    assert not (run_dir / "report.html.tmp").exists()
    return path.read_text(encoding="utf-8")


def test_report_embeds_one_png_chart_of_the_run_over_time(full_report: str) -> None:
    images = _images(full_report)
    assert len(images) == 1  # latency, throughput and node state on one time axis; no lateness plot (none late)
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
    assert len(_images(text)) == 1
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
    assert len(_images(text)) == 1
    # The kill once in the faults table, and its start and heal in the timing table.
    assert text.count("<td>kill</td>") == 3 and "<td>halves</td>" not in text


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
    code = "import sys, chaos.report.page; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- flagged messages, from simulated runs

DETAILS = re.compile(r"<details><summary>(.*?)</summary>", re.S)


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """A failing smoke run (replication skipped: lost and missing messages) and a valid one, ~3 s each."""
    from chaos.sim.jobs import run_jobs

    runs_dir = tmp_path_factory.mktemp("sim")
    jobs = [{"scenario": "smoke", "seed": 1, "inject_bugs": ["skip-replication"], "runs_dir": str(runs_dir / "bug")},
            {"scenario": "smoke", "seed": 1, "inject_bugs": [], "runs_dir": str(runs_dir / "ok")}]
    results = run_jobs(jobs, 2)
    by = {("failing" if r["failing"] else "valid"): r for r in results}
    assert set(by) == {"failing", "valid"}, results
    return by


def _verdict(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "verdict.json").read_text())


def test_flagged_section_shows_each_flagged_message_with_its_journey(sim_runs: dict) -> None:
    from chaos.report.page import write_report

    run_dir = sim_runs["failing"]["run_dir"]
    # Written again with a budget no loaded machine runs out of: the journeys, not the
    # report's 5 s tracing budget (its cut-off has a test of its own), are what this checks.
    text = write_report(Path(run_dir), trace_timeout_s=300).read_text(encoding="utf-8")
    checkers = _verdict(run_dir)["checkers"]
    lost = checkers["delivery"]["lost"]
    missing = [m["msg_id"] for m in checkers["replication"]["missing"]]
    flagged = list(dict.fromkeys(lost + missing))
    assert lost and len(flagged) > 50  # enough to cut the journeys at 50
    section = text[text.index('<h2 id="flagged">'):]
    assert f"Flagged messages ({len(flagged)})" in section
    summaries = DETAILS.findall(section)
    assert len(summaries) == 50
    # delivery's failures first, each with every checker that flagged it, its findings and where its trail ends
    for mid, summary in zip(lost, summaries):
        assert f"<code>{mid}</code>" in summary and "delivery: lost; replication: missing" in summary
        # (findings in time order, which the simulated wire's delays may set either way)
        assert re.search(r"findings: (acked-alone, no-copies|no-copies, acked-alone) ", summary), summary
        assert "trail ends at n" in summary
    first = section[:section.index("</details>")]
    assert "<svg" in first and "<pre>" in first and "<b>acked-alone</b>" in first
    assert f"message {lost[0]}  hash " in first and "storage at the end" in first and "trail ends at" in first
    assert "faults active during the journey" in first and "kill n04" in first
    # the rest by id, each with the command that shows it
    rest = section[section.rindex("</details>"):]
    for mid in flagged[50:]:
        assert f"<code>swarmnet trace {run_dir} {mid}</code>" in rest
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_valid_run_says_no_message_was_flagged(sim_runs: dict) -> None:
    text = (Path(sim_runs["valid"]["run_dir"]) / "report.html").read_text(encoding="utf-8")
    assert "Flagged messages (0)" in text and "No message was flagged by any checker." in text
    assert "<details>" not in text


def test_run_loaded_once_and_a_journey_that_breaks_says_why(sim_runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import chaos.trace.journey
    from chaos.report.flagged import trace_keys

    run_dir = Path(sim_runs["failing"]["run_dir"])
    checkers = _verdict(str(run_dir))["checkers"]
    # Flagged messages, lost ones first (how many are lost depends on the interleaving).
    lost = list(dict.fromkeys(checkers["delivery"]["lost"] + [m["msg_id"] for m in checkers["replication"]["missing"]]))
    assert len(lost) >= 2
    loads: list[Path] = []
    real_load, real_journey = chaos.trace.journey.load_run, chaos.trace.journey.journey

    def load_run(path: Path) -> object:
        loads.append(path)
        return real_load(path)

    def journey(run: object, key: str) -> dict:
        if key == lost[0]:
            raise RuntimeError("<boom>")
        return real_journey(run, key)

    monkeypatch.setattr(chaos.trace.journey, "load_run", load_run)
    monkeypatch.setattr(chaos.trace.journey, "journey", journey)
    out = list(trace_keys(run_dir, lost + ["no-such-message"]))
    assert len(loads) == 1
    assert out[0] == {"key": lost[0], "error": "RuntimeError: <boom>"}
    assert out[1]["key"] == lost[1] and out[1]["journey"]["msg_id"] == lost[1]
    assert out[-1]["key"] == "no-such-message" and out[-1]["error"].startswith("TraceError: no message")
    assert list(trace_keys(run_dir / "nothing-here", lost))[0]["error"].startswith(
        "the run directory could not be read for tracing: TraceError")


def test_a_tracer_past_its_time_leaves_every_message_listed_by_id(sim_runs: dict) -> None:
    from chaos.report.flagged import flagged_section

    run_dir = Path(sim_runs["failing"]["run_dir"])
    verdict = _verdict(str(run_dir))
    lost = verdict["checkers"]["delivery"]["lost"]
    history = read_jsonl(run_dir / "history.jsonl")
    section = flagged_section(run_dir, verdict, history, timeout_s=0.05)
    assert "<details>" not in section and "tracing took over 0.05 s" in section
    assert f"<td>{lost[0]}</td><td>delivery: lost; replication: missing</td>" in section
    assert f"<code>swarmnet trace {run_dir} {lost[0]}</code>" in section
    # with time enough (a budget no loaded machine runs out of): the first N with journeys, in the order of the list
    section = flagged_section(run_dir, verdict, history, max_journeys=3, timeout_s=300)
    flagged = list(dict.fromkeys(lost + [m["msg_id"] for m in verdict["checkers"]["replication"]["missing"]]))
    assert [s.split("</code>")[0] for s in DETAILS.findall(section)] == [f"<code>{m}" for m in flagged[:3]]


def test_flagged_section_survives_a_run_dir_it_cannot_trace(full_report: str, tmp_path: Path) -> None:
    # the synthetic run above: a verdict with lost messages, but no keys, captures or databases
    section = full_report[full_report.index('<h2 id="flagged">'):]
    assert f"Flagged messages ({len(LOST_IDS)})" in section
    for mid, summary in zip(LOST_IDS, DETAILS.findall(section)):
        assert f"<code>{mid}</code>" in summary and "delivery: lost" in summary and "no journey" in summary
    assert section.count("the journey could not be built: TraceError: no message") == len(LOST_IDS)
    # no run.json: nothing to trace by; every message listed by id, and the rest of the report is whole
    _jsonl(tmp_path / "history.jsonl", _history())
    (tmp_path / "verdict.json").write_text(json.dumps(VERDICT))
    text = write_report(tmp_path, trace_timeout_s=300).read_text(encoding="utf-8")
    section = text[text.index('<h2 id="flagged">'):]
    assert len(_images(text)) == 1 and "could not be read for tracing" in section and "<details>" not in section
    for mid in LOST_IDS:
        assert f"<td>{mid}</td><td>delivery: lost</td>" in section


def test_flagged_messages_groups_every_checker_failure_per_message() -> None:
    from chaos.report.flagged import flagged_messages

    history = [{"op": "send", "type": "invoke", "msg_id": "a-1", "hash": "H1"},
               {"op": "send", "type": "invoke", "msg_id": "a-2", "hash": "H2"}]
    verdict = {"checkers": {
        "delivery": {"counts": {"lost": 1, "misdelivered": 3}, "lost": ["a-1"],
                     "misdelivered": [{"msg_id": None, "hash": "H2", "process": "eve", "to": None,
                                       "reason": "does not open"}],
                     "unexpected": [{"msg_id": "zz-9", "hash": "HZ", "process": "bob"}]},
        "replication": {"counts": {"missing": 1, "stray": 2, "stray_after_grace": 0},
                        "missing": [{"msg_id": "a-1", "hash": "H1", "members": ["n1", "n2"], "missing_on": ["n2"]}],
                        "stray": [{"msg_id": "a-2", "hash": "H2", "after_grace": False, "stray_on_live": ["n3"]}]},
        "unlinkability": {"linked": [{"msg_id": "a-2", "hash": "H2", "linked_by": {"n4": {}}}]},
        "authority": {"valid": "unknown", "error": "KeyError: 'x'"}}}
    f = flagged_messages(verdict, history, lost_ids=["a-1", "a-3"])
    by = {m.key: [(x.checker, x.outcome) for x in m.flags] for m in f.messages}
    assert by == {"a-1": [("delivery", "lost"), ("replication", "missing")],
                  "a-3": [("delivery", "lost")],  # past the list's cap, known from the history
                  "a-2": [("delivery", "misdelivered"), ("unlinkability", "linked")],  # found by its hash
                  "HZ": [("delivery", "unexpected")]}  # never sent: traced by its hash
    assert [m.key for m in f.messages] == ["a-1", "a-2", "HZ", "a-3"]
    assert f.unlisted == ["delivery misdelivered: 2 more than verdict.json lists"]
    assert f.unjudged == ["authority: KeyError: 'x'"]
    assert flagged_messages(None, history).messages == []


def test_node_state_chart_of_a_large_network_shows_the_nodes_something_happened_to():
    import struct

    from chaos.report.charts import plot_over_time

    def height(png: bytes) -> int:
        return struct.unpack(">II", png[16:24])[1]  # IHDR: width, height

    def plot_nodes(timeline: dict, t0: float, end: float) -> bytes:
        return plot_over_time({}, {}, [], [], timeline, t0, end)

    t0 = 1_000_000
    small = {f"n{i:02d}": [] for i in range(1, 11)}
    small["n03"] = [("killed", t0 + 1000, t0 + 3000)]
    large = {f"n{i:03d}": [] for i in range(1, 301)}
    for n in ("n007", "n150", "n299"):
        large[n] = [("partitioned", t0 + 2000, t0 + 5000)]
    # 300 rows would be ~100 inches tall; three rows are shown, smaller than ten.
    assert height(plot_nodes(large, t0, t0 + 10_000)) < height(plot_nodes(small, t0, t0 + 10_000))


def test_the_report_draws_each_phase_lateness_and_names_what_failed(tmp_path: Path) -> None:
    faults = [dict(FAULTS[0], planned=T0 + 1900, late_ms=100, took_ms=90),
              dict(FAULTS[1], planned=T0 + 3900, late_ms=100, took_ms=400),
              {"t": T0 + 9000, "fault": 2, "kind": "halves", "phase": "error", "during": "start", "late_ms": 4000,
               "error": "BatchError: 3 of 40 Toxiproxy calls failed",
               "failures": [{"error": "BatchError: 3 of 40 Toxiproxy calls failed", "failed": 3, "calls": 40,
                             "calls_failed": [{"server": "127.9.8.3:8474", "call": "PATCH /proxies/n03->n04",
                                               "proxy": "n03->n04", "status": None,
                                               "reason": "no answer in 5 s"}]}]}]
    _jsonl(tmp_path / "history.jsonl", _history())
    _jsonl(tmp_path / "faults.jsonl", faults)
    verdict = {"valid": "unknown", "faults": {"tolerance_ms": 1000, "worst": {"fault": 2, "kind": "halves",
                                                                               "phase": "start", "late_ms": 4000},
                                              "valid": "unknown", "why": ["fault 2 halves: failed to start: ..."]}}
    (tmp_path / "verdict.json").write_text(json.dumps(verdict))
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Fault timing" in text and 'alt="fault timing"' in text and "Worst lateness: 4.00 s" in text
    assert "fault 2 halves: failed to start" in text and "3 of 40 calls failed" in text
    assert "127.9.8.3:8474 PATCH /proxies/n03-&gt;n04: no answer in 5 s" in text
    # Every phase within the tolerance: the sentence says so, and no plot is drawn.
    _jsonl(tmp_path / "faults.jsonl", faults[:2])
    (tmp_path / "verdict.json").write_text(json.dumps({"valid": True, "faults": {"tolerance_ms": 1000, "valid": True}}))
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Fault timing" in text and "within the tolerance (1 s)" in text and 'alt="fault timing"' not in text
    # A run from before lateness was recorded draws no timing plot.
    _jsonl(tmp_path / "faults.jsonl", FAULTS)
    (tmp_path / "verdict.json").unlink()
    assert 'alt="fault timing"' not in write_report(tmp_path).read_text(encoding="utf-8")
