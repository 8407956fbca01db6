"""Serving peers: the node-to-node ops (PROTOCOL.md, "Service node: node-to-node ops").

Each handler takes the authenticated caller's ed25519 hex — None only under
the injected bug no-node-auth, which checks no authority at all — and answers
403 for accounts of a swarm the caller is not (for pushed copies: was not
recently) a member of (:mod:`nodes.auth`).  Membership is not authority over
an account's messages: a delete or an expiry change must carry the account's
signed request, and a copy must be one a store could have made
(:mod:`nodes.proofs`).  The node's own side of anti-entropy, which calls these
on its peers, is :mod:`nodes.anti_entropy`.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from testnet.base import crypto

from . import auth, core, proofs
from .anti_entropy import AntiEntropy
from .core import SwarmView, require_view
from .hostile import Hostility
from .replication import GroupCommit
from .storage import Storage, StoredMessage, ae_bucket


class PeerOps:
    def __init__(self, *, storage: Storage, commit: GroupCommit, now_ms: Callable[[], int],
                 view: Callable[[], SwarmView | None], entitled: auth.Entitlements, anti_entropy: AntiEntropy,
                 stats: dict[str, int], bugs: set[str], sign_root: Callable[[bytes], bytes],
                 signature_budget: proofs.SignatureBudget, hostile: Hostility | None = None) -> None:
        self.sign_root = sign_root  # this node's signature over a results root (copies it holds)
        self.signature_budget = signature_budget  # account signatures a peer may make us check
        self.hostile = hostile  # armed only by the byzantine nemesis (nodes/hostile.py)
        self.storage = storage
        self.commit = commit
        self.now_ms = now_ms
        self.view = view
        self.entitled = entitled
        self.anti_entropy = anti_entropy
        self.stats = stats
        self.bugs = bugs

    # The ops answered by plain calls, on the reader's own turn (Node.take): no task each.
    # ``replicate`` waits for the group commit (the node's fast path answers it from there).
    SYNC_OPS = frozenset({"replicate_delete", "replicate_expire", "ae_digest", "ae_hashes", "ae_fetch"})

    def ops(self) -> dict[str, Callable[[dict, str | None], Any]]:
        return {"replicate": self.replicate, "replicate_delete": self.replicate_delete,
                "replicate_expire": self.replicate_expire, "ae_digest": self.ae_digest,
                "ae_hashes": self.ae_hashes, "ae_fetch": self.ae_fetch}

    def _require_accounts(self, caller: str | None, pubkeys: Any, *, rehoming: bool = False) -> None:
        if caller is not None:
            self.entitled.require_accounts(caller, pubkeys, rehoming=rehoming)

    def replicated(self, args: dict, caller: str | None) -> list[StoredMessage]:
        """The copies of a ``replicate`` this node may store: held to the store rules
        (nodes.proofs.accept_copies), not deleted here.  (The node's fast path commits them
        without a task: ``Node.take``.)"""
        msgs = core.replicated_messages(args)
        self._require_accounts(caller, (m.pubkey for m in msgs), rehoming=True)
        return [m for m in proofs.accept_copies(msgs, self.now_ms()) if not self.storage.tombstoned(m.pubkey, m.hash)]

    def dropping(self, msgs: list[StoredMessage]) -> bool:
        """Whether this (hostile) node acknowledges these copies without keeping them."""
        if self.hostile is not None and "drop-replication" in self.hostile:
            self.hostile.drop_copies(msgs)
            return True
        return False

    def answer(self, args: dict, msgs: list[StoredMessage]) -> dict:
        """A ``replicate``'s answer once ``msgs`` are committed: with ``sign``, this node's
        signed result for the copies it holds — one signature over the root of their hashes
        in the request's order (testnet.base.crypto.results_root), and the request's hashes
        it did not keep (``skipped``) — which the store's target passes to the client with
        each copy's path (PROTOCOL.md, store).  One signature per request, not per copy."""
        out: dict[str, Any] = {"stored": len(msgs)}
        if args.get("sign") is True:
            kept = [m.hash for m in msgs]
            out["skipped"] = sorted({item[2] for item in args["messages"]} - set(kept))
            if kept:
                out["signature"] = self.sign_root(crypto.results_root(kept)[0])
        return out

    async def replicate(self, args: dict, caller: str | None) -> dict:
        """Forwarded copies (from a member, or a recent member rehoming them): held to the
        store rules (nodes.proofs.accept_copies), stored unless deleted here, never
        forwarded again."""
        msgs = self.replicated(args, caller)
        if msgs and not self.dropping(msgs):
            new = await self.commit.commit(msgs)
            self.stats["replicated_in"] += sum(new)
        return self.answer(args, msgs)

    def _require_signed(self, caller: str | None, requests: list[Any], verify: Callable[[Any], None]) -> bool:
        """Each request's account must be this swarm's (421) and must have signed it (401).
        Every request is checked before any is acted on: one bad proof refuses them all.
        Whether they were verified (not under the injected bugs no-node-auth and unsigned-peer-delete)."""
        if caller is None:
            return False
        view = core.require_view(self.view())
        for r in requests:
            if not view.is_mine(r.pubkey):
                raise view.wrong_swarm(r.pubkey)
        if "unsigned-peer-delete" in self.bugs:  # injected: a member's word is taken for the account's
            return False
        # Each distinct request is verified once (a repeated one proves nothing more), and
        # a peer pays for every check from its budget before any is made (nodes.proofs).
        unique = list(dict.fromkeys(requests))
        self.signature_budget.charge(caller, len(requests), len(unique), trio.current_time())
        for r in unique:
            verify(r)
        return True

    def replicate_delete(self, args: dict, caller: str | None) -> dict:
        """Deletes forwarded by a member: each is the account's signed request, verified here."""
        deletes = proofs.signed_deletes(args)
        self._require_accounts(caller, (d.pubkey for d in deletes))
        verified = self._require_signed(caller, deletes, proofs.SignedDelete.verify)
        done = []
        for d in deletes:
            done.extend(self.storage.delete(d.pubkey, d.hashes, tombstone_until=self.now_ms() + core.TOMBSTONE_MS,
                                            proof=d.to_bytes() if verified else None))
        return {"deleted": len(done)}

    def replicate_expire(self, args: dict, caller: str | None) -> dict:
        """Expiry changes forwarded by a member: each is the account's signed request, verified here."""
        expiries = proofs.signed_expiries(args)
        self._require_accounts(caller, (e.pubkey for e in expiries))
        now = self.now_ms()
        self._require_signed(caller, expiries, lambda e: e.verify(now))
        n = 0
        for e in expiries:
            n += len(self.storage.expire(e.pubkey, e.hashes, max(e.expiry, 1)))
        return {"updated": n}

    def ae_digest(self, args: dict, caller: str | None) -> dict:
        """Anti-entropy, step 1: the pubkeys of that swarm whose digests differ from the
        caller's, each with our digest per bucket."""
        swarm_id, theirs = core.ae_digest_args(args)
        if caller is not None:
            self.entitled.require_swarm(caller, swarm_id)
        if "skip-replication" in self.bugs:
            return {"buckets": {}}
        view = require_view(self.view())
        if self.hostile is not None and "lie-digest" in self.hostile:
            mine = [pk for pk in theirs if view.swarm_of(pk) == swarm_id]
            lie = self.hostile.lie_digest(mine, self.storage.ae_buckets(mine[:50]), ae_bucket(self.now_ms()))
            return {"buckets": {pk: [[b, d] for b, d in bs.items()] for pk, bs in lie.items()}}
        ours = self.storage.ae_digests(lambda pk: view.swarm_of(pk) == swarm_id)
        differ = [pk for pk in set(ours) | set(theirs) if ours.get(pk) != theirs.get(pk)][:1000]
        if not differ and caller is not None and swarm_id == view.my_swarm and caller in view.peer_keys():
            # Equal at our state: our own round need not ask this peer again until either side
            # changes (as if we had asked; the side that changes runs the round).
            self.anti_entropy.note_match(caller, (self.storage.index.version, view.height))
        if caller is not None:
            differ = [pk for pk in differ if self.entitled.may_hold(caller, pk)]
        buckets = self.storage.ae_buckets(differ)
        # Pubkeys whose buckets fit in one reply; the rest still differ next round.
        fit = core.fitting(buckets.items(), core.hash_list_bytes)
        return {"buckets": {pk: [[b, d] for b, d in bs.items()] for pk, bs in fit}}

    def ae_hashes(self, args: dict, caller: str | None) -> dict:
        """Anti-entropy, step 2: our hashes in the buckets asked for, per pubkey."""
        wanted = core.ae_buckets_args(args)
        self._require_accounts(caller, wanted)
        if "skip-replication" in self.bugs:
            return {"hashes": {}}
        hashes = self.storage.ae_hashes(dict(list(wanted.items())[:1000]), self.now_ms())
        if self.hostile is not None and "lie-digest" in self.hostile:
            hashes = self.hostile.lie_hashes({pk: hashes.get(pk, []) for pk in list(wanted)[:1000]})
        # Pubkeys whose hashes fit in one reply; the initiator compares only those this round.
        fit = core.fitting(hashes.items(), core.hash_list_bytes)
        return {"hashes": dict(fit)}

    def ae_fetch(self, args: dict, caller: str | None) -> dict:
        """The messages with these hashes that we hold and the caller may hold too, as
        many as fit in one reply (in order).  A hash names no account, so messages of
        other swarms are left out rather than refused."""
        msgs = self.storage.get_many(core.hashes(args))
        if caller is not None:
            msgs = [m for m in msgs if self.entitled.may_hold(caller, m.pubkey)]
        return {"messages": [core.message_to_wire(m) for m in core.fitting(msgs, core.wire_bytes)]}
