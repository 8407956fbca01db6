"""Moving messages between nodes: group commit, per-peer batched forwarding.

Strategy: many concurrent stores share one SQLite transaction (group commit),
and each swarm peer gets one sender task that folds whatever is queued into a
single ``replicate`` request over the persistent connection — so under load
the cost per message falls instead of the number of round trips rising.
:class:`Fanout` keeps those senders, one per (peer, op), for the node's life.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import trio

from testnet.base import meter
from testnet.base.protocol import ProtocolError, Status
from testnet.base.rpc import ConnectionPool, RpcError

from .core import BATCH_COUNT, SwarmView, fitting, message_to_wire, wire_bytes
from .proofs import SignedDelete, SignedExpire
from .storage import Storage, StorageError, StoredMessage

log = logging.getLogger("node.replication")

MAX_BACKLOG = 20_000  # queued messages per peer before new ones fail at once


class _Waiter:
    __slots__ = ("event", "value", "error", "kind")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: str | None = None
        self.kind: type[StorageError] = StorageError

    def set(self, value: Any = None, error: str | None = None, kind: type[StorageError] = StorageError) -> None:
        self.value, self.error, self.kind = value, error, kind
        self.event.set()


class GroupCommit:
    """Batches writes from concurrent tasks into one transaction per loop turn."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._pending: list[tuple[Sequence[StoredMessage], _Waiter]] = []
        self._wake = trio.Event()
        self.commits = 0
        self.messages = 0

    async def commit(self, messages: Sequence[StoredMessage]) -> list[bool]:
        """Store ``messages``; returns once committed: True where new."""
        waiter = _Waiter()
        self._pending.append((messages, waiter))
        self._wake.set()
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.kind(waiter.error)  # a full disk stays a full disk (507), and so on
        return waiter.value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        meter.ROLE.set("storage")
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.lowlevel.checkpoint()  # let this turn's writers join the batch
            batch, self._pending = self._pending, []
            if not batch:
                continue
            flat = [m for msgs, _ in batch for m in msgs]
            try:
                results = self.storage.store_many(flat)
            except StorageError:
                # One writer's bad batch must not fail the others that shared its
                # transaction: each commits alone, and only the culprit hears of it.
                for msgs, w in batch:
                    self._commit_alone(msgs, w)
                continue
            self.commits += 1
            self.messages += len(flat)
            await self._pay_syncs()
            i = 0
            for msgs, w in batch:
                w.set(results[i:i + len(msgs)])
                i += len(msgs)

    async def _pay_syncs(self) -> None:
        """A slow disk's syncs take their time before anyone hears "stored" (nodes.disk:
        on the node's trio clock, so virtual time in the simulation)."""
        disk = self.storage.disk
        owed = disk.take_owed_s() if disk is not None else 0.0
        if owed > 0:
            await trio.sleep(owed)

    def _commit_alone(self, messages: Sequence[StoredMessage], waiter: _Waiter) -> None:
        try:
            waiter.set(self.storage.store_many(messages))
        except StorageError as exc:
            log.error("group commit failed", extra={"fields": {"error": str(exc)}})
            waiter.set(error=str(exc), kind=type(exc))
            return
        self.commits += 1
        self.messages += len(messages)


class PeerSender:
    """Forwards messages to one swarm peer in batches, one request in flight.

    A batch is whatever queued while the previous request was out, cut to the
    wire budget (``size`` estimates an item's bytes): a slow or paused peer
    must not make the next request too big to send.
    """

    def __init__(self, peer: str, pool: ConnectionPool, op: str, timeout_s: float,
                 encode: Callable[[Any], Any], size: Callable[[Any], int]) -> None:
        self.peer = peer
        self.pool = pool
        self.op = op
        self.timeout_s = timeout_s
        self.encode = encode
        self.size = size
        self._queue: list[tuple[Any, _Waiter]] = []
        self._wake = trio.Event()
        self.closed = False

    def submit(self, item: Any) -> _Waiter:
        w = _Waiter()
        if self.closed:
            w.set(error="peer left the swarm")
        elif len(self._queue) >= MAX_BACKLOG:
            w.set(error="replication backlog full")
        else:
            self._queue.append((item, w))
            self._wake.set()
        return w

    def close(self) -> None:
        self.closed = True
        for _, w in self._queue:
            w.set(error="peer left the swarm")
        self._queue.clear()
        self._wake.set()

    async def run(self) -> None:
        meter.ROLE.set("replication-out")
        while not self.closed:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue and not self.closed:
                batch = fitting(self._queue, lambda entry: self.size(entry[0]), max_count=BATCH_COUNT)
                self._queue = self._queue[len(batch):]
                try:
                    resp = await self.pool.call(self.peer, self.op, {"messages": [self.encode(i) for i, _ in batch]},
                                                timeout=self.timeout_s)
                    error = None if resp.ok else f"status {resp.status}"
                except RpcError as exc:
                    error = type(exc).__name__
                    await self.pool.drop(self.peer)
                except ProtocolError as exc:  # a request we cannot frame: fail this batch, not the node
                    log.error("replication batch not sent", extra={"fields": {"error": str(exc)[:200]}})
                    error = type(exc).__name__
                for _, w in batch:
                    w.set(error=error)


# What each forwarded op carries, and a generous estimate of its bytes on the wire.
_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], int]]] = {
    "replicate": (message_to_wire, wire_bytes),  # a StoredMessage
    "replicate_delete": (SignedDelete.to_wire, SignedDelete.wire_bytes),  # the client's signed request
    "replicate_expire": (SignedExpire.to_wire, SignedExpire.wire_bytes),
}


class Fanout:
    """Forwards what a client gave this node (stores, and deletes and expiries as the
    account signed them) to every other member of its swarm: one :class:`PeerSender`
    per (peer, op), started in ``nursery`` on first use and closed when the peer
    leaves the swarm."""

    def __init__(self, nursery: trio.Nursery, pool: ConnectionPool, timeout_s: float) -> None:
        self._nursery = nursery
        self._pool = pool
        self.timeout_s = timeout_s
        self._senders: dict[tuple[str, str], PeerSender] = {}

    async def send(self, op: str, item: Any, view: SwarmView) -> dict[str, Any]:
        """Forward ``item`` (``op``: a key of ``_CODECS``) to every other swarm member in
        parallel; each one's outcome."""
        peers = view.peers()
        waiters = {p.ed25519_public: self._sender(p.ed25519_public, op).submit(item) for p in peers}
        with trio.move_on_after(self.timeout_s):
            for w in waiters.values():
                await w.event.wait()
        out = {}
        for key, w in waiters.items():
            if not w.event.is_set():
                out[key] = {"status": Status.GATEWAY_TIMEOUT, "error": "timeout"}
            elif w.error is not None:
                out[key] = {"status": Status.BAD_GATEWAY, "error": w.error}
            else:
                out[key] = {"status": Status.OK}
        return out

    def _sender(self, peer: str, op: str) -> PeerSender:
        s = self._senders.get((peer, op))
        if s is None or s.closed:
            encode, size = _CODECS[op]
            s = PeerSender(peer, self._pool, op, self.timeout_s, encode, size)
            self._senders[(peer, op)] = s
            self._nursery.start_soon(s.run)
        return s

    def keep_only(self, peers: set[str] | frozenset[str]) -> None:
        """Close the senders of peers no longer in the swarm (what they still queue fails)."""
        for key, sender in list(self._senders.items()):
            if key[0] not in peers:
                sender.close()
                del self._senders[key]
