"""Bytes on one connection, below the frames: reading and writing a socket
with as few trips through trio's scheduler as the kernel allows, the
addresses at both ends, the capture hook that sees every byte, and one
numbering of connections for the whole process.

Shared by both ends of the wire protocol: :mod:`.rpc_server` and
:mod:`.rpc_client` (see :mod:`.rpc`).
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import Any, Protocol

import trio

RECEIVE_SIZE = 65536

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
            return data
        try:
            sent = os.write(self._fd(), data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise stream_error(exc) from exc
        return None if sent == len(data) else memoryview(data)[sent:]

    async def send(self, data: bytes, timeout: float) -> bool:
        """Write all of ``data``; False if the peer took too long to take the rest."""
        rest = self.send_now(data)
        if rest is None:
            return True
        with trio.move_on_after(timeout) as scope:
            await self.stream.send_all(rest)
        return not scope.cancelled_caught


def stream_error(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("connection closed")
    return trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}")
