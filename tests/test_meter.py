"""The CPU accounting the throughput benchmark relies on: the CPU-time sampler,
the process counters and the role each task's CPU is charged to."""

import os
import signal
import time

import trio

from clients.bench_ledger import read_roles
from testnet.base import meter
from testnet.base.cpuprofile import CpuSampler, arm_on_signals
from testnet.base.rpc import open_rpc, serve


def _burn(seconds: float) -> int:
    t0, n = time.process_time(), 0
    while time.process_time() - t0 < seconds:
        n += sum(i * i for i in range(200))
    return n


def _idle(seconds: float) -> None:
    time.sleep(seconds)


def test_sampler_weights_sum_to_the_cpu_used_and_name_where_it_went():
    s = CpuSampler(interval_s=0.002, tag=lambda: "busy")
    t0 = time.process_time()
    s.start()
    _burn(0.4)
    _idle(0.3)  # no CPU: must not be sampled (a wall-clock profiler would charge it)
    s.stop()
    used = time.process_time() - t0
    assert 0.8 * used <= s.total_s <= used + 0.01
    lines = s.collapsed()
    burn = sum(int(l.rpartition(" ")[2]) for l in lines if "test_meter.py:_burn" in l)
    assert burn / 1e6 >= 0.8 * s.total_s
    assert not any("_idle" in l for l in lines)
    assert all(l.startswith("role:busy;") for l in lines)


def test_a_sampler_armed_on_signals_profiles_only_between_them(tmp_path):
    path = tmp_path / "p.collapsed"
    old = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)
    try:
        arm_on_signals(path, interval_s=0.002, tag=lambda: "x")
        _burn(0.1)  # before the start signal: not counted
        os.kill(os.getpid(), signal.SIGUSR1)
        _burn(0.3)
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR1, old[0])
        signal.signal(signal.SIGUSR2, old[1])
    total = sum(int(l.rpartition(" ")[2]) for l in path.read_text().splitlines())
    assert 0.2e6 <= total <= 0.35e6


def test_read_roles_sums_each_nodes_file_by_its_outer_frame(tmp_path):
    (tmp_path / "n01.collapsed").write_text("role:guard;a;b 1500\nrole:relay;a 500\n")
    (tmp_path / "n02.collapsed").write_text("role:guard;c 1000\nno_role 7\n")
    assert read_roles(tmp_path, ["n01", "n02", "n03"]) == {"guard": 0.0025, "relay": 0.0005, "unknown": 7e-06}


async def test_counts_frames_socket_calls_tasks_and_the_role_of_each_request():
    roles = []

    async def handler(req, peer):
        roles.append(meter.ROLE.get())  # the transport's reader names its tasks "transport"
        meter.ROLE.set("echo")
        return 200, req.args

    meter.install()  # loop wake-ups and tasks are counted only while installed
    async with trio.open_nursery() as nursery:
        (addr,) = await nursery.start(lambda task_status: serve(handler, [("127.0.0.1", 0)],
                                                                task_status=task_status))
        async with open_rpc(*addr) as rpc:
            await rpc.call("echo", {"x": 1}, timeout=5)  # warm: the connection is up
            before = meter.snapshot()
            for i in range(3):
                assert (await rpc.call("echo", {"x": i}, timeout=5)).body == {"x": i}
            after = meter.snapshot()
        nursery.cancel_scope.cancel()
    meter.uninstall()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # Both ends are in this process: each call is one request and one response, each
    # written once and read once.
    assert d["frames_out"] == 6 and d["frames_in"] == 6
    assert d["send_calls"] == 6 and d["recv_calls"] >= 6
    assert d["tasks_started"] >= 3  # one handler task per request
    assert d["loop_wakeups"] >= 6
    assert roles == ["transport"] * 4


def test_capture_records_are_the_msgpack_arrays_the_readers_expect(tmp_path):
    import msgpack

    from nodes.capture import CaptureFile, read_capture

    ticks = iter(range(1_900_000_000_000, 1_900_000_000_010))
    cap = CaptureFile(str(tmp_path / "c.bin"), now_ms=lambda: next(ticks))
    records = [(7, "in", ("127.0.0.1", 5000), ("127.0.0.2", 40000), b"x" * 300),
               (7, "out", ("127.0.0.1", 5000), ("127.0.0.2", 40000), b""),
               (7, "in", ("127.0.0.1", 5000), ("127.0.0.2", 40000), b"y" * 70000),
               (2**40, "out", ("127.1.2.3", 1), ("127.3.2.1", 65535), b"z")]
    for r in records:
        cap.record(*r)
    cap.close()
    raw = (tmp_path / "c.bin").read_bytes()
    expect = b"".join(msgpack.packb([t, c, d, list(l), list(rm), data], use_bin_type=True)
                      for t, (c, d, l, rm, data) in zip(range(1_900_000_000_000, 2_000_000_000_000), records))
    assert raw == expect
    assert [r[5] for r in read_capture(str(tmp_path / "c.bin"))] == [r[4] for r in records]
