"""What a node takes from a peer, and the proof each change must carry.

oxen-storage-server's rule, followed here: a client's ``delete`` or ``expire``
is signed by the account; the node that takes it forwards the same signed
request to its swarm's peers, and each peer checks the account's signature
itself before it acts.  Nothing a peer says about an account's messages is
taken on its word — a registered member of the account's swarm may be
hostile:

* a delete (``replicate_delete``) or an expiry change (``replicate_expire``)
  carries the account's signed request, :class:`SignedDelete` /
  :class:`SignedExpire`, which the receiver verifies as the client op does
  (401 when missing or wrong; 400 for an expiry beyond the window);
* a copy (``replicate``, an ``ae_fetch`` answer) proves itself: its hash is
  its content's (:func:`nodes.core.message_from_wire`), and it must be a
  message a store could have made (:func:`accept_copies`);
* a node keeps each signed delete with the tombstones it leaves
  (:meth:`nodes.storage.Storage.delete`), so that anti-entropy can forward it
  to a peer still holding the message, which verifies it like any other.

Pure: no sockets, clock or trio; times are passed in (ms since the epoch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from testnet.base import crypto
from testnet.base.protocol import RequestError, Status

from . import core
from .core import BATCH_COUNT, MAX_TTL_MS, STORE_CLOCK_WINDOW_MS
from .storage import StoredMessage

# A copy's times were set by another node's clock (a store's timestamp within 10 s of
# it, an expiry at most 14 days ahead of it), which may be off from ours: the chaos
# library skews clocks by seconds to a minute; an hour covers far worse.  Found by the
# adversary scenario: without a bound, replicate planted messages that outlived every
# TTL rule.  The byzantine scenario's hostile members post-date copies by a day and
# give them 15-day lives: this slack is what refuses them.
REPLICA_CLOCK_SLACK_MS = 3600 * 1000


def _bad(msg: str, status: int = Status.BAD_REQUEST) -> RequestError:
    return RequestError(status, msg)


# --------------------------------------------------------------------------- copies


def accept_copies(msgs: Iterable[StoredMessage], now_ms: int) -> list[StoredMessage]:
    """The copies to keep, each as a store would have kept it; 400 (none kept) when any
    breaks the store rules.  A copy may be days old, so a store's rules apply as
    follows (size and hash = content: :func:`nodes.core.message_from_wire`):

    * **timestamp**: at most the store window (10 s) plus the clock slack ahead of our
      clock — a store took it within 10 s of *its* clock.  Not bounded behind: a copy
      of a message stored days ago is as valid as a fresh one; its expiry, not its
      timestamp, says how long it may live;
    * **expiry**: at most 14 days plus the slack ahead of our clock (a store's TTL or
      an ``expire`` set it, from some node's clock);
    * **life**: a store gives at most ``timestamp + 14 days``.  A longer one only the
      account's signed ``expire`` gives, and a copy does not carry that proof: the
      copy is kept with the life a store gives it (an honest extension reaches the
      swarm as a signed ``replicate_expire``; the stored expiry only ever grows, so a
      copy never shortens one);
    * a copy already expired here is not kept (there is nothing to keep), and is no error.
    """
    out = []
    for m in msgs:
        if m.timestamp > now_ms + STORE_CLOCK_WINDOW_MS + REPLICA_CLOCK_SLACK_MS:
            raise _bad("replicated message timestamp is ahead of the node's clock by more than a store allows")
        if m.expiry > now_ms + MAX_TTL_MS + REPLICA_CLOCK_SLACK_MS:
            raise _bad("replicated message expiry is more than 14 days ahead")
        if m.expiry > m.timestamp + MAX_TTL_MS:
            m = StoredMessage(m.pubkey, m.namespace, m.hash, m.data, m.timestamp, m.timestamp + MAX_TTL_MS)
        if m.expiry > now_ms:
            out.append(m)
    return out


# --------------------------------------------------------------------------- signed requests


def _signature_fields(item: list[Any], start: int) -> tuple[Any, Any]:
    """``pubkey_ed25519`` and ``signature`` at ``item[start:]``, as sent (None when left
    out): their absence or wrong type is the signature check's 401, as for the client op."""
    rest = item[start:]
    return (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


@dataclass(frozen=True)
class SignedDelete:
    """An account's signed ``delete`` as its client sent it: the hashes in the order
    signed, ``pubkey_ed25519`` and ``signature`` as received (checked by :meth:`verify`).
    On the wire (``replicate_delete``): ``[pubkey, [hash, …], pubkey_ed25519, signature]``."""

    pubkey: str
    hashes: tuple[str, ...]
    pubkey_ed25519: Any
    signature: Any

    @classmethod
    def from_client(cls, args: Mapping[str, Any]) -> SignedDelete:
        """The client's ``delete`` request, validated and verified (400, 401)."""
        pubkey, hs = core.validate_delete(args)
        return cls(pubkey, tuple(hs), args["pubkey_ed25519"], args["signature"])

    @classmethod
    def from_wire(cls, item: Any) -> SignedDelete:
        """One entry of ``replicate_delete``, its shape checked (400), not its signature."""
        if not (isinstance(item, list) and 2 <= len(item) <= 4):
            raise _bad("each replicated delete must be [pubkey, [hash, …], pubkey_ed25519, signature]")
        return cls(core.session_pubkey({"pubkey": item[0]}), tuple(core.hashes({"hashes": item[1]})),
                   *_signature_fields(item, 2))

    def verify(self) -> None:
        """401 unless the account signed exactly this delete."""
        core.check_signed({"pubkey_ed25519": self.pubkey_ed25519, "signature": self.signature}, self.pubkey,
                          crypto.delete_signature_message(list(self.hashes)))

    def to_wire(self) -> list[Any]:
        return [self.pubkey, list(self.hashes), self.pubkey_ed25519, self.signature]

    def wire_bytes(self) -> int:
        return 200 + 50 * len(self.hashes)

    def to_bytes(self) -> bytes:
        """As kept with its tombstones (verified first: only a proof is worth keeping)."""
        return json.dumps([self.pubkey, list(self.hashes), self.pubkey_ed25519, self.signature.hex()]).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> SignedDelete:
        pubkey, hs, ed, sig = json.loads(blob)
        return cls(pubkey, tuple(hs), ed, bytes.fromhex(sig))


@dataclass(frozen=True)
class SignedExpire:
    """An account's signed ``expire`` as its client sent it.  On the wire
    (``replicate_expire``): ``[pubkey, [hash, …], expiry, pubkey_ed25519, signature]``."""

    pubkey: str
    hashes: tuple[str, ...]
    expiry: int
    pubkey_ed25519: Any
    signature: Any

    @classmethod
    def from_client(cls, args: Mapping[str, Any], now_ms: int) -> SignedExpire:
        """The client's ``expire`` request, validated and verified (400, 401)."""
        pubkey, hs, expiry = core.validate_expire(args, now_ms)
        return cls(pubkey, tuple(hs), expiry, args["pubkey_ed25519"], args["signature"])

    @classmethod
    def from_wire(cls, item: Any) -> SignedExpire:
        """One entry of ``replicate_expire``, its shape checked (400), not its signature."""
        if not (isinstance(item, list) and 3 <= len(item) <= 5 and core.is_int(item[2])
                and -2**63 <= item[2] < 2**63):
            raise _bad("each replicated expiry must be [pubkey, [hash, …], expiry ms, pubkey_ed25519, signature]")
        return cls(core.session_pubkey({"pubkey": item[0]}), tuple(core.hashes({"hashes": item[1]})), item[2],
                   *_signature_fields(item, 3))

    def verify(self, now_ms: int) -> None:
        """As the client op checks it: the expiry at most 14 days ahead (+ the clock slack:
        the node that took it checked it against its own clock; 400), then the account's
        signature over exactly this expiry and these hashes (401)."""
        if self.expiry > now_ms + MAX_TTL_MS + REPLICA_CLOCK_SLACK_MS:
            raise _bad("expiry is more than 14 days ahead")
        core.check_signed({"pubkey_ed25519": self.pubkey_ed25519, "signature": self.signature}, self.pubkey,
                          crypto.expire_signature_message(self.expiry, list(self.hashes)))

    def to_wire(self) -> list[Any]:
        return [self.pubkey, list(self.hashes), self.expiry, self.pubkey_ed25519, self.signature]

    def wire_bytes(self) -> int:
        return 200 + 50 * len(self.hashes)


def signed_deletes(args: Mapping[str, Any]) -> list[SignedDelete]:
    """``replicate_delete {messages: [[pubkey, [hash, …], pubkey_ed25519, signature], …]}`` (400)."""
    return [SignedDelete.from_wire(i) for i in core.arg_list(args, "messages")]


def signed_expiries(args: Mapping[str, Any]) -> list[SignedExpire]:
    """``replicate_expire {messages: [[pubkey, [hash, …], expiry, pubkey_ed25519, signature], …]}`` (400)."""
    return [SignedExpire.from_wire(i) for i in core.arg_list(args, "messages")]


# --------------------------------------------------------------------------- what checking costs

# An account's signature costs ~160 µs to check (the key's conversion to the Session ID,
# then the signature) and a peer's 1 MiB request may carry ~4,000 signed requests, all
# valid (a member receives real signed deletes, and may replay them): 0.6 s of CPU per
# request, unbounded.  So a peer op carries at most as many signed requests as an honest
# sender puts in one (a batch: 500; 413 above that), and each peer may make this node
# check at most SIGNATURES_PER_S a second, SIGNATURE_BURST at once (429 beyond: nothing
# checked, nothing done; its anti-entropy forwards the rest in a later round).
MAX_SIGNED_PER_REQUEST = BATCH_COUNT
SIGNATURE_BURST = 2_000
SIGNATURES_PER_S = 500.0


class SignatureBudget:
    """Per-peer budget of account-signature checks (a token bucket, as for client requests:
    :class:`nodes.core.TokenBucket`), and the per-request cap."""

    def __init__(self, burst: int = SIGNATURE_BURST, per_second: float = SIGNATURES_PER_S,
                 max_per_request: int = MAX_SIGNED_PER_REQUEST) -> None:
        self.max_per_request = max_per_request
        self.bucket = core.TokenBucket(burst, per_second)
        self.refused = 0  # requests refused (413 or 429), for the node's stats

    def charge(self, peer: str, requests: int, checks: int, now_s: float) -> None:
        """Take ``checks`` from ``peer``'s budget for a request of ``requests`` signed requests
        (``now_s``: a monotonic clock): 413 over the per-request cap, 429 when the budget
        cannot pay for all of them (nothing taken then)."""
        if requests > self.max_per_request:
            self.refused += 1
            raise _bad(f"{requests} signed requests in one request; at most {self.max_per_request}",
                       Status.TOO_LARGE)
        if not self.bucket.allow(peer, now_s, cost=checks):
            self.refused += 1
            raise _bad(f"signature checks over budget ({self.bucket.per_second:g}/s per peer): try later",
                       Status.RATE_LIMITED)
