"""The harness's disk under SQLite (nodes.disk): the LazyFS model and the armed faults,
on real files through the real apsw VFS, no processes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nodes.disk import Disk, DiskFaultError
from nodes.storage import Storage, StorageFull, StorageIOError, StoredMessage, hashes_at_restart

PK = "05" + "ab" * 32


def msg(i: int) -> StoredMessage:
    return StoredMessage(PK, 0, f"hash{i:04d}", b"x" * 500 + i.to_bytes(4, "big"), 1_000 + i, 10**12)


def fill(db: Storage, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        db.store(msg(i))


def reopen(path: Path) -> Storage:
    return Storage(path, disk=Disk(random.Random(0)))


def test_synced_commits_survive_a_power_loss(tmp_path: Path) -> None:
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk, synchronous="FULL")
    fill(db, 20)
    assert disk.pending_writes(str(tmp_path / "db.sqlite-wal")) == 0  # FULL: every commit synced
    disk.power_loss()
    db.close()
    again = reopen(tmp_path / "db.sqlite")
    assert again.count() == 20


def test_unsynced_commits_are_lost(tmp_path: Path) -> None:
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk, synchronous="FULL")
    fill(db, 5)
    db._db.execute("PRAGMA synchronous=OFF")  # from here on SQLite never syncs
    fill(db, 30, start=5)
    assert db.count() == 35 and disk.pending_writes(str(tmp_path / "db.sqlite-wal")) > 0
    report = disk.power_loss()
    db.close()
    assert report.files["db.sqlite-wal"]["bytes_lost"] > 0
    again = reopen(tmp_path / "db.sqlite")
    assert again.count() == 5
    assert again._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_restart_view_names_what_a_power_loss_took(tmp_path: Path) -> None:
    # What a node logs at a power loss (nodes/admin.py) for swarmnet trace: held before, not after.
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk, synchronous="FULL")
    fill(db, 5)
    db._db.execute("PRAGMA synchronous=OFF")
    fill(db, 10, start=5)
    held = db.hashes()
    disk.power_loss()
    kept, unusable = hashes_at_restart(tmp_path / "db.sqlite")
    assert unusable is None and held - kept == {f"hash{i:04d}" for i in range(5, 15)}
    db.close()
    assert reopen(tmp_path / "db.sqlite").hashes() == kept


def _torn_run(d: Path, seed: int) -> tuple[dict, list[str]]:
    d.mkdir()
    disk = Disk(random.Random(seed))
    db = Storage(d / "db.sqlite", disk=disk, synchronous="OFF")
    fill(db, 40)
    report = disk.power_loss(torn=True)
    db.close()
    # Not the files' bytes: SQLite salts each WAL from its own PRNG; what was lost is exact.
    return report.to_json(), [m.hash for m in reopen(d / "db.sqlite").get_many(f"hash{i:04d}" for i in range(40))]


def test_a_torn_power_loss_is_exact_for_a_seed(tmp_path: Path) -> None:
    a = _torn_run(tmp_path / "a", 7)
    b = _torn_run(tmp_path / "b", 7)
    assert a == b  # same seed, same bytes lost
    assert a[0]["torn"] and 0 <= len(a[1]) <= 40
    others = {repr(_torn_run(tmp_path / f"s{s}", s)[0]) for s in range(3)}
    assert len(others) > 1  # the seed does choose what survives


def test_full_disk_refuses_writes_and_serves_reads_then_recovers(tmp_path: Path) -> None:
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk)
    fill(db, 3)
    disk.arm("full")
    with pytest.raises(StorageFull):
        db.store(msg(99))
    got, _ = db.retrieve(PK, 0, None, 0)
    assert [m.hash for m in got] == ["hash0000", "hash0001", "hash0002"]
    disk.heal("full")
    assert db.store(msg(99)) is True
    assert db.count() == 4


def test_io_errors_fail_the_armed_ops_only(tmp_path: Path) -> None:
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk)
    fill(db, 3)
    disk.arm("error", ops=["sync"])
    with pytest.raises(StorageIOError):
        db.store(msg(50))
    disk.heal()
    assert db.store(msg(51)) is True
    with pytest.raises(DiskFaultError):
        disk.arm("error", ops=["fsck"])
    with pytest.raises(DiskFaultError):
        disk.arm("melt")


def test_slow_syncs_are_owed_not_slept(tmp_path: Path) -> None:
    disk = Disk(random.Random(1))
    db = Storage(tmp_path / "db.sqlite", disk=disk)
    disk.arm("slow", sync_ms=250)
    fill(db, 2)
    owed = disk.take_owed_s()
    assert owed >= 0.5 and disk.take_owed_s() == 0.0  # at least one WAL sync per commit


def test_corrupt_reads_flip_bits_deterministically(tmp_path: Path) -> None:
    def run(d: Path) -> dict:
        d.mkdir()
        Storage(d / "db.sqlite", disk=Disk(random.Random(3))).close()
        db0 = Storage(d / "db.sqlite", disk=Disk(random.Random(3)))
        fill(db0, 50)
        db0.close()
        disk = Disk(random.Random(3))
        disk.arm("corrupt", rate=0.5)
        try:  # the open's integrity check reads every page
            Storage(d / "db.sqlite", disk=disk).get_many([f"hash{i:04d}" for i in range(50)])
        except Exception as exc:  # noqa: BLE001 - SQLite may or may not notice a flipped bit
            return {"error": type(exc).__name__, **disk.counts}
        return dict(disk.counts)

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a == b and a["flipped"] > 0


def test_a_database_found_corrupt_at_open_is_set_aside_never_served(tmp_path: Path) -> None:
    from nodes.server import open_storage

    path = tmp_path / "db.sqlite"
    db = Storage(path, disk=Disk(random.Random(1)))
    fill(db, 200)
    db.close()
    with open(path, "r+b") as fh:  # a b-tree page overwritten: what a torn or misdirected write leaves
        fh.seek(4096 * 3)
        fh.write(b"\xa5" * 4096)
    again = open_storage(path, Disk(random.Random(1)), "FULL")
    assert again.count() == 0  # a fresh store, for anti-entropy to fill from the swarm's peers
    assert (tmp_path / "db.sqlite.corrupt").exists()
