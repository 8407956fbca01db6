"""The honest-but-curious node's record: every byte it read or wrote, with the
connection's addresses, captured at the transport layer below any protocol
logic.  The unlinkability checker replays it with only this node's keys.

File format: a stream of msgpack arrays
``[t_ms, conn_id, direction, [local_host, local_port], [remote_host, remote_port], data]``
with ``direction`` ``"in"`` or ``"out"``.  Records are buffered and flushed
by the owner (a node: 0.2 s after the first record since the last flush) and
at exit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, BinaryIO, Callable, Iterator

import msgpack

from testnet.base.clock import wall_ms
from testnet.base.meter import COUNTS
from testnet.base.protocol import FrameSplitter, RemoteProtocolError, decode_body

Address = tuple[str, int]


class CaptureFile:
    def __init__(self, path: str, *, buffer_bytes: int = 1 << 20,
                 now_ms: Callable[[], int] = wall_ms, on_dirty: Callable[[], None] | None = None) -> None:
        """``on_dirty`` is called when a record follows a flush (so an owner can flush
        soon after, and sleep while nothing is written)."""
        self.path = path
        self._now_ms = now_ms
        self._on_dirty = on_dirty
        self.dirty = False
        self._f: BinaryIO = open(path, "ab", buffering=buffer_bytes)
        self._packer = msgpack.Packer(use_bin_type=True)
        # The packed middle of a record (conn_id, direction, local, remote) per connection and
        # direction: a record is written for every read and write of the process.
        self._middles: dict[tuple[int, str], bytes] = {}

    def record(self, conn_id: int, direction: str, local: tuple[str, int], remote: tuple[str, int],
               data: bytes) -> None:
        if not self.dirty:
            self.dirty = True
            if self._on_dirty is not None:
                self._on_dirty()
        pack = self._packer.pack
        middle = self._middles.get((conn_id, direction))
        if middle is None:
            if len(self._middles) >= 4096:
                self._middles.clear()
            middle = self._middles[(conn_id, direction)] = (
                pack(conn_id) + pack(direction) + pack(list(local)) + pack(list(remote)))
        # The same bytes as packing [t_ms, conn_id, direction, local, remote, data] at once.
        COUNTS["capture_bytes"] += self._f.write(b"\x96" + pack(self._now_ms()) + middle + pack(data))

    def flush(self) -> None:
        self.dirty = False
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def read_capture(path: str) -> Iterator[list[Any]]:
    """Every record of a capture file; a torn last record (kill -9) is ignored."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, use_list=True, max_buffer_size=64 << 20)
        try:
            yield from unpacker
        except (ValueError, msgpack.UnpackException):
            return


CAPTURE_MAX_FRAME_BYTES = 64 << 20  # readers never stop on a large but legal frame


def capture_messages(path: str, *, stats: Counter | None = None,
                     max_frame_size: int = CAPTURE_MAX_FRAME_BYTES) -> Iterator[tuple[Any, tuple, str, Address,
                                                                                       Address, Any]]:
    """Every framed message of a capture file, in order, as
    ``(t_ms, conn, direction, local, remote, message)``: ``conn`` keys the connection
    (ids restart with the process, so the addresses are part of it) and ``message`` is
    what :func:`testnet.base.protocol.decode_body` makes of the frame.  A record that
    does not parse is skipped (``stats["bad_records"]``); a direction whose framing
    breaks is read no further (``stats["broken_streams"]``)."""
    for t, conn, direction, local, remote, body in capture_frames(path, stats=stats, max_frame_size=max_frame_size):
        yield t, conn, direction, local, remote, decode_body(body)


def capture_frames(path: str, *, stats: Counter | None = None,
                   max_frame_size: int = CAPTURE_MAX_FRAME_BYTES) -> Iterator[tuple[Any, tuple, str, Address,
                                                                                     Address, bytes]]:
    """:func:`capture_messages` with each frame's body left undecoded (the same records,
    connections, framing and ``stats``), so a reader decodes only the frames it reads."""
    splitters: dict[tuple, FrameSplitter] = {}
    broken: set[tuple] = set()
    for record in read_capture(path):
        try:
            t, cid, direction, local, remote, data = record
            local, remote = (str(local[0]), int(local[1])), (str(remote[0]), int(remote[1]))
        except (TypeError, ValueError, IndexError):
            if stats is not None:
                stats["bad_records"] += 1
            continue
        if direction not in ("in", "out") or not isinstance(data, bytes) or not data:
            continue
        conn = (cid, local, remote)
        stream = (conn, direction)
        if stream in broken:
            continue
        splitter = splitters.get(stream)
        if splitter is None:
            splitter = splitters[stream] = FrameSplitter(max_frame_size)
        splitter.receive_data(data)
        while True:
            try:
                body = splitter.next_body()
            except RemoteProtocolError:
                broken.add(stream)
                if stats is not None:
                    stats["broken_streams"] += 1
                break
            if not isinstance(body, bytes):
                break
            yield t, conn, direction, local, remote, body
