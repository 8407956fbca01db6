"""nodes.storage on real SQLite files: ordering, duplicates, expiry, ownership,
anti-entropy digests, durability across a kill -9, and a model-based test."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nodes.storage import AE_BUCKET_MS, SCHEMA_VERSION, DigestIndex, Storage, StorageError, StoredMessage, ae_bucket

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000_000  # ms
ALICE = "05" + "a1" * 32
BOB = "05" + "b2" * 32


def msg(pubkey: str = ALICE, n: int = 0, *, namespace: int = 0, ttl: int = 60_000, ts: int = NOW) -> StoredMessage:
    """A message whose hash is fixed by (pubkey, namespace, n), as a real hash is by its content."""
    tag = f"{pubkey[2:6]}-{namespace}-{n}"
    return StoredMessage(pubkey, namespace, f"h{tag}", f"data {tag}".encode(), ts, ts + ttl)


@pytest.fixture
def storage(tmp_path: Path):
    s = Storage(tmp_path / "node.sqlite")
    yield s
    s.close()


def hashes(messages: list[StoredMessage]) -> list[str]:
    return [m.hash for m in messages]


def test_retrieve_in_storage_order_after_last_hash(storage: Storage) -> None:
    # Timestamps run backwards: order is the order of storing, not of timestamps.
    mine = [msg(n=i, ts=NOW - i) for i in range(5)]
    for i, m in enumerate(mine):
        storage.store(m)
        storage.store(msg(BOB, i))  # interleaved, must not show up
    assert storage.retrieve(ALICE, 0, None, NOW) == (mine, False)
    assert storage.retrieve(ALICE, 0, "", NOW) == (mine, False)
    assert storage.retrieve(ALICE, 0, mine[1].hash, NOW) == (mine[2:], False)
    assert storage.retrieve(ALICE, 0, mine[-1].hash, NOW) == ([], False)
    # oxen-storage-server: an unknown last hash returns everything.
    assert storage.retrieve(ALICE, 0, "no-such-hash", NOW) == (mine, False)
    # So does another pubkey's or another namespace's hash.
    assert storage.retrieve(ALICE, 0, msg(BOB, 3).hash, NOW) == (mine, False)
    assert storage.retrieve(ALICE, 0, msg(n=0, namespace=2).hash, NOW) == (mine, False)


def test_retrieve_pages_with_limit(storage: Storage) -> None:
    mine = [msg(n=i) for i in range(7)]
    storage.store_many(mine)
    got, last = [], None
    pages = []
    while True:
        page, more = storage.retrieve(ALICE, 0, last, NOW, limit=3)
        pages.append((len(page), more))
        got += page
        if not more:
            break
        last = page[-1].hash
    assert got == mine
    assert pages == [(3, True), (3, True), (1, False)]
    assert storage.retrieve(ALICE, 0, None, NOW, limit=7) == (mine, False)


def test_last_hash_deleted_reads_from_start(storage: Storage) -> None:
    mine = [msg(n=i) for i in range(3)]
    storage.store_many(mine)
    assert storage.delete(ALICE, [mine[0].hash]) == [mine[0].hash]
    assert storage.retrieve(ALICE, 0, mine[0].hash, NOW)[0] == mine[1:]
    # A newer message after the newest was deleted still sorts after the rest.
    assert storage.delete(ALICE, [mine[2].hash]) == [mine[2].hash]
    storage.store(msg(n=9))
    assert hashes(storage.retrieve(ALICE, 0, mine[1].hash, NOW)[0]) == [msg(n=9).hash]


def test_duplicates_are_stored_once_and_expiry_only_grows(storage: Storage) -> None:
    first = msg(n=1, ttl=60_000)
    assert storage.store(first) is True
    shorter = StoredMessage(ALICE, 0, first.hash, b"other bytes", NOW + 5, NOW + 10_000)
    assert storage.store(shorter) is False
    assert storage.count() == 1
    assert storage.get_many([first.hash]) == [first]  # nothing changed, not even data/timestamp
    longer = StoredMessage(ALICE, 0, first.hash, first.data, NOW + 5, NOW + 120_000)
    assert storage.store(longer) is False
    assert storage.get_many([first.hash])[0].expiry == NOW + 120_000
    assert storage.get_many([first.hash])[0].timestamp == NOW
    assert storage.count() == 1


def test_duplicates_within_one_batch(storage: Storage) -> None:
    a, b = msg(n=1, ttl=1_000), msg(n=2)
    a_later = StoredMessage(a.pubkey, a.namespace, a.hash, a.data, a.timestamp, a.expiry + 5_000)
    assert storage.store_many([a, b, a_later, b]) == [True, True, False, False]
    assert storage.count() == 2
    assert storage.get_many([a.hash])[0].expiry == a.expiry + 5_000
    assert storage.store_many([]) == []


def test_namespaces_are_isolated(storage: Storage) -> None:
    plain, other, negative = msg(n=1), msg(n=1, namespace=3), msg(n=1, namespace=-10)
    assert storage.store_many([plain, other, negative]) == [True, True, True]
    assert storage.retrieve(ALICE, 0, None, NOW)[0] == [plain]
    assert storage.retrieve(ALICE, 3, None, NOW)[0] == [other]
    assert storage.retrieve(ALICE, -10, None, NOW)[0] == [negative]
    assert storage.retrieve(ALICE, 4, None, NOW)[0] == []
    assert storage.messages_for([ALICE]) == [plain, other, negative]


def test_expiry_filters_retrieve_and_delete_expired(storage: Storage) -> None:
    short, mid, long = msg(n=1, ttl=1_000), msg(n=2, ttl=2_000), msg(n=3, ttl=3_000)
    storage.store_many([short, mid, long, msg(BOB, 1, ttl=1_500)])
    assert storage.retrieve(ALICE, 0, None, NOW + 999)[0] == [short, mid, long]
    # expiry == now counts as expired.
    assert storage.retrieve(ALICE, 0, None, NOW + 1_000)[0] == [mid, long]
    # An expired last hash is still a position: reading resumes after it.
    assert storage.retrieve(ALICE, 0, short.hash, NOW + 1_000)[0] == [mid, long]
    assert storage.count() == 4  # expired rows stay until cleaned up
    assert storage.delete_expired(NOW + 2_000) == 3
    assert storage.count() == 1
    assert storage.get_many([short.hash, mid.hash, long.hash]) == [long]
    assert storage.delete_expired(NOW + 2_000) == 0
    assert storage.messages_for(now_ms=NOW + 3_000) == []
    assert storage.messages_for() == [long]


def test_delete_only_deletes_own_pubkeys_messages(storage: Storage) -> None:
    a1, a2, b1 = msg(n=1), msg(n=2), msg(BOB, 1)
    storage.store_many([a1, a2, b1])
    assert storage.delete(BOB, [a1.hash, a2.hash]) == []
    assert storage.count() == 3
    assert storage.delete(ALICE, [a2.hash, "unknown", b1.hash, a1.hash, a2.hash]) == [a2.hash, a1.hash]
    assert storage.messages_for() == [b1]
    assert storage.delete(ALICE, []) == []


def test_expire_sets_expiry_of_own_messages(storage: Storage) -> None:
    a1, a2, b1 = msg(n=1), msg(n=2), msg(BOB, 1)
    storage.store_many([a1, a2, b1])
    assert storage.expire(ALICE, [a1.hash, b1.hash, "unknown"], NOW + 10) == [a1.hash]
    assert storage.get_many([a1.hash])[0].expiry == NOW + 10  # shortened
    assert storage.get_many([b1.hash]) == [b1]
    assert storage.retrieve(ALICE, 0, None, NOW + 10)[0] == [a2]
    assert storage.expire(ALICE, [a1.hash], NOW + 999_999) == [a1.hash]  # and lengthened
    assert storage.get_many([a1.hash])[0].expiry == NOW + 999_999


def test_digests_track_content_and_agree_across_databases(tmp_path: Path) -> None:
    one, two = Storage(tmp_path / "one.sqlite"), Storage(tmp_path / "two.sqlite")
    old = NOW - 3 * AE_BUCKET_MS
    try:
        batch = [msg(n=i, namespace=i % 2, ts=old) for i in range(6)] + [msg(BOB, 1, ttl=500, ts=old)]
        one.store_many(batch)
        two.store_many(batch[::-1])  # other storage order, same set
        d1 = one.ae_digests()
        assert d1 == two.ae_digests()
        assert set(d1) == {ALICE, BOB} and d1[ALICE] != d1[BOB]
        # A message one side lacks changes that pubkey's digest and that bucket's only.
        one.store(msg(n=99, ts=old + 1))
        one.store(msg(n=97, ts=NOW))
        two.store(msg(n=97, ts=NOW))
        d1_after = one.ae_digests()
        assert d1_after[ALICE] != two.ae_digests()[ALICE] and d1_after[BOB] == d1[BOB]
        b1, b2 = one.ae_buckets([ALICE])[ALICE], two.ae_buckets([ALICE])[ALICE]
        assert set(b1) == set(b2) == {ae_bucket(old), ae_bucket(NOW)}
        assert [b for b in b1 if b1[b] != b2[b]] == [ae_bucket(old)]
        assert one.ae_hashes({ALICE: [ae_bucket(old)], BOB: [], "05" + "0" * 64: [1]}, now_ms=NOW) == {
            ALICE: sorted(hashes(batch[:6]) + [msg(n=99).hash]), BOB: [], "05" + "0" * 64: []}
        two.store(msg(n=99, ts=old + 1))
        assert two.ae_digests() == d1_after
        assert set(one.ae_digests(lambda pubkey: pubkey == BOB)) == {BOB}
        # Expired messages are not listed for fetching, and leave the digests once deleted.
        assert one.ae_hashes({BOB: [ae_bucket(old)]}, now_ms=old + 500) == {BOB: []}
        assert one.ae_hashes({BOB: [ae_bucket(old)]}) == {BOB: [batch[6].hash]}
        one.delete_expired(old + 500)
        assert BOB not in one.ae_digests()
        # A delete takes the message out; a reopened store rebuilds the same digests.
        one.delete(ALICE, [msg(n=99).hash])
        assert one.ae_digests()[ALICE] != d1_after[ALICE]
        before_close = one.ae_digests()
        one.close()
        one = Storage(tmp_path / "one.sqlite")
        assert one.ae_digests() == before_close
    finally:
        one.close()
        two.close()


def test_digest_index_is_order_independent_and_counts():
    a, b = DigestIndex(), DigestIndex()
    items = [(ALICE, f"h{i}", NOW + i * 1000) for i in range(12)]
    for it in items:
        a.add(*it)
    for it in reversed(items):
        b.add(*it)
    assert a.totals() == b.totals() and a.buckets([ALICE]) == b.buckets([ALICE])
    assert len(a.buckets([ALICE])[ALICE]) == len({ae_bucket(t) for _, _, t in items})
    b.remove(*items[3])
    assert a.totals() != b.totals()
    assert [k for k, v in a.buckets([ALICE])[ALICE].items() if b.buckets([ALICE])[ALICE].get(k) != v] == \
        [ae_bucket(items[3][2])]
    b.add(*items[3])
    assert a.totals() == b.totals()
    for it in items:
        a.remove(*it)
    assert a.totals() == {} and a.buckets([ALICE]) == {ALICE: {}}


def test_bulk_readers(storage: Storage) -> None:
    a1, b1, a2 = msg(n=1), msg(BOB, 1, namespace=5), msg(n=2, ttl=10)
    storage.store_many([a1, b1, a2])
    assert storage.pubkeys() == [ALICE, BOB]
    assert storage.messages_for() == [a1, b1, a2]
    assert storage.messages_for([BOB, ALICE]) == [a1, b1, a2]
    assert storage.messages_for([ALICE], now_ms=NOW + 10) == [a1]
    assert storage.messages_for([]) == []
    assert storage.has(a1.hash) and not storage.has("nope")
    assert storage.get_many([a2.hash, "nope", a1.hash, a2.hash]) == [a2, a1]
    stats = storage.statistics()
    assert (stats.messages, stats.pubkeys) == (3, 2)
    assert stats.db_bytes > 0 and stats.wal_bytes > 0


def test_store_many_returns_after_commit(tmp_path: Path) -> None:
    writer, reader = Storage(tmp_path / "n.sqlite"), Storage(tmp_path / "n.sqlite")
    try:
        writer.store_many([msg(n=1), msg(n=2)])
        assert reader.count() == 2  # another connection sees it: committed, not pending
        writer.delete(ALICE, [msg(n=1).hash])
        assert hashes(reader.messages_for()) == [msg(n=2).hash]
    finally:
        writer.close()
        reader.close()


def test_schema_pragmas_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite"
    s = Storage(path)
    s.store(msg(n=1))
    s.close()
    s.close()  # twice is fine
    with pytest.raises(StorageError, match="closed"):
        s.count()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexed = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"messages_owner", "messages_expiry", "messages_time"} <= indexed
    finally:
        raw.close()
    again = Storage(path)
    assert again.messages_for() == [msg(n=1)]
    again.close()


def test_tombstones_outlive_the_message_and_a_restart_then_run_out(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    s = Storage(path)
    try:
        s.store(msg(n=1))
        # Every hash asked for is tombstoned, held here or not; a plain delete (rehoming) leaves none.
        assert s.delete(ALICE, [msg(n=1).hash, "hnever-seen"], tombstone_until=NOW + 1000) == [msg(n=1).hash]
        s.store(msg(n=2))
        assert s.delete(ALICE, [msg(n=2).hash]) == [msg(n=2).hash]
        assert s.tombstoned(ALICE, msg(n=1).hash) and s.tombstoned(ALICE, "hnever-seen")
        assert not s.tombstoned(ALICE, msg(n=2).hash)
        # A tombstone is the deleting account's: another's delete naming a hash blocks nothing of ours.
        assert not s.tombstoned(BOB, msg(n=1).hash)
        with pytest.raises(StorageError):
            s.delete(ALICE, ["h"], tombstone_until=-1)
    finally:
        s.close()
    s = Storage(path)
    try:
        assert s.tombstoned(ALICE, msg(n=1).hash)  # a restarted node still refuses the deleted message
        s.delete_expired(NOW + 999)
        assert s.tombstoned(ALICE, msg(n=1).hash)
        s.delete_expired(NOW + 1000)
        assert not s.tombstoned(ALICE, msg(n=1).hash) and not s.tombstoned(ALICE, "hnever-seen")
    finally:
        s.close()
    s = Storage(path)
    try:
        assert not s.tombstoned(ALICE, msg(n=1).hash)
    finally:
        s.close()


def test_tombstones_keep_the_proof_of_their_latest_delete_until_they_run_out(tmp_path: Path) -> None:
    s = Storage(tmp_path / "node.sqlite")
    try:
        h1, h2, h3 = msg(n=1).hash, msg(n=2).hash, msg(n=3).hash
        s.delete(ALICE, [h1, h2], tombstone_until=NOW + 1000, proof=b"first")
        s.delete(ALICE, [h1, h2], tombstone_until=NOW + 1000, proof=b"first")  # the same delete again: one proof
        s.delete(ALICE, [h2], tombstone_until=NOW + 2000, proof=b"later")
        s.delete(ALICE, [h3], tombstone_until=NOW + 3000)  # no proof: nothing to forward
        assert s.tombstone_proofs(ALICE, [h1, h2, h3]) == [b"first", b"later"]
        assert s.tombstone_proofs(ALICE, [h1]) == [b"first"] and s.tombstone_proofs(BOB, [h1]) == []
        s.delete(ALICE, [h2], tombstone_until=NOW + 1500, proof=b"earlier")  # an older delete keeps no hold
        assert s.tombstone_proofs(ALICE, [h2]) == [b"later"]
        s.delete_expired(NOW + 1000)
        assert s.tombstone_proofs(ALICE, [h1, h2]) == [b"later"] and not s.tombstoned(ALICE, h1)
        s.delete_expired(NOW + 2000)
        assert s.tombstone_proofs(ALICE, [h1, h2, h3]) == [] and s.tombstoned(ALICE, h3)
        with pytest.raises(StorageError):
            s.delete(ALICE, [h1], tombstone_until=NOW, proof="text")  # type: ignore[arg-type]
    finally:
        s.close()


def test_version_2_tombstones_stand_for_any_account_after_migration(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    Storage(path).close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE tombstones")
    raw.execute("DROP TABLE proofs")
    raw.execute("CREATE TABLE tombstones (hash TEXT PRIMARY KEY, until INTEGER NOT NULL)")
    raw.execute("INSERT INTO tombstones VALUES (?, ?)", (msg(n=1).hash, NOW + 1000))
    raw.execute("PRAGMA user_version = 2")
    raw.commit()
    raw.close()
    s = Storage(path)
    try:
        # A version-2 tombstone names no account: it still refuses the hash for every one.
        assert s.tombstoned(ALICE, msg(n=1).hash) and s.tombstoned(BOB, msg(n=1).hash)
        assert s.tombstone_proofs(ALICE, [msg(n=1).hash]) == []
        s.delete(ALICE, [msg(n=1).hash], tombstone_until=NOW + 2000, proof=b"p")
        assert s.tombstone_proofs(ALICE, [msg(n=1).hash]) == [b"p"]
        s.delete_expired(NOW + 1000)
        assert s.tombstoned(ALICE, msg(n=1).hash) and not s.tombstoned(BOB, msg(n=1).hash)
    finally:
        s.close()


def test_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    Storage(path).close()
    raw = sqlite3.connect(path)
    raw.execute("DROP INDEX messages_time")
    raw.execute("DROP TABLE tombstones")
    raw.execute("DROP TABLE proofs")
    raw.execute("INSERT INTO messages (hash, pubkey, namespace, timestamp, expiry, data) VALUES (?, ?, 0, ?, ?, ?)",
                (msg(n=5).hash, ALICE, NOW, NOW + 60_000, msg(n=5).data))
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    s = Storage(path)
    try:
        assert s.messages_for() == [msg(n=5)]
        assert s.ae_hashes({ALICE: [ae_bucket(NOW)]}) == {ALICE: [msg(n=5).hash]}
        assert ALICE in s.ae_digests()
        s.delete(ALICE, [msg(n=5).hash], tombstone_until=NOW)
        assert s.tombstoned(ALICE, msg(n=5).hash)
    finally:
        s.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "messages_time" in {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        raw.close()


def test_refuses_foreign_or_future_databases(tmp_path: Path) -> None:
    future = tmp_path / "future.sqlite"
    Storage(future).close()
    raw = sqlite3.connect(future)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StorageError, match="schema version"):
        Storage(future)
    foreign = tmp_path / "foreign.sqlite"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE something (x)")
    raw.commit()
    raw.close()
    with pytest.raises(StorageError, match="not a message store"):
        Storage(foreign)
    with pytest.raises(StorageError, match="cannot open"):
        Storage(tmp_path / "no" / "such" / "dir.sqlite")


@pytest.mark.parametrize(
    "bad",
    [
        StoredMessage("05" + "a" * 63, 0, "h", b"", NOW, NOW + 1),  # 65 characters
        StoredMessage("05" + "A1" * 32, 0, "h", b"", NOW, NOW + 1),  # upper case
        StoredMessage(ALICE, 2**15, "h", b"", NOW, NOW + 1),
        StoredMessage(ALICE, True, "h", b"", NOW, NOW + 1),
        StoredMessage(ALICE, 0, "", b"", NOW, NOW + 1),
        StoredMessage(ALICE, 0, "h", "text", NOW, NOW + 1),
        StoredMessage(ALICE, 0, "h", b"", -1, NOW + 1),
        StoredMessage(ALICE, 0, "h", b"", NOW, 0),
        StoredMessage(ALICE, 0, "h", b"", NOW, 1.5),
        ("not", "a", "message"),
    ],
)
def test_invalid_batch_stores_nothing(storage: Storage, bad: object) -> None:
    with pytest.raises(StorageError, match="message 1"):
        storage.store_many([msg(n=1), bad, msg(n=2)])  # type: ignore[list-item]
    assert storage.count() == 0


def test_invalid_arguments(storage: Storage) -> None:
    with pytest.raises(StorageError):
        storage.retrieve(ALICE, 0, None, NOW, limit=0)
    with pytest.raises(StorageError):
        storage.retrieve(ALICE, 0, None, -1)
    with pytest.raises(StorageError):
        storage.retrieve("bob", 0, None, NOW)
    with pytest.raises(StorageError, match="collection"):
        storage.delete(ALICE, "hsinglehash")
    with pytest.raises(StorageError):
        storage.expire(ALICE, ["h"], 0)
    with pytest.raises(StorageError):
        storage.delete_expired(-5)
    with pytest.raises(StorageError):
        storage.ae_hashes({ALICE: [1]}, now_ms=-1)
    with pytest.raises(StorageError):
        storage.ae_buckets(["bob"])


def test_batch_of_5000_in_one_store_many(storage: Storage) -> None:
    batch = [msg("05" + f"{i % 50:064x}", i, namespace=i % 3) for i in range(5_000)]
    assert storage.store_many(batch) == [True] * 5_000
    assert storage.count() == 5_000
    assert len(storage.pubkeys()) == 50
    assert storage.store_many(batch) == [False] * 5_000
    assert storage.count() == 5_000
    assert len(storage.get_many(hashes(batch))) == 5_000  # crosses the IN (...) chunk size
    assert len(storage.delete(batch[0].pubkey, hashes(batch))) == 100


CHILD = textwrap.dedent(
    """
    import sys, time
    from nodes.storage import Storage, StoredMessage
    s = Storage(sys.argv[1])
    pk = "05" + "c3" * 32
    s.store_many([StoredMessage(pk, 0, f"kill-{i}", b"x" * 100, 1, 10**15) for i in range(20)])
    s.store(StoredMessage(pk, 0, "kill-last", b"last", 1, 10**15))
    print("stored", flush=True)
    time.sleep(30)
    """
)


def test_acknowledged_store_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "stored"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL  # killed, not a clean exit
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        child.stdout.close()
    s = Storage(path)
    try:
        assert s.count() == 21
        assert s.get_many(["kill-last"])[0].data == b"last"
    finally:
        s.close()


# -- model-based test: Storage against a dict --------------------------------------

# A small universe, so that rules often hit stored messages and each other's hashes.
PUBKEYS = [ALICE, BOB]
NAMESPACES = [0, -1]
SERIALS = st.integers(0, 2)
ALL_HASHES = [msg(p, n, namespace=ns).hash for p in PUBKEYS for ns in NAMESPACES for n in range(3)]
# Times move in steps of 10 ms so that expiry == now, the boundary, comes up often.
TICKS = st.integers(1, 30).map(lambda k: 10 * k)
# (pubkey, namespace, serial, ttl ms)
STORE_SPECS = st.tuples(st.sampled_from(PUBKEYS), st.sampled_from(NAMESPACES), SERIALS, TICKS)
CHOSEN = st.lists(st.sampled_from(ALL_HASHES), min_size=1, max_size=5)  # any owner's, some unknown


class StorageMachine(RuleBasedStateMachine):
    """Model: hash -> [storage seq, StoredMessage]; time moves forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="storage-model-")
        self.storage = Storage(os.path.join(self.dir, "node.sqlite"))
        self.model: dict[str, tuple[int, StoredMessage]] = {}
        self.seq = 0
        self.now = NOW

    def teardown(self) -> None:
        self.storage.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def live(self, pubkey: str, namespace: int) -> list[StoredMessage]:
        rows = sorted(v for v in self.model.values() if v[1].pubkey == pubkey and v[1].namespace == namespace)
        return [m for _, m in rows if m.expiry > self.now]

    @initialize(batch=st.lists(STORE_SPECS, min_size=4, max_size=12))
    def fill(self, batch: list[tuple[str, int, int, int]]) -> None:
        self.store(batch)  # start most programs with several messages to act on

    @rule(batch=st.lists(STORE_SPECS, min_size=1, max_size=6))
    def store(self, batch: list[tuple[str, int, int, int]]) -> None:
        # Timestamps spread over several anti-entropy buckets; expiry stays relative to now.
        messages = [replace(msg(p, n, namespace=ns, ts=self.now - (n % 4) * 3000), expiry=self.now + ttl)
                    for p, ns, n, ttl in batch]
        expected = []
        for m in messages:
            expected.append(m.hash not in self.model)
            if m.hash in self.model:
                seq, old = self.model[m.hash]
                self.model[m.hash] = (seq, replace(old, expiry=max(old.expiry, m.expiry)))
            else:
                self.seq += 1
                self.model[m.hash] = (self.seq, m)
        assert self.storage.store_many(messages) == expected

    @rule(pubkey=st.sampled_from(PUBKEYS), chosen=CHOSEN)
    def delete(self, pubkey: str, chosen: list[str]) -> None:
        expected = [h for h in dict.fromkeys(chosen) if h in self.model and self.model[h][1].pubkey == pubkey]
        for h in expected:
            del self.model[h]
        assert self.storage.delete(pubkey, chosen) == expected

    @rule(pubkey=st.sampled_from(PUBKEYS), chosen=CHOSEN, ttl=st.integers(-2, 20).map(lambda k: 10 * k))
    def expire(self, pubkey: str, chosen: list[str], ttl: int) -> None:
        expiry = self.now + ttl
        expected = [h for h in dict.fromkeys(chosen) if h in self.model and self.model[h][1].pubkey == pubkey]
        for h in expected:
            seq, m = self.model[h]
            self.model[h] = (seq, replace(m, expiry=expiry))
        assert self.storage.expire(pubkey, chosen, expiry) == expected

    @rule(dt=st.integers(0, 4).map(lambda k: 10 * k))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule()
    def delete_expired(self) -> None:
        gone = [h for h, (_, m) in self.model.items() if m.expiry <= self.now]
        for h in gone:
            del self.model[h]
        assert self.storage.delete_expired(self.now) == len(gone)

    @rule(
        pubkey=st.sampled_from(PUBKEYS),
        namespace=st.sampled_from(NAMESPACES),
        last_kind=st.sampled_from(["none", "empty", "own", "any"]),
        own=SERIALS,
        other=st.sampled_from(ALL_HASHES),
        limit=st.integers(1, 4),
    )
    def retrieve(self, pubkey: str, namespace: int, last_kind: str, own: int, other: str, limit: int) -> None:
        own_hash = msg(pubkey, own, namespace=namespace).hash
        last = {"none": None, "empty": "", "own": own_hash, "any": other}[last_kind]
        after = self.live(pubkey, namespace)
        entry = self.model.get(last or "")
        if entry is not None and entry[1].pubkey == pubkey and entry[1].namespace == namespace:
            after = [m for m in after if self.model[m.hash][0] > entry[0]]
        assert self.storage.retrieve(pubkey, namespace, last, self.now, limit) == (after[:limit], len(after) > limit)

    @invariant()
    def same_contents(self) -> None:
        assert self.storage.count() == len(self.model)
        live = {p: sorted(h for h, (_, m) in self.model.items() if m.pubkey == p and m.expiry > self.now)
                for p in PUBKEYS}
        # Anti-entropy digests, kept up to date change by change, equal digests built from scratch.
        fresh = DigestIndex()
        for _, m in self.model.values():
            fresh.add(m.pubkey, m.hash, m.timestamp)
        assert self.storage.ae_digests() == fresh.totals()
        assert self.storage.ae_buckets(PUBKEYS) == fresh.buckets(PUBKEYS)
        everything = {p: range(ae_bucket(self.now) - 4, ae_bucket(self.now) + 1) for p in PUBKEYS}
        assert self.storage.ae_hashes(everything, self.now) == live
        for pubkey in PUBKEYS:
            for namespace in NAMESPACES:
                expected = (self.live(pubkey, namespace), False)
                assert self.storage.retrieve(pubkey, namespace, None, self.now) == expected


StorageMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestStorageModel = StorageMachine.TestCase


async def test_a_replica_commit_window_groups_held_copies_and_yields_to_a_write_that_cannot_wait(
        storage: Storage, autojump_clock):
    """Held copies (a replica's) share one transaction up to the window's end; a write that
    may not wait (a target's own store) commits at its turn's end, taking the held ones."""
    import trio

    from nodes.replication import GroupCommit
    from testnet.base.turn import Timers

    timers = Timers()
    told: list[tuple[str, float]] = []

    def done(name: str):
        return lambda new, error: told.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        commit = GroupCommit(storage, window_s=0.005, window_timers=timers)
        start = trio.current_time()
        commit.commit_soon([msg(n=1)], done("a"), hold=True)
        await trio.sleep(0.002)
        commit.commit_soon([msg(n=2)], done("b"), hold=True)
        await trio.sleep(0.01)
        assert [(n, round(t - start, 3)) for n, t in told] == [("a", 0.005), ("b", 0.005)]
        assert commit.commits == 1
        told.clear()
        commit.commit_soon([msg(n=3)], done("c"), hold=True)
        await trio.sleep(0.001)
        commit.commit_soon([msg(n=4)], done("d"))  # cannot wait: now, with the held copy
        await trio.sleep(0)
        assert [n for n, _ in told] == ["c", "d"] and told[0][1] - start == pytest.approx(0.013)
        assert commit.commits == 2
        await trio.sleep(0.01)  # the window's timer, cancelled, commits nothing more
        assert commit.commits == 2 and len(storage.messages_for([ALICE])) == 4
        nursery.cancel_scope.cancel()
