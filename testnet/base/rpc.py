"""The trio edge of the wire protocol: servers, persistent multiplexed client
connections and a pool of them.

Only bytes and time move here; framing and validation live in
:mod:`testnet.base.protocol`.  Every wait has a deadline and every task belongs to
a nursery the caller owns.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable, Protocol

import trio

from .meter import COUNTS, ROLE
from .limits import AUTHENTICATED_SESSION_KEY, ConnectionGate, ConnectionLimits
from .net import TCP, Network, may_listen_on
from .protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    BadFrame,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    RequestError,
    Response,
    Status,
    error_frame,
    NEED_DATA,
    EOF,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds
DEFAULT_MAX_IN_FLIGHT = 256  # requests per connection before we stop reading
POOL_IDLE_S = 30.0  # a pooled connection idle this long is replaced (servers close theirs at 60 s)


class RpcError(Exception):
    """A call did not produce a response."""


class ConnectError(RpcError):
    """The peer could not be reached (``refused``: nothing listens at its address)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ConnectionLost(RpcError):
    """The connection broke before the response arrived."""


class RpcTimeout(RpcError):
    """No response within the deadline."""


class StatusError(RpcError):
    """The peer answered with a non-200 status (raised by :meth:`RpcConnection.call_ok`)."""

    def __init__(self, response: Response) -> None:
        body = response.body
        reason = body.get("error") if isinstance(body, dict) else None
        super().__init__(f"status {response.status}: {reason or body!r}")
        self.response = response
        self.status = response.status


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of an accepted connection.

    ``session`` is the handler's per-connection state (e.g. which service
    node authenticated on it); it lives and dies with the connection.
    """

    remote: Address
    local: Address
    conn_id: int
    session: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class CaptureSink(Protocol):
    """Receives every chunk of bytes a connection reads or writes.

    The transport calls it below any protocol logic, so what it records is
    what the process really saw on the wire (direction ``"in"``/``"out"``).
    """

    def record(self, conn_id: int, direction: str, local: Address, remote: Address, data: bytes) -> None: ...


Handler = Callable[[Request, Peer], Awaitable[tuple[int, Any]]]

_conn_ids = itertools.count(1)


def _addr(sockaddr: Any) -> Address:
    return (str(sockaddr[0]), int(sockaddr[1]))


def _stream_addresses(stream: trio.SocketStream) -> tuple[Address, Address]:
    return _addr(stream.socket.getsockname()), _addr(stream.socket.getpeername())


# --------------------------------------------------------------------------- wire

MAX_READ_STREAK = 16  # reads in a row that found data at once before the reader yields anyway


class _Wire:
    """Reads and writes of one connection, without a trip through the scheduler when the
    kernel can answer at once.

    trio makes every socket operation a schedule point: a read that finds data, or a
    write the kernel takes whole, still yields to the event loop and resumes a turn
    later (and trio's own read first tries a read that fails when none is waiting).
    Onion stores are chains of small frames, one or two per connection at a time, so
    those yields were a large part of the CPU per store (``swarmnet bench
    throughput``).  For a real socket this reads and writes its descriptor directly
    and waits for readiness only when the kernel says it would block; every
    ``MAX_READ_STREAK`` immediate reads it yields once, so a peer that never stops
    sending cannot starve the rest of the process.  Other streams (the simulated
    network) take trio's path unchanged.
    """

    __slots__ = ("stream", "_socket", "_streak")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._streak = 0

    def _fd(self) -> int:
        # Asked each time: a closed socket's number may already name another one.
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("connection closed")
        return fd

    async def receive(self) -> bytes:
        """The next bytes (``b""`` at end of stream)."""
        if self._socket is None:
            return await self.stream.receive_some(RECEIVE_SIZE)
        if self._streak >= MAX_READ_STREAK:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            fd = self._fd()
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            self._streak += 1
            return data

    def send_now(self, data: bytes) -> bytes | memoryview | None:
        """Write what the kernel takes at once; what is left (``None`` if nothing)."""
        if self._socket is None:
            return data
        try:
            sent = os.write(self._fd(), data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise _stream_error(exc) from exc
        return None if sent == len(data) else memoryview(data)[sent:]

    async def send(self, data: bytes, timeout: float) -> bool:
        """Write all of ``data``; False if the peer took too long to take the rest."""
        rest = self.send_now(data)
        if rest is None:
            return True
        with trio.move_on_after(timeout) as scope:
            await self.stream.send_all(rest)
        return not scope.cancelled_caught


def _stream_error(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("connection closed")
    return trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}")


# --------------------------------------------------------------------------- server

REFUSAL_SEND_TIMEOUT_S = 1.0  # a refusal is one small frame into an empty send buffer


def _gate_for(limits: ConnectionLimits | None, gate: ConnectionGate | None) -> ConnectionGate:
    if gate is None:
        return ConnectionGate(limits)
    if limits is not None and limits != gate.limits:
        raise ValueError("pass either limits or a gate made with them, not both")
    return gate


async def _refuse(stream: trio.SocketStream, reason: str, conn_id: int, local: Address, remote: Address,
                  capture: CaptureSink | None) -> None:
    # Answer without reading: a flood costs us one small write and a close.
    data = error_frame(Status.RATE_LIMITED, reason)
    try:
        if capture is not None:
            capture.record(conn_id, "out", local, remote, data)
        with trio.move_on_after(REFUSAL_SEND_TIMEOUT_S):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def serve_connection(
    stream: trio.SocketStream,
    handler: Handler,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    capture: CaptureSink | None = None,
    limits: ConnectionLimits | None = None,
    gate: ConnectionGate | None = None,
) -> None:
    """Serve requests on one accepted connection until it closes.

    Requests run concurrently (answered in any order); once ``max_in_flight``
    are running we stop reading, which pushes back on the peer.  A handler
    error becomes a 500 for that request only.

    ``gate`` (default: a fresh one with ``limits``, default
    :class:`ConnectionLimits`) admits the connection or answers 429 and
    closes it unread; the connection is closed when it idles, when a frame
    takes too long to arrive, or when the peer stops taking our bytes.
    """
    conn_id = next(_conn_ids)
    ROLE.set("transport")  # reading and framing; each request's handler names its own role
    try:
        gate = _gate_for(limits, gate)
        local, remote = _stream_addresses(stream)
    except OSError:
        await stream.aclose()
        return
    except ValueError:
        await trio.aclose_forcefully(stream)
        raise
    admission, reason = gate.admit(remote[0])
    if admission is None:
        await _refuse(stream, reason, conn_id, local, remote, capture)
        return
    lim = gate.limits
    peer = Peer(remote, local, conn_id)
    conn = Connection(max_frame_size=max_frame_size)
    send_lock = trio.Lock()
    in_flight = trio.Semaphore(max_in_flight)
    conn_scope = trio.CancelScope()  # everything of this connection: cancelled when we close it

    # Strategy: one timer, the deadline of the scope around the reader's wait
    # for bytes; it is recomputed before each wait and moved by the request
    # that leaves the connection idle.  No task per timer.
    running = 0  # requests in flight
    idle_since = trio.current_time()  # last bytes received or last request finished
    frame_deadline: float | None = None  # set while a partial frame is buffered
    # One scope for the whole read loop (not one per read: that was a measurable share
    # of a node's CPU); its deadline is the read deadline while the reader waits for
    # bytes, and infinite while it works on what arrived.
    read_scope = trio.CancelScope()
    reading = False
    closed_by: str | None = None

    def read_deadline() -> float:
        if frame_deadline is not None:
            return frame_deadline
        if running:
            return math.inf  # a slow handler is not an idle peer
        return idle_since + lim.idle_timeout_s

    outbox: list[bytes] = []
    wire = _Wire(stream)

    async def write(data: bytes) -> None:
        nonlocal closed_by
        # Whoever holds the lock sends everything queued so far: under load,
        # many responses leave in one send(2).
        outbox.append(data)
        if send_lock.locked():
            await send_lock.acquire()
        else:
            send_lock.acquire_nowait()  # no schedule point when nobody else is sending
        try:
            if not outbox:
                return
            chunk = b"".join(outbox) if len(outbox) > 1 else outbox[0]
            outbox.clear()
            if capture is not None:
                capture.record(conn_id, "out", local, remote, chunk)
            COUNTS["send_calls"] += 1
            if not await wire.send(chunk, lim.send_timeout_s):
                # The peer stopped reading; a half-sent frame also leaves the
                # stream unusable.  Close the whole connection.
                closed_by = closed_by or "slow_send"
                conn_scope.cancel()
        finally:
            send_lock.release()

    async def answer(req: Request) -> None:
        nonlocal running, idle_since
        try:
            try:
                status, body = await handler(req, peer)
            except RequestError as exc:
                status, body = exc.status, exc.body
            except Exception:
                log.exception("handler for %r failed", req.op)
                status, body = Status.INTERNAL_ERROR, {"error": "internal error"}
            if admission.counted and peer.session.get(AUTHENTICATED_SESSION_KEY):
                # A service node: node links through Toxiproxy all come from
                # 127.0.0.1 and must not share a cap with strangers.
                gate.authenticated(admission)
            try:
                data = conn.send(Response(req.id, status, body))
            except LocalProtocolError as exc:
                data = conn.send(Response(req.id, exc.status, {"error": str(exc)}))
            COUNTS["frames_out"] += 1
            await write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            in_flight.release()
            running -= 1
            if not running:
                idle_since = trio.current_time()
                if reading:
                    read_scope.deadline = read_deadline()

    try:
        with conn_scope:
            async with trio.open_nursery() as nursery:
                with read_scope:
                    while True:
                        reading = True
                        read_scope.deadline = read_deadline()
                        COUNTS["recv_calls"] += 1
                        try:
                            data = await wire.receive()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = None
                        finally:
                            reading = False
                            read_scope.deadline = math.inf
                        if data is None:
                            break
                        if capture is not None and data:
                            capture.record(conn_id, "in", local, remote, data)
                        idle_since = trio.current_time()
                        conn.receive_data(data)
                        framed = False  # did this read complete a frame?
                        try:
                            while True:
                                ev = conn.next_event()
                                if ev is NEED_DATA or ev is EOF:
                                    break
                                framed = True
                                COUNTS["frames_in"] += 1
                                if isinstance(ev, Request):
                                    try:
                                        in_flight.acquire_nowait()  # no schedule point while under the cap
                                    except trio.WouldBlock:
                                        await in_flight.acquire()
                                    running += 1
                                    nursery.start_soon(answer, ev)
                                elif isinstance(ev, BadFrame):
                                    await write(error_frame(ev.status, ev.reason, ev.id or 0))
                                # A response on a server connection answers nothing: drop it.
                        except RemoteProtocolError as exc:
                            # The stream cannot be resynchronised: say why, then close.
                            try:
                                await write(error_frame(exc.status, str(exc)))
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                            break
                        if not data:
                            break
                        if not conn.buffered:
                            frame_deadline = None
                        elif frame_deadline is None or framed:
                            # A new frame is under way.  Started after any
                            # back-pressure wait above: our pause is not its delay.
                            frame_deadline = trio.current_time() + lim.frame_timeout_s
                if read_scope.cancelled_caught:
                    closed_by = "idle" if frame_deadline is None else "slow_frame"
                    conn_scope.cancel()
                # Let in-flight requests finish writing before we close.
    finally:
        gate.release(admission, closed_by)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def serve(
    handler: Handler,
    listen: list[Address],
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    capture: CaptureSink | None = None,
    network: Network = TCP,
    limits: ConnectionLimits | None = None,
    gate: ConnectionGate | None = None,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on every (host, port) given (port 0 picks a free one) and serve forever.

    Reports the bound addresses through ``task_status.started``.  Every
    listener of this call shares ``gate`` (default: a fresh
    ``ConnectionGate(limits)``); a process that calls ``serve`` more than
    once passes the same gate to each call.
    """
    gate = _gate_for(limits, gate)
    listeners: list[trio.SocketListener] = []
    for host, port in listen:
        if not may_listen_on(host):
            raise ValueError(f"swarmnet servers listen on loopback or a private cluster address only, not {host!r}")
        listeners.extend(await network.open_tcp_listeners(port, host=host, backlog=1024))
    bound = [_addr(l.socket.getsockname()) for l in listeners]

    async def one(stream: trio.SocketStream) -> None:
        await serve_connection(
            stream, handler, max_frame_size=max_frame_size, max_in_flight=max_in_flight, capture=capture,
            gate=gate,
        )

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, one, [listener])
        task_status.started(bound)


# --------------------------------------------------------------------------- client


class _Slot:
    __slots__ = ("event", "response", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None
        self.error: RpcError | None = None


class RpcConnection:
    """A persistent client connection with many calls in flight.

    Its reader runs as a task in a nursery the caller owns (:meth:`run`);
    :func:`open_rpc` does that for a single connection.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capture: CaptureSink | None = None,
        name: str = "",
    ) -> None:
        self.stream = stream
        self.name = name
        self._conn = Connection(max_frame_size=max_frame_size)
        self._capture = capture
        self._conn_id = next(_conn_ids)
        try:
            self.local, self.remote = _stream_addresses(stream)
        except OSError:
            self.local, self.remote = ("?", 0), ("?", 0)
        self._ids = itertools.count(1)
        self.last_active = trio.current_time()  # a call started or a response arrived
        self._wire = _Wire(stream)
        self._pending: dict[int, _Slot] = {}
        self._send_lock = trio.Lock()
        self._outbox: list[bytes] = []
        self._closed: RpcError | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def busy(self) -> bool:
        """A call is waiting for its response."""
        return bool(self._pending)

    def _fail_all(self, error: RpcError) -> None:
        if self._closed is None:
            self._closed = error
        for slot in self._pending.values():
            if not slot.event.is_set():
                slot.error = error
                slot.event.set()
        self._pending.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read responses until the connection closes; then fail whatever is pending."""
        task_status.started()
        ROLE.set("transport")
        error: RpcError = ConnectionLost(f"connection to {self.name or self.remote} closed")
        try:
            while True:
                COUNTS["recv_calls"] += 1
                data = await self._wire.receive()
                if self._capture is not None and data:
                    self._capture.record(self._conn_id, "in", self.local, self.remote, data)
                self._conn.receive_data(data)
                while True:
                    ev = self._conn.next_event()
                    if ev is NEED_DATA or ev is EOF:
                        break
                    COUNTS["frames_in"] += 1
                    if isinstance(ev, Response):
                        self.last_active = trio.current_time()
                        slot = self._pending.pop(ev.id, None)
                        if slot is not None:
                            slot.response = ev
                            slot.event.set()
                    # Requests and bad frames from a server are ignored.
                if not data:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except RemoteProtocolError as exc:
            error = ConnectionLost(f"connection to {self.name or self.remote} broke: {exc}")
        finally:
            self._fail_all(error)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def call(self, op: str, args: dict[str, Any], *, timeout: float) -> Response:
        """Send one request and wait for its response (any status)."""
        if self._closed is not None:
            raise self._closed
        msg_id = next(self._ids)
        slot = _Slot()
        self.last_active = trio.current_time()
        data = self._conn.send(Request(msg_id, op, args))
        COUNTS["frames_out"] += 1
        self._pending[msg_id] = slot
        try:
            with trio.move_on_after(timeout) as scope:
                try:
                    self._outbox.append(data)
                    lock = self._send_lock
                    if lock.locked():
                        await lock.acquire()
                    else:
                        lock.acquire_nowait()  # no schedule point when nobody else is sending
                    try:
                        if self._outbox:  # else an earlier holder sent ours too
                            chunk = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
                            self._outbox.clear()
                            if self._capture is not None:
                                self._capture.record(self._conn_id, "out", self.local, self.remote, chunk)
                            COUNTS["send_calls"] += 1
                            rest = self._wire.send_now(chunk)
                            if rest is not None:
                                try:
                                    await self.stream.send_all(rest)
                                except trio.Cancelled:
                                    # Cut off mid-write (our deadline): part of a frame may be on the wire
                                    # and the next request would be misread. This connection is done.
                                    self._fail_all(ConnectionLost(f"send to {self.name or self.remote} interrupted"))
                                    with trio.CancelScope(shield=True):
                                        await trio.aclose_forcefully(self.stream)
                                    raise
                    finally:
                        lock.release()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail_all(ConnectionLost(f"connection to {self.name or self.remote} lost: {exc}"))
                await slot.event.wait()
        finally:
            self._pending.pop(msg_id, None)
        if scope.cancelled_caught:
            raise RpcTimeout(f"{op} to {self.name or self.remote}: no response in {timeout:.3g} s")
        if slot.error is not None:
            raise slot.error
        assert slot.response is not None
        return slot.response

    async def call_ok(self, op: str, args: dict[str, Any], *, timeout: float) -> Any:
        """Like :meth:`call` but returns the body of a 200 and raises :class:`StatusError` otherwise."""
        resp = await self.call(op, args, timeout=timeout)
        if resp.status != Status.OK:
            raise StatusError(resp)
        return resp.body

    async def aclose(self) -> None:
        self._fail_all(ConnectionLost(f"connection to {self.name or self.remote} closed locally"))
        await trio.aclose_forcefully(self.stream)


async def connect(
    host: str,
    port: int,
    *,
    local_host: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    network: Network = TCP,
) -> trio.SocketStream:
    """A TCP stream to (host, port), from ``local_host`` when given, within ``timeout`` s."""
    try:
        with trio.fail_after(timeout):
            return await network.open_tcp_stream(host, port, local_address=local_host)
    except trio.TooSlowError:
        raise ConnectError(f"connect to {host}:{port} timed out after {timeout:.3g} s") from None
    except OSError as exc:
        raise ConnectError(f"connect to {host}:{port} failed: {exc.strerror or exc}", refused=_refused(exc)) from None


def _refused(exc: BaseException) -> bool:
    """Whether a failed connect was refused (nothing listens), however trio wrapped it."""
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_refused(e) for e in cause.exceptions)
    return False


@asynccontextmanager
async def open_rpc(
    host: str,
    port: int,
    *,
    local_host: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    capture: CaptureSink | None = None,
    network: Network = TCP,
) -> AsyncIterator[RpcConnection]:
    """One connection whose reader lives for the ``async with`` block."""
    stream = await connect(host, port, local_host=local_host, timeout=timeout, network=network)
    rpc = RpcConnection(stream, max_frame_size=max_frame_size, capture=capture, name=f"{host}:{port}")
    async with trio.open_nursery() as nursery:
        await nursery.start(rpc.run)
        try:
            yield rpc
        finally:
            await rpc.aclose()


async def call_once(host: str, port: int, op: str, args: dict[str, Any], *, timeout: float,
                    local_host: str | None = None, network: Network = TCP) -> Response:
    """Connect, make one call, close: for tools, not for hot paths."""
    with trio.move_on_after(timeout) as scope:
        async with open_rpc(host, port, local_host=local_host, timeout=timeout, network=network) as rpc:
            return await rpc.call(op, args, timeout=timeout)
    assert scope.cancelled_caught
    raise RpcTimeout(f"{op} to {host}:{port}: no response in {timeout:.3g} s")


class ConnectionPool:
    """Persistent connections keyed by peer, created on first use.

    ``resolve(key)`` gives the address to dial (and an optional local address
    to dial from); it is asked again after a connection breaks, so a peer's
    address may change.  A connection idle for ``idle_s`` is not reused but
    replaced: servers close idle connections (60 s by default,
    :class:`~testnet.base.limits.ConnectionLimits`), and a request sent as
    the server closes would be lost with the connection.  ``on_connect(key, conn, timeout)``, when given, runs
    on every new connection before its first call (a handshake); if it raises,
    the connection is closed and the call fails.  ``on_refused(key, timeout)``, when given,
    runs when a dial is refused (nothing listens there) and says whether to dial once more (a
    testnet node has its link's proxy made there); if it raises, the call fails.  Readers run
    in ``nursery``, which the owner keeps open for the pool's whole life.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        resolve: Callable[[Hashable], tuple[str, int, str | None]],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capture: CaptureSink | None = None,
        on_connect: Callable[[Hashable, RpcConnection, float], Awaitable[None]] | None = None,
        on_refused: Callable[[Hashable, float], Awaitable[bool]] | None = None,
        network: Network = TCP,
        idle_s: float = POOL_IDLE_S,
    ) -> None:
        self._on_refused = on_refused
        self._nursery = nursery
        self._idle_s = idle_s
        self._resolve = resolve
        self._on_connect = on_connect
        self._network = network
        self._connect_timeout = connect_timeout
        self._max_frame_size = max_frame_size
        self._capture = capture
        self._conns: dict[Hashable, RpcConnection] = {}
        self._locks: dict[Hashable, trio.Lock] = {}

    def _usable(self, conn: RpcConnection | None) -> bool:
        return conn is not None and not conn.closed and (
            conn.busy or trio.current_time() - conn.last_active < self._idle_s)

    async def get(self, key: Hashable, *, timeout: float | None = None) -> RpcConnection:
        conn = self._conns.get(key)
        if self._usable(conn):
            return conn  # type: ignore[return-value]
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if self._usable(conn):
                return conn  # type: ignore[return-value]
            if conn is not None and not conn.closed:
                await conn.aclose()  # idle too long: the server may be closing it right now
            ct = self._connect_timeout if timeout is None else min(timeout, self._connect_timeout)
            stream = await self._dial(key, ct)
            conn = RpcConnection(stream, max_frame_size=self._max_frame_size, capture=self._capture,
                                 name=str(key)[:16])
            await self._nursery.start(conn.run)
            if self._on_connect is not None:
                try:
                    await self._on_connect(key, conn, ct)
                except BaseException:
                    await conn.aclose()
                    raise
            self._conns[key] = conn
            return conn

    async def _dial(self, key: Hashable, timeout: float) -> trio.SocketStream:
        deadline = trio.current_time() + timeout
        host, port, local_host = self._resolve(key)
        try:
            return await connect(host, port, local_host=local_host, timeout=timeout, network=self._network)
        except ConnectError as exc:
            if not exc.refused or self._on_refused is None:
                raise
            if not await self._on_refused(key, max(deadline - trio.current_time(), 0.001)):
                raise
        host, port, local_host = self._resolve(key)
        return await connect(host, port, local_host=local_host, timeout=max(deadline - trio.current_time(), 0.001),
                             network=self._network)

    async def call(self, key: Hashable, op: str, args: dict[str, Any], *, timeout: float) -> Response:
        """Call ``op`` on peer ``key`` over its persistent connection, within ``timeout`` s overall."""
        deadline = trio.current_time() + timeout
        conn = await self.get(key, timeout=timeout)
        remaining = max(deadline - trio.current_time(), 0.0)
        return await conn.call(op, args, timeout=remaining)

    async def drop(self, key: Hashable) -> None:
        """Close the connection to ``key`` (the next call dials again)."""
        conn = self._conns.pop(key, None)
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        for key in list(self._conns):
            await self.drop(key)

    def __len__(self) -> int:
        return sum(1 for c in self._conns.values() if not c.closed)
