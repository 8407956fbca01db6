"""The honest-but-curious node's record: every byte it read or wrote, with the
connection's addresses, captured at the transport layer below any protocol
logic.  The unlinkability checker replays it with only this node's keys.

File format: a stream of msgpack arrays
``[t_ms, conn_id, direction, [local_host, local_port], [remote_host, remote_port], data]``
with ``direction`` ``"in"`` or ``"out"``.  Records are buffered and flushed
every ``flush_interval_s`` and at exit.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, Iterator

import msgpack

from testnet.base.clock import wall_ms


class CaptureFile:
    def __init__(self, path: str, *, buffer_bytes: int = 1 << 20,
                 now_ms: Callable[[], int] = wall_ms) -> None:
        self.path = path
        self._now_ms = now_ms
        self._f: BinaryIO = open(path, "ab", buffering=buffer_bytes)
        self._packer = msgpack.Packer(use_bin_type=True)

    def record(self, conn_id: int, direction: str, local: tuple[str, int], remote: tuple[str, int],
               data: bytes) -> None:
        self._f.write(self._packer.pack([self._now_ms(), conn_id, direction,
                                         list(local), list(remote), data]))

    def flush(self) -> None:
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
