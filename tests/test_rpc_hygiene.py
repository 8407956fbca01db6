"""Connection hygiene of swarmnet servers: idle and slow-frame timeouts,
stalled readers, per-source and total connection caps (real loopback sockets)."""

from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from testnet.base.protocol import HEADER, Connection, Request, RequestError, Response, Status
from testnet.base.rpc import ConnectionGate, ConnectionLimits, connect, open_rpc, serve

TOO_MANY_FROM_SOURCE = "too many connections from this address"


async def handler(req, peer):
    if req.op == "echo":
        return 200, {"args": req.args, "remote": peer.remote[0]}
    if req.op == "sleep":
        await trio.sleep(req.args["s"])
        return 200, "slept"
    if req.op == "auth":  # stands in for nodes/auth.py's node_auth
        peer.session["node"] = "x"
        return 200, {"node": "x"}
    if req.op == "big":
        return 200, b"\x00" * req.args["n"]
    raise RequestError(404, f"unknown op {req.op}")


@asynccontextmanager
async def server(*, gate=None, listeners=1, **limits):
    gate = gate or ConnectionGate(ConnectionLimits(**limits))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve, handler, [("127.0.0.1", 0)] * listeners, gate=gate))
        try:
            yield (bound[0] if listeners == 1 else bound), gate
        finally:
            nursery.cancel_scope.cancel()


async def read_until_closed(stream):
    """Every response the server sends until it closes; EOF or a reset both count as closed."""
    conn = Connection()
    events = []
    try:
        while True:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            events.extend(conn.events())
            if not data:
                break
    except trio.BrokenResourceError:  # closed with our bytes unread: a reset
        pass
    return events


async def call(stream, conn, msg_id, op, args=None):
    """One request on a raw stream; its response."""
    await stream.send_all(conn.send(Request(msg_id, op, args or {})))
    while True:
        for ev in conn.events():
            return ev
        data = await stream.receive_some(65536)
        assert data, "server closed the connection"
        conn.receive_data(data)


async def wait_stats(gate, predicate):
    while not predicate(gate.statistics()):
        await trio.sleep(0.01)


async def test_idle_connection_closed_and_active_one_kept():
    with trio.fail_after(3):
        async with server(idle_timeout_s=0.5, frame_timeout_s=0.5) as ((host, port), gate):
            idle = await connect(host, port)
            t0 = trio.current_time()
            async with open_rpc(host, port) as active:

                async def closes():
                    assert await read_until_closed(idle) == []
                    closed_after.append(trio.current_time() - t0)

                closed_after = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(closes)
                    for i in range(3):  # 0.6 s of a request every 0.2 s: longer than the idle timeout
                        assert (await active.call("echo", {"i": i}, timeout=1)).ok
                        await trio.sleep(0.2)
                assert 0.45 <= closed_after[0] <= 0.8
                assert (await active.call("echo", {}, timeout=1)).ok and not active.closed
                stats = gate.statistics()
                assert stats.closed_idle == 1 and stats.open == 1
            await idle.aclose()


async def test_partial_frame_closed_after_frame_timeout_even_while_trickling():
    # The idle timeout is long: only the frame deadline can close these.
    with trio.fail_after(3):
        async with server(idle_timeout_s=10, frame_timeout_s=0.5) as ((host, port), gate):
            silent, trickling = await connect(host, port), await connect(host, port)
            frame = Connection().send(Request(1, "echo", {"pad": b"p" * 100}))
            t0 = trio.current_time()
            await silent.send_all(frame[:20])
            await trickling.send_all(frame[:20])
            took = {}

            async def trickle():
                # One byte every 0.1 s: bytes keep coming, the frame never completes in time.
                for i in range(20, 60):
                    await trio.sleep(0.1)
                    try:
                        await trickling.send_all(frame[i:i + 1])
                    except trio.BrokenResourceError:
                        return

            async def closes(name, stream):
                assert await read_until_closed(stream) == []
                took[name] = trio.current_time() - t0

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                nursery.start_soon(closes, "silent", silent)
                nursery.start_soon(closes, "trickling", trickling)
            assert 0.45 <= took["silent"] <= 0.9 and 0.45 <= took["trickling"] <= 0.9, took
            assert gate.statistics().closed_slow_frame == 2
            assert gate.statistics().closed_idle == 0


async def test_frame_deadline_restarts_for_each_frame():
    # Two frames, each in two halves 0.2 s apart, the second begun in the
    # same write that ends the first: 0.4 s in all, more than the 0.3 s frame
    # deadline, but no single frame takes that long.
    with trio.fail_after(3):
        async with server(idle_timeout_s=10, frame_timeout_s=0.3) as ((host, port), gate):
            stream, conn = await connect(host, port), Connection()
            first, second = (conn.send(Request(i + 1, "echo", {"i": i})) for i in range(2))
            await stream.send_all(first[:5])
            await trio.sleep(0.2)
            await stream.send_all(first[5:] + second[:5])
            await trio.sleep(0.2)
            await stream.send_all(second[5:])
            got = []
            while len(got) < 2:
                data = await stream.receive_some(65536)
                assert data
                conn.receive_data(data)
                got.extend(conn.events())
            assert [r.status for r in got] == [200, 200]
            assert gate.statistics().closed_slow_frame == 0
            await stream.aclose()


async def test_slow_handler_is_not_an_idle_peer():
    with trio.fail_after(3):
        async with server(idle_timeout_s=0.3, frame_timeout_s=0.3) as ((host, port), gate):
            stream, conn = await connect(host, port), Connection()
            t0 = trio.current_time()
            resp = await call(stream, conn, 7, "sleep", {"s": 0.6})  # twice the idle timeout
            assert resp == Response(7, 200, "slept")
            answered = trio.current_time()
            assert answered - t0 >= 0.6
            # Idle starts when the last request is done, and then it does fire.
            assert await read_until_closed(stream) == []
            assert 0.25 <= trio.current_time() - answered <= 0.6
            assert gate.statistics().closed_idle == 1


async def test_peer_that_stops_reading_is_closed():
    with trio.fail_after(3):
        async with server(send_timeout_s=0.2) as ((host, port), gate):
            stream, conn = await connect(host, port), Connection()
            # 64 answers of 512 KiB (32 MiB) never read: far beyond the socket buffers.
            await stream.send_all(b"".join(conn.send(Request(i + 1, "big", {"n": 1 << 19})) for i in range(64)))
            await wait_stats(gate, lambda s: s.open == 0)
            stats = gate.statistics()
            assert stats.closed_slow_send == 1 and stats.closed_idle == 0
            await stream.aclose()


async def test_per_source_cap_refuses_extras_and_serves_other_sources():
    with trio.fail_after(3):
        async with server(max_per_source=8, idle_timeout_s=10) as ((host, port), gate):
            held = []
            for i in range(8):
                s, c = await connect(host, port, local_host="127.0.0.77"), Connection()
                assert (await call(s, c, 1, "echo", {"i": i})).status == 200
                held.append(s)
            for _ in range(2):
                extra = await connect(host, port, local_host="127.0.0.77")
                (refusal,) = await read_until_closed(extra)  # then EOF, without a request
                assert refusal == Response(0, Status.RATE_LIMITED, {"error": TOO_MANY_FROM_SOURCE})
                await extra.aclose()
            # Another address is still served meanwhile.
            async with open_rpc(host, port, local_host="127.0.0.78") as other:
                assert (await other.call_ok("echo", {}, timeout=1))["remote"] == "127.0.0.78"
            stats = gate.statistics()
            assert stats.refused_per_source == 2 and stats.refused_total == 0
            # A slot given back is a slot for the next connection.
            await held.pop().aclose()
            await wait_stats(gate, lambda s: s.open == 7)
            s, c = await connect(host, port, local_host="127.0.0.77"), Connection()
            assert (await call(s, c, 1, "echo", {})).status == 200
            held.append(s)
            for s in held:
                await s.aclose()


async def test_authenticated_connections_stop_counting_against_their_source():
    with trio.fail_after(3):
        async with server(max_per_source=4, idle_timeout_s=10) as ((host, port), gate):
            held = []
            for _ in range(4):  # service nodes, all from one address (as through Toxiproxy)
                s, c = await connect(host, port, local_host="127.0.0.77"), Connection()
                assert (await call(s, c, 1, "auth")).status == 200
                held.append(s)
            assert gate.statistics().authenticated == 4
            for _ in range(4):  # strangers from the same address still get their 4
                s, c = await connect(host, port, local_host="127.0.0.77"), Connection()
                assert (await call(s, c, 1, "echo")).status == 200
                held.append(s)
            extra = await connect(host, port, local_host="127.0.0.77")
            (refusal,) = await read_until_closed(extra)
            assert refusal.status == Status.RATE_LIMITED and refusal.id == 0
            stats = gate.statistics()
            assert (stats.open, stats.unauthenticated, stats.sources) == (8, 4, 1)
            for s in held + [extra]:
                await s.aclose()
            await wait_stats(gate, lambda s: s.open == 0)
            assert gate.statistics().unauthenticated == 0 and gate.statistics().sources == 0


async def test_total_cap_and_per_source_cap_shared_by_listeners_and_serve_calls():
    gate = ConnectionGate(ConnectionLimits(max_per_source=2, max_connections=3, idle_timeout_s=10))
    with trio.fail_after(3):
        async with server(gate=gate, listeners=2) as ((a, b), _), server(gate=gate) as (c, _):
            held = []
            for (host, port), src in ((a, "127.0.0.77"), (b, "127.0.0.77")):
                s, conn = await connect(host, port, local_host=src), Connection()
                assert (await call(s, conn, 1, "echo")).status == 200
                held.append(s)
            # Third from .77, on the other serve call: the source's cap is shared.
            s = await connect(*c, local_host="127.0.0.77")
            (refusal,) = await read_until_closed(s)
            assert refusal.body == {"error": TOO_MANY_FROM_SOURCE}
            await s.aclose()
            s, conn = await connect(*c, local_host="127.0.0.78"), Connection()
            assert (await call(s, conn, 1, "echo")).status == 200
            held.append(s)
            # Fourth in all: the total cap, whatever the source.
            s = await connect(*a, local_host="127.0.0.79")
            (refusal,) = await read_until_closed(s)
            assert refusal == Response(0, Status.RATE_LIMITED, {"error": "too many connections"})
            await s.aclose()
            stats = gate.statistics()
            assert (stats.refused_per_source, stats.refused_total, stats.open) == (1, 1, 3)
            for s in held:
                await s.aclose()


def test_limits_are_checked():
    assert ConnectionLimits() == ConnectionLimits(60.0, 30.0, 30.0, 256, 10_000)
    for bad in ({"idle_timeout_s": 0}, {"frame_timeout_s": -1}, {"max_per_source": 0},
                {"max_connections": 1.5}):
        with pytest.raises(ValueError):
            ConnectionLimits(**bad)
    with pytest.raises(ValueError):
        trio.run(partial(serve, handler, [], limits=ConnectionLimits(max_per_source=1),
                         gate=ConnectionGate()))


def test_connection_reports_bytes_of_an_unfinished_frame():
    conn = Connection()
    frame = conn.send(Request(1, "echo", {}))
    conn.receive_data(frame + frame[:3])
    assert conn.buffered == len(frame) + 3
    assert isinstance(conn.next_event(), Request) and conn.buffered == 3
    assert HEADER.size > 3  # not even a whole header yet: still a frame under way
