"""The service node: a trio server that wires together the node's parts and
dispatches each request to the one that serves it.

| part | module | what it owns |
| --- | --- | --- |
| serving clients | :mod:`nodes.client_ops` | store, retrieve, delete, expire, get_swarm |
| serving peers | :mod:`nodes.peer_ops` | replicate*, ae_* (node-to-node ops) |
| following the registry | :mod:`nodes.follower` | the swarm view, entitlements |
| anti-entropy and rehoming | :mod:`nodes.anti_entropy` | the node's own healing rounds |
| forwarding | :mod:`nodes.replication` | group commit, per-peer senders |
| reaching others | :mod:`nodes.dialing` | the dial table, the handshake on each connection |
| admin ops | :mod:`nodes.admin` | links, listeners, clock offset, stop |
| chores | :mod:`nodes.housekeeping` | the expiry sweep, capture flushes |

Rules live in :mod:`nodes.core`, :mod:`nodes.auth` (who may call a node op)
and :mod:`nodes.proofs` (what a peer's change must prove); the parts move
bytes and time.  They are made when the node runs (they need its nursery and
connection pool) and live as long as that run.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import random
import secrets
from typing import Any, Awaitable, Callable

import trio

from testnet.base import crypto, meter
from testnet.base.clock import wall_s
from testnet.base.limits import ConnectionGate
from testnet.base.logs import event
from testnet.base.net import TCP, Network
from testnet.base.protocol import Request, RequestError, Status
from testnet.base.rpc import ConnectionPool, Peer, Reply, Take, serve
from testnet.base.turn import Timers, at_turn_end

from . import auth, core, proofs
from .admin import AdminOps
from .hostile import Hostility
from .anti_entropy import AntiEntropy
from .capture import CaptureFile
from .client_ops import ClientOps
from .core import NodeConfig, SwarmView
from .dialing import REGISTRY_KEY, Dialer
from .follower import RegistryFollower
from .housekeeping import CaptureFlusher, sweep_expired
from .peer_ops import PeerOps
from .replication import Fanout, GroupCommit
from .disk import Disk
from .storage import SYNCHRONOUS, Storage, StorageCorrupt, StorageError, StorageFull, StorageIOError

__all__ = ["Node", "Clock", "NODE_OPS", "HANDSHAKE_OPS", "CLIENT_OPS", "ADMIN_OPS", "REGISTRY_KEY"]

log = logging.getLogger("node")

NODE_OPS = {"replicate", "replicate_delete", "replicate_expire", "ae_digest", "ae_hashes", "ae_fetch"}
HANDSHAKE_OPS = {"node_hello", "node_auth"}
CLIENT_OPS = {"store", "retrieve", "delete", "expire", "get_swarm", "info", "onion"}
ADMIN_OPS = {"admin_set_links", "admin_listen", "admin_clock", "admin_stop", "admin_disk", "admin_byzantine"}
# The CPU role (testnet.base.meter.ROLE) of each op's handler; onion requests are
# "onion-open" until their layer is open, then guard, relay or target (nodes.onion).
_ROLES = {"onion": "onion-open", "replicate": "replica", "replicate_delete": "replica", "replicate_expire": "replica",
          "ae_digest": "anti-entropy", "ae_hashes": "anti-entropy", "ae_fetch": "anti-entropy",
          "node_hello": "handshake", "node_auth": "handshake",
          **{op: "direct-client-op" for op in ("store", "retrieve", "delete", "expire", "get_swarm", "info")},
          **{op: "admin" for op in ADMIN_OPS}}


class Clock:
    """The node's one source of time: the wall clock plus an injectable offset (ms)."""

    def __init__(self, offset_ms: int = 0, source: Callable[[], float] = wall_s) -> None:
        self.offset_ms = offset_ms
        self._source = source

    def now_ms(self) -> int:
        return int(self._source() * 1000) + self.offset_ms

    def wall_ms(self) -> int:
        """The time without the injected offset (registration, capture records)."""
        return int(self._source() * 1000)


def disk_refusal(exc: StorageError) -> RequestError:
    """A failing disk's answer, never a 500: 507 when full, 503 on an I/O error or a
    corrupt file (PROTOCOL.md)."""
    if isinstance(exc, StorageFull):
        return RequestError(Status.INSUFFICIENT_STORAGE, "disk full: not stored")
    return RequestError(Status.NOT_READY, f"disk failing: {type(exc).__name__}")


async def _disk_refusals(work: Awaitable[tuple[int, Any]]) -> tuple[int, Any]:
    try:
        return await work
    except (StorageFull, StorageIOError, StorageCorrupt) as exc:
        raise disk_refusal(exc) from None


def open_storage(path: Any, disk: Disk | None, synchronous: str) -> Storage:
    """The node's store; a database found corrupt is set aside (renamed ``.corrupt``, for
    a person to look at) and a fresh one opened, which anti-entropy fills from the swarm's
    peers: nothing is ever served from a damaged file, and no retrieve is answered from
    the new one before it has caught up (``rebuilding``; :meth:`Node.rebuild_storage` does
    the same for damage found at run time)."""
    try:
        return Storage(path, disk=disk, synchronous=synchronous)
    except StorageCorrupt as exc:
        event(log, "database corrupt: set aside, rebuilding from swarm peers by anti-entropy", logging.ERROR,
              error=str(exc)[:200])
        base = os.fspath(path)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(base + suffix):
                os.replace(base + suffix, base + ".corrupt" + suffix)
        storage = Storage(path, disk=disk, synchronous=synchronous)
        storage.rebuilding = True
        storage.set_aside_count = 1
        return storage


REBUILD_RETRY_S = 1.0  # a fresh file that would not open (the disk failing): try again after this


class Node:
    """One service node.  Time, randomness and the network come from the objects
    passed in: the real ones by default, virtual ones in the simulation."""

    def __init__(self, config: NodeConfig, *, clock: Clock | None = None,
                 randbytes: Callable[[int], bytes] = crypto.random_bytes,
                 rng: random.Random | None = None, network: Network = TCP, disk: Disk | None = None,
                 halt: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.randbytes = randbytes  # handshake challenges, onion reply nonces
        self.rng = rng or random.Random()  # timer jitter
        self.network = network
        self.identity = config.identity()
        self.ed_hex = self.identity.ed25519_public.hex()
        self.x_hex = self.identity.x25519_public.hex()
        self.clock = clock or Clock(config.clock_offset_ms)
        # The harness's disk under SQLite (nodes.disk): faults armed by admin_disk, or
        # by the simulation on the same object.
        # Its own Random, seeded by the node's name: drawing from rng would shift every later draw.
        # With config.disk "os" (bench node's comparison) SQLite runs on its own VFS: no disk faults.
        self.disk: Disk | None = disk or (
            Disk(random.Random(f"disk:{config.name}")) if config.disk == "model" else None)
        # Injected bug ack-before-sync: commits are acknowledged with nothing synced.
        self.storage = open_storage(config.db, self.disk,
                                    "OFF" if "ack-before-sync" in config.inject_bugs else SYNCHRONOUS)
        self.storage.on_corrupt = self._found_corrupt
        self.halt = halt  # how a power loss ends this node at once (the process's _exit by default)
        self._flusher = CaptureFlusher()
        self.capture = CaptureFile(config.capture, now_ms=self.clock.wall_ms,
                                   buffer_bytes=config.capture_buffer_bytes,
                                   on_dirty=self._flusher.wake) if config.capture else None
        self._flusher.capture = self.capture
        self.entitled = auth.Entitlements()
        self.bugs = set(config.inject_bugs)
        self.rate = core.TokenBucket(config.rate_limit_burst, config.rate_limit_per_second)
        self.signature_budget = proofs.SignatureBudget()  # account signatures each peer may make us check
        self.hostile = Hostility(self.rng)  # armed only by the byzantine nemesis (admin_byzantine)
        self.gate = ConnectionGate(config.connection_limits)  # shared by every listener of this node
        self.listening: list[tuple[str, int]] = []
        self.onion_handler: Callable[[Request, Peer], Awaitable[tuple[int, Any]]] | None = None
        self.onion_take: Take | None = None  # the onion handler's fast path (nodes.onion)
        self.timers = Timers()  # deadlines of work answered from callbacks (forwarding, slow syncs)
        self.window_timers: Timers | None = None  # the replica commit window's, when it has one
        self.stats = {"stores": 0, "replicated_in": 0, "results_signed": 0, "ae_fetched": 0, "ae_pushed": 0,
                      "rehomed": 0, "node_auth_ok": 0, "node_auth_refused": 0, "node_ops_refused_401": 0,
                      "node_ops_refused_403": 0}
        self.dialer = Dialer(config, self.identity, network=network, capture=self.capture, view=lambda: self.view)
        # The parts, made by run() (see the module docstring).
        self.follower: RegistryFollower | None = None
        self.anti_entropy: AntiEntropy | None = None
        self.clients: ClientOps | None = None
        self.peers: PeerOps | None = None
        self.admin: AdminOps | None = None
        self.commit: GroupCommit | None = None
        self._client_ops: dict[str, Callable[[dict], Awaitable[Any]]] = {}
        self._peer_ops: dict[str, Callable[[dict, str | None], Any]] = {}  # replicate's awaitable
        self._admin_ops: dict[str, Callable[[dict], Awaitable[Any]]] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None

    # ------------------------------------------------------------------ what the parts share

    @property
    def host(self) -> str:
        return self.config.listen[0][0]

    @property
    def view(self) -> SwarmView | None:
        """The registry's list as this node holds it (None before the first)."""
        return self.follower.view if self.follower is not None else None

    @property
    def pool(self) -> ConnectionPool | None:
        """Connections to the registry and to other nodes (handshake made on each)."""
        return self.dialer.pool

    @property
    def links(self) -> dict[str, tuple[str, int]]:
        return self.dialer.links

    # ------------------------------------------------------------------ a damaged database

    def _found_corrupt(self, exc: StorageCorrupt) -> None:
        """Damage found at run time: nothing more is served from the file (retrieves answer
        503 from now on), and at the end of this turn it is set aside and rebuilt."""
        event(log, "database corrupt at run time: no longer served; setting it aside, rebuilding from swarm "
                   "peers by anti-entropy", logging.ERROR, error=str(exc)[:200])
        at_turn_end(self.rebuild_storage)

    def rebuild_storage(self) -> None:
        """Set the damaged file aside and start an empty one, which anti-entropy fills from
        the swarm's peers; retrieves wait (503) until it has caught up with them."""
        try:
            self.storage.set_aside()
        except StorageError as exc:  # the disk fails under the new file too: try again soon
            event(log, "rebuild: a fresh database would not open", logging.ERROR, error=str(exc)[:200])
            self.timers.call_after(REBUILD_RETRY_S, self.rebuild_storage)
            return
        event(log, "database set aside: rebuilding from swarm peers by anti-entropy", logging.WARNING,
              set_aside=self.storage.set_aside_count)
        if self.anti_entropy is not None:
            self.anti_entropy.rebuild()

    # ------------------------------------------------------------------ lifecycle

    def _make_parts(self, nursery: trio.Nursery, pool: ConnectionPool) -> None:
        now_ms, view = self.clock.now_ms, lambda: self.view
        window_s = self.config.replica_commit_window_ms / 1000
        self.window_timers = Timers() if window_s > 0 else None
        self.commit = GroupCommit(self.storage, self.timers, window_s=window_s, window_timers=self.window_timers)
        fanout = Fanout(nursery, pool, self.config.replication_timeout_s, self.timers)
        self.anti_entropy = AntiEntropy(self.config, me=self.ed_hex, storage=self.storage, commit=self.commit,
                                        pool=pool, now_ms=now_ms, rng=self.rng, view=view, stats=self.stats,
                                        bugs=self.bugs, hostile=self.hostile)
        self.follower = RegistryFollower(self.config, self.identity, dialer=self.dialer, wall_ms=self.clock.wall_ms,
                                         listening=lambda: self.listening, entitled=self.entitled, fanout=fanout,
                                         wake_anti_entropy=self.anti_entropy.wake)
        hostile = self.hostile
        self.clients = ClientOps(me=self.ed_hex, storage=self.storage, commit=self.commit, fanout=fanout,
                                 now_ms=now_ms, view=view, stats=self.stats, bugs=self.bugs, nursery=nursery,
                                 sign_root=self.sign_root, hostile=hostile)
        self.peers = PeerOps(storage=self.storage, commit=self.commit, now_ms=now_ms, view=view,
                             entitled=self.entitled, anti_entropy=self.anti_entropy, stats=self.stats, bugs=self.bugs,
                             sign_root=self.sign_root, signature_budget=self.signature_budget, hostile=hostile)
        self.admin = AdminOps(dialer=self.dialer, listen=self._listen_more, clock=self.clock, stop=self.stop,
                              nursery=nursery, hostile=hostile, disk=self.disk, storage=self.storage,
                              own_host=self.host, honest_again=self.anti_entropy.wake,
                              **({"halt": self.halt} if self.halt else {}))
        self._client_ops = {**self.clients.ops(), "info": self.op_info}
        self._peer_ops = self.peers.ops()
        self._admin_ops = self.admin.ops()

    async def run(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._cancel = nursery.cancel_scope
                pool = self.dialer.open(nursery)
                self._make_parts(nursery, pool)
                assert self.commit is not None and self.follower is not None and self.anti_entropy is not None
                await nursery.start(self.timers.run)
                if self.window_timers is not None:  # the replica commit window's (one delay: kept apart)
                    await nursery.start(self.window_timers.run)
                self.listening = await nursery.start(self._serve, list(self.config.listen))
                event(log, "listening", node=self.config.name, addresses=self.listening,
                      ed25519=self.ed_hex[:16])
                nursery.start_soon(self.follower.run)
                nursery.start_soon(self.anti_entropy.run)
                nursery.start_soon(sweep_expired, self.storage, self.clock.now_ms, self.config.expiry_interval_s)
                if self.capture is not None:
                    nursery.start_soon(self._flusher.run)
                task_status.started(self.listening)
        finally:
            if self.capture is not None:
                self.capture.close()
            self.storage.close()

    def sign_root(self, root: bytes) -> bytes:
        """This node's signature over a results root: the stores it holds (PROTOCOL.md, store)."""
        self.stats["results_signed"] += 1
        return crypto.sign_fast(self.identity, crypto.store_result_message(self.ed_hex, root))

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def _serve(self, addresses: list[tuple[str, int]], *,
                     task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(self.handle, addresses, capture=self.capture, network=self.network, gate=self.gate,
                    take=self.take, task_status=task_status)

    async def _listen_more(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """More listeners (admin_listen: per-user ingress ports), served like the first."""
        assert self._nursery is not None
        bound = await self._nursery.start(self._serve, addresses)
        self.listening.extend(bound)
        return bound

    # ------------------------------------------------------------------ dispatch

    def take(self, req: Request, peer: Peer, reply: Reply) -> Awaitable[tuple[int, Any]] | None:
        """The server's fast path (testnet.base.rpc_server.Take): a replicated copy, an
        onion layer to relay and a store for this node as the onion target are handled
        on the reader's turn and answered from callbacks, and the other node ops (anti-
        entropy's, forwarded deletes and expiries: plain calls) answered at once, with no
        task of their own;
        everything else, and whatever must wait for a dial, goes on as :meth:`handle`
        in a task.  Refusals are answered as :meth:`handle` answers them."""
        op = req.op
        try:
            if op == "replicate" and "no-node-auth" not in self.bugs and self.peers is not None:
                self._replicate_now(req, peer, reply)
                return None
            if op in PeerOps.SYNC_OPS and "no-node-auth" not in self.bugs and self.peers is not None:
                meter.ROLE.set(_ROLES[op])
                reply(Status.OK, self._node_op(op, req, peer))
                return None
            if op == "onion" and self.onion_take is not None:
                meter.ROLE.set("onion-open")
                self._rate_limit(peer)
                work = self.onion_take(req, peer, reply)
                return None if work is None else _disk_refusals(work)
        except (StorageFull, StorageIOError, StorageCorrupt) as exc:
            raise disk_refusal(exc) from None
        return self.handle(req, peer)

    def _replicate_now(self, req: Request, peer: Peer, reply: Reply) -> None:
        """``replicate`` from an authenticated node: checked here, committed with this
        turn's writes, answered from the commit's callback."""
        meter.ROLE.set("replica")
        try:
            caller = auth.authenticated_node(peer.session, self.entitled.is_registered)
            msgs = self.peers.replicated(req.args, caller)  # type: ignore[union-attr]
        except RequestError as exc:
            self._count_refusal(exc)
            raise
        peers = self.peers
        assert peers is not None
        if not msgs or peers.dropping(msgs):
            reply(Status.OK, peers.answer(req.args, msgs))
            return

        def committed(new: list[bool] | None, error: StorageError | None) -> None:
            if error is None:
                self.stats["replicated_in"] += sum(new)  # type: ignore[arg-type]
                reply(Status.OK, peers.answer(req.args, msgs))
            elif isinstance(error, (StorageFull, StorageIOError, StorageCorrupt)):
                refusal = disk_refusal(error)
                reply(refusal.status, refusal.body)
            else:  # as a failed write in a handler: logged by the group commit, answered 500
                reply(Status.INTERNAL_ERROR, {"error": "internal error"})

        self.commit.commit_soon(msgs, committed, hold=True)  # type: ignore[union-attr]

    def _node_op(self, op: str, req: Request, peer: Peer) -> Any:
        """A node op's answer (an awaitable for ``replicate``), once its caller is known to be
        a registered node; refusals counted."""
        try:
            caller = None if "no-node-auth" in self.bugs else \
                auth.authenticated_node(peer.session, self.entitled.is_registered)
            return self._peer_ops[op](req.args, caller)
        except RequestError as exc:
            self._count_refusal(exc)
            raise

    def _count_refusal(self, exc: RequestError) -> None:
        if exc.status in (Status.UNAUTHORIZED, Status.FORBIDDEN):
            self.stats[f"node_ops_refused_{exc.status}"] += 1

    def _rate_limit(self, peer: Peer) -> None:
        if not self.rate.allow((peer.remote[0], peer.local[1]), trio.current_time()):
            raise RequestError(Status.RATE_LIMITED, "rate limited")

    async def _handle(self, req: Request, peer: Peer) -> tuple[int, Any]:
        op = req.op
        # What this request's CPU serves (the onion handler refines it: guard, relay, target).
        meter.ROLE.set(_ROLES.get(op, "other"))
        if (op in CLIENT_OPS and op != "info") or op in HANDSHAKE_OPS:
            self._rate_limit(peer)
        if op == "onion" and self.onion_handler is not None:
            return await self.onion_handler(req, peer)
        if op == "node_hello":
            return Status.OK, auth.hello(peer.session, self.ed_hex, self.randbytes)
        if op == "node_auth":
            try:
                caller = auth.check_auth(peer.session, req.args, self.ed_hex, self.entitled.is_registered)
            except RequestError:
                self.stats["node_auth_refused"] += 1
                raise
            self.stats["node_auth_ok"] += 1
            return Status.OK, {"node": caller}
        if op in NODE_OPS:
            # oxen-storage-server: node-to-node requests only from a node on the service-node list.
            result = self._node_op(op, req, peer)
            if inspect.isawaitable(result):
                try:
                    result = await result
                except RequestError as exc:
                    self._count_refusal(exc)
                    raise
            return Status.OK, result
        if op in ADMIN_OPS:
            token = req.args.get("token")
            # compare_digest takes str only when ASCII: compare the UTF-8 bytes.
            if not self.config.admin_token or not isinstance(token, str) or \
                    not secrets.compare_digest(token.encode(), self.config.admin_token.encode()):
                raise RequestError(Status.UNAUTHORIZED, "admin token required")
            return Status.OK, await self._admin_ops[op](req.args)
        method = self._client_ops.get(op) if op in CLIENT_OPS else None
        if method is None:
            raise RequestError(Status.NOT_FOUND, f"unknown op {op!r:.70}")
        return Status.OK, await method(req.args)

    async def handle(self, req: Request, peer: Peer) -> tuple[int, Any]:
        """:meth:`handle`, with a failing disk answered by its status, never a 500:
        507 when full, 503 on an I/O error or a corrupt file (PROTOCOL.md)."""
        try:
            return await self._handle(req, peer)
        except (StorageFull, StorageIOError, StorageCorrupt) as exc:
            raise disk_refusal(exc) from None

    disk_refusal = staticmethod(disk_refusal)  # for the onion target's fast path

    def client_op(self, op: str) -> Callable[[dict], Awaitable[Any]]:
        """The handler of a client op (an onion request's target runs it); KeyError if none."""
        return self._client_ops[op]

    async def op_info(self, args: dict) -> dict:
        view = self.view
        return {
            "role": "node", "version": core.VERSION, "name": self.config.name,
            "ed25519_public": self.ed_hex, "x25519_public": self.x_hex,
            "height": view.height if view else 0,
            "swarm_id": view.my_swarm if view else None,
            "swarm": [n.ed25519_public for n in view.members(view.my_swarm)] if view and view.my_swarm is not None else [],
            "clock_ms": self.clock.now_ms(), "clock_offset_ms": self.clock.offset_ms,
            "messages": self.storage.count(), "listening": [list(a) for a in self.listening],
            "stats": {**self.stats, "signature_checks_refused": self.signature_budget.refused},
            "connections": dataclasses.asdict(self.gate.statistics()),
            "process_meter": meter.snapshot(),
        }
