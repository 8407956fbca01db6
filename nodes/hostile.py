"""A hostile member, for the byzantine nemesis: what a staked node that lies
does to its own answers.  Off unless the controller arms it with the admin op
``admin_byzantine {behaviours}`` (PROTOCOL.md); an empty list makes the node
honest again, and a restarted node is honest (the nemesis arms it again while
its period lasts).

* ``lie-retrieve`` — a retrieve's answer leaves out some messages (a stale or
  partial view), repeats some, and alters the content of some under their
  true hash.  The client model copes: each poll goes to a random member of
  the swarm, every message is verified against its hash and the sender's
  signature inside the sealed box, and a hash already received is dropped.
* ``drop-replication`` — as a store's target it answers the client without
  forwarding the message to its peers (half the time without keeping it
  either), and reports its peers either as failed (a lie no one can see) or
  as having stored it, under signatures made with its own key (a lie the
  client sees: it stores again through another member).  Copies its peers
  replicate to it are acknowledged, signed, and dropped; it runs no
  anti-entropy rounds of its own.  Only the results its honest peers signed
  vouch for a message (CHECKERS.md).
* ``lie-digest`` — its anti-entropy answers lie: a digest claiming to equal
  the caller's (the caller skips it), or differing in made-up buckets; hash
  lists claiming to hold nothing (the caller pushes) or to hold what it
  dropped and hashes that do not exist (the caller skips pushing those and
  fetches nothing).  Honest members only ever take what a peer can prove.
* ``misrelay`` — as a relay of onion requests it drops some (no forward; a
  504 once the caller has stopped waiting), delays some and replays some
  (forwards the same layer again, later).  Stores are idempotent and a
  deleted message stays deleted (its tombstone), so a replay does nothing.

Every lie is counted (:attr:`Hostility.acts`, returned by ``admin_byzantine``)
for the nemesis' record.  Pure: the node's parts ask it what to change; its
randomness is the node's own seeded ``random.Random`` (exact in the
simulation).
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import replace
from typing import Iterable, Mapping

from testnet.base.protocol import RequestError, Status

from .storage import StoredMessage

BEHAVIOURS = ("lie-retrieve", "drop-replication", "lie-digest", "misrelay")
# Of the messages a lying retrieve would return: left out, altered, repeated (the rest as they are).
MISSING, ALTERED, REPEATED = 0.25, 0.15, 0.15
# Of the stores a dropping target answers: also not kept here; peers claimed stored under forged signatures.
NOT_KEPT, FORGED = 0.5, 0.5
# Of the onion requests a misrelaying node passes on: dropped, delayed, replayed.
DROP, DELAY, REPLAY = 0.1, 0.15, 0.15
DELAY_S = (0.5, 3.0)  # how long a delayed or replayed request waits
DROPPED_KEPT = 256  # hashes of dropped copies remembered per account (to claim in digests)


class Hostility:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.active: frozenset[str] = frozenset()
        self.acts: Counter[str] = Counter()
        self._dropped: dict[str, deque[str]] = {}

    def __contains__(self, behaviour: str) -> bool:
        return behaviour in self.active

    def arm(self, behaviours: object) -> list[str]:
        """Set the behaviours (400 names an unknown one); the list armed."""
        if not isinstance(behaviours, list) or not all(isinstance(b, str) for b in behaviours):
            raise RequestError(Status.BAD_REQUEST, "'behaviours' must be a list of strings")
        unknown = sorted(set(behaviours) - set(BEHAVIOURS))
        if unknown:
            raise RequestError(Status.BAD_REQUEST, f"unknown behaviour(s) {unknown}; known: {list(BEHAVIOURS)}")
        self.active = frozenset(behaviours)
        if "drop-replication" not in self.active:
            self._dropped.clear()
        return sorted(self.active)

    # ------------------------------------------------------------------ lie-retrieve

    def tamper(self, msgs: Iterable[StoredMessage]) -> list[StoredMessage]:
        """A lying retrieve's answer for ``msgs``."""
        out = []
        for m in msgs:
            r = self.rng.random()
            if r < MISSING:
                self.acts["retrieve-left-out"] += 1
                continue
            if r < MISSING + ALTERED:
                self.acts["retrieve-altered"] += 1
                out.append(replace(m, data=b"altered by a hostile member " + self.rng.randbytes(16)))
            elif r < MISSING + ALTERED + REPEATED:
                self.acts["retrieve-repeated"] += 1
                out += [m, m]
            else:
                out.append(m)
        return out

    # ------------------------------------------------------------------ drop-replication

    def store_plan(self) -> tuple[bool, bool]:
        """For a store this node takes while dropping: (keep it here, claim the peers stored it
        under forged signatures) — else they are reported as failed."""
        keep = self.rng.random() >= NOT_KEPT
        forge = self.rng.random() < FORGED
        self.acts["stores-not-forwarded"] += 1
        self.acts["stores-not-kept"] += not keep
        self.acts["results-forged"] += forge
        return keep, forge

    def drop_copies(self, msgs: Iterable[StoredMessage]) -> None:
        """Copies a peer replicated here, acknowledged and not kept: remembered to claim them."""
        for m in msgs:
            self._dropped.setdefault(m.pubkey, deque(maxlen=DROPPED_KEPT)).append(m.hash)
            self.acts["copies-dropped"] += 1

    # ------------------------------------------------------------------ lie-digest

    def lie_digest(self, theirs: Iterable[str], honest: Mapping[str, Mapping[int, str]],
                   now_bucket: int) -> dict[str, dict[int, str]]:
        """An ``ae_digest`` answer: claim to equal the caller ({}: it skips us), or claim
        made-up digests for recent buckets of the caller's accounts (it asks for hashes)."""
        self.acts["digests-lied"] += 1
        if self.rng.random() < 0.5:
            return {}
        out = {pk: dict(bs) for pk, bs in honest.items()}
        for pk in list(theirs)[:50]:
            for b in range(now_bucket - 3, now_bucket + 1):
                out.setdefault(pk, {})[b] = self.rng.randbytes(8).hex()
        return out

    def lie_hashes(self, hashes: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """An ``ae_hashes`` answer: claim to hold nothing (the caller pushes), or to hold
        what it dropped plus a hash that exists nowhere (the caller skips those)."""
        self.acts["hash-lists-lied"] += 1
        if self.rng.random() < 0.5:
            return {pk: [] for pk in hashes}
        out = {}
        for pk, hs in hashes.items():
            claimed = set(hs) | set(self._dropped.get(pk, ()))
            claimed.add(self.rng.randbytes(32).hex()[:43])
            out[pk] = sorted(claimed)
        return out

    # ------------------------------------------------------------------ misrelay

    def relay_act(self) -> tuple[str | None, float]:
        """What to do with one onion request to relay: (None | "drop" | "delay" | "replay",
        the delay in s)."""
        r = self.rng.random()
        delay = self.rng.uniform(*DELAY_S)
        for act, p in (("drop", DROP), ("delay", DROP + DELAY), ("replay", DROP + DELAY + REPLAY)):
            if r < p:
                self.acts[f"relay-{act}"] += 1
                return act, delay
        return None, 0.0
