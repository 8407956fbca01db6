"""The simulated network and Toxiproxy (chaos/sim): TCP-like streams and
Toxiproxy's toxics on virtual time (MockClock with autojump: no real waiting)."""

import random

import pytest
import trio

from chaos.sim.network import SimNetwork
from chaos.sim.toxiproxy import SimToxiproxy
from testnet.links import ProxyGone

async def echo_server(net, host, port, *, task_status=trio.TASK_STATUS_IGNORED):
    (listener,) = await net.open_tcp_listeners(port, host=host)
    task_status.started(listener.address)

    async def one(stream):
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(1000)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                try:
                    await stream.send_all(data)
                except trio.BrokenResourceError:
                    return

    await trio.serve_listeners(one, [listener])


async def roundtrip(stream, data=b"ping"):
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(1000)
        if not chunk:
            break
        got += chunk
    return got


async def test_streams_are_ordered_closable_and_refused_without_a_listener(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(echo_server, net, "127.1.0.1", 0)
        s = await net.open_tcp_stream(*addr, local_address="127.1.0.2")
        assert s.socket.getsockname()[0] == "127.1.0.2" and s.socket.getpeername() == addr
        assert await roundtrip(s, b"abc" * 1000) == b"abc" * 1000
        await s.send_eof()
        assert await s.receive_some(10) == b""
        await s.aclose()
        with pytest.raises(OSError):
            await net.open_tcp_stream("127.1.0.1", addr[1] + 1)
        nursery.cancel_scope.cancel()


async def test_a_paused_host_answers_only_once_resumed(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(echo_server, net, "127.1.0.1", 0)
        s = await net.open_tcp_stream(*addr)
        net.pause("127.1.0.1")
        with trio.move_on_after(5):
            await roundtrip(s)
            pytest.fail("a paused host answered")
        net.resume("127.1.0.1")
        with trio.fail_after(1):  # the bytes sent while paused were kept, then answered
            assert await s.receive_some(100) == b"ping"
            assert await roundtrip(s, b"pong") == b"pong"
        nursery.cancel_scope.cancel()


async def proxied(net, nursery, seed=1):
    up = await nursery.start(echo_server, net, "127.1.0.1", 0)
    api = SimToxiproxy(net, nursery, random.Random(seed))
    await api.populate([{"name": "a_to_b", "listen": "127.1.0.9:7000", "upstream": f"{up[0]}:{up[1]}"}])
    return api


async def test_latency_and_bandwidth_toxics_take_virtual_time(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        api = await proxied(net, nursery)
        s = await net.open_tcp_stream("127.1.0.9", 7000)
        t0 = trio.current_time()
        assert await roundtrip(s) == b"ping"
        assert trio.current_time() - t0 < 0.001
        name = await api.add_toxic("a_to_b", "latency", {"latency": 100, "jitter": 0}, stream="upstream")
        await api.add_toxic("a_to_b", "latency", {"latency": 50, "jitter": 0}, stream="downstream")
        t0 = trio.current_time()
        assert await roundtrip(s) == b"ping"
        assert 0.15 <= trio.current_time() - t0 < 0.16
        await api.remove_toxic("a_to_b", name)
        await api.add_toxic("a_to_b", "bandwidth", {"rate": 10}, stream="upstream")  # 10 KB/s
        t0 = trio.current_time()
        assert await roundtrip(s, b"x" * 5000) == b"x" * 5000
        assert 0.5 <= trio.current_time() - t0 < 0.6
        nursery.cancel_scope.cancel()


async def test_timeout_drops_then_closes_and_a_disabled_proxy_refuses(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        api = await proxied(net, nursery)
        s = await net.open_tcp_stream("127.1.0.9", 7000)
        assert await roundtrip(s) == b"ping"
        name = await api.add_toxic("a_to_b", "timeout", {"timeout": 0}, stream="upstream")
        with trio.move_on_after(10):
            await roundtrip(s)
            pytest.fail("data passed a blackhole")
        await api.remove_toxic("a_to_b", name)
        with trio.fail_after(1):  # removing the toxic closed the connection
            assert await s.receive_some(10) == b""
        s = await net.open_tcp_stream("127.1.0.9", 7000)
        assert await roundtrip(s) == b"ping"
        await api.set_enabled("a_to_b", False)
        with trio.fail_after(1):
            assert await s.receive_some(10) == b""
        with pytest.raises(OSError):
            await net.open_tcp_stream("127.1.0.9", 7000)
        await api.set_enabled("a_to_b", True)
        s = await net.open_tcp_stream("127.1.0.9", 7000)
        assert await roundtrip(s) == b"ping"
        with pytest.raises(ProxyGone):
            await api.set_enabled("nope", False)
        nursery.cancel_scope.cancel()


async def test_reset_peer_breaks_connections_and_slicer_keeps_the_bytes(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        api = await proxied(net, nursery)
        s = await net.open_tcp_stream("127.1.0.9", 7000)
        await api.add_toxic("a_to_b", "slicer", {"average_size": 10, "size_variation": 5, "delay": 1000},
                            stream="downstream")
        assert await roundtrip(s, bytes(range(256)) * 4) == bytes(range(256)) * 4
        await api.add_toxic("a_to_b", "reset_peer", {"timeout": 200}, stream="upstream")
        t0 = trio.current_time()
        with trio.fail_after(1):
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await s.receive_some(10)
        assert abs(trio.current_time() - t0 - 0.2) < 0.01
        nursery.cancel_scope.cancel()


async def test_the_wire_takes_each_route_its_time_keeps_order_and_ends_after_the_data(autojump_clock):
    from chaos.sim.wire import LOOPBACK, Wire, model_for

    wire = Wire(model_for("loopback", 7, random.Random(7)))
    net = SimNetwork(wire)
    net.attach_wire()
    async with trio.open_nursery() as nursery:
        await proxied(net, nursery)  # an echo server at 127.1.0.1 behind a proxy at 127.1.0.9:7000
        addr = next(a for a in net._listeners if a[0] == "127.1.0.1")
        direct = await net.open_tcp_stream(*addr, local_address="127.1.0.2")
        via = await net.open_tcp_stream("127.1.0.9", 7000, local_address="127.1.0.2")
        for s, (lo, _) in ((direct, LOOPBACK.direct_ms), (via, LOOPBACK.proxied_ms)):
            t0 = trio.current_time()
            assert await roundtrip(s) == b"ping"
            assert 2 * lo / 1000 <= trio.current_time() - t0 < 0.05  # two legs of the route, and jitter
        chunks = [b"%d," % i for i in range(300)]
        for c in chunks:
            await via.send_all(c)
        await via.send_eof()  # the echo server closes after it: the end comes after every chunk
        got = b""
        while chunk := await via.receive_some(100_000):
            got += chunk
        assert got == b"".join(chunks)
        assert wire.statistics()["jumps"] > 0 and wire.statistics()["in_flight"] == 0
        nursery.cancel_scope.cancel()
