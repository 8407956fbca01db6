"""The disk under a node's SQLite files, controlled by the harness.

Strategy: an apsw VFS written in Python sits under every file SQLite opens for
the node (database, WAL, journals) and inherits the OS's default VFS, so bytes
reach the real file at once and reads need no model.  What the model keeps is
the LazyFS view of durability: every write or truncate since a file's last
sync is *pending*, and for each the bytes it overwrote (an undo log).  A power
loss (:meth:`Disk.power_loss`) puts the files back as the last syncs left them
— all pending writes lost, or a seeded prefix of them kept with the next one
torn part-way — and the node stops on the spot.

Faults armed at run time (:meth:`Disk.arm`, :meth:`Disk.heal`):

* ``full``  — every write fails with SQLITE_FULL;
* ``error`` — reads, writes and/or syncs (``ops``) fail with an I/O error;
* ``slow``  — each sync owes ``sync_ms``; the node pays what is owed on its
  own clock (:meth:`Disk.take_owed_s`) before it acknowledges, so in the
  simulation the wait is virtual time;
* ``corrupt`` — each page read back from the database has, with probability
  ``rate``, one bit flipped (the file itself is unchanged).

Every random choice (which bit, how much of a torn write) comes from the
``random.Random`` passed in, never from the OS: the simulation replays a seed
to the byte.  Nothing here reads a clock.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from typing import Any

import apsw

__all__ = ["Disk", "DiskFaultError", "FAULTS", "PowerLossReport"]

FAULTS = ("full", "error", "slow", "corrupt")
_OPS = ("read", "write", "sync")
# Undo bytes kept per file before the oldest pending writes count as written
# back (as an OS flushes old dirty pages): bounds memory when SQLite never syncs.
MAX_PENDING_BYTES = 64 * 1024 * 1024
_names = itertools.count()


class DiskFaultError(ValueError):
    """A disk command that makes no sense (unknown fault, bad parameter)."""


@dataclass(frozen=True, slots=True)
class PowerLossReport:
    """What one power loss did: per file, pending writes lost and kept, bytes reverted."""

    files: dict[str, dict[str, int]]
    torn: bool

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "torn": self.torn}


@dataclass(slots=True)
class _Pending:
    """One file's writes since its last sync: (offset, old bytes, old size, length) per
    write, (None, old tail, old size, new size) per truncate."""

    ops: list[tuple[int | None, bytes, int, int]] = field(default_factory=list)
    undo_bytes: int = 0


class Disk:
    """One node's disk: the fault switches, the pending-write model and the VFS."""

    def __init__(self, rng: random.Random, *, real_sync: bool = True) -> None:
        self.rng = rng
        self.real_sync = real_sync  # pass syncs to the OS (real runs); the model holds either way
        self.vfs_name = f"swarmnet-disk-{next(_names)}"
        self._pending: dict[str, _Pending] = {}
        self._sizes: dict[str, int] = {}
        self.full = False
        self.errors: set[str] = set()
        self.sync_s = 0.0
        self.corrupt_rate = 0.0
        self._owed_s = 0.0
        self.counts = {"writes": 0, "syncs": 0, "reads": 0, "failed": 0, "flipped": 0}
        self._vfs = _DiskVFS(self)

    # ------------------------------------------------------------------ commands

    def arm(self, fault: str, **params: Any) -> None:
        """Arm one fault (see the module docstring); arming again changes its parameters."""
        if fault == "full":
            self.full = True
        elif fault == "error":
            ops = params.get("ops", list(_OPS))
            if isinstance(ops, str):
                ops = [ops]
            if not ops or any(o not in _OPS for o in ops):
                raise DiskFaultError(f"error ops must be some of {_OPS}, got {ops!r:.80}")
            self.errors = set(ops)
        elif fault == "slow":
            ms = params.get("sync_ms")
            if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0 <= ms <= 60_000:
                raise DiskFaultError(f"slow needs sync_ms in [0, 60000], got {ms!r:.80}")
            self.sync_s = ms / 1000
        elif fault == "corrupt":
            rate = params.get("rate", 0.01)
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1:
                raise DiskFaultError(f"corrupt needs rate in (0, 1], got {rate!r:.80}")
            self.corrupt_rate = float(rate)
        else:
            raise DiskFaultError(f"unknown disk fault {fault!r:.40}; known: {', '.join(FAULTS)}")

    def heal(self, fault: str | None = None) -> None:
        """Disarm one fault, or every fault (None)."""
        if fault not in (None, *FAULTS):
            raise DiskFaultError(f"unknown disk fault {fault!r:.40}; known: {', '.join(FAULTS)}")
        if fault in (None, "full"):
            self.full = False
        if fault in (None, "error"):
            self.errors = set()
        if fault in (None, "slow"):
            self.sync_s = 0.0
        if fault in (None, "corrupt"):
            self.corrupt_rate = 0.0

    def status(self) -> dict[str, Any]:
        """The armed faults and counters, as JSON."""
        return {"full": self.full, "errors": sorted(self.errors), "sync_ms": round(self.sync_s * 1000, 3),
                "corrupt_rate": self.corrupt_rate, "owed_ms": round(self._owed_s * 1000, 3),
                "pending_writes": {os.path.basename(p): len(f.ops) for p, f in self._pending.items() if f.ops},
                **self.counts}

    def take_owed_s(self) -> float:
        """Seconds of slow syncs not yet paid (and forget them): the caller sleeps them."""
        owed, self._owed_s = self._owed_s, 0.0
        return owed

    def pending_writes(self, path: str) -> int:
        """How many writes and truncates of this file a power loss would now undo."""
        f = self._pending.get(os.path.abspath(path))
        return len(f.ops) if f else 0

    def power_loss(self, *, torn: bool = False) -> PowerLossReport:
        """Put every file back as its last sync left it.  With ``torn``, a seeded prefix
        of each file's pending writes survives and the next is kept only part-way.
        The node must stop at once afterwards (its SQLite state no longer matches)."""
        report: dict[str, dict[str, int]] = {}
        for path in sorted(self._pending):
            pending = self._pending[path]
            if not pending.ops:
                continue
            n = len(pending.ops)
            keep = self.rng.randrange(n + 1) if torn else 0
            reverted = 0
            with open(path, "r+b") as fh:
                for i in range(n - 1, keep - 1, -1):
                    offset, old, old_size, length = pending.ops[i]
                    torn_data = b""
                    if torn and i == keep and offset is not None and length:
                        # The write that was under way: its first bytes reached the platter.
                        fh.seek(offset)
                        torn_data = fh.read(self.rng.randrange(length))
                    reverted += _undo(fh, offset, old, old_size)
                    if torn_data:
                        fh.seek(offset)
                        fh.write(torn_data)
                fh.flush()
                os.fsync(fh.fileno())
            report[os.path.basename(path)] = {"lost": n - keep, "kept": keep, "reverted_bytes": reverted}
            pending.ops.clear()
            pending.undo_bytes = 0
        self._sizes.clear()
        self._owed_s = 0.0
        return PowerLossReport(report, torn)

    # ------------------------------------------------------------------ what the VFS calls

    def _opened(self, path: str, size: int) -> None:
        self._sizes[path] = size
        self._pending.setdefault(path, _Pending())

    def _fail(self, op: str) -> None:
        if self.full and op == "write":
            self.counts["failed"] += 1
            raise apsw.FullError("disk full (armed by the harness)")
        if op in self.errors:
            self.counts["failed"] += 1
            raise apsw.IOError(f"I/O error on {op} (armed by the harness)")

    def _record(self, path: str, op: tuple[int | None, bytes, int, int]) -> None:
        pending = self._pending.setdefault(path, _Pending())
        pending.ops.append(op)
        pending.undo_bytes += len(op[1])
        while pending.undo_bytes > MAX_PENDING_BYTES and len(pending.ops) > 1:
            pending.undo_bytes -= len(pending.ops.pop(0)[1])

    def _synced(self, path: str) -> None:
        self.counts["syncs"] += 1
        self._owed_s += self.sync_s
        pending = self._pending.get(path)
        if pending is not None:
            pending.ops.clear()
            pending.undo_bytes = 0

    def _flip(self, data: bytes) -> bytes:
        if not data or self.rng.random() >= self.corrupt_rate:
            return data
        self.counts["flipped"] += 1
        bit = self.rng.randrange(len(data) * 8)
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)


def _undo(fh: Any, offset: int | None, old: bytes, old_size: int) -> int:
    """Reverse one pending write (offset set) or truncate (offset None); bytes touched."""
    if offset is None:  # a truncate: the tail it cut comes back
        fh.seek(old_size - len(old))
        fh.write(old)
        return len(old)
    fh.seek(offset)
    fh.write(old)
    if fh.seek(0, 2) > old_size:  # the write had grown the file
        fh.truncate(old_size)
    return len(old)


class _DiskVFS(apsw.VFS):
    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        super().__init__(disk.vfs_name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        return _DiskFile(self.disk, name, flags)


class _DiskFile(apsw.VFSFile):
    """One open file: passes through to the default VFS, telling the model."""

    def __init__(self, disk: Disk, name: Any, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self.disk = disk
        text = name.filename() if isinstance(name, apsw.URIFilename) else name
        # Temporary files (no name) vanish at a power loss anyway: not modelled.
        self.path = os.path.abspath(text) if text else None
        self.main_db = bool(flags[0] & apsw.mapping_open_flags["SQLITE_OPEN_MAIN_DB"])
        if self.path is not None:
            disk._opened(self.path, super().xFileSize())

    def xRead(self, amount: int, offset: int) -> bytes:
        disk = self.disk
        if disk.errors:
            disk._fail("read")
        data = super().xRead(amount, offset)
        if disk.corrupt_rate and self.main_db:
            data = disk._flip(data)
        return data

    def xWrite(self, data: bytes, offset: int) -> None:
        disk = self.disk
        if disk.full or disk.errors:
            disk._fail("write")
        disk.counts["writes"] += 1
        path = self.path
        if path is not None:
            size = disk._sizes.get(path)
            if size is None:
                size = super().xFileSize()
            overlap = min(len(data), size - offset)
            old = super().xRead(overlap, offset) if overlap > 0 else b""
            disk._record(path, (offset, old, size, len(data)))
            disk._sizes[path] = max(size, offset + len(data))
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        disk = self.disk
        if disk.errors:
            disk._fail("write")
        path = self.path
        if path is not None:
            size = disk._sizes.get(path)
            if size is None:
                size = super().xFileSize()
            tail = super().xRead(size - newsize, newsize) if size > newsize else b""
            disk._record(path, (None, tail, size, newsize))
            disk._sizes[path] = newsize
        super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        disk = self.disk
        if disk.errors:
            disk._fail("sync")
        if disk.real_sync:
            super().xSync(flags)
        if self.path is not None:
            disk._synced(self.path)
