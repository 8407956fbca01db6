"""Toxiproxy, simulated: the same proxies and toxics, on the simulated network.

:class:`SimToxiproxy` answers the calls the harness makes of
:class:`testnet.links.ToxiproxyApi` (``populate``, ``set_enabled``,
``add_toxic``, ``remove_toxic``, ``delete_proxy``, ``reset``, ``proxies``),
so the plan's link table, the nodes' dial tables and every nemesis work
unchanged.  Each proxy listens at its planned address and forwards each
connection to its upstream through a chain of toxics, per direction
(``upstream`` = caller to node, ``downstream`` = back), with Toxiproxy
2.12's semantics as far as they matter here:

* latency — each chunk leaves ``latency`` ± ``jitter`` ms after it arrived
  (chunks stay in order; a slow chunk delays the ones behind it);
* bandwidth — ``rate`` KB/s;
* slicer — chunks cut to ``average_size`` ± ``size_variation`` bytes,
  ``delay`` µs apart;
* timeout — data is dropped; with ``timeout`` > 0 the connection closes after
  that many ms; removing the toxic closes the connections it held;
* reset_peer — the connection is reset after ``timeout`` ms;
* slow_close — a close is passed on ``delay`` ms late;
* limit_data — the connection closes after ``bytes`` bytes;
* ``toxicity`` — whether a toxic acts is decided once per connection;
* a disabled proxy closes its connections and refuses new ones.

A hop's own time (the wire model's, ``wire.py``) is taken on the connection
into the proxy, both ways, with the figures measured through a real proxy;
the proxy's connection to its upstream adds none.  Toxics add on top.

Random draws (jitter, toxicity, slice sizes) come from the ``random.Random``
given, in a fixed order, so a seed replays them.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import trio

from testnet.links import TOXIC_TYPES, BatchError, CallFailure, LinkError, ProxyGone

from .network import SimListener, SimNetwork, SimStream

RECEIVE_SIZE = 65536
FAULT_CALLS_AT_ONCE = 32  # a fault's calls in flight (a heal's: all)


@dataclass
class Toxic:
    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, Any]


@dataclass
class _Conn:
    client: SimStream
    server: SimStream
    active: set[str] = field(default_factory=set)  # toxics acting on this connection
    sent: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    closed: bool = False


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class SimProxy:
    def __init__(self, owner: SimToxiproxy, name: str, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.owner = owner
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = True
        self.toxics: dict[str, Toxic] = {}
        self.conns: list[_Conn] = []
        self._listener: SimListener | None = None
        self._scope: trio.CancelScope | None = None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        (self._listener,) = await self.owner.net.open_tcp_listeners(self.listen[1], host=self.listen[0])
        self._listener.proxied = True
        self.owner.nursery.start_soon(self._accept_loop, self._listener)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        for c in list(self.conns):
            await self._close(c)

    async def _accept_loop(self, listener: SimListener) -> None:
        with trio.CancelScope() as self._scope:
            while True:
                try:
                    client = await listener.accept()
                except trio.ClosedResourceError:
                    return
                self.owner.nursery.start_soon(self._serve, client)

    async def _serve(self, client: SimStream) -> None:
        try:
            server = await self.owner.net.open_tcp_stream(*self.upstream, local_address="127.0.0.1", timed=False)
        except OSError:
            client.reset()  # Toxiproxy closes the client when the upstream refuses
            return
        conn = _Conn(client, server)
        for t in self.toxics.values():
            self._decide(conn, t)
        self.conns.append(conn)
        with conn.scope:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._pump, conn, "upstream", client, server)
                nursery.start_soon(self._pump, conn, "downstream", server, client)
                for t in self.toxics.values():
                    if t.name in conn.active:
                        self._arm(nursery, conn, t)
        await self._close(conn)

    async def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.scope.cancel()
        if conn in self.conns:
            self.conns.remove(conn)
        await conn.client.aclose()
        await conn.server.aclose()

    # ------------------------------------------------------------------ toxics

    def _decide(self, conn: _Conn, t: Toxic) -> None:
        if t.toxicity >= 1.0 or self.owner.rng.random() < t.toxicity:
            conn.active.add(t.name)

    def _arm(self, nursery: trio.Nursery, conn: _Conn, t: Toxic) -> None:
        """Toxics that act on their own clock rather than on data."""
        if t.type == "reset_peer":
            nursery.start_soon(self._after, int(t.attributes.get("timeout", 0)), conn, "reset")
        elif t.type == "timeout" and int(t.attributes.get("timeout", 0)) > 0:
            nursery.start_soon(self._after, int(t.attributes["timeout"]), conn, "close")

    async def _after(self, ms: int, conn: _Conn, what: str) -> None:
        await trio.sleep(ms / 1000)
        if what == "reset":
            conn.client.reset()
            conn.server.reset()
        conn.scope.cancel()

    def chain(self, conn: _Conn, stream: str) -> list[Toxic]:
        return [t for t in self.toxics.values() if t.stream == stream and t.name in conn.active]

    async def _pump(self, conn: _Conn, stream: str, src: SimStream, dst: SimStream) -> None:
        """Read ``src`` and write ``dst`` through this direction's toxics; chunks keep their order."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](1 << 30)
        queued = [0]  # chunks handed to the writer and not yet through

        def forward(data: bytes) -> bool:
            # Bytes written to src while nothing of this direction is buffered or queued and
            # no toxic acts on it: passed on at once, as the reader below would a turn later.
            if queued[0] or conn.closed or self.chain(conn, stream):
                return False
            try:
                if not dst.send_nowait(data):
                    return False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.scope.cancel()
                return True  # a write into a closed link is lost, as the reader's would be
            conn.sent[stream] += len(data)
            return True

        async def reader() -> None:
            src._in.forward = forward
            try:
                while True:
                    data = await src.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    if not queued[0] and not self.chain(conn, stream):
                        # No toxic and nothing ahead of this chunk: pass it on at once.
                        await self._send(dst, [data], None, conn, stream)
                        continue
                    queued[0] += 1
                    send.send_nowait((trio.current_time(), data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                src._in.forward = None
            queued[0] += 1
            send.send_nowait((trio.current_time(), b""))

        async def writer() -> None:
            async for arrived, data in receive:
                await self._through(conn, stream, dst, arrived, data)
                queued[0] -= 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)

    async def _through(self, conn: _Conn, stream: str, dst: SimStream, arrived: float, data: bytes) -> None:
        """One chunk (``b""``: the end of the stream) through this direction's toxics."""
        if not data:
            for t in self.chain(conn, stream):
                if t.type == "slow_close":
                    await trio.sleep(int(t.attributes.get("delay", 0)) / 1000)
            conn.scope.cancel()  # either side closing ends the link, as in Toxiproxy
            return
        pieces = [data]
        for t in self.chain(conn, stream):
            a = t.attributes
            if t.type == "timeout":
                pieces = []  # dropped while the toxic is there
            elif t.type == "latency":
                jitter = int(a.get("jitter", 0))
                delay = int(a.get("latency", 0)) + (self.owner.rng.randint(-jitter, jitter) if jitter else 0)
                await trio.sleep_until(arrived + max(delay, 0) / 1000)
            elif t.type == "bandwidth":
                rate = max(int(a.get("rate", 0)), 1)  # KB/s
                await trio.sleep(sum(map(len, pieces)) / (rate * 1000))
            elif t.type == "slicer":
                pieces = self._slice(pieces, a)
            elif t.type == "limit_data":
                room = max(int(a.get("bytes", 0)) - conn.sent[stream], 0)
                joined = b"".join(pieces)
                if len(joined) >= room:
                    await self._send(dst, [joined[:room]] if room else [], None, conn, stream)
                    conn.scope.cancel()
                    return
        await self._send(dst, pieces, self._slicer_delay(conn, stream), conn, stream)

    def _slice(self, pieces: list[bytes], a: dict[str, Any]) -> list[bytes]:
        avg, var = max(int(a.get("average_size", 64)), 1), int(a.get("size_variation", 0))
        out = []
        for p in pieces:
            i = 0
            while i < len(p):
                n = max(1, avg + (self.owner.rng.randint(-var, var) if var else 0))
                out.append(p[i:i + n])
                i += n
        return out

    def _slicer_delay(self, conn: _Conn, stream: str) -> float | None:
        for t in self.chain(conn, stream):
            if t.type == "slicer":
                return int(t.attributes.get("delay", 0)) / 1e6
        return None

    async def _send(self, dst: SimStream, pieces: list[bytes], gap_s: float | None, conn: _Conn, stream: str) -> None:
        try:
            for k, p in enumerate(pieces):
                if k and gap_s:
                    await trio.sleep(gap_s)
                await dst.send_all(p)
                conn.sent[stream] += len(p)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.scope.cancel()

    # ------------------------------------------------------------------ API

    def add_toxic(self, t: Toxic) -> None:
        if t.name in self.toxics:
            raise LinkError(f"toxic {t.name} already exists on {self.name}")
        self.toxics[t.name] = t
        for conn in list(self.conns):
            self._decide(conn, t)
            if t.name in conn.active and conn.nursery is not None:
                self._arm(conn.nursery, conn, t)

    async def remove_toxic(self, name: str) -> None:
        t = self.toxics.pop(name, None)
        if t is None:
            raise ProxyGone(f"no toxic {name} on proxy {self.name}")
        if t.type == "timeout":
            # Toxiproxy: a connection that was timing out is closed when the toxic goes.
            for conn in [c for c in self.conns if name in c.active]:
                await self._close(conn)
        for conn in self.conns:
            conn.active.discard(name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "listen": f"{self.listen[0]}:{self.listen[1]}",
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}", "enabled": self.enabled,
                "toxics": [{"name": t.name, "type": t.type, "stream": t.stream, "toxicity": t.toxicity,
                            "attributes": dict(t.attributes)} for t in self.toxics.values()]}


@dataclass
class SimLinkFault:
    """What a fault did to the simulated links, in the order it did it (its heal goes the same way)."""

    cut: bool
    done: list[Any] = field(default_factory=list)  # links cut, or (link, toxic name) pairs

    @property
    def links(self) -> int:
        return len(self.done) if self.cut else len({name for name, _ in self.done})


class SimToxiproxy:
    """The simulated server; its proxies' tasks live in ``nursery``."""

    url = "sim://toxiproxy"

    def __init__(self, net: SimNetwork, nursery: trio.Nursery, rng: random.Random) -> None:
        self.net = net
        self.nursery = nursery
        self.rng = rng
        self._proxies: dict[str, SimProxy] = {}
        self._toxic_ids = itertools.count(1)

    def _proxy(self, name: str) -> SimProxy:
        try:
            return self._proxies[name]
        except KeyError:
            raise ProxyGone(f"no proxy {name}") from None

    async def version(self) -> str:
        return "sim"

    async def proxies(self) -> dict[str, dict[str, Any]]:
        return {name: p.describe() for name, p in self._proxies.items()}

    async def populate(self, proxies: list[dict[str, Any]]) -> None:
        for spec in proxies:
            name, listen, upstream = spec["name"], _addr(spec["listen"]), _addr(spec["upstream"])
            old = self._proxies.get(name)
            if old is not None:
                if (old.listen, old.upstream) == (listen, upstream):
                    continue
                await old.stop()
            proxy = SimProxy(self, name, listen, upstream)
            self._proxies[name] = proxy
            await proxy.start()

    async def delete_proxy(self, name: str) -> None:
        proxy = self._proxy(name)
        del self._proxies[name]
        await proxy.stop()

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        p = self._proxy(proxy)
        if enabled and not p.enabled:
            p.enabled = True
            await p.start()
        elif not enabled and p.enabled:
            p.enabled = False
            await p.stop()
        await trio.lowlevel.checkpoint()

    async def add_toxic(self, proxy: str, type: str, attributes: dict[str, Any], *, stream: str = "downstream",
                        toxicity: float = 1.0, name: str | None = None) -> str:
        if type not in TOXIC_TYPES:
            raise LinkError(f"unknown toxic type {type!r}; known: {', '.join(TOXIC_TYPES)}")
        name = name or f"{type}_{stream}_{next(self._toxic_ids)}"
        self._proxy(proxy).add_toxic(Toxic(name, type, stream, float(toxicity), dict(attributes)))
        await trio.lowlevel.checkpoint()
        return name

    async def remove_toxic(self, proxy: str, name: str) -> None:
        await self._proxy(proxy).remove_toxic(name)

    # ------------------------------------------------------------------ many links at once
    #
    # What testnet.proxies.ProxyTable does in bulk, done here one call per link and toxic (a
    # simulated call costs nothing): a fault's calls at most 32 at a time, a heal's all at once,
    # in the order and with the tasks the nemeses used before they had bulk calls, so a seed
    # replays as it did.  Failed calls are gathered into one BatchError, raised once every
    # call has been made.

    async def fault_links(self, names: list[str], *, cut: bool = False,
                          toxics: Any = (), toxicity: float = 1.0) -> SimLinkFault:
        applied = SimLinkFault(cut)

        async def disable(name: str) -> None:
            await self.set_enabled(name, False)
            applied.done.append(name)

        async def add(name: str, type: str, attributes: dict[str, Any], stream: str) -> None:
            applied.done.append((name, await self.add_toxic(name, type, attributes, stream=stream,
                                                           toxicity=toxicity)))

        if cut:
            await self._each(disable, [(name,) for name in names], applied, heal=False)
        else:
            await self._each(add, [(name, *toxic) for name in names for toxic in toxics], applied, heal=False)
        return applied

    async def heal_links(self, applied: SimLinkFault) -> None:
        async def enable(name: str) -> None:
            await self.set_enabled(name, True)

        if applied.cut:
            await self._each(enable, [(name,) for name in applied.done], applied, heal=True)
        else:
            await self._each(self.remove_toxic, list(applied.done), applied, heal=True)

    async def _each(self, fn: Any, argss: list[tuple], applied: SimLinkFault, *, heal: bool) -> None:
        failures: list[CallFailure] = []
        sem = trio.Semaphore(FAULT_CALLS_AT_ONCE)

        async def call(args: tuple) -> None:
            try:
                await fn(*args)
            except ProxyGone:
                return  # the link went with its node
            except LinkError as exc:
                failures.append(CallFailure(self.url, exc.call or fn.__name__, args[0], exc.status, str(exc)))

        async def bounded(args: tuple) -> None:
            async with sem:
                await call(args)

        async with trio.open_nursery() as nursery:
            for args in argss:
                nursery.start_soon(call if heal else bounded, args)
        if failures:
            raise BatchError(failures, len(argss), applied)

    async def reset(self) -> None:
        for p in self._proxies.values():
            for name in list(p.toxics):
                await p.remove_toxic(name)
            if not p.enabled:
                p.enabled = True
                await p.start()
