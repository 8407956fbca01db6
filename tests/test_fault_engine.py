"""Faults of the fault engine: a Toxiproxy call refused, a server killed or stalled in the
middle of a fault.  The run says what failed (server, call, how many of how many), its
verdict is unknown (exit 2), what could be healed is, and no process is left.  Also the
pure parts: the pipelined HTTP answers, errors opened into their leaves, the nightly's
harness errors shown apart."""

from __future__ import annotations

import json
import signal
import socket

import psutil
import pytest
import trio

from chaos.run.nemesis import HealFailed, inject
from chaos.run.play import describe_error
from chaos.scenario import NEMESES, load_scenario
from chaos.schedule import Fault, to_toml
from testnet import links as L
from testnet.toxiproxy import BatchError, CallFailure, _Answers

# ---------------------------------------------------------------- pure


def test_pipelined_answers_are_read_whatever_the_pieces_they_arrive_in():
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
              b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"
              b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found"
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
              b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n")
    want = [(200, b'{"a":1}'), (204, b""), (404, b"not found"), (200, b"abcde"), (409, b"")]
    for size in (1, 2, 7, 50, len(stream)):
        answers, got = _Answers(), []
        for i in range(0, len(stream), size):
            got += answers.feed(stream[i:i + size])
        assert got == want, size
    with pytest.raises(ValueError):
        _Answers().feed(b"HTTP/1.1 200 OK\r\n\r\n")  # no length: cannot be framed on a kept-alive connection


def test_an_error_is_opened_into_its_leaves_never_one_sub_exception():
    refused = [CallFailure("127.9.8.3:8474", f"POST /proxies/n0{i}->n02/toxics", f"n0{i}->n02", None,
                           "cannot connect (refused)") for i in range(1, 4)]
    batch = BatchError(refused + [CallFailure("127.9.8.3:8475", "POST /proxies/n09->n01", "n09->n01", 500,
                                              "status 500: boom")], 40)
    assert str(batch).startswith("4 of 40 Toxiproxy calls failed: 127.9.8.3:8474 cannot connect (refused) x3 "
                                 "(e.g. POST /proxies/n01->n02/toxics); 127.9.8.3:8475 status 500: boom")
    nested = ExceptionGroup("Exceptions from Trio nursery", [ExceptionGroup("inner", [batch]), KeyError("n07")])
    d = describe_error(HealFailed("fault 5 (latency)", [nested]))
    assert "sub-exception" not in d["error"] and d["error"].startswith("fault 5 (latency): 2 errors: (1) BatchError: 4 of 40")
    assert "(2) KeyError: 'n07'" in d["error"]
    leaf = d["failures"][0]
    assert (leaf["failed"], leaf["calls"], leaf["calls_failed"][0]["server"]) == (4, 40, "127.9.8.3:8474")
    assert describe_error(L.ProxyGone("gone", server="s:1", call="GET /proxies/x", status=404))["failures"] == [
        {"error": "ProxyGone: gone", "server": "s:1", "call": "GET /proxies/x", "status": 404}]


def test_the_nightly_lists_harness_errors_first_as_neither_pass_nor_fail(capsys):
    from chaos.run.cli import show_nightly

    results = [{"scenario": "smoke", "seed": 1, "status": "pass", "passed": True, "failing": []},
               {"scenario": "large", "seed": 2, "status": "harness", "passed": False, "failing": [],
                "run_dir": "runs/x", "harness": ["fault 5 latency: started 45.00 s late (tolerance 1.00 s)"]},
               {"scenario": "mixed", "seed": 3, "status": "fail", "passed": False, "failing": ["delivery"],
                "run_dir": "runs/y"}]
    assert show_nightly(results) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("HARNESS  large") and "started 45.00 s late" in lines[1]
    assert lines[2].startswith("FAIL     mixed") and lines[3].startswith("PASS     smoke")
    assert lines[4].startswith("1 passed, 1 failed, 1 harness error(s) of 3 runs")
    assert show_nightly(results[:2]) == 2 and show_nightly(results[:1]) == 0


# ---------------------------------------------------------------- real Toxiproxy, real nodes

def _have_toxiproxy() -> bool:
    try:
        L.find_toxiproxy()
    except L.ToxiproxyMissing:
        return False
    return True


network = pytest.mark.skipif(not _have_toxiproxy(), reason="Toxiproxy not installed (make toxiproxy)")


def _closed_port(host: str) -> int:
    """A port nothing listens on at ``host`` (bound, then closed: a call there is refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@network
@pytest.mark.network
@pytest.mark.parametrize("how", ["killed", "stalled"])
async def test_a_toxiproxy_server_killed_or_stalled_mid_fault_fails_the_heal_naming_it(tmp_path, how):
    from testnet.controller import open_testnet

    async with open_testnet(nodes=4, users=1, min_swarm=2, seed=5, check=False, run_dir=tmp_path / "run",
                            toxiproxy_servers=2) as net:
        pids = [c.pid for c in net.children()]
        server = net.api.apis[1].server
        fault = Fault(1, 0, 1, "latency", {"all-links": True}, NEMESES["latency"][1])
        with pytest.raises(L.LinkError) as info:
            async with inject(net, fault) as desc:
                assert desc["proxies"] == len(net.plan.links)
                proxies = await net.api.proxies()
                assert proxies and all(len(p["toxics"]) == 2 for p in proxies.values())
                victim = net.toxiproxies[1]
                # A stalled server's heal calls give up after this long (set after the start: at
                # 1 s a loaded machine's start could time out too).
                net.api.apis[1].timeout_s = 1.0
                if how == "killed":
                    victim.kill()
                    assert await victim.wait_exit(5)
                else:
                    victim.send_signal(signal.SIGSTOP)
        d = describe_error(info.value)
        reason = "cannot connect (refused)" if how == "killed" else "no answer in 1 s"
        assert f"{server} {reason}" in d["error"] and "Toxiproxy calls failed" in d["error"], d
        leaf = d["failures"][0]
        assert 0 < leaf["failed"] < leaf["calls"] and leaf["calls_failed"][0]["server"] == server
        # What could be healed was: the other server's proxies carry no toxic any more.
        other = await net.api.apis[0].proxies()
        assert other and not any(p["toxics"] for p in other.values())
    with trio.fail_after(10):
        while not _gone(pids):
            await trio.sleep(0.1)


REFUSED = {
    "name": "refused",
    "topology": {"nodes": 5, "min_swarm": 3, "users": 2},
    "workload": {"rate": 5, "duration_s": 3, "drain_s": 5},
    "faults": {"timeline": [{"at_s": 1, "duration_s": 1, "kind": "latency", "target": {"node-links": "n01"}}]},
    "check": {"quiet_s": 1, "checkers": ["delivery"]},
}


@network
@pytest.mark.network
async def test_a_fault_whose_calls_are_refused_makes_the_run_unknown_naming_what_failed(tmp_path):
    from contextlib import asynccontextmanager

    from chaos.run.runner import RealProcesses, run_chaos

    class RefusingToxiproxy(RealProcesses):
        """Points the Toxiproxy API at a closed port once the network is up (its proxies keep
        forwarding), and back once the fault has failed."""

        @asynccontextmanager
        async def open(self, opts, progress):
            async with super().open(opts, progress) as net:
                self.api = net.api.apis[0]
                self.port = self.api.port
                self.api.port = _closed_port(self.api.host)
                yield net

    world = RefusingToxiproxy()
    said = []

    def progress(msg: str) -> None:
        said.append(msg)
        if "failed to start" in msg:
            world.api.port = world.port

    (tmp_path / "refused.toml").write_text(to_toml(REFUSED))
    result = await run_chaos(load_scenario(tmp_path / "refused.toml"), seed=3, run_dir=tmp_path / "bundle",
                             progress=progress, world=world)
    assert result.exit_code == 2 and result.verdict["valid"] == "unknown", result.summary
    (error,) = result.verdict["faults"]["errors"]
    assert error["during"] == "start" and f"{world.api.host}:" in error["error"] and "cannot connect (refused)" in error["error"]
    # The heal of what the start did ran while the API still refused: both are named.
    assert "harness error" in result.summary and "fault 1 latency: failed to start: " in result.summary
    assert " Toxiproxy calls failed: " in result.summary and "cannot connect (refused)" in result.summary
    assert "sub-exception" not in result.summary
    assert any(m.startswith("fault 1 latency failed to start: ") and "(refused)" in m for m in said), said
    (record,) = [json.loads(l) for l in (result.run_dir / "faults.jsonl").read_text().splitlines()]
    leaf = record["failures"][0]
    assert leaf["failed"] == leaf["calls"] > 0 and record["late_ms"] >= 0 and record["planned"] > 0
    assert {c["reason"] for c in leaf["calls_failed"]} == {"cannot connect (refused)"}
    assert "What failed" in (result.run_dir / "report.html").read_text()


@network
@pytest.mark.network
async def test_a_change_to_many_links_is_centred_on_its_planned_times(tmp_path):
    """A fault whose calls take a while begins half of them before its planned time and
    says so (early_ms), for its start and for its heal; the verdict holds early to the
    tolerance as it holds late.  The nodes run at a lower CPU priority than the harness."""
    from chaos.checkers.verdict import fault_record
    from chaos.run.play import FaultLog, play
    from chaos.schedule import Schedule
    from testnet.controller import open_testnet
    from testnet.launch import NODE_NICE

    async with open_testnet(nodes=4, users=1, min_swarm=2, seed=5, check=False, run_dir=tmp_path / "run") as net:
        # The harness keeps the CPU first: its nodes run below it, Toxiproxy beside it.
        ours = psutil.Process().nice()
        assert {psutil.Process(rt.child.pid).nice() for rt in net.nodes.values()} == {ours + NODE_NICE}
        assert {psutil.Process(c.pid).nice() for c in net.toxiproxies} == {ours}
        await net.api.populate([{"name": name} for name in sorted(net.plan.link_names)])
        made = len(net.api.made)
        # As if this run's bulk calls went at 2 x made a second: each phase's 2 x made calls
        # (a latency toxic each way) are estimated at 1 s, half of it before the planned time.
        net.api.bulk_rates["toxic"] = 2.0 * made
        assert net.api.estimate_s(net.plan.link_names, 2, "toxic") == pytest.approx(1.0)
        fault = Fault(1, 1.2, 2.0, "latency", {"all-links": True}, NEMESES["latency"][1])
        log = FaultLog(tmp_path / "run" / "faults.jsonl")
        await play(net, Schedule("centred", 5, (fault,)), log, lambda msg: None)
        log.close()
        start, end = [json.loads(l) for l in (tmp_path / "run" / "faults.jsonl").read_text().splitlines()]
        assert start["phase"] == "start" and end["phase"] == "end"
        assert start["targets"]["calls"] == 2 * made
        for phase in (start, end):
            # Begun about 0.5 s early (a loaded machine wakes late, never early), done soon after.
            assert 250 <= phase["early_ms"] <= 520 and phase["late_ms"] < 1000, phase
            assert phase["took_ms"] >= phase["early_ms"] + phase["late_ms"] - 20, phase
        assert not any(p["toxics"] for p in (await net.api.proxies()).values())
    (tmp_path / "run" / "schedule.json").write_text(json.dumps({"faults": [{"id": 1, "kind": "latency"}]}))
    assert fault_record(tmp_path / "run")["valid"] is True
    with (tmp_path / "run" / "faults.jsonl").open("a") as f:
        f.write(json.dumps({**start, "fault": 2, "early_ms": 1500}) + "\n" + json.dumps({**end, "fault": 2}) + "\n")
    rec = fault_record(tmp_path / "run", tolerance_ms=1000)
    assert rec["valid"] == "unknown" and any("beginning 1.50 s early" in w for w in rec["why"]), rec
