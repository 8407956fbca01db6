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
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby

__all__ = ["SCHEMA_VERSION", "StorageError", "StoredMessage", "StorageStatistics", "Storage", "digest_of"]

SCHEMA_VERSION = 1
# Bound variables per `IN (...)` query: SQLite allows 32766 since 3.32 but only
# 999 before, and a few hundred already amortise the statement.
_CHUNK = 500
_PUBKEY = re.compile(r"[0-9a-f]{66}")
_NAMESPACES = range(-(2**15), 2**15)  # oxen-storage-server: a namespace is an int16
_SCHEMA = (
    # AUTOINCREMENT: ids are never reused, even after the newest row is deleted,
    # so "stored after last_hash" keeps its meaning.
    "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT UNIQUE NOT NULL,"
    " pubkey TEXT NOT NULL, namespace INTEGER NOT NULL, timestamp INTEGER NOT NULL,"
    " expiry INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE INDEX messages_owner ON messages (pubkey, namespace, id)",
    "CREATE INDEX messages_expiry ON messages (expiry)",
)
_COLUMNS = "pubkey, namespace, hash, data, timestamp, expiry"  # StoredMessage's field order


class StorageError(Exception):
    """Nonsense input, an unusable database file, or a failed SQLite call."""


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


def digest_of(hashes: Iterable[str]) -> str:
    """Hex blake2b-128 of a set of message hashes, whatever their order; as `Storage.digest`."""
    h = hashlib.blake2b(digest_size=16)
    for message_hash in sorted(set(hashes)):
        h.update(message_hash.encode() + b"\n")  # base64 never holds a newline
    return h.hexdigest()


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


def _check_ms(name: str, value: object, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        raise StorageError(f"{name} must be an int of ms >= {minimum}, got {value!r:.80}")
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        try:
            # isolation_level=None: no implicit transactions; each write opens
            # its own with BEGIN IMMEDIATE and commits before returning.
            self._db: sqlite3.Connection | None = sqlite3.connect(self._path, isolation_level=None, timeout=2.0)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open {self._path!r}: {e}") from e
        try:
            with self._guard("open") as db:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal" and self._path != ":memory:":
                    raise StorageError(f"{self._path!r}: SQLite refused WAL mode (got {mode!r})")
                # Durability: in WAL mode a commit hands its frames to the OS
                # with write(2) before it returns, so an acknowledged store sits
                # in the page cache and survives a kill -9 of this process (the
                # next open replays the WAL). OFF also skips the fsyncs at
                # checkpoints: the testnet's fault model is process death, not
                # power loss, and on a shared disk those fsyncs cost ~30 % of
                # store throughput (measured with `swarmnet bench node`). A
                # power cut or an OS crash may lose or corrupt recent commits.
                db.execute("PRAGMA synchronous=OFF")
            with self._transaction("open") as db:
                self._migrate(db)
        except BaseException:
            self.close()
            raise

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise StorageError(f"{self._path!r}: schema version {version}, this code knows {SCHEMA_VERSION}")
        if db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
            raise StorageError(f"{self._path!r} has tables but no schema version: not a message store")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _guard(self, what: str) -> Iterator[sqlite3.Connection]:
        """The open connection, with SQLite's errors raised as StorageError."""
        if self._db is None:
            raise StorageError(f"{what}: storage is closed")
        try:
            yield self._db
        except sqlite3.Error as e:
            raise StorageError(f"{what}: {e}") from e

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        with self._guard(what) as db:
            # IMMEDIATE takes the write lock first, so what we read inside
            # (which hashes exist) cannot change before we write.
            db.execute("BEGIN IMMEDIATE")
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
            db.close()

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
        return results

    def store(self, message: StoredMessage) -> bool:
        """Store one message; True if it was new (see store_many)."""
        return self.store_many([message])[0]

    def delete(self, pubkey: str, hashes: Iterable[str]) -> list[str]:
        """Delete the pubkey's (only) messages with these hashes; those deleted, in the given order."""
        sql = "DELETE FROM messages WHERE pubkey = ? AND hash IN ({}) RETURNING hash"
        return self._by_owner("delete", sql, (_check_pubkey(pubkey),), hashes)

    def expire(self, pubkey: str, hashes: Iterable[str], expiry_ms: int) -> list[str]:
        """Set the expiry (ms) of the pubkey's messages with these hashes; the hashes updated."""
        # Unlike a duplicate store this may shorten a life, as Session's signed expire may.
        sql = "UPDATE messages SET expiry = ? WHERE pubkey = ? AND hash IN ({}) RETURNING hash"
        args = (_check_ms("expiry_ms", expiry_ms, minimum=1), _check_pubkey(pubkey))
        return self._by_owner("expire", sql, args, hashes)

    def _by_owner(self, what: str, sql: str, args: tuple, hashes: Iterable[str]) -> list[str]:
        wanted = _unique("hashes", hashes, _check_hash)
        if not wanted:
            return []
        done: set[str] = set()
        with self._transaction(what) as db:
            for part, marks in _chunks(wanted):
                done.update(h for (h,) in db.execute(sql.format(marks), (*args, *part)))
        return [h for h in wanted if h in done]

    def delete_expired(self, now_ms: int) -> int:
        """Remove every message whose expiry is at or before now_ms; how many went."""
        # oxen-storage-server runs this every 10 s (Database::CLEANUP_PERIOD).
        now_ms = _check_ms("now_ms", now_ms)
        with self._transaction("delete_expired") as db:
            return db.execute("DELETE FROM messages WHERE expiry <= ?", (now_ms,)).rowcount

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

    def hashes_for(self, pubkeys: Iterable[str], now_ms: int | None = None) -> dict[str, list[str]]:
        """Sorted message hashes per asked pubkey (every one a key), all namespaces.

        now_ms filters as in messages_for. Anti-entropy: where digests differ,
        peers swap these lists and fetch what they lack with get_many.
        """
        wanted = _unique("pubkeys", pubkeys, _check_pubkey)
        expiry_sql, expiry_args = _expiry_filter(now_ms)
        out: dict[str, list[str]] = {pubkey: [] for pubkey in wanted}
        with self._guard("hashes_for") as db:
            for part, marks in _chunks(wanted):
                sql = f"SELECT pubkey, hash FROM messages WHERE pubkey IN ({marks}) {expiry_sql} ORDER BY hash"
                for pubkey, message_hash in db.execute(sql, (*part, *expiry_args)):
                    out[pubkey].append(message_hash)
        return out

    def digest(self, pubkey_filter: Callable[[str], bool] | None = None, now_ms: int | None = None) -> dict[str, str]:
        """digest_of(its hashes) per pubkey holding messages that the filter accepts.

        Equal message sets give equal digests. now_ms filters as in messages_for:
        pass it, or nodes that cleaned up at different times disagree.
        """
        expiry_sql, expiry_args = _expiry_filter(now_ms)
        with self._guard("digest") as db:
            sql = f"SELECT pubkey, hash FROM messages WHERE 1 {expiry_sql} ORDER BY pubkey"
            rows = db.execute(sql, expiry_args).fetchall()
        return {
            pubkey: digest_of(h for _, h in group)
            for pubkey, group in groupby(rows, key=lambda row: row[0])
            if pubkey_filter is None or pubkey_filter(pubkey)
        }

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
