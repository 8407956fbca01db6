"""The disk under a node's SQLite files, controlled by the harness.

Strategy: an apsw VFS written in Python sits under every file SQLite opens for
the node (database, WAL, journals) and inherits the OS's default VFS.  As
LazyFS does, it keeps every write since a file's last sync in its own cache
(reads see them; the real file does not) and writes them out, in order, at
the sync.  A power loss (:meth:`Disk.power_loss`) drops the cache — all pending
writes lost, or a seeded prefix of them written out with the next one torn
part-way — and the node stops on the spot.  A clean close writes the cache out
(as an OS would, given time), so only a power loss loses it.  Truncates write
the cache out first and are not themselves losable.

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
from dataclasses import dataclass
from typing import Any, Callable

import apsw

__all__ = ["Disk", "DiskFaultError", "FAULTS", "PowerLossReport"]

FAULTS = ("full", "error", "slow", "corrupt")
_OPS = ("read", "write", "sync")
# Pending bytes kept per file before they are written out (as an OS writes back
# old dirty pages): bounds memory when SQLite never syncs.
MAX_PENDING_BYTES = 2 * 1024 * 1024
WRITE_RUN_BYTES = 64 * 1024  # pending writes that follow on from each other go out in runs of at most this
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


class _Cache:
    """One file's writes since its last sync, in order, and its size counting them."""

    __slots__ = ("writes", "size", "bytes")

    def __init__(self, size: int) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.size = size
        self.bytes = 0


class Disk:
    """One node's disk: the fault switches, the pending-write model and the VFS."""

    def __init__(self, rng: random.Random, *, real_sync: bool = True,
                 sync_time: Callable[[], float] | None = None) -> None:
        self.rng = rng
        self.real_sync = real_sync  # pass syncs to the OS (real runs); the model holds either way
        # What a sync takes when no fault slows it (s), owed like a slow disk's: the
        # simulation's seeded figures (chaos/sim/wire.py); a real disk takes its own time.
        self.sync_time = sync_time
        self.vfs_name = f"swarmnet-disk-{next(_names)}"
        self._caches: dict[str, _Cache] = {}
        self.full = False
        self.errors: set[str] = set()
        self.sync_s = 0.0
        self.corrupt_rate = 0.0
        self.powered_off = False
        self._owed_s = 0.0
        self.counts = {"syncs": 0, "failed": 0, "flipped": 0}
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
                "pending_writes": {os.path.basename(p): len(c.writes) for p, c in self._caches.items() if c.writes},
                **self.counts}

    def take_owed_s(self) -> float:
        """Seconds of slow syncs not yet paid (and forget them): the caller sleeps them."""
        owed, self._owed_s = self._owed_s, 0.0
        return owed

    def pending_writes(self, path: str) -> int:
        """How many writes of this file a power loss would now lose."""
        c = self._caches.get(os.path.abspath(path))
        return len(c.writes) if c else 0

    def power_loss(self, *, torn: bool = False) -> PowerLossReport:
        """Drop every file's pending writes: the files stay as their last syncs left
        them.  With ``torn``, a seeded prefix of each file's pending writes reaches the
        file and the next one only part-way.  The node must stop at once afterwards
        (its SQLite state no longer matches): the disk refuses everything from now on."""
        report: dict[str, dict[str, int]] = {}
        for path in sorted(self._caches):
            cache = self._caches[path]
            n = len(cache.writes)
            if not n:
                continue
            keep = self.rng.randrange(n + 1) if torn else 0
            written = 0
            with open(path, "r+b") as fh:
                for i, (offset, data) in enumerate(cache.writes[: keep + 1]):
                    if i == keep:  # the write under way when the power went
                        data = data[: self.rng.randrange(len(data))] if data else b""
                    fh.seek(offset)
                    fh.write(data)
                    written += len(data)
            lost = sum(len(d) for _, d in cache.writes) - written
            report[os.path.basename(path)] = {"writes": n, "kept": keep if torn else 0, "bytes_lost": lost}
        self._caches.clear()
        self._owed_s = 0.0
        # Off: whatever this process still does to the files (a simulated node's SQLite
        # closing, checkpointing from its stale page cache) must not reach them.
        self.powered_off = True
        return PowerLossReport(report, torn)

    # ------------------------------------------------------------------ what the VFS calls

    def _cache(self, path: str) -> _Cache:
        cache = self._caches.get(path)
        if cache is None:
            cache = self._caches[path] = _Cache(0)
        return cache

    def _fail(self, op: str) -> None:
        if self.powered_off:
            raise apsw.IOError("the disk lost power")
        if self.full and op == "write":
            self.counts["failed"] += 1
            raise apsw.FullError("disk full (armed by the harness)")
        if op in self.errors:
            self.counts["failed"] += 1
            raise apsw.IOError(f"I/O error on {op} (armed by the harness)")

    def _flip(self, data: bytes) -> bytes:
        if not data or self.rng.random() >= self.corrupt_rate:
            return data
        self.counts["flipped"] += 1
        bit = self.rng.randrange(len(data) * 8)
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)


class _DiskVFS(apsw.VFS):
    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        super().__init__(disk.vfs_name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        if self.disk.powered_off:
            raise apsw.IOError("the disk lost power")
        return _DiskFile(self.disk, name, flags)

    def xDelete(self, name: str, syncdir: bool) -> None:
        if self.disk.powered_off:
            raise apsw.IOError("the disk lost power")
        self.disk._caches.pop(os.path.abspath(name), None)
        super().xDelete(name, syncdir)


class _DiskFile(apsw.VFSFile):
    """One open file: the default VFS's, with writes held in the disk's cache until synced."""

    def __init__(self, disk: Disk, name: Any, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self.disk = disk
        text = name.filename() if isinstance(name, apsw.URIFilename) else name
        # Temporary files (no name) vanish at a power loss anyway: written through.
        self.path = os.path.abspath(text) if text else None
        self.main_db = bool(flags[0] & apsw.mapping_open_flags["SQLITE_OPEN_MAIN_DB"])
        self.cache = disk._cache(self.path) if self.path is not None else None

    def _write_out(self) -> None:
        """Pending writes to the real file, in order (a sync, a truncate, a clean close)."""
        cache = self.cache
        if cache is not None and cache.writes:
            write = super().xWrite
            # Writes that follow on from the one before (a commit's WAL frames, header then
            # page, one after another) go out as one: one system call per run of them, not
            # two per page.  Order is kept, so later writes still win.
            # At most WRITE_RUN_BYTES each: SQLite's unix VFS writes less than 128 KiB at a
            # time (seekAndWrite masks the count with 0x1ffff; a larger one fails as "full").
            start, parts, end = -1, [], -1
            for offset, data in cache.writes:
                if offset != end or end - start + len(data) > WRITE_RUN_BYTES:
                    if parts:
                        write(b"".join(parts), start)
                    start, parts = offset, []
                parts.append(data)
                end = offset + len(data)
            write(b"".join(parts), start)
            cache.writes.clear()
            cache.bytes = 0

    def xRead(self, amount: int, offset: int) -> bytes:
        disk = self.disk
        if disk.errors or disk.powered_off:
            disk._fail("read")
        cache = self.cache
        if cache is None or not cache.writes:
            data = super().xRead(amount, offset)
        else:
            data = self._read_cached(cache, amount, offset)
        if disk.corrupt_rate and self.main_db:
            data = disk._flip(data)
        return data

    def _read_cached(self, cache: _Cache, amount: int, offset: int) -> bytes:
        end = min(offset + amount, cache.size)
        if end <= offset:
            return b""
        real = super().xFileSize()
        buf = bytearray(end - offset)
        if offset < real:
            got = super().xRead(min(end, real) - offset, offset)
            buf[: len(got)] = got
        for w_off, data in cache.writes:  # in order: later writes win
            lo, hi = max(w_off, offset), min(w_off + len(data), end)
            if lo < hi:
                buf[lo - offset: hi - offset] = data[lo - w_off: hi - w_off]
        return bytes(buf)  # shorter than asked past the end: SQLite's short read

    def xWrite(self, data: bytes, offset: int) -> None:
        disk = self.disk
        if disk.full or disk.errors or disk.powered_off:
            disk._fail("write")
        cache = self.cache
        if cache is None:
            super().xWrite(data, offset)
            return
        if not cache.writes:  # the real file is the whole truth again: start from its size
            cache.size = super().xFileSize()
        cache.writes.append((offset, bytes(data)))
        cache.bytes += len(data)
        if offset + len(data) > cache.size:
            cache.size = offset + len(data)
        if cache.bytes > MAX_PENDING_BYTES:  # as an OS writes back old dirty pages
            self._write_out()

    def xFileSize(self) -> int:
        cache = self.cache
        return cache.size if cache is not None and cache.writes else super().xFileSize()

    def xTruncate(self, newsize: int) -> None:
        disk = self.disk
        if disk.errors or disk.powered_off:
            disk._fail("write")
        self._write_out()
        super().xTruncate(newsize)
        if self.cache is not None:
            self.cache.size = newsize

    def xSync(self, flags: int) -> None:
        disk = self.disk
        if disk.errors or disk.powered_off:
            disk._fail("sync")
        self._write_out()
        if disk.real_sync:
            super().xSync(flags)
        disk.counts["syncs"] += 1
        disk._owed_s += disk.sync_s if disk.sync_time is None else disk.sync_s + disk.sync_time()

    def xClose(self) -> None:
        if not self.disk.powered_off:
            self._write_out()
        super().xClose()
