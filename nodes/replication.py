"""Moving messages between nodes: group commit, per-peer batched forwarding.

Strategy: the writes of one loop turn share one SQLite transaction (group
commit), and each swarm peer gets a sender that folds whatever is queued for
it into a single ``replicate`` request over the persistent connection — so
under load the cost per message falls instead of the number of round trips
rising.  Neither has a task: both act at the end of the loop's turn
(:mod:`testnet.base.turn`) and on the answers their connections bring, so a
copy costs no hand-off between tasks on its way.  :class:`Fanout` keeps the
senders, one per (peer, op), for the node's life.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Optional, Sequence

import trio

from testnet.base import crypto, meter
from testnet.base.protocol import ProtocolError, Response, Status
from testnet.base.rpc import ConnectionPool, RpcConnection, RpcError
from testnet.base.turn import Timer, Timers, at_turn_end

from .core import BATCH_COUNT, SwarmView, fitting, message_to_wire, wire_bytes
from .proofs import SignedDelete, SignedExpire
from .storage import Storage, StorageError, StoredMessage

log = logging.getLogger("node.replication")

MAX_BACKLOG = 20_000  # queued messages per peer before new ones fail at once
HOLD_MAX = 256  # copies held by a replica commit window before they commit at once

# done(new, error) of a group commit: True per message where new, or what went wrong (the
# storage's own error: a full disk stays a full disk, 507, and so on).
Committed = Callable[[Optional[list], Optional[StorageError]], None]
# done(error, result) of an item forwarded to a peer: error None when the peer took it, with
# what the peer's answer says of this item (a replicate's: the peer's signed result).
Outcome = Callable[[Optional[str], Any], None]


def _tell(done: Callable[..., None], *args: Any) -> None:
    """Run one waiter's callback; its failure is logged and stops nobody else's (the
    callbacks of one commit or one batch run in a row, outside any task)."""
    try:
        done(*args)
    except Exception:
        log.exception("replication callback failed")


class GroupCommit:
    """Batches the writes of one loop turn into one transaction, made at the turn's end
    (:func:`testnet.base.turn.at_turn_end`): the stores and replicated copies that
    arrive together are committed together, with no task and no hand-off between them
    and the commit.

    A slow disk's syncs take their time before anyone hears "stored" (nodes.disk, on the
    node's trio clock, so virtual time in the simulation): the writers of a commit that
    owes sync time are told when it has passed (``timers``), and later writes wait for
    it, as behind a disk busy syncing."""

    def __init__(self, storage: Storage, timers: Timers | None = None, *, window_s: float = 0.0,
                 window_timers: Timers | None = None) -> None:
        self.storage = storage
        self._timers = timers
        self._pending: list[tuple[Sequence[StoredMessage], Committed]] = []
        self._syncing = False  # a commit's sync time has not passed yet
        self._turn_end = False  # a commit is queued for this turn's end
        # The replica commit window (NodeConfig.replica_commit_window_ms): copies that may
        # wait (``hold``) are committed up to this long after the first of them, with what
        # arrives meanwhile, unless a write that may not wait, or HOLD_MAX held copies,
        # commit them sooner.  Its timers have the one delay, so they stay in order.
        self.window_s = window_s if window_timers is not None else 0.0
        self._window_timers = window_timers
        self._window: Timer | None = None
        self._held = 0  # copies pending under the window
        self.commits = 0
        self.messages = 0

    def commit_soon(self, messages: Sequence[StoredMessage], done: Committed, *, hold: bool = False) -> None:
        """Store ``messages`` at the end of this turn; then ``done(new, None)`` (True where
        new) or ``done(None, error)``, once, from outside any task.  With ``hold`` (a
        replica's copies) the commit may wait for the window (``window_s``) to share a
        transaction with later writes."""
        self._pending.append((messages, done))
        if self._syncing or self._turn_end:
            return  # committed with what is already due
        if hold and self.window_s > 0:
            self._held += len(messages)
            if self._held < HOLD_MAX:
                if self._window is None:
                    self._window = self._window_timers.call_after(self.window_s, self._window_closed)  # type: ignore[union-attr]
                return
        self._due()

    def _due(self) -> None:
        """Commit what is pending at the end of this turn."""
        if not self._turn_end:
            self._turn_end = True
            at_turn_end(self._commit)

    def _window_closed(self) -> None:
        self._window = None
        if not self._syncing:
            self._due()

    async def commit(self, messages: Sequence[StoredMessage]) -> list[bool]:
        """Store ``messages``; returns once committed: True where new."""
        committed = trio.Event()
        outcome: list[Any] = []

        def done(new: list[bool] | None, error: StorageError | None) -> None:
            outcome[:] = [new, error]
            committed.set()

        self.commit_soon(messages, done)
        await committed.wait()
        error = outcome[1]
        if error is not None:
            raise type(error)(str(error))  # a full disk stays a full disk (507), and so on
        return outcome[0]

    def _commit(self) -> None:
        self._turn_end = False
        if self._syncing:
            return
        batch, self._pending = self._pending, []
        self._held = 0
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if not batch:
            return
        token = meter.ROLE.set("storage")
        try:
            flat = [m for msgs, _ in batch for m in msgs]
            try:
                results = self.storage.store_many(flat)
            except StorageError:
                # One writer's bad batch must not fail the others that shared its
                # transaction: each commits alone, and only the culprit hears of it.
                for msgs, done in batch:
                    self._commit_alone(msgs, done)
                return
            self.commits += 1
            self.messages += len(flat)
            disk = self.storage.disk
            owed = disk.take_owed_s() if disk is not None else 0.0
            if owed > 0 and self._timers is not None:
                self._syncing = True
                self._timers.call_after(owed, lambda: self._synced(batch, results))
                return
            self._tell_all(batch, results)
        finally:
            meter.ROLE.reset(token)

    def _tell_all(self, batch: list[tuple[Sequence[StoredMessage], Committed]], results: list[bool]) -> None:
        i = 0
        for msgs, done in batch:
            _tell(done, results[i:i + len(msgs)], None)
            i += len(msgs)

    def _synced(self, batch: list[tuple[Sequence[StoredMessage], Committed]], results: list[bool]) -> None:
        self._syncing = False
        self._tell_all(batch, results)
        if self._pending:
            self._due()  # what waited behind the sync (held copies too: they have waited)

    def _commit_alone(self, messages: Sequence[StoredMessage], done: Committed) -> None:
        try:
            new = self.storage.store_many(messages)
        except StorageError as exc:
            log.error("group commit failed", extra={"fields": {"error": str(exc)}})
            _tell(done, None, exc)
            return
        self.commits += 1
        self.messages += len(messages)
        _tell(done, new, None)


class PeerSender:
    """Forwards items to one swarm peer in batches, one request in flight, with no task
    of its own: what was submitted in one loop turn leaves at the turn's end in one
    request (:meth:`testnet.base.rpc.RpcConnection.call_soon`), and what queued while
    a request was out leaves in the next one, as soon as its answer arrives.

    A batch is cut to the wire budget (``size`` estimates an item's bytes): a slow or
    paused peer must not make the next request too big to send.  Each item's outcome
    goes to the ``done(error)`` it was submitted with (``None``: the peer took it).
    A peer not connected yet is dialled by a task started with ``spawn``.
    """

    def __init__(self, peer: str, pool: ConnectionPool, op: str, timeout_s: float,
                 encode: Callable[[Any], Any], size: Callable[[Any], int],
                 spawn: Callable[..., None], extra: dict[str, Any] | None = None,
                 per_item: Callable[[list[Any], Any], list[Any]] | None = None) -> None:
        self.peer = peer
        self.extra = extra or {}  # more arguments of every request (replicate: ask for signed results)
        self.per_item = per_item  # what an answer says of each item (replicate: its signed result)
        self.pool = pool
        self.op = op
        self.timeout_s = timeout_s
        self.encode = encode
        self.size = size
        self._spawn = spawn
        self._queue: list[tuple[Any, Outcome]] = []
        self._in_flight = False
        self._scheduled = False
        self.closed = False

    def submit(self, item: Any, done: Outcome) -> None:
        if self.closed:
            _tell(done, "peer left the swarm", None)
        elif len(self._queue) >= MAX_BACKLOG:
            _tell(done, "replication backlog full", None)
        else:
            self._queue.append((item, done))
            self._schedule()

    def close(self) -> None:
        self.closed = True
        queue, self._queue = self._queue, []
        for _, done in queue:
            _tell(done, "peer left the swarm", None)

    def _schedule(self) -> None:
        if not (self._scheduled or self._in_flight or self.closed) and self._queue:
            self._scheduled = True
            at_turn_end(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if self._in_flight or self.closed or not self._queue:
            return
        token = meter.ROLE.set("replication-out")
        try:
            batch = fitting(self._queue, lambda entry: self.size(entry[0]), max_count=BATCH_COUNT)
            self._queue = self._queue[len(batch):]
            self._in_flight = True
            conn = self.pool.get_nowait(self.peer)
            if conn is None:
                self._spawn(self._dial_and_send, batch)
            else:
                self._request(conn, batch)
        finally:
            meter.ROLE.reset(token)

    async def _dial_and_send(self, batch: list[tuple[Any, Outcome]]) -> None:
        meter.ROLE.set("replication-out")
        try:
            conn = await self.pool.get(self.peer, timeout=self.timeout_s)
        except RpcError as exc:
            self._finish(batch, type(exc).__name__, drop=True)
            return
        self._request(conn, batch)

    def _request(self, conn: RpcConnection, batch: list[tuple[Any, Outcome]]) -> None:
        try:
            conn.call_soon(self.op, {"messages": [self.encode(i) for i, _ in batch], **self.extra},
                           timeout=self.timeout_s,
                           done=lambda resp, error: self._answered(batch, resp, error))
        except RpcError as exc:
            self._finish(batch, type(exc).__name__, drop=True)
        except ProtocolError as exc:  # a request we cannot frame: fail this batch, not the node
            log.error("replication batch not sent", extra={"fields": {"error": str(exc)[:200]}})
            self._finish(batch, type(exc).__name__)

    def _answered(self, batch: list[tuple[Any, Outcome]], resp: Response | None, error: RpcError | None) -> None:
        if error is not None:
            self._finish(batch, type(error).__name__, drop=True)
        else:
            assert resp is not None
            self._finish(batch, None if resp.ok else f"status {resp.status}", body=resp.body)

    def _finish(self, batch: list[tuple[Any, Outcome]], error: str | None, *, drop: bool = False,
                body: Any = None) -> None:
        if drop:
            self.pool.drop_soon(self.peer)
        self._in_flight = False
        results = [None] * len(batch)
        if error is None and self.per_item is not None:
            try:
                results = self.per_item([item for item, _ in batch], body)
            except Exception:  # a peer's answer is input: a bad one vouches for nothing
                log.warning("unreadable results from a peer", extra={"fields": {"peer": self.peer[:16]}})
        for (_, done), result in zip(batch, results):
            _tell(done, error, result)
        self._schedule()


# What each forwarded op carries, and a generous estimate of its bytes on the wire.
# A store's copies ask each peer for its signed result (PROTOCOL.md, store): the
# client checks them.
_EXTRA: dict[str, dict[str, Any]] = {"replicate": {"sign": True}}


def signed_results(items: list[StoredMessage], body: Any) -> list[dict[str, Any] | None]:
    """Each copy's signed result from a peer's ``replicate`` answer ``{"signature", "skipped"}``:
    the peer signed the root of the hashes it kept (the request's, in order, less those
    ``skipped``); each kept copy gets that signature and its path to the root, which the
    client checks (nodes.proofs, PROTOCOL.md).  None for a copy it did not keep."""
    out: list[dict[str, Any] | None] = [None] * len(items)
    sig = body.get("signature") if isinstance(body, dict) else None
    skipped = body.get("skipped") if isinstance(body, dict) else None
    if not isinstance(sig, bytes) or not isinstance(skipped, list):
        return out
    gone = {h for h in skipped if isinstance(h, str)}
    kept = [i for i, m in enumerate(items) if m.hash not in gone]
    if kept:
        _, paths = crypto.results_root([items[i].hash for i in kept])
        for i, path in zip(kept, paths):
            out[i] = {"signature": sig, "proof": path}
    return out
_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], int]]] = {
    "replicate": (message_to_wire, wire_bytes),  # a StoredMessage
    "replicate_delete": (SignedDelete.to_wire, SignedDelete.wire_bytes),  # the client's signed request
    "replicate_expire": (SignedExpire.to_wire, SignedExpire.wire_bytes),
}


class Fanout:
    """Forwards what a client gave this node (stores, and deletes and expiries as the
    account signed them) to every other member of its swarm: one :class:`PeerSender`
    per (peer, op), made on first use and closed when the peer leaves the swarm.  ``nursery`` runs the dials of peers not
    connected yet; ``timers`` ends the wait for peers that take longer than
    ``timeout_s``."""

    def __init__(self, nursery: trio.Nursery, pool: ConnectionPool, timeout_s: float, timers: Timers) -> None:
        self._nursery = nursery
        self._pool = pool
        self.timeout_s = timeout_s
        self._timers = timers
        self._senders: dict[tuple[str, str], PeerSender] = {}

    def send_soon(self, op: str, item: Any, view: SwarmView, done: Callable[[dict[str, Any]], None]) -> None:
        """Forward ``item`` (``op``: a key of ``_CODECS``) to every other swarm member in
        parallel; ``done(outcomes)`` (each peer's) runs once, when the last peer has
        answered or at the timeout (those not answered yet: 504), with no task waiting.
        A peer's 200 for a ``replicate`` carries its signed result for the copy it holds
        (``signature`` and ``proof``: :func:`signed_results`; a peer that did not keep it,
        deleted or expired there, signs none)."""
        peers = [p.ed25519_public for p in view.peers()]
        errors: dict[str, str | None] = {}
        signed: dict[str, dict[str, Any]] = {}
        timer: Timer | None = None

        def finish() -> None:
            out = {}
            for key in peers:
                if key not in errors:
                    out[key] = {"status": Status.GATEWAY_TIMEOUT, "error": "timeout"}
                elif errors[key] is not None:
                    out[key] = {"status": Status.BAD_GATEWAY, "error": errors[key]}
                elif key in signed:
                    out[key] = {"status": Status.OK, **signed[key]}
                else:
                    out[key] = {"status": Status.OK}
            done(out)

        def answered(key: str, error: str | None, result: Any) -> None:
            if timer is not None and timer.cancelled:
                return  # answered after the timeout: already reported
            errors[key] = error
            if error is None and result is not None:
                signed[key] = result
            if len(errors) == len(peers) and timer is not None:
                timer.cancel()
                finish()

        for key in peers:
            self._sender(key, op).submit(item, partial(answered, key))
        if len(errors) == len(peers):  # every peer refused at once (or there is none)
            finish()
            return
        timer = self._timers.call_after(self.timeout_s, finish)

    async def send(self, op: str, item: Any, view: SwarmView) -> dict[str, Any]:
        """:meth:`send_soon`, waited for: each peer's outcome."""
        outcomes: list[dict[str, Any]] = []
        finished = trio.Event()

        def done(out: dict[str, Any]) -> None:
            outcomes.append(out)
            finished.set()

        self.send_soon(op, item, view, done)
        await finished.wait()
        return outcomes[0]

    def _sender(self, peer: str, op: str) -> PeerSender:
        s = self._senders.get((peer, op))
        if s is None or s.closed:
            encode, size = _CODECS[op]
            s = PeerSender(peer, self._pool, op, self.timeout_s, encode, size, self._nursery.start_soon,
                           _EXTRA.get(op), signed_results if op == "replicate" else None)
            self._senders[(peer, op)] = s
        return s

    def keep_only(self, peers: set[str] | frozenset[str]) -> None:
        """Close the senders of peers no longer in the swarm (what they still queue fails)."""
        for key, sender in list(self._senders.items()):
            if key[0] not in peers:
                sender.close()
                del self._senders[key]
