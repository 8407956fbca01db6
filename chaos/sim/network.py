"""An in-memory loopback network on trio's clock, for the deterministic simulation.

:class:`SimNetwork` offers what :mod:`testnet.base.rpc` asks of a network —
``open_tcp_listeners(port, host=)`` and ``open_tcp_stream(host, port,
local_address=)`` — and hands out :class:`SimStream` objects that behave like
TCP streams: bytes arrive in order, a close is seen as end of stream after
the data before it, a reset breaks the other side at once, connecting to an
address nobody listens on is refused.  Delivery takes the time the run's wire
model says (``wire.py``: a seeded delay per route and chunk, kept in order per
connection; none with the ``instant`` profile); faults' delays, bandwidth and
loss come on top from the simulated Toxiproxy (``toxiproxy.py``), exactly where
the real harness puts them.

Every choice is deterministic: ports are handed out in order per host, and
waking a reader is a plain trio event, so with a seeded scheduler the same
program gives the same interleaving.

A *paused* host (SIGSTOP in real runs) neither reads, writes nor accepts
until it resumes; its peers' bytes wait in the buffers, as in the kernel's.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

import trio

from .wire import Wire

Address = tuple[str, int]

FIRST_PORT = 20_000


class _SimSocket:
    """What :mod:`testnet.base.rpc` reads of a socket: its two addresses."""

    __slots__ = ("_local", "_remote")

    def __init__(self, local: Address, remote: Address) -> None:
        self._local, self._remote = local, remote

    def getsockname(self) -> Address:
        return self._local

    def getpeername(self) -> Address:
        return self._remote


class _Pipe:
    """One direction of a connection: a byte buffer, end of stream, or broken.

    ``forward``, when set by whoever reads this pipe (a simulated proxy), is offered the
    bytes that arrive while the buffer is empty, and returns True if it passed them on
    itself: a proxy without toxics then costs no task step per chunk.

    With a ``wire``, what is written (:meth:`put`, :meth:`shut`) arrives (:meth:`arrive`)
    after the route's delay; without one, at once.  ``shut`` is the writer's end of
    stream, ``eof`` the reader's (it arrives after the data before it).
    """

    __slots__ = ("buf", "eof", "shut_", "broken", "lot", "forward", "wire", "base_s", "last_at")

    def __init__(self, wire: Wire | None = None, base_s: float = 0.0) -> None:
        self.buf = bytearray()
        self.eof = False
        self.shut_ = False
        self.broken = False
        self.lot = trio.lowlevel.ParkingLot()  # the reader waiting for bytes
        self.forward: Callable[[bytes], bool] | None = None
        self.wire = wire
        self.base_s = base_s
        self.last_at = 0.0  # when the latest chunk in flight arrives (virtual s)

    def put(self, data: bytes | bytearray | memoryview) -> None:
        if self.wire is not None:
            self.wire.send(self, bytes(data))
        else:
            self.arrive(data)

    def shut(self) -> None:
        """The writer's end of stream (once)."""
        if self.shut_:
            return
        self.shut_ = True
        if self.wire is not None:
            self.wire.send(self, None)
        else:
            self.arrive(None)

    def arrive(self, data: bytes | bytearray | memoryview | None) -> None:
        """Bytes (``None``: end of stream) reach the reader's side; lost if the pipe broke
        while they were in flight (a reset overtakes what is on the wire)."""
        if self.broken:
            return
        if data is None:
            self.eof = True
        elif self.forward is not None and not self.buf and self.forward(bytes(data)):
            return
        else:
            self.buf += data
        self.notify()

    def notify(self) -> None:
        if self.lot:
            self.lot.unpark_all()


class SimStream(trio.abc.HalfCloseableStream):
    """One end of a simulated TCP connection."""

    def __init__(self, net: SimNetwork, local: Address, remote: Address, inbound: _Pipe, outbound: _Pipe) -> None:
        self._net = net
        self.socket = _SimSocket(local, remote)
        self._in, self._out = inbound, outbound
        self._closed = False
        self._peer: SimStream | None = None

    @property
    def host(self) -> str:
        return self.socket.getsockname()[0]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._net._paused:
            await self._net.wait_running(self.host)
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
        if self._out.broken or self._out.shut_:
            raise trio.BrokenResourceError("connection reset by peer")
        # Buffering never blocks: honour a cancellation, but do not give up the turn
        # (a yield per write was a measurable share of a simulated run).
        await trio.lowlevel.checkpoint_if_cancelled()
        if data:
            self._out.put(data)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Buffer ``data`` at once, as a socket's write the kernel takes whole (the transport's
        end-of-turn write, testnet.base.rpc_wire.Outbox); False, with nothing taken, while this
        host is paused (then :meth:`send_all` waits).  Raises as :meth:`send_all` does."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._net._paused and self.host in self._net._paused:
            return False
        if self._out.broken or self._out.shut_:
            raise trio.BrokenResourceError("connection reset by peer")
        if data:
            self._out.put(data)
        return True

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self._out.shut()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._net._paused:
            await self._net.wait_running(self.host)
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if self._in.broken:
                raise trio.BrokenResourceError("connection reset by peer")
            if self._in.buf:
                n = len(self._in.buf) if max_bytes is None else min(max_bytes, len(self._in.buf))
                data = bytes(self._in.buf[:n])
                del self._in.buf[:n]
                await trio.lowlevel.checkpoint_if_cancelled()
                return data
            if self._in.eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._in.lot.park()
            if self._net._paused:
                await self._net.wait_running(self.host)

    def reset(self) -> None:
        """Break the connection both ways now (a TCP reset): buffered data is lost."""
        for p in (self._in, self._out):
            p.broken = True
            p.buf.clear()
            p.notify()
        self._closed = True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.shut()
            # Bytes the peer still sends are refused (a write to a closed socket is reset).
            self._in.buf.clear()
            self._in.broken = True
            self._in.notify()  # wake a reader of ours blocked on this stream
        await trio.lowlevel.checkpoint()


class SimListener(trio.abc.Listener[SimStream]):
    def __init__(self, net: SimNetwork, address: Address) -> None:
        self._net = net
        self.address = address
        self.proxied = False  # a simulated Toxiproxy proxy's: its routes take the proxied figures
        self.socket = _SimSocket(address, ("0.0.0.0", 0))
        self._send, self._receive = trio.open_memory_channel[SimStream](1 << 30)
        self._closed = False

    def deliver(self, stream: SimStream) -> None:
        self._send.send_nowait(stream)

    async def accept(self) -> SimStream:
        if self._closed:
            raise trio.ClosedResourceError("listener closed")
        await self._net.wait_running(self.address[0])
        try:
            stream = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None
        await self._net.wait_running(self.address[0])
        return stream

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._net._unlisten(self)
            # Connections not yet accepted are refused, as the kernel does.
            while True:
                try:
                    s = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                s.reset()
            await self._send.aclose()
        await trio.lowlevel.checkpoint()


class SimNetwork:
    """Loopback addresses and ports in memory; see the module docstring."""

    def __init__(self, wire: Wire | None = None) -> None:
        self._listeners: dict[Address, SimListener] = {}
        self._next_port: dict[str, int] = {}
        self._paused: dict[str, trio.Event] = {}
        self.connections = 0
        # Delays on every connection (wire.py), once attached to the run (attach_wire).
        self.wire = wire if wire is not None and not wire.model.instant else None

    # ------------------------------------------------------------------ the seam rpc uses

    async def open_tcp_listeners(self, port: int, *, host: str, backlog: int | None = None) -> list[SimListener]:
        await trio.lowlevel.checkpoint()
        if not host.startswith("127."):
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {host}: not a loopback address")
        if port == 0:
            port = self._free_port(host)
        addr = (host, port)
        if addr in self._listeners:
            raise OSError(errno.EADDRINUSE, f"address {host}:{port} already in use")
        listener = SimListener(self, addr)
        self._listeners[addr] = listener
        return [listener]

    async def open_tcp_stream(self, host: str, port: int, *, local_address: str | None = None,
                              timed: bool = True) -> SimStream:
        """A connection to (host, port); ``timed=False`` (a simulated proxy to its upstream):
        no delay of its own, the hop's time having been taken on the way into the proxy."""
        await trio.lowlevel.checkpoint()
        listener = self._listeners.get((host, port))
        if listener is None:
            raise OSError(errno.ECONNREFUSED, f"connection to {host}:{port} refused")
        local = (local_address or "127.0.0.1", self._free_port(local_address or "127.0.0.1"))
        wire = self.wire if timed else None
        if wire is None:
            a_to_b, b_to_a = _Pipe(), _Pipe()
        else:
            # A proxy's route is its link (one listen address per directed link); a direct
            # one is the pair of hosts.
            route = f"{local[0]}>{host}:{port}" if listener.proxied else f"{local[0]}>{host}"
            base = wire.model.base_s(route, proxied=listener.proxied)
            a_to_b, b_to_a = _Pipe(wire, base), _Pipe(wire, base)
        client = SimStream(self, local, (host, port), inbound=b_to_a, outbound=a_to_b)
        server = SimStream(self, (host, port), local, inbound=a_to_b, outbound=b_to_a)
        client._peer, server._peer = server, client
        listener.deliver(server)
        self.connections += 1
        return client

    def attach_wire(self) -> None:
        """Start delivering what is on the wire (once, from inside the run; nothing to do
        when delivery is instant)."""
        if self.wire is not None:
            self.wire.attach()

    # ------------------------------------------------------------------ processes

    def pause(self, host: str) -> None:
        self._paused.setdefault(host, trio.Event())

    def resume(self, host: str) -> None:
        ev = self._paused.pop(host, None)
        if ev is not None:
            ev.set()

    def paused(self, host: str) -> bool:
        return host in self._paused

    async def wait_running(self, host: str) -> None:
        ev = self._paused.get(host)
        if ev is not None:
            await ev.wait()

    def listening(self, address: Address) -> bool:
        return address in self._listeners

    # ------------------------------------------------------------------ internals

    def _free_port(self, host: str) -> int:
        port = self._next_port.get(host, FIRST_PORT)
        while (host, port) in self._listeners:
            port += 1
        self._next_port[host] = port + 1
        return port

    def _unlisten(self, listener: SimListener) -> None:
        if self._listeners.get(listener.address) is listener:
            del self._listeners[listener.address]

    def statistics(self) -> dict[str, Any]:
        return {"listeners": len(self._listeners), "connections": self.connections, "paused": sorted(self._paused),
                "wire": self.wire.statistics() if self.wire is not None else {"profile": "instant"}}
