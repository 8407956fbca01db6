"""Order-independent digests of a node's message hashes, for anti-entropy
(:class:`DigestIndex`, kept by :class:`nodes.storage.Storage`): pure, no SQLite."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

__all__ = ["AE_BUCKET_MS", "DigestIndex", "ae_bucket"]

# Anti-entropy compares messages in buckets of this many ms of their (client-set,
# hence replica-independent) timestamp.
AE_BUCKET_MS = 5_000


def ae_bucket(timestamp_ms: int) -> int:
    """The anti-entropy bucket of a message with this timestamp."""
    return timestamp_ms // AE_BUCKET_MS


def _hash_value(message_hash: str) -> int:
    return int.from_bytes(hashlib.blake2b(message_hash.encode(), digest_size=16).digest(), "big")


def _digest_text(xor: int, count: int) -> str:
    return f"{xor:032x}-{count}"


class DigestIndex:
    """Order-independent digests of a store's message hashes, per pubkey and
    per timestamp bucket, kept current in O(1) per stored or removed message.

    A digest is the XOR of blake2b-128 of each hash, plus the count: equal sets
    give equal digests whatever the storage order, and a store or delete
    changes only its own bucket and its pubkey's total.  Anti-entropy compares
    the totals of every pubkey, then the buckets of the pubkeys that differ,
    then the hashes of the buckets that differ: a round costs O(pubkeys +
    their buckets + messages in differing buckets), not O(messages).  Expired
    messages count until ``delete_expired`` removes them.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, dict[int, list[int]]] = {}  # pubkey -> bucket -> [xor, count]
        self._totals: dict[str, list[int]] = {}  # pubkey -> [xor, count] over all its buckets
        self.version = 0  # how many changes so far: equal versions, equal digests

    def add(self, pubkey: str, message_hash: str, timestamp: int) -> None:
        self._change(pubkey, _hash_value(message_hash), ae_bucket(timestamp), +1)

    def remove(self, pubkey: str, message_hash: str, timestamp: int) -> None:
        self._change(pubkey, _hash_value(message_hash), ae_bucket(timestamp), -1)

    def _change(self, pubkey: str, value: int, bucket: int, step: int) -> None:
        self.version += 1
        buckets = self._buckets.setdefault(pubkey, {})
        cell = buckets.setdefault(bucket, [0, 0])
        total = self._totals.setdefault(pubkey, [0, 0])
        cell[0] ^= value
        cell[1] += step
        total[0] ^= value
        total[1] += step
        if cell[1] == 0:
            del buckets[bucket]
        if total[1] == 0:
            del self._buckets[pubkey], self._totals[pubkey]

    def totals(self, pubkey_filter: Callable[[str], bool] | None = None) -> dict[str, str]:
        """One digest per pubkey that holds messages (and that the filter accepts)."""
        return {pk: _digest_text(x, c) for pk, (x, c) in self._totals.items()
                if pubkey_filter is None or pubkey_filter(pk)}

    def buckets(self, pubkeys: Iterable[str]) -> dict[str, dict[int, str]]:
        """Digest per bucket of each pubkey (an empty map for those without messages)."""
        return {pk: {b: _digest_text(x, c) for b, (x, c) in self._buckets.get(pk, {}).items()} for pk in pubkeys}
