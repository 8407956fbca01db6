"""The trio edge: a real loopback server, persistent multiplexed clients."""

import trio
import pytest

from testnet.base.protocol import HEADER, Connection, RequestError, Response, Status
from testnet.base.rpc import (
    ConnectError, ConnectionPool, RpcTimeout, StatusError, connect, open_rpc, serve,
)


async def handler(req, peer):
    if req.op == "echo":
        return 200, {"args": req.args, "remote": peer.remote[0]}
    if req.op == "sleep":
        await trio.sleep(req.args["s"])
        return 200, req.args["tag"]
    if req.op == "fail":
        raise RequestError(421, "wrong swarm", {"nodes": []})
    if req.op == "crash":
        raise RuntimeError("boom")
    raise RequestError(404, f"unknown op {req.op}")


class Recorder:
    def __init__(self):
        self.chunks = []

    def record(self, conn_id, direction, local, remote, data):
        self.chunks.append((direction, remote[0], data))


async def start(nursery, **kw):
    (addr,) = await nursery.start(lambda task_status: serve(handler, [("127.0.0.1", 0)], task_status=task_status, **kw))
    return addr


async def test_many_calls_in_flight_answered_out_of_order():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery)
        async with open_rpc(host, port) as rpc:
            results = {}

            async def one(i):
                results[i] = (await rpc.call("sleep", {"s": (5 - i) * 0.01, "tag": i}, timeout=5)).body

            async with trio.open_nursery() as inner:
                for i in range(5):
                    inner.start_soon(one, i)
            assert results == {i: i for i in range(5)}
            assert (await rpc.call("fail", {}, timeout=5)).status == 421
            assert (await rpc.call("crash", {}, timeout=5)).status == 500
            with pytest.raises(StatusError) as info:
                await rpc.call_ok("nope", {}, timeout=5)
            assert info.value.status == 404
            # The connection survived every error above.
            assert (await rpc.call_ok("echo", {"a": 1}, timeout=5))["args"] == {"a": 1}
        nursery.cancel_scope.cancel()


async def test_client_binds_its_own_loopback_address_and_capture_sees_it():
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, capture=rec)
        async with open_rpc(host, port, local_host="127.0.0.77") as rpc:
            body = await rpc.call_ok("echo", {"x": b"\x01\x02"}, timeout=5)
        assert body["remote"] == "127.0.0.77"
        assert any(d == "in" and ip == "127.0.0.77" and b"\x01\x02" in data for d, ip, data in rec.chunks)
        nursery.cancel_scope.cancel()


async def test_timeout_and_connect_error():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery)
        async with open_rpc(host, port) as rpc:
            with pytest.raises(RpcTimeout):
                await rpc.call("sleep", {"s": 10, "tag": 0}, timeout=0.05)
            assert (await rpc.call("echo", {}, timeout=5)).ok
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectError):
        # Nothing listens on the port we just closed.
        await connect(host, port, timeout=2)


async def test_garbage_and_oversized_frames_get_error_frames_and_others_unaffected():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, max_frame_size=1000)
        async with open_rpc(host, port) as good:
            # A malformed body: answered with 400, connection goes on.
            bad = await connect(host, port)
            await bad.send_all(HEADER.pack(3) + b"\xc1\xc1\xc1")
            await bad.send_all(Connection().send(__import__("testnet.base.protocol").base.protocol.Request(5, "echo", {})))
            conn = Connection()
            events = []
            with trio.fail_after(5):
                while len(events) < 2:
                    conn.receive_data(await bad.receive_some(4096))
                    events.extend(conn.events())
            assert events[0].status == 400 and events[1] == Response(5, 200, events[1].body)
            # An oversized announced length: error frame, then the server closes.
            await bad.send_all(HEADER.pack(10_000))
            with trio.fail_after(5):
                while True:
                    data = await bad.receive_some(4096)
                    conn.receive_data(data)
                    if not data:
                        break
            (err,) = conn.events()
            assert err.status == Status.TOO_LARGE
            await bad.aclose()
            assert (await good.call("echo", {}, timeout=5)).ok
        nursery.cancel_scope.cancel()


async def test_pool_reuses_one_connection_and_redials_after_loss():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery)
        dials = []

        def resolve(key):
            dials.append(key)
            return host, port, None

        pool = ConnectionPool(nursery, resolve)
        for _ in range(20):
            assert (await pool.call("peer", "echo", {}, timeout=5)).ok
        assert dials == ["peer"] and len(pool) == 1
        await pool.drop("peer")
        assert (await pool.call("peer", "echo", {}, timeout=5)).ok
        assert dials == ["peer", "peer"]
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_servers_refuse_non_loopback_addresses():
    with pytest.raises(ValueError):
        await serve(handler, [("0.0.0.0", 0)])


async def test_pool_replaces_a_connection_idle_long_enough_for_the_server_to_be_closing_it():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery)
        pool = ConnectionPool(nursery, lambda key: (host, port, None), idle_s=0.3)
        first = await pool.get("k")
        assert (await pool.call("k", "echo", {"n": 1}, timeout=5)).status == 200
        assert await pool.get("k") is first  # just used: kept
        await trio.sleep(0.4)
        second = await pool.get("k")
        assert second is not first and first.closed and not second.closed
        assert (await pool.call("k", "echo", {"n": 2}, timeout=5)).body["args"] == {"n": 2}
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_pool_asks_on_a_refused_dial_whether_to_dial_again():
    async with trio.open_nursery() as nursery:
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
        probe.close()  # nothing listens there now: a dial is refused
        asked = []

        async def make_it_listen(key, timeout):
            asked.append(key)
            if key == "lazy":
                await nursery.start(lambda task_status: serve(handler, [("127.0.0.1", free_port)],
                                                              task_status=task_status))
                return True
            return False

        pool = ConnectionPool(nursery, lambda key: ("127.0.0.1", free_port, None), on_refused=make_it_listen)
        with pytest.raises(ConnectError) as refused:
            await pool.call("other", "echo", {}, timeout=5)
        assert refused.value.refused and asked == ["other"]
        assert (await pool.call("lazy", "echo", {}, timeout=5)).ok  # made to listen, dialled again
        assert (await pool.call("lazy", "echo", {}, timeout=5)).ok and asked == ["other", "lazy"]
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_frames_of_one_loop_turn_leave_in_one_write_each_way():
    from testnet.base import meter

    rec = Recorder()
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, capture=rec)
        async with open_rpc(host, port) as rpc:
            await rpc.call("echo", {}, timeout=5)  # the connection is up
            rec.chunks.clear()
            before = meter.snapshot()
            results = []

            async def one(i):
                results.append((await rpc.call("echo", {"i": i}, timeout=5)).body["args"]["i"])

            async with trio.open_nursery() as calls:  # eight callers, all in one turn
                for i in range(8):
                    calls.start_soon(one, i)
            after = meter.snapshot()
        nursery.cancel_scope.cancel()
    assert sorted(results) == list(range(8))
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("frames_out", "frames_in", "send_calls")}
    # Eight requests in one write; the server reads them in one go and answers them all
    # in its next turn, in one write too: 16 frames, 2 writes (both ends are this process).
    assert d == {"frames_out": 16, "frames_in": 16, "send_calls": 2}
    # The capture sees the bytes as they moved: the eight answers in one chunk.
    (out,) = [c[2] for c in rec.chunks if c[0] == "out"]
    conn = Connection()
    conn.receive_data(out)
    assert sorted(r.body["args"]["i"] for r in conn.events()) == list(range(8))


async def test_a_fast_path_answers_later_without_a_task_and_its_errors_are_answers():
    from testnet.base import meter

    later = []

    def take(req, peer, reply):
        if req.op == "later":  # answered from a callback, as a group commit or a next hop does
            later.append(reply)
            return None
        if req.op == "refuse":
            raise RequestError(403, "no")
        if req.op == "bug":
            raise RuntimeError("boom")
        return handler(req, peer)  # anything else: a task running the handler

    async with trio.open_nursery() as nursery:
        (host, port), = await nursery.start(
            lambda task_status: serve(handler, [("127.0.0.1", 0)], take=take, task_status=task_status))
        async with open_rpc(host, port) as rpc:
            assert (await rpc.call("echo", {"a": 1}, timeout=5)).body["args"] == {"a": 1}
            assert (await rpc.call("refuse", {}, timeout=5)) == Response(2, 403, {"error": "no"})
            assert (await rpc.call("bug", {}, timeout=5)).status == 500
            meter.install()
            try:
                before = meter.snapshot()
                async with trio.open_nursery() as inner:
                    got = []

                    async def ask():
                        got.append(await rpc.call("later", {}, timeout=5))

                    inner.start_soon(ask)
                    while not later:
                        await trio.sleep(0.01)
                    spawned = meter.snapshot().get("tasks_started", 0) - before.get("tasks_started", 0)
                    later.pop()(200, "done")
                assert got[0].body == "done"
                assert spawned == 1  # the caller's own task; none on the server for the request
            finally:
                meter.uninstall()
        nursery.cancel_scope.cancel()


async def test_call_soon_runs_its_callback_with_the_response_or_a_timeout():
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery)
        async with open_rpc(host, port) as rpc:
            outcomes = []
            done = trio.Event()

            def answered(resp, error):
                outcomes.append(resp.body["args"] if resp else type(error).__name__)
                if len(outcomes) == 3:
                    done.set()

            t0 = trio.current_time()
            rpc.call_soon("sleep", {"s": 1.0, "tag": 0}, timeout=0.2, done=answered)  # times out
            rpc.call_soon("echo", {"n": 1}, timeout=5, done=answered)
            rpc.call_soon("sleep", {"s": 0.4, "tag": 0}, timeout=0.3, done=answered)  # later, still out of time
            with trio.fail_after(3):
                await done.wait()
            assert outcomes == [{"n": 1}, "RpcTimeout", "RpcTimeout"]
            assert 0.3 <= trio.current_time() - t0 < 0.9
            # The connection is fine after its timeouts.
            assert (await rpc.call_ok("echo", {}, timeout=5))["args"] == {}
        nursery.cancel_scope.cancel()


async def test_turn_end_runs_after_the_turns_tasks_and_timers_skip_cancelled_ones():
    from testnet.base.turn import Timers, at_turn_end

    seen = []

    async def task(i):
        seen.append(f"task{i}")
        if i == 0:
            at_turn_end(lambda: seen.append("end"))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(task, i)
    assert sorted(seen[:3]) == ["task0", "task1", "task2"] and seen[3:] == ["end"]

    # A callback that wakes a task while the loop was about to sleep must not leave it asleep.
    woken = trio.Event()
    with trio.fail_after(1):
        at_turn_end(woken.set)
        await woken.wait()

    timers, fired = Timers(), []
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        t0 = trio.current_time()
        a = timers.call_after(0.2, lambda: fired.append(("a", trio.current_time() - t0)))
        timers.call_after(0.3, lambda: fired.append(("b", trio.current_time() - t0)))
        timers.call_after(0.1, lambda: fired.append(("c", trio.current_time() - t0)))  # out of order: kept in order
        a.cancel()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [n for n, _ in fired] == ["c", "b"]
    assert 0.1 <= fired[0][1] < 0.2 and 0.3 <= fired[1][1] < 0.45
