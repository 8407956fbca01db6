"""The serving end of the wire protocol: one task per accepted connection,
requests answered concurrently (each in a task of its own, or at once by a
fast path that needs none: :data:`Take`), and the connection's hygiene
(admission by :class:`~.limits.ConnectionGate`, idle and slow-frame
timeouts, a peer that stops reading).  Framing is
:class:`.protocol.Connection`'s; bytes move through :class:`.rpc_wire.Wire`
and leave once per loop turn through :class:`.rpc_wire.Outbox`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

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
from .rpc_wire import Address, CaptureSink, Outbox, Wire, conn_ids, sock_address, stream_addresses

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


class Reply:
    """Answers one request, once, from wherever its work ends (see :data:`Take`).

    Calling it queues the response on the connection, to be written with the rest of
    this loop turn's frames; a connection that has closed meanwhile drops it.
    """

    __slots__ = ("_answer", "_req", "done")

    def __init__(self, answer: Callable[[Request, int, Any], None], req: Request) -> None:
        self._answer = answer
        self._req = req
        self.done = False

    def __call__(self, status: int, body: Any) -> None:
        if self.done:
            raise RuntimeError(f"request {self._req.id} ({self._req.op}) answered twice")
        self.done = True
        self._answer(self._req, status, body)


# A server's fast path: called for each request on the reader's own turn.  It may
# answer through ``reply`` — at once, or later from a callback (a group commit, a
# response on another connection) — and return None; or return an awaitable whose
# result answers the request, run as a task of its own (as ``handler`` would be).
# A RequestError it raises is the answer; any other exception a 500.
Take = Callable[[Request, "Peer", Reply], Optional[Awaitable[tuple[int, Any]]]]


async def serve_connection(
    stream: trio.SocketStream,
    handler: Handler,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    capture: CaptureSink | None = None,
    limits: ConnectionLimits | None = None,
    gate: ConnectionGate | None = None,
    take: Take | None = None,
) -> None:
    """Serve requests on one accepted connection until it closes.

    Requests run concurrently (answered in any order); once ``max_in_flight``
    are running we stop reading, which pushes back on the peer.  A handler
    error becomes a 500 for that request only.  Each request is a task running
    ``handler`` unless ``take`` (see :data:`Take`) answers it without one.
    The answers of one loop turn leave in one write (:class:`.rpc_wire.Outbox`).

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
    in_flight = trio.Semaphore(max_in_flight)
    conn_scope = trio.CancelScope()  # everything of this connection: cancelled when we close it

    # Strategy: one timer, the deadline of the scope around the read loop, and
    # moved as rarely as possible: a deadline change is a push on trio's heap,
    # and one per read (the idle deadline moves with every byte) was a
    # measurable share of a node's CPU.  It is armed at the idle deadline (or
    # a partial frame's, which comes sooner); when it fires, the connection
    # closes if it really is idle or slow, and otherwise the loop re-arms at
    # the deadline as it now is (a request running, bytes since: at most one
    # early fire per idle timeout).  No task per timer.
    running = 0  # requests in flight
    idle_since = trio.current_time()  # last bytes received or last request finished
    frame_deadline: float | None = None  # set while a partial frame is buffered
    read_scope = trio.CancelScope()
    closed_by: str | None = None
    nursery: trio.Nursery | None = None

    def read_deadline() -> float:
        """When the connection is to close if nothing changes (a slow handler is not an idle peer)."""
        now_idle = (idle_since if not running else trio.current_time()) + lim.idle_timeout_s
        return now_idle if frame_deadline is None else min(frame_deadline, now_idle)

    def spawn(fn: Callable[[], Awaitable[None]]) -> None:
        if nursery is None:
            raise RuntimeError("connection closing")
        nursery.start_soon(fn)

    def on_write_error(why: str) -> None:
        nonlocal closed_by
        if why == "slow_send":
            # The peer stopped reading; a half-sent frame also leaves the stream unusable.
            # Close the whole connection.
            closed_by = closed_by or "slow_send"
            conn_scope.cancel()
        # A broken stream: the reader finds out on its next read.

    wire = Wire(stream)
    outbox = Outbox(wire, send_timeout=lim.send_timeout_s, spawn=spawn, on_error=on_write_error,
                    capture=capture, conn_id=conn_id, local=local, remote=remote)

    def send(data: bytes) -> None:
        try:
            outbox.put(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is gone: nobody is left to answer

    all_answered: trio.Event | None = None  # set when the last request is answered, if someone waits

    def settle() -> None:
        nonlocal running, idle_since
        in_flight.release()
        running -= 1
        if not running:
            idle_since = trio.current_time()
            if all_answered is not None:
                all_answered.set()

    def answer(req: Request, status: int, body: Any) -> None:
        try:
            if admission.counted and peer.session.get(AUTHENTICATED_SESSION_KEY):
                # A service node: node links through Toxiproxy all come from
                # 127.0.0.1 and must not share a cap with strangers.
                gate.authenticated(admission)
            try:
                data = conn.send(Response(req.id, status, body))
            except LocalProtocolError as exc:
                data = conn.send(Response(req.id, exc.status, {"error": str(exc)}))
            COUNTS["frames_out"] += 1
            send(data)
        finally:
            settle()

    def failed(req: Request, exc: Exception) -> tuple[int, Any]:
        if isinstance(exc, RequestError):
            return exc.status, exc.body
        log.error("handler for %r failed", req.op, exc_info=exc)
        return Status.INTERNAL_ERROR, {"error": "internal error"}

    async def run_task(req: Request, work: Awaitable[tuple[int, Any]]) -> None:
        finished = False
        try:
            try:
                status, body = await work
            except Exception as exc:
                status, body = failed(req, exc)
            finished = True
        finally:
            if finished:
                answer(req, status, body)
            else:
                settle()  # cancelled with its connection: nobody is left to answer

    def dispatch(req: Request) -> None:
        if take is None:
            nursery.start_soon(run_task, req, handler(req, peer))
            return
        reply = Reply(answer, req)
        try:
            work = take(req, peer, reply)
            ROLE.set("transport")  # whatever the fast path was doing, the reader reads again
        except Exception as exc:
            ROLE.set("transport")
            if reply.done:
                log.error("handler for %r failed after answering", req.op, exc_info=exc)
                return
            reply(*failed(req, exc))
            return
        if work is not None:
            if reply.done:
                log.error("the fast path answered %r and gave work for it too", req.op)
                work.close()  # type: ignore[attr-defined]
                return
            nursery.start_soon(run_task, req, work)

    async def read_loop() -> None:
        """Read and dispatch until the stream ends or breaks (the caller's scope keeps the deadline)."""
        nonlocal idle_since, frame_deadline, running
        while True:
            COUNTS["recv_calls"] += 1
            try:
                data = await wire.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
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
                            # Back-pressure: our own handlers' pace, not the peer's.  The timer
                            # must not fire on a request read and not yet dispatched.
                            deadline, read_scope.deadline = read_scope.deadline, math.inf
                            await in_flight.acquire()
                            read_scope.deadline = deadline
                        running += 1
                        dispatch(ev)
                    elif isinstance(ev, BadFrame):
                        send(error_frame(ev.status, ev.reason, ev.id or 0))
                    # A response on a server connection answers nothing: drop it.
            except RemoteProtocolError as exc:
                # The stream cannot be resynchronised: say why, then close.
                send(error_frame(exc.status, str(exc)))
                return
            if not data:
                return
            if not conn.buffered:
                frame_deadline = None
            elif frame_deadline is None or framed:
                # A new frame is under way.  Started after any
                # back-pressure wait above: our pause is not its delay.
                frame_deadline = trio.current_time() + lim.frame_timeout_s
                if frame_deadline < read_scope.deadline:
                    read_scope.deadline = frame_deadline

    try:
        with conn_scope:
            async with trio.open_nursery() as nursery:
                while True:
                    with trio.CancelScope(deadline=read_deadline()) as read_scope:
                        await read_loop()
                    if not read_scope.cancelled_caught:
                        break
                    now = trio.current_time()
                    if frame_deadline is not None and now >= frame_deadline:
                        closed_by = "slow_frame"
                    elif not running and now >= idle_since + lim.idle_timeout_s:
                        closed_by = "idle"
                    else:
                        continue  # fired early: re-arm at the deadline as it is now
                    conn_scope.cancel()
                    break
                # Let in-flight requests finish before we close; those taken without a task
                # (waiting for a group commit, the next hop) each end within their own deadline.
                if running:
                    all_answered = trio.Event()
                    await all_answered.wait()
            nursery = None
            if outbox.pending:
                await outbox.aflush()
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
    take: Take | None = None,
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
            gate=gate, take=take,
        )

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, one, [listener])
        task_status.started(bound)
