"""The calling end of the wire protocol: a persistent connection with many
calls in flight (:class:`RpcConnection`), dialling (:func:`connect`), and the
one-shot helpers :func:`open_rpc` and :func:`call_once`.  A call that gets no
response raises an :class:`RpcError`.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import trio

from .meter import COUNTS, ROLE
from .net import TCP, Network
from .protocol import DEFAULT_MAX_FRAME_SIZE, EOF, NEED_DATA, Connection, RemoteProtocolError, Request, Response, Status
from .rpc_wire import CaptureSink, Outbox, Wire, conn_ids, stream_addresses

log = logging.getLogger("testnet.base.rpc")

DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds


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

DEFAULT_SEND_TIMEOUT = 30.0  # s a peer may take to read a write of ours (as a server's ConnectionLimits)

Done = Callable[[Optional[Response], Optional[RpcError]], None]


class _Slot:
    """A call waiting for its response: a task waiting on ``event``, or a callback (``done``)."""

    __slots__ = ("op", "event", "response", "error", "done")

    def __init__(self, op: str, done: Done | None = None) -> None:
        self.op = op
        self.event = trio.Event() if done is None else None
        self.response: Response | None = None
        self.error: RpcError | None = None
        self.done = done

    def settle(self, response: Response | None, error: RpcError | None) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            try:
                done(response, error)
            except Exception:
                log.exception("response callback failed")
        elif self.event is not None and not self.event.is_set():
            self.response, self.error = response, error
            self.event.set()


class RpcConnection:
    """A persistent client connection with many calls in flight.

    Its reader runs as a task in a nursery the caller owns (:meth:`run`);
    :func:`open_rpc` does that for a single connection.  A call waits for its
    response in the caller's task (:meth:`call`) or has a callback run when it
    comes (:meth:`call_soon`: no task waits at all).  Requests queued in one
    loop turn leave in one write (:class:`.rpc_wire.Outbox`).
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capture: CaptureSink | None = None,
        name: str = "",
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self.stream = stream
        self.name = name
        self._conn = Connection(max_frame_size=max_frame_size)
        self._capture = capture
        self._conn_id = next(conn_ids)
        try:
            self.local, self.remote = stream_addresses(stream)
        except OSError:
            self.local, self.remote = ("?", 0), ("?", 0)
        self._ids = itertools.count(1)
        self.last_active = trio.current_time()  # a call started or a response arrived
        self._wire = Wire(stream)
        self._pending: dict[int, _Slot] = {}
        # Deadlines of callback calls, earliest first (answered ones are dropped lazily):
        # the reader's wait ends at the first, so no task or timer per call.
        self._deadlines: list[tuple[float, int]] = []
        self._read_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._outbox = Outbox(self._wire, send_timeout=send_timeout, spawn=self._spawn, on_error=self._write_failed,
                              capture=capture, conn_id=self._conn_id, local=self.local, remote=self.remote)
        self._closed: RpcError | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def busy(self) -> bool:
        """A call is waiting for its response."""
        return bool(self._pending)

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise RuntimeError("connection not running")
        self._nursery.start_soon(fn)

    def _write_failed(self, why: str) -> None:
        what = "stopped reading" if why == "slow_send" else "broke"
        self._fail_all(ConnectionLost(f"connection to {self.name or self.remote} {what}"))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()  # the reader closes the stream

    def _fail_all(self, error: RpcError) -> None:
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        for slot in pending.values():
            slot.settle(None, error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read responses until the connection closes; then fail whatever is pending."""
        ROLE.set("transport")
        error: RpcError = ConnectionLost(f"connection to {self.name or self.remote} closed")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._read()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                except RemoteProtocolError as exc:
                    error = ConnectionLost(f"connection to {self.name or self.remote} broke: {exc}")
                nursery.cancel_scope.cancel()  # a write still waiting for the peer is moot
        finally:
            self._nursery = None
            self._fail_all(error)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _read(self) -> None:
        # The scope's deadline is the earliest callback call's, set when that call is made
        # (call_soon) and left when it is answered: when it fires, what is due times out and
        # the loop re-arms at the next (no deadline change per read or per answer).
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._read_scope = scope
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
                                slot.settle(ev, None)
                        # Requests and bad frames from a server are ignored.
                    if not data:
                        return
            self._read_scope = None
            self._expire()

    def _next_deadline(self) -> float:
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._pending:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else math.inf

    def _expire(self) -> None:
        now = trio.current_time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, msg_id = heapq.heappop(deadlines)
            slot = self._pending.pop(msg_id, None)
            if slot is not None:
                slot.settle(None, RpcTimeout(f"{slot.op} to {self.name or self.remote}: no response in time"))

    def _send(self, op: str, args: dict[str, Any], slot: _Slot) -> int:
        """Queue one request; its id.  Raises what a closed connection raised, or a
        LocalProtocolError for a request that cannot be framed."""
        if self._closed is not None:
            raise self._closed
        msg_id = next(self._ids)
        self.last_active = trio.current_time()
        data = self._conn.send(Request(msg_id, op, args))
        try:
            self._outbox.put(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_all(ConnectionLost(f"connection to {self.name or self.remote} lost: {exc}"))
            raise self._closed from None  # type: ignore[misc]
        COUNTS["frames_out"] += 1
        self._pending[msg_id] = slot
        return msg_id

    def call_soon(self, op: str, args: dict[str, Any], *, timeout: float, done: Done) -> None:
        """Send one request; ``done(response, None)`` runs when its response arrives, or
        ``done(None, error)`` when it cannot (:class:`RpcTimeout` after ``timeout`` s,
        :class:`ConnectionLost`) — once, later, from this connection's reader.  Raises
        :class:`RpcError` at once if the connection is closed."""
        slot = _Slot(op, done)
        msg_id = self._send(op, args, slot)
        deadline = trio.current_time() + timeout
        heapq.heappush(self._deadlines, (deadline, msg_id))
        scope = self._read_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def call(self, op: str, args: dict[str, Any], *, timeout: float) -> Response:
        """Send one request and wait for its response (any status)."""
        slot = _Slot(op)
        msg_id = self._send(op, args, slot)
        try:
            with trio.move_on_after(timeout) as scope:
                await slot.event.wait()  # type: ignore[union-attr]
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

    def close_soon(self) -> None:
        """Fail every call now and close the stream from the reader (for callbacks, which cannot await)."""
        self._fail_all(ConnectionLost(f"connection to {self.name or self.remote} closed locally"))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

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
