"""Serving clients: store, retrieve, delete, expire and get_swarm (PROTOCOL.md,
"Service node: client ops"), directly or as the target of an onion request.

A store is committed here before it is answered, then forwarded to every
other member of the swarm (:class:`nodes.replication.Fanout`), from callbacks
with no task waiting in between (:meth:`ClientOps.store_soon`); deletes and
expiries are forwarded likewise, as the account's signed requests, which
every member verifies itself (:mod:`nodes.proofs`).  Validation is
:mod:`nodes.core`'s.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

from testnet.base import crypto
from testnet.base.logs import event
from testnet.base.protocol import RequestError, Status

from . import core
from .core import SwarmView, require_view
from .hostile import Hostility
from .proofs import SignedDelete, SignedExpire
from .replication import Fanout, GroupCommit
from .storage import Storage, StorageCorrupt, StorageError, StorageFull, StorageIOError, StoredMessage

log = logging.getLogger("node")

WRITE_BEHIND_S = 3.0  # the ack-before-commit bug's delay


class ClientOps:
    def __init__(self, *, me: str, storage: Storage, commit: GroupCommit, fanout: Fanout,
                 now_ms: Callable[[], int], view: Callable[[], SwarmView | None], stats: dict[str, int],
                 bugs: set[str], nursery: trio.Nursery, sign_root: Callable[[bytes], bytes],
                 hostile: Hostility | None = None) -> None:
        self.me = me
        self.sign_root = sign_root  # this node's signature over a results root (PROTOCOL.md, store)
        self.storage = storage
        self.commit = commit
        self.fanout = fanout
        self.now_ms = now_ms
        self.view = view
        self.stats = stats
        self.bugs = bugs
        self._nursery = nursery  # the ack-before-commit bug's late writes
        self.hostile = hostile  # armed only by the byzantine nemesis (nodes/hostile.py)

    def ops(self) -> dict[str, Callable[[dict], Any]]:
        return {"store": self.store, "retrieve": self.retrieve, "delete": self.delete, "expire": self.expire,
                "get_swarm": self.get_swarm}

    async def get_swarm(self, args: dict) -> dict:
        view = require_view(self.view())
        pubkey = core.session_pubkey(args)
        target = view.swarm_of(pubkey)
        return {"swarm_id": target, "nodes": [n.to_wire() for n in view.members(target)]}

    def store_soon(self, args: dict, done: Callable[[dict | None, Exception | None], None]) -> None:
        """A store, committed here and then forwarded to every other member of the swarm,
        with no task waiting in between (the onion target's fast path): ``done(body,
        None)`` once every member has answered (or the forwarding timed out), or
        ``done(None, error)`` — a RequestError, or a failing disk's StorageFull,
        StorageIOError or StorageCorrupt, which the dispatcher answers 507 or 503.  A
        refusal found at once is raised."""
        msg = core.validate_store(args, self.now_ms())
        view = require_view(self.view())
        if not view.is_mine(msg.pubkey):
            raise view.wrong_swarm(msg.pubkey)
        if self.storage.tombstoned(msg.pubkey, msg.hash):
            # Stored once and deleted by its account since: a store again (a replay of the
            # first — an onion relay may replay requests — or a late retry) must not bring it
            # back.  Nothing is kept, so nothing is signed: the client learns nothing stored.
            done({"hash": msg.hash, "deleted": True, "swarm": {self.me: {"status": Status.OK, "deleted": True}}},
                 None)
            return
        self.stats["stores"] += 1
        # Each member's result is signed by that member (oxen-storage-server): ours once committed.
        results: dict[str, Any] = {self.me: {"status": Status.OK, "signature": self.sign_result(msg.hash)}}
        if self.hostile is not None and "drop-replication" in self.hostile:
            self._store_hostile(msg, view, results, done)
            return
        if "ack-before-commit" in self.bugs:
            # Deliberately broken: answer now, write (and forward) later.
            self._nursery.start_soon(self._write_behind, msg)
            done({"hash": msg.hash, "swarm": results}, None)
            return

        def replicated(outcomes: dict[str, Any]) -> None:
            results.update(outcomes)
            done({"hash": msg.hash, "swarm": results}, None)

        def committed(new: list[bool] | None, error: StorageError | None) -> None:
            if isinstance(error, (StorageFull, StorageIOError, StorageCorrupt)):
                done(None, error)  # the disk, not the node, failed
            elif error is not None:  # this node did not keep it
                done(None, RequestError(Status.INTERNAL_ERROR, f"storage failed: {type(error).__name__}"))
            elif "skip-replication" in self.bugs:
                done({"hash": msg.hash, "swarm": results}, None)
            else:
                self.fanout.send_soon("replicate", msg, view, replicated)

        self.commit.commit_soon([msg], committed)

    def sign_result(self, message_hash: str) -> bytes:
        """This node's signed result for one store it holds: its root is the hash's leaf."""
        return self.sign_root(crypto.results_root([message_hash])[0])

    def _store_hostile(self, msg: StoredMessage, view: SwarmView, results: dict[str, Any],
                       done: Callable[[dict | None, Exception | None], None]) -> None:
        """A hostile target's store (nodes.hostile, drop-replication): answered at once, never
        forwarded, kept here or not; its peers reported failed, or stored under signatures
        made with this node's own key (which the client finds do not verify)."""
        assert self.hostile is not None
        keep, forge = self.hostile.store_plan()
        for p in view.peers():
            results[p.ed25519_public] = {"status": Status.OK, "signature": self.sign_result(msg.hash)} if forge \
                else {"status": Status.BAD_GATEWAY, "error": "timeout"}
        if keep:
            self.commit.commit_soon([msg], lambda new, error: None)
        done({"hash": msg.hash, "swarm": results}, None)

    async def store(self, args: dict) -> dict:
        outcome: list[Any] = []
        answered = trio.Event()

        def done(body: dict | None, error: Exception | None) -> None:
            outcome[:] = [body, error]
            answered.set()

        self.store_soon(args, done)
        await answered.wait()
        body, error = outcome
        if error is not None:
            raise error
        return body

    async def _write_behind(self, msg: StoredMessage) -> None:
        await trio.sleep(WRITE_BEHIND_S)
        await self.commit.commit([msg])
        view = self.view()
        if view is not None:
            await self.fanout.send("replicate", msg, view)

    async def retrieve(self, args: dict) -> dict:
        pubkey, ns, last = core.validate_retrieve(args, self.now_ms())
        view = require_view(self.view())
        if not view.is_mine(pubkey):
            raise view.wrong_swarm(pubkey)
        if self.storage.rebuilding or self.storage.damaged:
            # A store set aside as damaged, or its replacement before it caught up with the
            # swarm's peers, would answer with wrong or missing messages: the client asks another member.
            raise RequestError(Status.NOT_READY, "database being rebuilt from swarm peers")
        msgs, more = self.storage.retrieve(pubkey, ns, last, self.now_ms())
        # A message's hash is a checksum of its content: a page the disk returned
        # damaged is never served (503; the client asks another member, which holds it).
        for m in msgs:
            try:
                intact = crypto.message_hash(m.pubkey, m.namespace, m.data) == m.hash
            except (crypto.CryptoError, ValueError, TypeError):
                intact = False
            if not intact:
                event(log, "corrupt message read back: not served", logging.ERROR, hash=m.hash[:12])
                exc = StorageCorrupt(f"retrieve: message {m.hash[:12]} read back damaged")
                self.storage.found_corrupt(exc)  # a checksum failed: the file is set aside and rebuilt
                raise exc
        # As many as fit in one reply; the client asks again after the last hash it got.
        fit = core.fitting(msgs, core.wire_bytes)
        msgs, more = fit, more or len(fit) < len(msgs)
        if "wrong-inbox" in self.bugs:
            # Deliberately broken: mix in a neighbour account's messages.
            for other in self.storage.pubkeys():
                if other != pubkey and view.is_mine(other):
                    extra, _ = self.storage.retrieve(other, ns, None, self.now_ms(), limit=2)
                    msgs = msgs + extra
                    break
        if self.hostile is not None and "lie-retrieve" in self.hostile:
            msgs = self.hostile.tamper(msgs)
        return {"messages": [{"hash": m.hash, "timestamp": m.timestamp, "expiry": m.expiry, "data": m.data}
                             for m in msgs], "more": more}

    async def delete(self, args: dict) -> dict:
        signed = SignedDelete.from_client(args)
        pubkey, hs = signed.pubkey, list(signed.hashes)
        view = require_view(self.view())
        if not view.is_mine(pubkey):
            raise view.wrong_swarm(pubkey)
        if "local-delete" in self.bugs:
            # Deliberately broken: delete here only, tell nobody, remember nothing.
            deleted = self.storage.delete(pubkey, hs)
            return {"deleted": deleted, "swarm": {self.me: {"status": Status.OK, "deleted": deleted}}}
        # The tombstones keep the account's signed request: anti-entropy forwards it to a
        # peer that still holds the message, and the peer verifies it (nodes.proofs).
        deleted = self.storage.delete(pubkey, hs, tombstone_until=self.now_ms() + core.TOMBSTONE_MS,
                                      proof=signed.to_bytes())
        results = {self.me: {"status": Status.OK, "deleted": deleted}}
        results.update(await self.fanout.send("replicate_delete", signed, view))
        return {"deleted": deleted, "swarm": results}

    async def expire(self, args: dict) -> dict:
        signed = SignedExpire.from_client(args, self.now_ms())
        view = require_view(self.view())
        if not view.is_mine(signed.pubkey):
            raise view.wrong_swarm(signed.pubkey)
        updated = self.storage.expire(signed.pubkey, signed.hashes, max(signed.expiry, 1))
        results = {self.me: {"status": Status.OK, "updated": updated}}
        results.update(await self.fanout.send("replicate_expire", signed, view))
        return {"updated": updated, "swarm": results}
