"""The serving end of the wire protocol: one task per accepted connection,
requests answered concurrently, and the connection's hygiene (admission by
:class:`~.limits.ConnectionGate`, idle and slow-frame timeouts, a peer that
stops reading).  Framing is :class:`.protocol.Connection`'s; bytes move
through :class:`.rpc_wire.Wire`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from .limits import AUTHENTICATED_SESSION_KEY, ConnectionGate, ConnectionLimits
from .meter import COUNTS, ROLE
from .net import TCP, Network, may_listen_on
from .protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    EOF,
    NEED_DATA,
    BadFrame,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    RequestError,
    Response,
    Status,
    error_frame,
)
from .rpc_wire import Address, CaptureSink, Wire, conn_ids, sock_address, stream_addresses

log = logging.getLogger("testnet.base.rpc")

DEFAULT_MAX_IN_FLIGHT = 256  # requests per connection before we stop reading


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


Handler = Callable[[Request, Peer], Awaitable[tuple[int, Any]]]


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
    conn_id = next(conn_ids)
    ROLE.set("transport")  # reading and framing; each request's handler names its own role
    try:
        gate = _gate_for(limits, gate)
        local, remote = stream_addresses(stream)
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
    wire = Wire(stream)

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
    bound = [sock_address(l.socket.getsockname()) for l in listeners]

    async def one(stream: trio.SocketStream) -> None:
        await serve_connection(
            stream, handler, max_frame_size=max_frame_size, max_in_flight=max_in_flight, capture=capture,
            gate=gate,
        )

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, one, [listener])
        task_status.started(bound)
