"""Anti-entropy and rehoming: the node's own rounds that heal what replication
at store time missed.

Every ``anti_entropy_interval_s`` (jittered) and soon after a new view, the
node compares its messages with each swarm peer (``ae_digest``, then
``ae_hashes`` where digests differ), fetches what it lacks, pushes what the
peer lacks and forwards the signed deletes it keeps with its tombstones.  It
only ever adds what a peer can prove (a copy is content-addressed and held
to the store rules; a delete carries the account's signature, checked by the
receiver): nothing is removed on a peer's word.  And it pushes the messages of accounts
that now belong to another swarm to all of that swarm's members, then drops
them (rehoming).  A rehoming node only pushes copies: it is no member of
those accounts' swarm any more, so it may neither delete nor change expiries
there (403), and it drops its own copies only once every member took them.
The peer's side of the exchange is :mod:`nodes.peer_ops`.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

import trio

from testnet.base import meter
from testnet.base.logs import event
from testnet.base.protocol import RequestError
from testnet.base.rpc import ConnectionPool, RpcError

from . import core, proofs
from .core import NodeConfig, SwarmView
from .hostile import Hostility
from .replication import GroupCommit
from .storage import StorageError, Storage

log = logging.getLogger("node")

REBUILD_ROUNDS = 3  # rounds a rebuilding store waits for a swarm peer that never answers


class AntiEntropy:
    def __init__(self, config: NodeConfig, *, me: str, storage: Storage, commit: GroupCommit, pool: ConnectionPool,
                 now_ms: Callable[[], int], rng: random.Random, view: Callable[[], SwarmView | None],
                 stats: dict[str, int], bugs: set[str], hostile: Hostility | None = None) -> None:
        self.hostile = hostile  # a node dropping replication heals nobody, itself included (nodes/hostile.py)
        self.config = config
        self.me = me
        self.storage = storage
        self.commit = commit
        self.pool = pool
        self.now_ms = now_ms
        self.rng = rng
        self.view = view
        self.stats = stats
        self.bugs = bugs
        self._wake = trio.Event()
        # Anti-entropy skips what cannot have changed: a peer whose digests equalled ours at
        # this (storage version, view height), and rehoming already done at it.  A peer whose
        # own messages changed since runs its round with us (the exchange is symmetric).
        self._matched: dict[str, tuple[int, int]] = {}
        self._rehomed_at: tuple[int, int] | None = None
        self._rebuild_rounds = 0  # rounds since the store was set aside (while it is rebuilding)

    def rebuild(self) -> None:
        """The store was set aside and started empty: forget every match (they were the old
        file's) and run a round with every peer soon."""
        self._matched.clear()
        self._rehomed_at = None
        self._rebuild_rounds = 0
        self.wake()

    def _caught_up(self, peers: list[str], synced: set[str]) -> None:
        """A rebuilding store has caught up once one round synced with every swarm peer, or,
        with a peer that never answers, after REBUILD_ROUNDS rounds that each synced with some:
        from then on it serves retrieves again."""
        self._rebuild_rounds += 1
        if (peers and synced >= set(peers)) or (synced and self._rebuild_rounds >= REBUILD_ROUNDS) or \
                (not peers and self._rebuild_rounds >= REBUILD_ROUNDS):
            self.storage.rebuilding = False
            event(log, "database rebuilt from swarm peers", logging.WARNING, peers=len(synced),
                  rounds=self._rebuild_rounds, messages=self.storage.count())

    def wake(self) -> None:
        """Run a round soon (a new view: new peers to fill, accounts to rehome)."""
        self._wake.set()

    def note_match(self, peer: str, state: tuple[int, int]) -> None:
        """A peer's digests equalled ours at ``state``: no round with it until either side changes."""
        self._matched[peer] = state

    async def run(self) -> None:
        meter.ROLE.set("anti-entropy")
        while True:
            if self.view() is None:
                await self._wake.wait()  # nothing to compare before the first list
            with trio.move_on_after(self.config.anti_entropy_interval_s * self.rng.uniform(0.75, 1.25)):
                await self._wake.wait()
            woken = self._wake.is_set()
            if woken:
                # A new view: our new peers follow the same registry and may not list us yet
                # (they would refuse our handshake); give them the time they take to catch up.
                await trio.sleep(2 * self.config.registry_settle_s)
            self._wake = trio.Event()
            view = self.view()
            if view is None or "skip-replication" in self.bugs or \
                    (self.hostile is not None and "drop-replication" in self.hostile):
                continue
            state = (self.storage.index.version, view.height)
            rebuilding = self.storage.rebuilding
            synced: set[str] = set()
            peers: list[str] = []
            failed = False
            try:
                async with trio.open_nursery() as nursery:
                    if state != self._rehomed_at:
                        # Checked here, not in a task of its own: nearly every round finds none.
                        stray = [pk for pk in self.storage.pubkeys() if not view.is_mine(pk)]
                        if stray:
                            nursery.start_soon(self._rehome, view, stray)
                        else:
                            self._rehomed_at = state
                    if view.my_swarm is not None:
                        peers = [p.ed25519_public for p in view.peers() if self._matched.get(p.ed25519_public) != state]
                        if rebuilding:  # every peer, every round, until caught up
                            peers = [p.ed25519_public for p in view.peers()]
                        elif woken:
                            # Every member of a swarm wakes with the same new view: of each pair, the
                            # lower key asks at once (the exchange is symmetric, and the peer asked
                            # notes the match); the higher asks in its next round if still unmatched.
                            peers = [p for p in peers if p > self.me]
                        if peers:
                            ours = self.storage.ae_digests(view.is_mine)  # once per round, for all peers
                            for peer in peers:
                                nursery.start_soon(self._sync_with, view, peer, ours, state, synced)
            except* StorageError as group:  # a failing disk: this round stops, the next tries again
                event(log, "anti-entropy paused: disk failing", logging.WARNING,
                      error=type(group.exceptions[0]).__name__)
                failed = True
            if rebuilding and self.storage.rebuilding and not failed:
                self._caught_up(peers, synced)

    async def _sync_with(self, view: SwarmView, peer: str, ours: dict[str, str], state: tuple[int, int],
                         synced: set[str] | None = None) -> None:
        """Compare digests with ``peer``, then bucket digests where they differ, then
        hashes where buckets differ; fetch what we lack, push what it lacks, send deletes."""
        timeout = self.config.replication_timeout_s * 2
        try:
            resp = await self.pool.call(peer, "ae_digest", {"swarm_id": view.my_swarm, "digests": ours},
                                        timeout=timeout)
            if not resp.ok:
                return
            their_buckets = {pk: bs for pk, bs in core.ae_digest_reply(resp.body).items() if view.is_mine(pk)}
            if not their_buckets:
                self._matched[peer] = state  # equal: nothing to do until either side changes
                if synced is not None:
                    synced.add(peer)
                return
            my_buckets = self.storage.ae_buckets(list(their_buckets))
            differ = {pk: sorted(b for b in set(mine) | set(their_buckets[pk])
                                 if mine.get(b) != their_buckets[pk].get(b))
                      for pk, mine in my_buckets.items()}
            differ = {pk: bs for pk, bs in differ.items() if bs}
            if not differ:
                if synced is not None:
                    synced.add(peer)
                return
            resp = await self.pool.call(peer, "ae_hashes", {"buckets": differ}, timeout=timeout)
            if not resp.ok:
                return
            theirs = {pk: hs for pk, hs in core.ae_hashes_reply(resp.body).items() if pk in differ}
            mine = self.storage.ae_hashes({pk: differ[pk] for pk in theirs}, self.now_ms())
            want, give, kill = [], [], []
            for pk, hs in theirs.items():
                if not view.is_mine(pk):
                    continue
                have = set(mine.get(pk, ()))
                there = set(hs)
                want += [h for h in there - have if not self.storage.tombstoned(pk, h)]
                kill += [(pk, [h for h in there if self.storage.tombstoned(pk, h)])]
                give += sorted(have - there)
            while want:
                # The peer answers with as many as fit in one reply; ask again for the rest.
                asked = set(want[:core.BATCH_COUNT])
                got = await self.pool.call(peer, "ae_fetch", {"hashes": want[:core.BATCH_COUNT]}, timeout=timeout)
                # Only what we asked for, of our accounts: anything else would be taken unchecked
                # (and a peer answering with other messages would keep this loop going forever).
                # What we take must prove itself, as a pushed copy must (a peer's answer is input).
                msgs = [m for m in core.ae_fetch_reply(got.body) if m.hash in asked and view.is_mine(m.pubkey)] \
                    if got.ok else []
                if not msgs:
                    break
                received = {m.hash for m in msgs}
                try:
                    msgs = proofs.accept_copies(msgs, self.now_ms())
                except RequestError as exc:
                    raise core.bad_reply("ae_fetch", str(exc)) from None
                # Its account is the message's own, not the one the peer listed it under: a
                # peer naming another account's deleted message must not bring it back.
                msgs = [m for m in msgs if not self.storage.tombstoned(m.pubkey, m.hash)]
                if msgs:
                    new = await self.commit.commit(msgs)
                    self.stats["ae_fetched"] += sum(new)
                want = [h for h in want if h not in received]
            for i in range(0, len(give), core.BATCH_COUNT):
                for batch in core.batches(self.storage.get_many(give[i:i + core.BATCH_COUNT]), core.wire_bytes):
                    await self.pool.call(peer, "replicate", {"messages": [core.message_to_wire(m) for m in batch]},
                                         timeout=timeout)
                    self.stats["ae_pushed"] += len(batch)
            # What we deleted and it still holds: forward the account's signed deletes we kept
            # with the tombstones (never our word: the peer verifies each); a tombstone without
            # a proof (left by a node before proofs were kept) is not forwarded.
            signed = [proofs.SignedDelete.from_bytes(p) for pk, hs in kill if hs
                      for p in self.storage.tombstone_proofs(pk, hs)]
            for batch in core.batches(signed, proofs.SignedDelete.wire_bytes):
                await self.pool.call(peer, "replicate_delete", {"messages": [d.to_wire() for d in batch]},
                                     timeout=timeout)
            if synced is not None and not want:
                synced.add(peer)  # we now hold everything it listed for our accounts
        except (RpcError, RequestError, StorageError) as exc:
            event(log, "anti-entropy failed", logging.DEBUG, peer=peer[:16], error=type(exc).__name__)
            await self.pool.drop(peer)

    async def _rehome(self, view: SwarmView, stray: list[str]) -> None:
        """Push the messages of ``stray`` accounts (of another swarm now) to all that swarm's
        members, then drop them here.  (Once none is left astray at a state, the rounds skip
        the check until it changes.)"""
        now = self.now_ms()
        by_swarm: dict[int, list[str]] = {}
        for pk in stray:
            target = view.swarm_of(pk)
            if target is not None:
                by_swarm.setdefault(target, []).append(pk)
        timeout = self.config.replication_timeout_s * 2
        for target, pks in by_swarm.items():
            msgs = self.storage.messages_for(pks, now)
            members = view.members(target)
            if not msgs or not members:
                continue
            ok = True
            for member in members:
                for batch in core.batches(msgs, core.wire_bytes):
                    try:
                        resp = await self.pool.call(member.ed25519_public, "replicate",
                                                    {"messages": [core.message_to_wire(m) for m in batch]},
                                                    timeout=timeout)
                        ok = ok and resp.ok
                    except RpcError:
                        ok = False
                        await self.pool.drop(member.ed25519_public)
                        break
            if ok and self.view() is view:
                # Every member of the right swarm holds them now: they are not ours to keep.
                for pk in pks:
                    self.storage.delete(pk, [m.hash for m in msgs if m.pubkey == pk])
                self.stats["rehomed"] += len(msgs)
                event(log, "rehomed", swarm_id=target, messages=len(msgs))
