"""A service node's message store: one SQLite file per node.

Modelled on oxen-storage-server's ``Database``: messages keyed by their hash,
kept in storage order per (pubkey, namespace), read back "after last_hash",
removed once expired. Synchronous, with no trio and no clock: every time is an
int of ms since the epoch passed in by the caller, and no call fsyncs per
message, so the node may call it straight from its trio loop. Pubkeys are
Session ids: 66 lowercase hex characters.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import apsw

from testnet.base.meter import COUNTS

from .digests import AE_BUCKET_MS, DigestIndex, ae_bucket
from .disk import Disk

__all__ = ["hashes_at_restart", "SCHEMA_VERSION", "AE_BUCKET_MS", "StorageError", "StorageFull", "StorageIOError", "StorageCorrupt",
           "StoredMessage", "StorageStatistics", "Storage", "DigestIndex", "ae_bucket", "SYNCHRONOUS"]

SCHEMA_VERSION = 3
# Bound variables per `IN (...)` query: SQLite allows 32766 since 3.32 but only
# 999 before, and a few hundred already amortise the statement.
_CHUNK = 500
_PUBKEY = re.compile(r"[0-9a-f]{66}")
_NAMESPACES = range(-(2**15), 2**15)  # oxen-storage-server: a namespace is an int16
_V1 = (
    # AUTOINCREMENT: ids are never reused, even after the newest row is deleted,
    # so "stored after last_hash" keeps its meaning.
    "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT UNIQUE NOT NULL,"
    " pubkey TEXT NOT NULL, namespace INTEGER NOT NULL, timestamp INTEGER NOT NULL,"
    " expiry INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE INDEX messages_owner ON messages (pubkey, namespace, id)",
    "CREATE INDEX messages_expiry ON messages (expiry)",
)
_V2 = (
    # Anti-entropy lists an account's hashes by timestamp bucket, and deleted hashes
    # are remembered (until they could no longer be alive anywhere) so that no
    # peer's copy brings them back, across restarts too.
    "CREATE INDEX messages_time ON messages (pubkey, timestamp)",
    "CREATE TABLE tombstones (hash TEXT PRIMARY KEY, until INTEGER NOT NULL)",
)
_V3 = (
    # A tombstone belongs to the account whose delete left it (a hash is the hash of one
    # account's message: another account's delete naming it must not block that message),
    # and keeps the proof of that delete — the account's signed request, opaque here — so
    # that it can be forwarded and verified.  Version 2's tombstones name no account:
    # they stand for any (pubkey '') and have no proof.
    "CREATE TABLE tombstones_v3 (pubkey TEXT NOT NULL, hash TEXT NOT NULL, until INTEGER NOT NULL,"
    " proof INTEGER, PRIMARY KEY (pubkey, hash))",
    "INSERT INTO tombstones_v3 (pubkey, hash, until) SELECT '', hash, until FROM tombstones",
    "DROP TABLE tombstones",
    "ALTER TABLE tombstones_v3 RENAME TO tombstones",
    "CREATE TABLE proofs (id INTEGER PRIMARY KEY, digest BLOB UNIQUE NOT NULL, proof BLOB NOT NULL,"
    " until INTEGER NOT NULL)",
    "CREATE INDEX proofs_until ON proofs (until)",
)
_SCHEMA = _V1 + _V2 + _V3
_MIGRATIONS = {1: _V2 + _V3, 2: _V3}  # from version N to SCHEMA_VERSION
_COLUMNS = "pubkey, namespace, hash, data, timestamp, expiry"  # StoredMessage's field order


class StorageError(Exception):
    """Nonsense input, an unusable database file, or a failed SQLite call."""


class StorageFull(StorageError):
    """The disk is full: nothing of the write was kept (PROTOCOL.md: 507)."""


class StorageIOError(StorageError):
    """The disk failed to read, write or sync: nothing of the write was kept (503)."""


class StorageCorrupt(StorageError):
    """SQLite found the database file damaged: nothing it holds may be served."""


def _storage_error(what: str, e: apsw.Error) -> StorageError:
    if isinstance(e, apsw.FullError):
        return StorageFull(f"{what}: disk full: {e}")
    if isinstance(e, (apsw.CorruptError, apsw.NotADBError)):
        return StorageCorrupt(f"{what}: database corrupt: {e}")
    if isinstance(e, apsw.IOError):
        return StorageIOError(f"{what}: disk I/O error: {e}")
    return StorageError(f"{what}: {e}")


# The WAL is synced at every commit: an acknowledged store survives a power loss
# (PROTOCOL.md, "What an acknowledgement means"; the costs measured are there).
SYNCHRONOUS = "FULL"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as stored: timestamp and expiry in ms since the epoch, data opaque."""

    pubkey: str
    namespace: int
    hash: str
    data: bytes
    timestamp: int
    expiry: int


@dataclass(frozen=True, slots=True)
class StorageStatistics:
    """Counts over every stored row (expired or not) and on-disk sizes in bytes."""

    messages: int
    pubkeys: int
    db_bytes: int
    wal_bytes: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pubkey(pubkey: object) -> str:
    if not isinstance(pubkey, str) or not _PUBKEY.fullmatch(pubkey):
        raise StorageError(f"pubkey must be 66 lowercase hex characters, got {pubkey!r:.80}")
    return pubkey


def _check_namespace(namespace: object) -> int:
    if not _is_int(namespace) or namespace not in _NAMESPACES:
        raise StorageError(f"namespace must be an int16, got {namespace!r:.80}")
    return namespace


_INT64_MAX = 2**63 - 1  # SQLite's INTEGER: a bigger Python int raises OverflowError, not an SQLite error


def _check_ms(name: str, value: object, minimum: int = 0) -> int:
    if not _is_int(value) or not minimum <= value <= _INT64_MAX:
        raise StorageError(f"{name} must be an int of ms in [{minimum}, 2**63), got {value!r:.80}")
    return value


def _check_hash(message_hash: object) -> str:
    if not isinstance(message_hash, str) or not message_hash:
        raise StorageError(f"a message hash must be a non-empty str, got {message_hash!r:.80}")
    return message_hash


def _unique(name: str, values: Iterable[str], check: Callable[[object], str]) -> list[str]:
    """The values checked, in first-seen order, without repeats."""
    if isinstance(values, (str, bytes)):
        raise StorageError(f"{name} must be a collection of str, not one {type(values).__name__}")
    return list(dict.fromkeys(check(v) for v in values))


def _check_message(message: object, index: int) -> tuple:
    try:
        if not isinstance(message, StoredMessage):
            raise StorageError(f"a {type(message).__name__} is not a StoredMessage")
        if not isinstance(message.data, bytes):
            raise StorageError(f"data must be bytes, got {type(message.data).__name__}")
        return (
            _check_pubkey(message.pubkey),
            _check_namespace(message.namespace),
            _check_hash(message.hash),
            message.data,
            _check_ms("timestamp", message.timestamp),
            _check_ms("expiry", message.expiry, minimum=1),
        )
    except StorageError as e:
        raise StorageError(f"message {index}: {e}") from None


def _chunks(values: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """Slices of at most _CHUNK values, each with its `?, ?, ...` placeholders."""
    for start in range(0, len(values), _CHUNK):
        part = values[start : start + _CHUNK]
        yield part, ", ".join("?" * len(part))


def _expiry_filter(now_ms: int | None) -> tuple[str, tuple[int, ...]]:
    """SQL and argument keeping messages unexpired at now_ms; nothing for None."""
    if now_ms is None:
        return "", ()
    return "AND expiry > ?", (_check_ms("now_ms", now_ms),)


class Storage:
    """One node's message store in one SQLite file, used from one thread.

    Every write is one transaction and returns only after it has committed.
    """

    def __init__(self, path: str | os.PathLike[str], *, disk: Disk | None = None,
                 synchronous: str = SYNCHRONOUS) -> None:
        self._path = os.fspath(path)
        self.disk = disk
        if synchronous not in ("OFF", "NORMAL", "FULL"):
            raise StorageError(f"synchronous must be OFF, NORMAL or FULL, got {synchronous!r:.40}")
        self._synchronous = synchronous
        self._db: apsw.Connection | None = None
        # Told (once per file) when SQLite or a caller finds this file damaged at run time.
        self.on_corrupt: Callable[[StorageCorrupt], None] | None = None
        self._damaged = False
        # Set when this file replaced one set aside as damaged, until the node has caught up
        # with its swarm's peers: what it lacks is not known yet (nodes.server).
        self.rebuilding = False
        self.set_aside_count = 0
        self._open(version=0)

    def _open(self, version: int) -> None:
        try:
            # apsw opens no implicit transactions: each write opens its own
            # with BEGIN IMMEDIATE and commits before returning.  With a disk,
            # every file SQLite touches goes through the harness's VFS.
            self._db = apsw.Connection(self._path, vfs=self.disk.vfs_name if self.disk is not None else None)
            self._db.setbusytimeout(2000)
        except apsw.Error as e:
            raise _storage_error(f"cannot open {self._path!r}", e) from e
        try:
            with self._guard("open") as db:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal" and self._path != ":memory:":
                    raise StorageError(f"{self._path!r}: SQLite refused WAL mode (got {mode!r})")
                # Durability: FULL syncs the WAL at every commit, so a commit
                # that returned survives a power loss of the disk under it;
                # NORMAL syncs only at checkpoints (a power loss may lose the
                # latest commits), OFF never.  Group commit lets one sync cover
                # every store that arrived together.
                db.execute(f"PRAGMA synchronous={self._synchronous}")
            with self._guard("open") as db:
                # A damaged file is never served from: the caller sets it aside and
                # rebuilds from its swarm's peers (nodes.server.open_storage).
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StorageCorrupt(f"{self._path!r}: integrity check failed: {check:.200}")
            with self._transaction("open") as db:
                self._migrate(db)
            # A new file's digests are a new state: never equal to a version the old file had.
            self.index = DigestIndex()
            self.index.version = version
            with self._guard("open") as db:
                for pubkey, message_hash, timestamp in db.execute("SELECT pubkey, hash, timestamp FROM messages"):
                    self.index.add(pubkey, message_hash, timestamp)
                self._tombstones: set[tuple[str, str]] = set(db.execute("SELECT pubkey, hash FROM tombstones"))
        except BaseException:
            self.close()
            raise

    def set_aside(self) -> None:
        """Close this (damaged) file, keep it beside the new one as ``.corrupt`` (for a
        person to look at; the last one set aside), and start an empty one in its place:
        :attr:`rebuilding` until the node has caught up with its swarm's peers."""
        version = self.index.version + 1 if getattr(self, "index", None) is not None else 0
        self.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self._path + suffix):
                os.replace(self._path + suffix, self._path + ".corrupt" + suffix)
        self._damaged = False
        self.rebuilding = True
        self.set_aside_count += 1
        self._open(version=version)

    def found_corrupt(self, exc: StorageCorrupt) -> None:
        """Say that this file was found damaged at run time (SQLite's own checks, or a
        message read back whose content does not match its hash): the listener is told once."""
        if not self._damaged:
            self._damaged = True
            if self.on_corrupt is not None:
                self.on_corrupt(exc)

    @property
    def damaged(self) -> bool:
        """Found damaged and not yet set aside: nothing read from it may be served."""
        return self._damaged

    @property
    def path(self) -> str:
        """The database file's path."""
        return self._path

    def _migrate(self, db: apsw.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version in _MIGRATIONS:
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version != 0:
            raise StorageError(f"{self._path!r}: schema version {version}, this code knows {SCHEMA_VERSION}")
        if db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
            raise StorageError(f"{self._path!r} has tables but no schema version: not a message store")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _guard(self, what: str) -> Iterator[apsw.Connection]:
        """The open connection, with SQLite's errors raised as StorageError (or the
        subclass that says the disk is full, failing, or the file corrupt)."""
        if self._db is None:
            raise StorageError(f"{what}: storage is closed")
        try:
            yield self._db
        except apsw.Error as e:
            error = _storage_error(what, e)
            if isinstance(error, StorageCorrupt):
                self.found_corrupt(error)
            raise error from e

    @contextmanager
    def _transaction(self, what: str) -> Iterator[apsw.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        with self._guard(what) as db:
            # IMMEDIATE takes the write lock first, so what we read inside
            # (which hashes exist) cannot change before we write.
            db.execute("BEGIN IMMEDIATE")
            COUNTS["sqlite_transactions"] += 1
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the file; later calls raise StorageError. Safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except apsw.Error:  # a disk that failed (or lost power) cannot checkpoint: the files stay as they are
                try:
                    db.close(True)  # and statements still open are finalised
                except apsw.Error:
                    pass

    def store_many(self, messages: Sequence[StoredMessage]) -> list[bool]:
        """Store a batch in one transaction; per message, True if new and False if a duplicate.

        A duplicate hash (stored before, or earlier in the batch) keeps its first
        copy, and its expiry only ever grows to the later of the two. If any
        message is invalid, none is stored.
        """
        rows = [_check_message(m, i) for i, m in enumerate(messages)]
        if not rows:
            return []
        with self._transaction("store") as db:
            seen: set[str] = set()
            for part, marks in _chunks(list(dict.fromkeys(row[2] for row in rows))):
                seen.update(h for (h,) in db.execute(f"SELECT hash FROM messages WHERE hash IN ({marks})", part))
            results = []
            for row in rows:
                results.append(row[2] not in seen)
                seen.add(row[2])
            db.executemany(
                f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (hash) DO UPDATE SET expiry = max(expiry, excluded.expiry)",
                rows,
            )
        for row, new in zip(rows, results):
            if new:
                self.index.add(row[0], row[2], row[4])
        return results

    def store(self, message: StoredMessage) -> bool:
        """Store one message; True if it was new (see store_many)."""
        return self.store_many([message])[0]

    def delete(self, pubkey: str, hashes: Iterable[str], *, tombstone_until: int | None = None,
               proof: bytes | None = None) -> list[str]:
        """Delete the pubkey's (only) messages with these hashes; those deleted, in the given order.

        With ``tombstone_until`` (ms), every hash asked for — held here or not —
        is also remembered as deleted for this pubkey until then, in the same
        transaction (see :meth:`tombstoned`), with ``proof`` (opaque bytes: what
        authorised the delete) when given: see :meth:`tombstone_proofs`.
        """
        sql = "DELETE FROM messages WHERE pubkey = ? AND hash IN ({}) RETURNING hash, timestamp"
        tomb = None if tombstone_until is None else _check_ms("tombstone_until", tombstone_until)
        if proof is not None and not isinstance(proof, bytes):
            raise StorageError(f"a proof must be bytes, got {type(proof).__name__}")
        gone = self._by_owner("delete", sql, (_check_pubkey(pubkey),), hashes, tombstone_until=tomb,
                              proof=proof)
        for message_hash, timestamp in gone.items():
            self.index.remove(pubkey, message_hash, timestamp)
        return list(gone)

    def expire(self, pubkey: str, hashes: Iterable[str], expiry_ms: int) -> list[str]:
        """Set the expiry (ms) of the pubkey's messages with these hashes; the hashes updated."""
        # Unlike a duplicate store this may shorten a life, as Session's signed expire may.
        sql = "UPDATE messages SET expiry = ? WHERE pubkey = ? AND hash IN ({}) RETURNING hash, timestamp"
        args = (_check_ms("expiry_ms", expiry_ms, minimum=1), _check_pubkey(pubkey))
        return list(self._by_owner("expire", sql, args, hashes))

    def _by_owner(self, what: str, sql: str, args: tuple, hashes: Iterable[str], *,
                  tombstone_until: int | None = None, proof: bytes | None = None) -> dict[str, int]:
        """Run ``sql`` (returning hash, timestamp) over the hashes: hash -> timestamp of those
        it touched, in the given order.  ``args[-1]`` is the pubkey (its tombstones)."""
        wanted = _unique("hashes", hashes, _check_hash)
        if not wanted:
            return {}
        done: dict[str, int] = {}
        pubkey = args[-1]
        with self._transaction(what) as db:
            for part, marks in _chunks(wanted):
                done.update(db.execute(sql.format(marks), (*args, *part)))
            if tombstone_until is not None:
                proof_id = None
                if proof is not None:
                    # The same signed delete often comes twice (fanned out, then from anti-entropy).
                    proof_id = db.execute(
                        "INSERT INTO proofs (digest, proof, until) VALUES (?, ?, ?) ON CONFLICT (digest) DO "
                        "UPDATE SET until = max(until, excluded.until) RETURNING id",
                        (hashlib.blake2b(proof, digest_size=16).digest(), proof, tombstone_until)).fetchone()[0]
                # A tombstone keeps the proof of its latest delete (the one that set its `until`).
                db.executemany("INSERT INTO tombstones (pubkey, hash, until, proof) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (pubkey, hash) DO UPDATE SET proof = CASE WHEN excluded.proof IS NOT "
                               "NULL AND (proof IS NULL OR excluded.until >= until) THEN excluded.proof ELSE proof "
                               "END, until = max(until, excluded.until)",
                               [(pubkey, h, tombstone_until, proof_id) for h in wanted])
        if tombstone_until is not None:
            self._tombstones.update((pubkey, h) for h in wanted)
        return {h: done[h] for h in wanted if h in done}

    def tombstoned(self, pubkey: str, message_hash: str) -> bool:
        """Whether this account's message with this hash was deleted (with a tombstone still
        in force): copies of it from peers, by replication or anti-entropy, must not be
        stored again."""
        return (pubkey, message_hash) in self._tombstones or ("", message_hash) in self._tombstones

    def tombstone_proofs(self, pubkey: str, hashes: Iterable[str]) -> list[bytes]:
        """The proofs (as given to :meth:`delete`) of this account's tombstones of these
        hashes, each once; tombstones without a proof give none."""
        wanted = _unique("hashes", hashes, _check_hash)
        found: dict[int, bytes] = {}
        with self._guard("tombstone_proofs") as db:
            for part, marks in _chunks(wanted):
                sql = (f"SELECT p.id, p.proof FROM tombstones t JOIN proofs p ON p.id = t.proof "
                       f"WHERE t.pubkey = ? AND t.hash IN ({marks})")
                found.update(db.execute(sql, (_check_pubkey(pubkey), *part)))
        return [found[k] for k in sorted(found)]

    def delete_expired(self, now_ms: int) -> int:
        """Remove every message whose expiry is at or before now_ms (and every tombstone
        that ran out); how many messages went."""
        # oxen-storage-server runs this every 10 s (Database::CLEANUP_PERIOD).
        now_ms = _check_ms("now_ms", now_ms)
        with self._transaction("delete_expired") as db:
            gone = db.execute("DELETE FROM messages WHERE expiry <= ? RETURNING pubkey, hash, timestamp",
                              (now_ms,)).fetchall()
            buried = db.execute("DELETE FROM tombstones WHERE until <= ? RETURNING pubkey, hash",
                                (now_ms,)).fetchall()
            db.execute("DELETE FROM proofs WHERE until <= ?", (now_ms,))
        self._tombstones.difference_update(buried)
        for pubkey, message_hash, timestamp in gone:
            self.index.remove(pubkey, message_hash, timestamp)
        return len(gone)

    def retrieve(
        self, pubkey: str, namespace: int, last_hash: str | None, now_ms: int, limit: int = 256
    ) -> tuple[list[StoredMessage], bool]:
        """Unexpired messages of (pubkey, namespace) stored after last_hash, oldest first.

        At most `limit` of them, and whether more follow. A None, empty or
        unknown last_hash (or another pubkey's or namespace's) reads from the
        start (oxen-storage-server: a last hash not found returns everything).
        """
        pubkey, namespace = _check_pubkey(pubkey), _check_namespace(namespace)
        now_ms = _check_ms("now_ms", now_ms)
        if last_hash is not None and not isinstance(last_hash, str):
            raise StorageError(f"last_hash must be a str or None, got {type(last_hash).__name__}")
        if not _is_int(limit) or limit < 1:
            raise StorageError(f"limit must be an int >= 1, got {limit!r:.80}")
        # One statement, so finding last_hash and reading after it see one state.
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE pubkey = ? AND namespace = ? AND expiry > ? AND id >"
            " coalesce((SELECT id FROM messages WHERE hash = ? AND pubkey = ? AND namespace = ?), 0)"
            " ORDER BY id LIMIT ?"
        )
        args = (pubkey, namespace, now_ms, last_hash or "", pubkey, namespace, limit + 1)
        with self._guard("retrieve") as db:
            rows = db.execute(sql, args).fetchall()
        return [StoredMessage(*r) for r in rows[:limit]], len(rows) > limit

    def hashes(self) -> set[str]:
        """Every stored message's hash (expired or not)."""
        with self._guard("hashes") as db:
            return {h for (h,) in db.execute("SELECT hash FROM messages")}

    def has(self, message_hash: str) -> bool:
        """Whether a message with this hash is stored (expired or not)."""
        with self._guard("has") as db:
            sql = "SELECT 1 FROM messages WHERE hash = ?"
            return db.execute(sql, (_check_hash(message_hash),)).fetchone() is not None

    def get_many(self, hashes: Iterable[str]) -> list[StoredMessage]:
        """The stored messages (expired or not) with these hashes, in the given order; unknown ones skipped."""
        wanted = _unique("hashes", hashes, _check_hash)
        found: dict[str, StoredMessage] = {}
        with self._guard("get_many") as db:
            for part, marks in _chunks(wanted):
                for row in db.execute(f"SELECT {_COLUMNS} FROM messages WHERE hash IN ({marks})", part):
                    found[row[2]] = StoredMessage(*row)
        return [found[h] for h in wanted if h in found]

    def messages_for(self, pubkeys: Iterable[str] | None = None, now_ms: int | None = None) -> list[StoredMessage]:
        """Messages of these pubkeys (None: all), every namespace, in storage order, for bulk pushes.

        With now_ms only those unexpired then; with None every stored row.
        """
        expiry_sql, expiry_args = _expiry_filter(now_ms)
        keys = None if pubkeys is None else _unique("pubkeys", pubkeys, _check_pubkey)
        rows: list[tuple] = []
        with self._guard("messages_for") as db:
            if keys is None:
                rows.extend(db.execute(f"SELECT id, {_COLUMNS} FROM messages WHERE 1 {expiry_sql}", expiry_args))
            for part, marks in _chunks(keys or []):
                sql = f"SELECT id, {_COLUMNS} FROM messages WHERE pubkey IN ({marks}) {expiry_sql}"
                rows.extend(db.execute(sql, (*part, *expiry_args)))
        rows.sort(key=lambda r: r[0])
        return [StoredMessage(*r[1:]) for r in rows]

    def ae_digests(self, pubkey_filter: Callable[[str], bool] | None = None) -> dict[str, str]:
        """Anti-entropy, step 1: per pubkey (that the filter accepts), the digest of its
        messages. Equal sets give equal digests, whatever the storage order."""
        return self.index.totals(pubkey_filter)

    def ae_buckets(self, pubkeys: Iterable[str]) -> dict[str, dict[int, str]]:
        """Anti-entropy, step 2: the digest of each bucket of these pubkeys."""
        return self.index.buckets(_unique("pubkeys", pubkeys, _check_pubkey))

    def ae_hashes(self, wanted: dict[str, Iterable[int]], now_ms: int | None = None) -> dict[str, list[str]]:
        """Anti-entropy, step 3: the sorted hashes in these buckets, per pubkey (every one a key).

        now_ms filters as in messages_for, so nobody fetches what has expired.
        """
        expiry_sql, expiry_args = _expiry_filter(now_ms)
        sql = f"SELECT hash, timestamp FROM messages WHERE pubkey = ? AND timestamp >= ? AND timestamp < ? {expiry_sql}"
        out: dict[str, list[str]] = {}
        with self._guard("ae_hashes") as db:
            for pubkey, buckets in wanted.items():
                keep = {b for b in buckets if _is_int(b) and 0 <= b < _INT64_MAX // AE_BUCKET_MS}
                found: list[str] = []
                out[_check_pubkey(pubkey)] = found
                if keep:
                    lo, hi = min(keep) * AE_BUCKET_MS, (max(keep) + 1) * AE_BUCKET_MS
                    found.extend(h for h, t in db.execute(sql, (pubkey, lo, hi, *expiry_args)) if ae_bucket(t) in keep)
                    found.sort()
        return out

    def count(self) -> int:
        """Number of stored messages, expired ones included until delete_expired."""
        with self._guard("count") as db:
            return db.execute("SELECT count(*) FROM messages").fetchone()[0]

    def pubkeys(self) -> list[str]:
        """Distinct pubkeys with at least one stored message, sorted."""
        with self._guard("pubkeys") as db:
            return [p for (p,) in db.execute("SELECT DISTINCT pubkey FROM messages ORDER BY pubkey")]

    def statistics(self) -> StorageStatistics:
        """Message and pubkey counts, the database's size and its WAL file's (bytes)."""
        with self._guard("statistics") as db:
            messages, pubkeys = db.execute("SELECT count(*), count(DISTINCT pubkey) FROM messages").fetchone()
            db_bytes = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        try:
            wal_bytes = os.path.getsize(self._path + "-wal")
        except OSError:
            wal_bytes = 0
        return StorageStatistics(messages, pubkeys, db_bytes, wal_bytes)


def hashes_at_restart(path: str | os.PathLike[str]) -> tuple[set[str], str | None]:
    """The message hashes a node restarting on these files now would hold, and why none
    if its check at open would set the database aside (else None).

    Reads a copy of the database and its WAL (SQLite recovers the WAL of the copy as it
    would at the restart), so the files themselves, and whoever holds them open, are
    left alone.  For the record of what a power loss took (nodes/admin.py).
    """
    base = os.fspath(path)
    with tempfile.TemporaryDirectory(prefix=".restart-", dir=os.path.dirname(os.path.abspath(base))) as tmp:
        copy = os.path.join(tmp, "db.sqlite")
        for suffix in ("", "-wal"):
            if os.path.exists(base + suffix):
                shutil.copyfile(base + suffix, copy + suffix)
        if not os.path.exists(copy):
            return set(), None
        db = None
        try:
            db = apsw.Connection(copy)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                return set(), f"integrity check failed: {check:.200}"
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
                return set(), None
            return {h for (h,) in db.execute("SELECT hash FROM messages")}, None
        except apsw.Error as e:
            return set(), f"{type(e).__name__}: {e}"[:200]
        finally:
            if db is not None:
                db.close()
