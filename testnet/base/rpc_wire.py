"""Bytes on one connection, below the frames: reading and writing a socket
with as few trips through trio's scheduler as the kernel allows, the frames
of one loop turn written together (:class:`Outbox`), the addresses at both
ends, the capture hook that sees every byte, and one numbering of
connections for the whole process.

Shared by both ends of the wire protocol: :mod:`.rpc_server` and
:mod:`.rpc_client` (see :mod:`.rpc`).
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import Any, Protocol

import trio

from .meter import COUNTS, ROLE
from .turn import at_turn_end

RECEIVE_SIZE = 65536
MAX_WRITE = 256 * 1024  # bytes of queued frames joined into one write

Address = tuple[str, int]


class CaptureSink(Protocol):
    """Receives every chunk of bytes a connection reads or writes.

    The transport calls it below any protocol logic, so what it records is
    what the process really saw on the wire (direction ``"in"``/``"out"``).
    """

    def record(self, conn_id: int, direction: str, local: Address, remote: Address, data: bytes) -> None: ...


# Every connection of this process, accepted or dialled: captures name them by it.
conn_ids = itertools.count(1)


def sock_address(sockaddr: Any) -> Address:
    return (str(sockaddr[0]), int(sockaddr[1]))


def stream_addresses(stream: trio.SocketStream) -> tuple[Address, Address]:
    return sock_address(stream.socket.getsockname()), sock_address(stream.socket.getpeername())


MAX_READ_STREAK = 16  # reads in a row that found data at once before the reader yields anyway


class Wire:
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
                raise stream_error(exc) from exc
            self._streak += 1
            return data

    def send_now(self, data: bytes) -> bytes | memoryview | None:
        """Write what the kernel takes at once; what is left (``None`` if nothing)."""
        if self._socket is None:
            # The simulated network's streams take bytes at once unless their host is paused.
            send_nowait = getattr(self.stream, "send_nowait", None)
            return None if send_nowait is not None and send_nowait(data) else data
        try:
            sent = os.write(self._fd(), data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise stream_error(exc) from exc
        return None if sent == len(data) else memoryview(data)[sent:]



class Outbox:
    """The frames one connection sends, written together at the end of the loop turn
    they were queued in (:func:`.turn.at_turn_end`): requests and answers that leave in
    one turn cost one write (and one wake-up of the reader at the other end), not one
    each.

    The write is made at once when the kernel takes it whole (nearly always: a frame is
    small and the socket's buffer large).  What it does not take is written by a task
    (``spawn(async_fn, *args)`` starts one where the connection's tasks live) that waits
    for the peer to read, at most ``send_timeout`` s per write; meanwhile frames queue
    behind it, in order.  A peer that takes longer, or a connection that breaks, is
    reported once to ``on_error(reason)`` (``"slow_send"`` or ``"broken"``) and every
    later :meth:`put` raises.  The capture sees each write as it is made.
    """

    __slots__ = ("wire", "send_timeout", "_spawn", "_on_error", "_capture", "_conn_id", "_local", "_remote",
                 "_frames", "_rest", "_scheduled", "_draining", "error")

    def __init__(self, wire: Wire, *, send_timeout: float, spawn: Any, on_error: Any,
                 capture: CaptureSink | None, conn_id: int, local: Address, remote: Address) -> None:
        self.wire = wire
        self.send_timeout = send_timeout
        self._spawn = spawn
        self._on_error = on_error
        self._capture = capture
        self._conn_id, self._local, self._remote = conn_id, local, remote
        self._frames: list[bytes] = []
        self._rest: bytes | memoryview | None = None  # the part of a write the kernel has not taken yet
        self._scheduled = False
        self._draining = False
        self.error: Exception | None = None

    @property
    def pending(self) -> bool:
        """Bytes queued or half-written."""
        return bool(self._frames) or self._rest is not None

    def put(self, frame: bytes) -> None:
        """Queue one frame for this turn's write."""
        if self.error is not None:
            raise self.error
        self._frames.append(frame)
        if not self._scheduled and self._rest is None:
            self._scheduled = True
            at_turn_end(self._flush)

    def _take(self) -> bytes:
        frames = self._frames
        if len(frames) == 1:
            return frames.pop()
        n, size = 0, 0
        while n < len(frames) and (n == 0 or size + len(frames[n]) <= MAX_WRITE):
            size += len(frames[n])
            n += 1
        chunk = b"".join(frames[:n])
        del frames[:n]
        return chunk

    def _record(self, chunk: bytes) -> None:
        if self._capture is not None:
            self._capture.record(self._conn_id, "out", self._local, self._remote, chunk)
        COUNTS["send_calls"] += 1

    def _flush(self) -> None:
        self._scheduled = False
        if self.error is not None or self._rest is not None:
            return
        token = ROLE.set("transport")
        try:
            while self._frames:
                chunk = self._take()
                self._record(chunk)
                try:
                    rest = self.wire.send_now(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail("broken", exc)
                    return
                if rest is not None:
                    self._rest = rest
                    try:
                        self._spawn(self._drain)
                    except RuntimeError:
                        return  # the connection is closing: its final flush (aflush) writes the rest
                    self._draining = True
                    return
        finally:
            ROLE.reset(token)

    async def _drain(self) -> None:
        try:
            await self._write_rest()
        finally:
            self._draining = False

    async def _write_rest(self) -> None:
        """Write the half-written part, then whatever queued behind it, each within the timeout."""
        try:
            while self._rest is not None:
                with trio.move_on_after(self.send_timeout) as scope:
                    await self.wire.stream.send_all(self._rest)
                if scope.cancelled_caught:
                    # The peer stopped reading; a half-sent frame also leaves the stream unusable.
                    self._fail("slow_send", trio.BrokenResourceError("peer stopped reading"))
                    return
                self._rest = None
                if self._frames:
                    chunk = self._take()
                    self._record(chunk)
                    self._rest = chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail("broken", exc)

    async def aflush(self) -> None:
        """Write what is still queued now (a connection about to close answers what it took)."""
        if self.error is not None or self._draining:
            return
        if self._rest is None and self._frames:
            chunk = self._take()
            self._record(chunk)
            self._rest = chunk
        await self._write_rest()

    def _fail(self, reason: str, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
            self._frames.clear()
            self._rest = None
            self._on_error(reason)


def stream_error(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("connection closed")
    return trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}")
