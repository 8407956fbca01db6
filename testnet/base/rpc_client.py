"""The calling end of the wire protocol: a persistent connection with many
calls in flight (:class:`RpcConnection`), dialling (:func:`connect`), and the
one-shot helpers :func:`open_rpc` and :func:`call_once`.  A call that gets no
response raises an :class:`RpcError`.
"""

from __future__ import annotations

import errno
import itertools
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from .meter import COUNTS, ROLE
from .net import TCP, Network
from .protocol import DEFAULT_MAX_FRAME_SIZE, EOF, NEED_DATA, Connection, RemoteProtocolError, Request, Response, Status
from .rpc_wire import CaptureSink, Wire, conn_ids, stream_addresses

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
        self._conn_id = next(conn_ids)
        try:
            self.local, self.remote = stream_addresses(stream)
        except OSError:
            self.local, self.remote = ("?", 0), ("?", 0)
        self._ids = itertools.count(1)
        self.last_active = trio.current_time()  # a call started or a response arrived
        self._wire = Wire(stream)
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
