"""``swarmnet serve`` over stored runs (a failing simulated chaos run, broken run directories,
nights), and the page itself in a real browser: Playwright driving the machine's Chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import trio

from chaos.web import runs as R
from testnet import rundir
from testnet.fixtures import running_testnet

from web_helpers import get, served

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu"]


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory holding a failing smoke run (replication skipped: lost and missing
    messages), made in the simulation (~3 s)."""
    from chaos.sim.jobs import run_jobs

    runs_dir = tmp_path_factory.mktemp("web") / "runs"
    job = {"scenario": "smoke", "seed": 1, "inject_bugs": ["skip-replication"], "runs_dir": str(runs_dir)}
    [r] = run_jobs([job], 1)
    assert r["valid"] is False and "delivery" in r["failing"], r
    return runs_dir


def _fake_run(path: Path, run_id: str, *, scenario: str = "smoke", seed: int = 1, valid=True, bug: str | None = None,
              failing: tuple[str, ...] = (), started_ms: int = 1_700_000_000_000) -> None:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"schema": 1, "run_id": run_id, "seed": seed, "state": "stopped",
                                               "started_ms": started_ms, "links_mode": "direct",
                                               "nodes": [{"name": "n01"}], "users": [], "controller": None}))
    (path / "chaos.json").write_text(json.dumps({"scenario": scenario, "seed": seed,
                                                 "inject_bugs": [bug] if bug else []}))
    checkers = {c: {"valid": c not in failing} for c in ("delivery", "replication", "unlinkability", "authority")}
    (path / "verdict.json").write_text(json.dumps({"valid": valid, "checked_ms": started_ms + 30_000,
                                                   "checkers": checkers}))


async def test_runs_reports_and_journeys_over_http(sim_runs):
    [sim] = [p for p in sim_runs.iterdir() if p.is_dir() and not p.is_symlink()]
    before = _files(sim)
    async with served(sim_runs) as url:
        listed = (await get(url + "/api/runs")).json()["runs"]
        row = next(r for r in listed if r["key"] == sim.name)
        assert (row["kind"], row["scenario"], row["seed"], row["inject_bugs"], row["valid"]) == \
            ("sim", "smoke", 1, ["skip-replication"], False)
        assert row["checkers"]["delivery"] is False and row["checkers"]["unlinkability"] is True
        assert row["nodes"] == 8 and row["duration_ms"] > 0 and row["report"] and not row["live"]

        page = (await get(f"{url}/api/run?run={sim.name}")).json()
        assert [c["name"] for c in page["checkers"]][:2] == ["delivery", "replication"]
        assert page["flagged"]["total"] > 50 and page["faults"][0]["kind"] == "kill"
        first = page["flagged"]["messages"][0]
        assert any(f.startswith("delivery: lost") for f in first["flags"])

        report = await get(f"{url}/api/run/report?run={sim.name}")
        assert report.status_code == 200 and "swarmnet chaos run" in report.text
        assert report.headers["content-security-policy"].startswith("sandbox")

        j = await get(f"{url}/api/run/journey?run={sim.name}&message={first['key']}")
        assert j.status_code == 200, j.text
        j = j.json()
        assert "<svg" in j["html"] and "acked-alone" in j["html"] and "lost" in j["outcomes"]
        by_hash = (await get(f"{url}/api/run/journey", params={"run": sim.name, "message": first["hash"][:12]})).json()
        assert by_hash["msg_id"] == first["key"]
        missing = await get(f"{url}/api/run/journey?run={sim.name}&message=nobody-1")
        assert missing.status_code == 404 and "no message 'nobody-1'" in missing.json()["error"]
        bad = await get(f"{url}/api/run/journey?run={sim.name}&message=<script>")
        assert bad.status_code == 400

    # Reading never writes: listing, its page, its report and three journeys left the run as it was.
    assert _files(sim) == before


def _files(run_dir: Path) -> dict[Path, int]:
    """Every file's and directory's modification time (a file made or removed changes its
    directory's)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


async def test_broken_runs_say_why_and_nights_line_up(tmp_path):
    runs_dir = tmp_path / "runs"
    night = runs_dir / "nightly"
    day = 24 * 3600 * 1000
    for i, t in enumerate((1_700_000_000_000, 1_700_000_000_000 + day)):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(t / 1000))
        _fake_run(night / f"{stamp}-a{i}", f"r{i}a", scenario="smoke", seed=10 + i, valid=i == 0,
                  failing=() if i == 0 else ("delivery",), started_ms=t)
        _fake_run(night / f"{stamp}-b{i}", f"r{i}b", scenario="smoke", seed=1, valid=False, bug="skip-replication",
                  failing=("replication",) if i == 0 else (), started_ms=t + 60_000)
    (night / "nightly.json").write_text("[]\n")
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.json").write_text("{torn")
    _fake_run(runs_dir / "x" / "nodes" / "y", "hidden")  # a node's folder is never a run
    async with served(runs_dir) as url:
        listed = {r["key"]: r for r in (await get(url + "/api/runs")).json()["runs"]}
        assert "x/nodes/y" not in listed and len(listed) == 5
        assert "run.json" in listed["broken"]["error"]
        page = await get(url + "/api/run?run=broken")
        assert page.status_code == 200 and page.json()["row"]["error"]
        assert (await get(url + "/api/run/report?run=broken")).status_code == 404
        [folder] = (await get(url + "/api/nights")).json()["folders"]
        assert folder["folder"] == "nightly" and folder["names"] == ["smoke", "canary: skip-replication"]
        newest, oldest = folder["nights"]
        # a regression at one glance: smoke passed, then failed; the canary caught its bug, then went blind
        assert [(e["name"], e["passed"], e["seed"]) for e in oldest["entries"]] == \
            [("smoke", True, 10), ("canary: skip-replication", True, 1)]
        assert [(e["name"], e["passed"], e["seed"]) for e in newest["entries"]] == \
            [("smoke", False, 11), ("canary: skip-replication", False, 1)]


def test_listing_500_runs_reads_only_what_changed(tmp_path):
    runs_dir = tmp_path / "runs"
    names = [f"20250101-00{i // 60:02d}{i % 60:02d}-abcd" for i in range(500)]
    for i, name in enumerate(names):
        _fake_run(runs_dir / name, f"r{i}", seed=i, started_ms=1_700_000_000_000 + i)
    index = R.RunIndex(runs_dir)
    first = index.scan()
    assert len(first) == 500 and first[0].seed == 499
    (runs_dir / names[7] / "verdict.json").write_text(json.dumps({"valid": False, "checkers": {}}))
    again = {r.key: r for r in index.scan()}
    assert again[names[7]].valid is False
    assert sum(again[k] is r for k, r in ((r.key, r) for r in first)) == 499  # the rest were not read again


# ---------------------------------------------------------------------------- the browser


def _browser_or_skip():
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    if sync_api is None or not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: playwright and {CHROMIUM} are installed by .ci/run")
        pytest.skip(f"no {CHROMIUM} or playwright here (apt-get install chromium; pip install playwright)")
    return sync_api.sync_playwright, sync_api.expect


async def test_the_page_in_a_browser(sim_runs, tmp_path):
    """Six nodes in their swarms; a kill clicked shows the node killed and `status` agrees; the
    failing run is listed with its verdict, its report opens, one flagged message's journey opens."""
    sync_playwright, expect = _browser_or_skip()
    shots = Path(os.environ.get("SWARMNET_SCREENSHOTS") or tmp_path)
    runs_dir = tmp_path / "runs"
    shutil.copytree(sim_runs, runs_dir, symlinks=True)
    [sim] = [p.name for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    async with running_testnet(runs_dir / "live", nodes=6, users=2, min_swarm=1) as net:
        registry = await net.call("registry", "get_service_nodes", {})
        swarms = {f"{n['swarm_id']:016x}" for n in registry["nodes"]}
        async with served(runs_dir) as url:
            def browse() -> dict:
                found: dict = {}
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.goto(url + "/#live")
                    expect(page.locator(".node[data-state=up]")).to_have_count(6, timeout=15_000)
                    found["swarms"] = page.eval_on_selector_all(
                        ".swarm", "els => els.map(e => [e.dataset.swarm, "
                                  "[...e.querySelectorAll('.node')].map(n => n.dataset.node)])")
                    page.screenshot(path=str(shots / "live.png"), full_page=True)
                    page.click(".node[data-node=n02] button[data-action=kill]")
                    clicked = time.monotonic()
                    page.wait_for_selector(".node[data-node=n02][data-state=killed]", timeout=15_000)
                    found["killed_after_s"] = time.monotonic() - clicked
                    expect(page.locator("#feed li", has_text="kill started (control API): nodes=n02")).to_have_count(
                        1, timeout=5_000)
                    found["feed"] = page.inner_text("#feed")
                    page.screenshot(path=str(shots / "live-killed.png"), full_page=True)

                    page.goto(url + "/#runs")
                    row = page.wait_for_selector(f"tr[data-key='{sim}']")
                    found["row"] = row.inner_text()
                    page.screenshot(path=str(shots / "runs.png"), full_page=True)
                    row.click()
                    frame = page.wait_for_selector("iframe.report").content_frame()
                    frame.wait_for_selector("h1")
                    found["report"] = frame.inner_text("h1")
                    first = page.wait_for_selector(".flagged-list > li .fh")
                    found["flagged"] = first.inner_text()
                    first.click()
                    journey = page.wait_for_selector(".flagged-list > li .journey svg", timeout=30_000)
                    found["journey"] = page.inner_text(".flagged-list > li .journey")
                    journey.scroll_into_view_if_needed()
                    page.screenshot(path=str(shots / "run.png"))
                    browser.close()
                found["errors"] = errors
                return found

            found = await trio.to_thread.run_sync(browse)
            assert found["errors"] == []
            shown = dict(found["swarms"])
            assert set(shown) == swarms and sorted(sum(shown.values(), [])) == [f"n0{i}" for i in range(1, 7)]
            by_key = {n["ed25519_public"]: n for n in registry["nodes"]}
            for rt in net.nodes.values():
                assert rt.plan.name in shown[f"{by_key[rt.plan.ed25519_public]['swarm_id']:016x}"]
            # From the click: the controller's kill (it waits for the process's exit), then the page's round.
            assert found["killed_after_s"] < 2.0
            status = await rundir.gather_status(rundir.load_run(net.run_dir))
            assert {n["name"]: (n["state"], n["process"]) for n in status["nodes"]}["n02"] == ("killed", "dead")
            assert "kill n02: done" in found["feed"]
            assert "smoke" in found["row"] and "invalid" in found["row"] and "skip-replication" in found["row"]
            assert "swarmnet chaos run" in found["report"]
            assert "delivery: lost" in found["flagged"]
            assert "lost" in found["journey"] and "trail ends at" in found["journey"]


def test_the_users_traffic_from_a_growing_history():
    from chaos.web.traffic import Traffic

    t0 = 1_000_000
    history = []
    for i in range(20):  # a send a second, acknowledged after 40 ms, received after 900 ms
        history += [{"t": t0 + i * 1000, "op": "send", "type": "invoke", "msg_id": f"a-{i}"},
                    {"t": t0 + i * 1000 + 40, "op": "send", "type": "ok", "msg_id": f"a-{i}", "latency_ms": 40},
                    {"t": t0 + i * 1000 + 900, "op": "receive", "type": "ok", "msg_id": f"a-{i}"}]
    history.append({"t": t0 + 19_500, "op": "send", "type": "fail", "msg_id": "a-x"})
    traffic = Traffic()
    traffic.read(history[:30])
    back = traffic.backfill(now=(t0 + 10_500) / 1000)
    assert len(back) == 8 and all(p["stores_per_s"] == 1.0 and p["store_ms_p50"] == 40 for p in back)
    traffic.read(history[30:])
    p = traffic.point(now=(t0 + 20_000) / 1000, node_stores=3.0)
    assert (p["stores_per_s"], p["receives_per_s"], p["failed_per_s"], p["delivery_ms_p50"]) == (1.0, 1.0, 0.5, 900)
    assert traffic.totals == {"stores_ok": 20, "stores_failed": 1, "stores_unknown": 0, "receives": 20}
