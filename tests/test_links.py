"""Link faults through a real Toxiproxy server: one link slowed or cut, the
others untouched, and every fault healed on exit."""

from __future__ import annotations

import functools
import secrets
import socket
import time

import psutil
import pytest
import trio

from testnet import links
from testnet.links import LinkError, ToxiproxyApi, check_bindable, open_toxiproxy
from testnet.plan import TOXIPROXY_PORT, candidate_blocks


def _have_toxiproxy() -> bool:
    try:
        links.find_toxiproxy()
    except links.ToxiproxyMissing:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_toxiproxy(), reason="Toxiproxy not installed (make toxiproxy)")


def _free_block() -> tuple[int, int]:
    for a, b in candidate_blocks(secrets.token_hex(4)):
        try:
            check_bindable([(f"127.{a}.{b}.3", TOXIPROXY_PORT), (f"127.{a}.{b}.10", 30001)])
            return a, b
        except LinkError:
            continue
    raise RuntimeError("no free loopback block")


async def _echo_server(host: str, nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=host))
    return listeners[0].socket.getsockname()[1]


async def _round_trip_ms(host: str, port: int) -> float:
    """Connect, send one line, read it back: the elapsed wall time in ms."""
    start = time.monotonic()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"ping\n")
            got = b""
            while len(got) < 5:
                data = await stream.receive_some(64)
                if not data:
                    raise ConnectionError("closed")
                got += data
    return (time.monotonic() - start) * 1000


@pytest.fixture
async def toxi(tmp_path):
    a, b = _free_block()
    async with trio.open_nursery() as nursery:
        port1 = await _echo_server(f"127.{a}.{b}.21", nursery)
        port2 = await _echo_server(f"127.{a}.{b}.22", nursery)
        async with open_toxiproxy(f"127.{a}.{b}.3", TOXIPROXY_PORT, log=tmp_path / "toxiproxy.log") as api:
            await api.populate([
                {"name": "x->y", "listen": f"127.{a}.{b}.10:30001", "upstream": f"127.{a}.{b}.21:{port1}"},
                {"name": "x->z", "listen": f"127.{a}.{b}.10:30002", "upstream": f"127.{a}.{b}.22:{port2}"},
            ])
            yield api, (f"127.{a}.{b}.10", 30001), (f"127.{a}.{b}.10", 30002)
        nursery.cancel_scope.cancel()


async def test_latency_delays_only_its_link_and_heals(toxi):
    api, xy, xz = toxi
    assert await _round_trip_ms(*xy) < 150
    async with links.latency(api, "x->y", 400) as name:
        assert name in {t["name"] for t in (await api.proxies())["x->y"]["toxics"]}
        slow = await _round_trip_ms(*xy)
        other = await _round_trip_ms(*xz)
        assert slow >= 380, slow
        assert other < 150, other
    assert (await api.proxies())["x->y"]["toxics"] == []
    assert await _round_trip_ms(*xy) < 150


async def test_disabled_link_is_cut_then_restored(toxi):
    api, xy, xz = toxi
    async with links.link_down(api, "x->y"):
        with pytest.raises(OSError):
            await _round_trip_ms(*xy)
        assert await _round_trip_ms(*xz) < 150
    assert await _round_trip_ms(*xy) < 150


async def test_fault_heals_even_when_the_block_fails(toxi):
    api, xy, _ = toxi
    with pytest.raises(RuntimeError):
        async with links.links_down(api, ["x->y", "x->z"]):
            raise RuntimeError("scenario failed mid-fault")
    proxies = await api.proxies()
    assert proxies["x->y"]["enabled"] and proxies["x->z"]["enabled"]
    with pytest.raises(LinkError):
        await api.add_toxic("x->y", "no-such-toxic", {})
    with pytest.raises(links.ProxyGone, match="not found"):
        await api.set_enabled("nope", False)


@pytest.fixture
async def table(tmp_path):
    """A ProxyTable over one real Toxiproxy server: links ``x->y0`` .. ``x->y19`` to one echo
    server, ``x->late`` whose destination has not listened yet; nothing made."""
    a, b = _free_block()
    async with trio.open_nursery() as nursery:
        port = await _echo_server(f"127.{a}.{b}.21", nursery)
        async with open_toxiproxy(f"127.{a}.{b}.3", TOXIPROXY_PORT, log=tmp_path / "toxiproxy.log") as api:
            def spec(name: str) -> dict[str, str]:
                if name == "x->late":
                    raise LinkError("late has not listened yet")
                if not (name.startswith("x->y") and 0 <= int(name[4:]) < 20):
                    raise links.ProxyGone(f"no link {name}")
                return {"name": name, "listen": f"127.{a}.{b}.10:{30001 + int(name[4:])}",
                        "upstream": f"127.{a}.{b}.21:{port}"}

            table = links.ProxyTable(links.ToxiproxyServers([api], lambda name: 0), spec, nursery)
            yield table, api, (lambda i: (f"127.{a}.{b}.10", 30001 + i))
        nursery.cancel_scope.cancel()


async def test_a_link_is_made_on_first_use_and_only_once(table):
    t, api, addr = table
    assert await api.proxies() == {}
    with pytest.raises(OSError):
        await _round_trip_ms(*addr(0))  # no proxy, nothing listens
    populates = 0
    real_populate = api.populate

    async def counting(items):
        nonlocal populates
        populates += 1
        await real_populate(items)

    api.populate = counting
    async with trio.open_nursery() as nursery:  # asked for at about the same time: one request
        for i in range(20):
            nursery.start_soon(t.open, f"x->y{i}")
    assert populates == 1 and len(await api.proxies()) == 20 and len(t.made) == 20
    await t.open("x->y0")
    assert populates == 1
    assert await _round_trip_ms(*addr(0)) < 150
    with pytest.raises(links.ProxyGone):
        await t.open("x->nowhere")
    with pytest.raises(LinkError, match="not listened yet"):
        await t.open("x->late")


async def test_faults_on_a_link_not_made_yet_hold_from_its_first_byte(table):
    t, api, addr = table
    await t.set_enabled("x->y1", False)
    toxic = await t.add_toxic("x->y2", "latency", {"latency": 400, "jitter": 0})
    await t.set_enabled("x->late", False)  # planned, not makeable yet: recorded all the same
    assert await api.proxies() == {} and t.wanted("x->y1") == {"enabled": False, "toxics": []}
    with pytest.raises(links.ProxyGone):
        await t.set_enabled("x->nowhere", False)
    await t.open("x->y1")
    await t.open("x->y2")
    proxies = await api.proxies()
    assert not proxies["x->y1"]["enabled"] and [x["name"] for x in proxies["x->y2"]["toxics"]] == [toxic]
    with pytest.raises(OSError):
        await _round_trip_ms(*addr(1))  # made cut: refused like any cut link
    assert await _round_trip_ms(*addr(2)) >= 380
    # Healing a made link reaches Toxiproxy; the record goes with the fault.
    await t.set_enabled("x->y1", True)
    await t.remove_toxic("x->y2", toxic)
    assert await _round_trip_ms(*addr(1)) < 150 and await _round_trip_ms(*addr(2)) < 150
    assert t.wanted("x->y1") is None and t.wanted("x->y2") is None
    # Healed before it was ever made: made plain.
    await t.set_enabled("x->y3", False)
    await t.set_enabled("x->y3", True)
    await t.open("x->y3")
    assert (await api.proxies())["x->y3"]["enabled"] and t.wanted("x->y3") is None
    # The nemesis' own context managers work on the table as on a server.
    async with links.link_down(t, "x->y4"):
        await t.open("x->y4")
        with pytest.raises(OSError):
            await _round_trip_ms(*addr(4))
    assert await _round_trip_ms(*addr(4)) < 150
    await t.delete_proxy("x->y4")
    assert "x->y4" not in await api.proxies() and "x->y4" not in t.made


async def test_server_stops_with_its_block(tmp_path):
    a, b = _free_block()
    async with open_toxiproxy(f"127.{a}.{b}.3", TOXIPROXY_PORT, log=tmp_path / "t.log") as api:
        assert await api.version()
        pids = [p.pid for p in psutil.Process().children() if p.name().startswith("toxiproxy")]
        assert len(pids) == 1
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    check_bindable([(f"127.{a}.{b}.3", TOXIPROXY_PORT)])  # the port is free again
    with pytest.raises(LinkError, match="unreachable"):
        await ToxiproxyApi(f"127.{a}.{b}.3", TOXIPROXY_PORT, timeout_s=1).version()


def test_missing_binary_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(links, "PROJECT_BIN", tmp_path / "nope")
    monkeypatch.delenv("SWARMNET_TOXIPROXY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(links.ToxiproxyMissing, match="make toxiproxy.*--links direct"):
        links.find_toxiproxy()


def test_a_large_plan_gets_enough_toxiproxy_servers_for_the_descriptors_each_may_hold():
    from testnet.links import PROXY_FD_RESERVE, LinkError, proxies_needed, servers_needed

    assert proxies_needed(200, 3) == 200 * 199 + 600
    assert servers_needed(30, 3, 20_000) == 1
    assert servers_needed(100, 3, 20_000) == 2  # 10,200 listeners: more than half of 20,000 - reserve
    for nodes in (100, 200, 300, 508):
        k = servers_needed(nodes, 3, 20_000)
        # Each server's share of listeners leaves half of what it may hold for connections.
        assert proxies_needed(nodes, 3) / k <= (20_000 - PROXY_FD_RESERVE) / 2
        assert k == 1 or proxies_needed(nodes, 3) / (k - 1) > (20_000 - PROXY_FD_RESERVE) / 2
    # A limit too low for any sensible number of servers is refused, saying why.
    with pytest.raises(LinkError, match=r"40,400 proxies.*1,500 open files.*more than 64 Toxiproxy servers"):
        servers_needed(200, 3, 1_500)
    with pytest.raises(LinkError):
        servers_needed(5, 3, 1_000)  # not even the reserve


def test_processes_we_start_inherit_the_hard_limit_on_open_files():
    import resource
    import subprocess
    import sys

    from testnet.procs import raise_open_files_limit

    soft, hard = raise_open_files_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
    child = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
                           capture_output=True, text=True, timeout=30)
    assert int(child.stdout) == soft


async def test_batches_sharing_links_do_not_wait_for_each_other_forever(table):
    """A bulk populate and links asked for meanwhile, in another order, all get made."""
    t, api, addr = table
    names = [f"x->y{i}" for i in range(20)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(t.populate, [{"name": n} for n in names])
            for n in reversed(names):
                nursery.start_soon(t.open, n)
            nursery.start_soon(t.populate, [{"name": n} for n in reversed(names)])
    assert set(await api.proxies()) == set(names) == t.made


async def test_a_fault_on_many_links_is_recorded_once_and_made_proxies_get_bulk_calls(table):
    t, api, addr = table
    await t.populate([{"name": f"x->y{i}"} for i in range(10)])  # y0..y9 made, y10..y19 not yet
    names = [f"x->y{i}" for i in range(20)]
    slow = await t.fault_links(names, toxics=[("latency", {"latency": 300, "jitter": 0}, "upstream")])
    cut_a = await t.fault_links(["x->y0", "x->y1", "x->y15"], cut=True)
    cut_b = await t.fault_links(["x->y1", "x->y16"], cut=True)
    assert slow.links == 20 and t.wanted("x->y15") == {"enabled": False, "toxics": sorted(slow.toxics)}
    proxies = await api.proxies()
    assert sorted(proxies) == names[:10] and all(len(proxies[n]["toxics"]) == 1 for n in names[:10])
    assert [proxies[n]["enabled"] for n in ("x->y0", "x->y1", "x->y2")] == [False, False, True]
    await t.open("x->y12")  # made during the fault: slow from its first byte
    assert await _round_trip_ms(*addr(12)) >= 280
    await t.open("x->y16")
    with pytest.raises(OSError):
        await _round_trip_ms(*addr(16))
    # Overlapping cuts heal one at a time: y1 stays cut while cut_b holds it.
    await t.heal_links(cut_a)
    proxies = await api.proxies()
    assert proxies["x->y0"]["enabled"] and not proxies["x->y1"]["enabled"]
    await t.heal_links(cut_b)
    await t.heal_links(slow)
    await t.heal_links(slow)  # healing twice does nothing
    proxies = await api.proxies()
    assert t.faulted() == {} and all(p["enabled"] and not p["toxics"] for p in proxies.values())
    assert await _round_trip_ms(*addr(12)) < 150
    # A server that refuses its calls: every failed call named, how many of how many; the
    # fault is held (what was asked stays recorded) so that its heal can try again.
    port, api.port = api.port, _closed_port(api.host)
    with pytest.raises(links.BatchError) as info:
        await t.fault_links(names, cut=True)
    failed = info.value
    assert len(failed.failures) == failed.calls == 12 and failed.done.links == 20
    assert {f.reason for f in failed.failures} == {"cannot connect (refused)"}
    assert str(failed).startswith(f"12 of 12 Toxiproxy calls failed: {api.host}:{api.port} cannot connect (refused)")
    api.port = port
    await t.heal_links(failed.done)
    assert all(p["enabled"] for p in (await api.proxies()).values()) and t.faulted() == {}


async def test_a_link_held_by_a_fault_on_many_links_waits_for_its_calls(table):
    """Two faults on many links and a single-link fault at once, sharing links: the second
    gets the shared links' calls once the first is done with them, and every call is made."""
    t, api, addr = table
    names = [f"x->y{i}" for i in range(20)]
    await t.populate([{"name": n} for n in names])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                t.fault_links, names, toxics=[("latency", {"latency": 300, "jitter": 0}, "upstream")]))
            nursery.start_soon(functools.partial(t.fault_links, names[:5], cut=True))
            nursery.start_soon(t.set_enabled, "x->y7", False)
    proxies = await api.proxies()
    assert all(len(proxies[n]["toxics"]) == 1 for n in names)
    assert [proxies[f"x->y{i}"]["enabled"] for i in range(9)] == [False] * 5 + [True, True, False, True]
    assert not t._bulk and not t._locks  # nothing left held


def _closed_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
