"""The service node: a trio server over its storage, following the registry,
replicating to its swarm and healing by anti-entropy.

Rules live in :mod:`nodes.core`; this module moves bytes and time.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
from typing import Any, Awaitable, Callable

import trio

from testnet.base import crypto, meter
from testnet.base.clock import wall_s
from testnet.base.logs import event
from testnet.base.net import TCP, Network
from testnet.base.protocol import RequestError, Request, Status
from testnet.base.records import register_args
from testnet.base.limits import ConnectionGate
from testnet.base.rpc import ConnectionPool, Peer, RpcError, serve

from . import auth, core
from .capture import CaptureFile
from .core import NodeConfig, SwarmView
from .replication import GroupCommit, PeerSender
from .storage import Storage, StorageError, StoredMessage

log = logging.getLogger("node")

NODE_OPS = {"replicate", "replicate_delete", "replicate_expire", "ae_digest", "ae_hashes", "ae_fetch"}
HANDSHAKE_OPS = {"node_hello", "node_auth"}
CLIENT_OPS = {"store", "retrieve", "delete", "expire", "get_swarm", "info", "onion"}
ADMIN_OPS = {"admin_set_links", "admin_listen", "admin_clock", "admin_stop"}
CAPTURE_FLUSH_S = 0.2  # what a killed node's capture may lose
# The CPU role (testnet.base.meter.ROLE) of each op's handler; onion requests are
# "onion-open" until their layer is open, then guard, relay or target (nodes.onion).
_ROLES = {"onion": "onion-open", "replicate": "replica", "replicate_delete": "replica", "replicate_expire": "replica",
          "ae_digest": "anti-entropy", "ae_hashes": "anti-entropy", "ae_fetch": "anti-entropy",
          "node_hello": "handshake", "node_auth": "handshake",
          **{op: "direct-client-op" for op in ("store", "retrieve", "delete", "expire", "get_swarm", "info")},
          **{op: "admin" for op in ADMIN_OPS}}
REGISTRY_KEY = "registry"
WRITE_BEHIND_S = 3.0  # the ack-before-commit bug's delay


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


class Node:
    """One service node.  Time, randomness and the network come from the objects
    passed in: the real ones by default, virtual ones in the simulation."""

    def __init__(self, config: NodeConfig, *, clock: Clock | None = None,
                 randbytes: Callable[[int], bytes] = crypto.random_bytes,
                 rng: random.Random | None = None, network: Network = TCP) -> None:
        self.config = config
        self.randbytes = randbytes  # handshake challenges, onion reply nonces
        self.rng = rng or random.Random()  # timer jitter
        self.network = network
        self.identity = config.identity()
        self.ed_hex = self.identity.ed25519_public.hex()
        self.x_hex = self.identity.x25519_public.hex()
        self.clock = clock or Clock(config.clock_offset_ms)
        self.storage = Storage(config.db)
        self._capture_wake = trio.Event()
        self.capture = CaptureFile(config.capture, now_ms=self.clock.wall_ms,
                                   buffer_bytes=config.capture_buffer_bytes,
                                   on_dirty=lambda: self._capture_wake.set()) if config.capture else None
        self.view: SwarmView | None = None
        self.entitled = auth.Entitlements()
        self.links: dict[str, tuple[str, int]] = dict(config.links)
        self._links_open: set[str] = set()  # links whose proxy the link opener has said exists
        self._opener: ConnectionPool | None = None  # to the link opener (config.link_opener)
        self.bugs = set(config.inject_bugs)
        self.rate = core.TokenBucket(config.rate_limit_burst, config.rate_limit_per_second)
        self.gate = ConnectionGate(config.connection_limits)  # shared by every listener of this node
        self.listening: list[tuple[str, int]] = []
        self.onion_handler: Callable[[Request, Peer], Awaitable[tuple[int, Any]]] | None = None
        self._senders: dict[tuple[str, str], PeerSender] = {}
        self._ae_wake = trio.Event()
        # Anti-entropy skips what cannot have changed: a peer whose digests equalled ours at
        # this (storage version, view height), and rehoming already done at it.  A peer whose
        # own messages changed since runs its round with us (the exchange is symmetric).
        self._ae_matched: dict[str, tuple[int, int]] = {}
        self._rehomed_at: tuple[int, int] | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self.pool: ConnectionPool | None = None
        self.commit: GroupCommit | None = None
        self.stats = {"stores": 0, "replicated_in": 0, "ae_fetched": 0, "ae_pushed": 0, "rehomed": 0,
                      "node_auth_ok": 0, "node_auth_refused": 0, "node_ops_refused_401": 0,
                      "node_ops_refused_403": 0}

    # ------------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        return self.config.listen[0][0]

    def _resolve(self, key: Any) -> tuple[str, int, str | None]:
        if key == REGISTRY_KEY:
            return self.config.registry[0], self.config.registry[1], self.host
        if key in self.links:
            h, p = self.links[key]
            return h, p, self.host
        rec = self.view.nodes.get(key) if self.view else None
        if rec is None:
            raise RpcError(f"no address known for node {str(key)[:12]}")
        return rec.host, rec.port, self.host

    async def run(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._cancel = nursery.cancel_scope
                self.pool = ConnectionPool(nursery, self._resolve, capture=self.capture, network=self.network,
                                           connect_timeout=self.config.replication_timeout_s,
                                           on_connect=self._authenticate_to,
                                           on_refused=self._open_link if self.config.link_opener else None)
                if self.config.link_opener:  # testnet plumbing: not captured, not the modelled network
                    opener = (*self.config.link_opener, self.host)
                    self._opener = ConnectionPool(nursery, lambda key: opener, network=self.network,
                                                  connect_timeout=self.config.replication_timeout_s)
                self.commit = GroupCommit(self.storage)
                await nursery.start(self.commit.run)
                self.listening = await nursery.start(
                    lambda task_status: serve(self.handle, list(self.config.listen), capture=self.capture,
                                              network=self.network, gate=self.gate,
                                              task_status=task_status))
                event(log, "listening", node=self.config.name, addresses=self.listening,
                      ed25519=self.ed_hex[:16])
                nursery.start_soon(self._follow_registry)
                nursery.start_soon(self._anti_entropy_loop)
                nursery.start_soon(self._expiry_loop)
                if self.capture is not None:
                    nursery.start_soon(self._flush_capture_loop)
                task_status.started(self.listening)
        finally:
            if self.capture is not None:
                self.capture.close()
            self.storage.close()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def _open_link(self, key: Any, timeout: float) -> bool:
        """A dial through one of the testnet's links was refused: its proxy may not be made
        yet (they are made on first use).  Ask the testnet's controller (``link_opener``) to
        make it, signed with our key, and dial again.  Once it said so the proxy stays while
        the link does: a refused dial after that is a cut link, and we do not ask again."""
        if key not in self.links or key in self._links_open or self._opener is None:
            return False
        args = {"src": self.ed_hex, "dst": key,
                "signature": self.identity.sign(crypto.link_open_message(self.ed_hex, key))}
        resp = await self._opener.call("controller", "open_link", args, timeout=timeout)
        if not resp.ok:
            why = resp.body.get("error") if isinstance(resp.body, dict) else resp.body
            raise RpcError(f"no link to {str(key)[:12]}: {why}")
        self._links_open.add(key)
        return True

    async def _authenticate_to(self, key: Any, conn: Any, timeout: float) -> None:
        """Every connection to another node starts with our handshake (nodes/auth.py)."""
        if key != REGISTRY_KEY:
            await auth.authenticate(conn, self.identity, str(key), timeout=timeout)

    async def _flush_capture_loop(self) -> None:
        """Flush 0.2 s after the first record since the last flush; sleep while none comes
        (an idle node does not wake for its capture)."""
        meter.ROLE.set("capture-flush")
        assert self.capture is not None
        while True:
            if not self.capture.dirty:
                self._capture_wake = trio.Event()
                await self._capture_wake.wait()
            await trio.sleep(CAPTURE_FLUSH_S)
            self.capture.flush()

    # ------------------------------------------------------------------ dispatch

    async def handle(self, req: Request, peer: Peer) -> tuple[int, Any]:
        op = req.op
        # What this request's CPU serves (the onion handler refines it: guard, relay, target).
        meter.ROLE.set(_ROLES.get(op, "other"))
        if (op in CLIENT_OPS and op != "info") or op in HANDSHAKE_OPS:
            if not self.rate.allow((peer.remote[0], peer.local[1]), trio.current_time()):
                raise RequestError(Status.RATE_LIMITED, "rate limited")
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
            try:
                caller = None if "no-node-auth" in self.bugs else \
                    auth.authenticated_node(peer.session, self.entitled.is_registered)
                return Status.OK, await getattr(self, "op_" + op)(req.args, caller)
            except RequestError as exc:
                if exc.status in (Status.UNAUTHORIZED, Status.FORBIDDEN):
                    self.stats[f"node_ops_refused_{exc.status}"] += 1
                raise
        method = getattr(self, "op_" + op, None) if (op in CLIENT_OPS or op in ADMIN_OPS) else None
        if method is None:
            raise RequestError(Status.NOT_FOUND, f"unknown op {op!r:.70}")
        if op in ADMIN_OPS:
            token = req.args.get("token")
            # compare_digest takes str only when ASCII: compare the UTF-8 bytes.
            if not self.config.admin_token or not isinstance(token, str) or \
                    not secrets.compare_digest(token.encode(), self.config.admin_token.encode()):
                raise RequestError(Status.UNAUTHORIZED, "admin token required")
        return Status.OK, await method(req.args)

    def _require_view(self) -> SwarmView:
        if self.view is None or self.view.my_swarm is None:
            raise RequestError(Status.NOT_READY, "node has no swarm yet")
        return self.view

    # ------------------------------------------------------------------ client ops

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
            "stats": dict(self.stats), "connections": dataclasses.asdict(self.gate.statistics()),
            "process_meter": meter.snapshot(),
        }

    async def op_get_swarm(self, args: dict) -> dict:
        view = self._require_view()
        pubkey = core.session_pubkey(args)
        target = view.swarm_of(pubkey)
        return {"swarm_id": target, "nodes": [n.to_wire() for n in view.members(target)]}

    async def op_store(self, args: dict) -> dict:
        msg = core.validate_store(args, self.clock.now_ms())
        view = self._require_view()
        if not view.is_mine(msg.pubkey):
            raise view.wrong_swarm(msg.pubkey)
        self.stats["stores"] += 1
        results: dict[str, Any] = {}
        if "ack-before-commit" in self.bugs:
            # Deliberately broken: answer now, write (and forward) later.
            self._nursery.start_soon(self._write_behind, msg)
            results[self.ed_hex] = {"status": Status.OK}
            return {"hash": msg.hash, "swarm": results}
        try:
            await self.commit.commit([msg])
        except StorageError as exc:  # this node did not keep it
            raise RequestError(Status.INTERNAL_ERROR, f"storage failed: {type(exc).__name__}") from None
        results[self.ed_hex] = {"status": Status.OK}
        if "skip-replication" not in self.bugs:
            results.update(await self._fan_out("replicate", msg, core.message_to_wire, view))
        return {"hash": msg.hash, "swarm": results}

    async def _write_behind(self, msg: StoredMessage) -> None:
        await trio.sleep(WRITE_BEHIND_S)
        await self.commit.commit([msg])
        if self.view is not None:
            await self._fan_out("replicate", msg, core.message_to_wire, self.view)

    async def _fan_out(self, op: str, item: Any, encode: Callable[[Any], Any], view: SwarmView) -> dict[str, Any]:
        """Forward ``item`` to every other swarm member in parallel; each one's outcome."""
        peers = view.peers()
        waiters = {p.ed25519_public: self._sender(p.ed25519_public, op, encode).submit(item) for p in peers}
        with trio.move_on_after(self.config.replication_timeout_s):
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

    def _sender(self, peer: str, op: str, encode: Callable[[Any], Any]) -> PeerSender:
        s = self._senders.get((peer, op))
        if s is None or s.closed:
            size = core.wire_bytes if op == "replicate" else core.hash_list_bytes
            s = PeerSender(peer, self.pool, op, self.config.replication_timeout_s, encode, size)
            self._senders[(peer, op)] = s
            self._nursery.start_soon(s.run)
        return s

    async def op_retrieve(self, args: dict) -> dict:
        pubkey, ns, last = core.validate_retrieve(args, self.clock.now_ms())
        view = self._require_view()
        if not view.is_mine(pubkey):
            raise view.wrong_swarm(pubkey)
        msgs, more = self.storage.retrieve(pubkey, ns, last, self.clock.now_ms())
        # As many as fit in one reply; the client asks again after the last hash it got.
        fit = core.fitting(msgs, core.wire_bytes)
        msgs, more = fit, more or len(fit) < len(msgs)
        if "wrong-inbox" in self.bugs:
            # Deliberately broken: mix in a neighbour account's messages.
            for other in self.storage.pubkeys():
                if other != pubkey and view.is_mine(other):
                    extra, _ = self.storage.retrieve(other, ns, None, self.clock.now_ms(), limit=2)
                    msgs = msgs + extra
                    break
        return {"messages": [{"hash": m.hash, "timestamp": m.timestamp, "expiry": m.expiry, "data": m.data}
                             for m in msgs], "more": more}

    async def op_delete(self, args: dict) -> dict:
        pubkey, hs = core.validate_delete(args)
        view = self._require_view()
        if not view.is_mine(pubkey):
            raise view.wrong_swarm(pubkey)
        if "local-delete" in self.bugs:
            # Deliberately broken: delete here only, tell nobody, remember nothing.
            deleted = self.storage.delete(pubkey, hs)
            return {"deleted": deleted, "swarm": {self.ed_hex: {"status": Status.OK, "deleted": deleted}}}
        deleted = self._delete_local(pubkey, hs)
        results = {self.ed_hex: {"status": Status.OK, "deleted": deleted}}
        results.update(await self._fan_out("replicate_delete", (pubkey, hs), list, view))
        return {"deleted": deleted, "swarm": results}

    def _delete_local(self, pubkey: str, hs: list[str]) -> list[str]:
        # A deleted message must never come back from a peer's copy: remember the hash
        # for as long as any copy could still be alive.
        return self.storage.delete(pubkey, hs, tombstone_until=self.clock.now_ms() + core.MAX_TTL_MS)

    async def op_expire(self, args: dict) -> dict:
        pubkey, hs, expiry = core.validate_expire(args, self.clock.now_ms())
        view = self._require_view()
        if not view.is_mine(pubkey):
            raise view.wrong_swarm(pubkey)
        updated = self.storage.expire(pubkey, hs, max(expiry, 1))
        results = {self.ed_hex: {"status": Status.OK, "updated": updated}}
        results.update(await self._fan_out("replicate_expire", (pubkey, hs, expiry), list, view))
        return {"updated": updated, "swarm": results}

    # ------------------------------------------------------------------ node-to-node ops

    # Each takes the authenticated caller's ed25519 hex (None only under the
    # injected bug no-node-auth) and answers 403 for accounts of a swarm the
    # caller is not, and was not recently, a member of.

    def _require_accounts(self, caller: str | None, pubkeys: Any, *, rehoming: bool = False) -> None:
        if caller is not None:
            self.entitled.require_accounts(caller, pubkeys, rehoming=rehoming)

    async def op_replicate(self, args: dict, caller: str | None) -> dict:
        """Forwarded copies (from a member, or a recent member rehoming them): stored,
        never forwarded again."""
        msgs = core.replicated_messages(args)
        core.check_replicated_expiries(msgs, self.clock.now_ms())
        self._require_accounts(caller, (m.pubkey for m in msgs), rehoming=True)
        msgs = [m for m in msgs if not self.storage.tombstoned(m.hash)]
        if msgs:
            new = await self.commit.commit(msgs)
            self.stats["replicated_in"] += sum(new)
        return {"stored": len(msgs)}

    async def op_replicate_delete(self, args: dict, caller: str | None) -> dict:
        items = core.replicated_deletes(args)
        self._require_accounts(caller, (pk for pk, _ in items))
        done = []
        for pubkey, hs in items:
            done.extend(self._delete_local(pubkey, hs))
        return {"deleted": len(done)}

    async def op_replicate_expire(self, args: dict, caller: str | None) -> dict:
        items = core.replicated_expiries(args)
        self._require_accounts(caller, (pk for pk, _, _ in items))
        n = 0
        for pubkey, hs, expiry in items:
            n += len(self.storage.expire(pubkey, hs, max(expiry, 1)))
        return {"updated": n}

    async def op_ae_digest(self, args: dict, caller: str | None) -> dict:
        """Anti-entropy, step 1: the pubkeys of that swarm whose digests differ from the
        caller's, each with our digest per bucket."""
        swarm_id, theirs = core.ae_digest_args(args)
        if caller is not None:
            self.entitled.require_swarm(caller, swarm_id)
        if "skip-replication" in self.bugs:
            return {"buckets": {}}
        view = self._require_view()
        ours = self.storage.ae_digests(lambda pk: view.swarm_of(pk) == swarm_id)
        differ = [pk for pk in set(ours) | set(theirs) if ours.get(pk) != theirs.get(pk)][:1000]
        if not differ and caller is not None and swarm_id == view.my_swarm and caller in view.peer_keys():
            # Equal at our state: our own round need not ask this peer again until either side
            # changes (as if we had asked; the side that changes runs the round).
            self._ae_matched[caller] = (self.storage.index.version, view.height)
        if caller is not None:
            differ = [pk for pk in differ if self.entitled.may_hold(caller, pk)]
        buckets = self.storage.ae_buckets(differ)
        # Pubkeys whose buckets fit in one reply; the rest still differ next round.
        fit = core.fitting(buckets.items(), core.hash_list_bytes)
        return {"buckets": {pk: [[b, d] for b, d in bs.items()] for pk, bs in fit}}

    async def op_ae_hashes(self, args: dict, caller: str | None) -> dict:
        """Anti-entropy, step 2: our hashes in the buckets asked for, per pubkey."""
        wanted = core.ae_buckets_args(args)
        self._require_accounts(caller, wanted)
        if "skip-replication" in self.bugs:
            return {"hashes": {}}
        hashes = self.storage.ae_hashes(dict(list(wanted.items())[:1000]), self.clock.now_ms())
        # Pubkeys whose hashes fit in one reply; the initiator compares only those this round.
        fit = core.fitting(hashes.items(), core.hash_list_bytes)
        return {"hashes": dict(fit)}

    async def op_ae_fetch(self, args: dict, caller: str | None) -> dict:
        """The messages with these hashes that we hold and the caller may hold too, as
        many as fit in one reply (in order).  A hash names no account, so messages of
        other swarms are left out rather than refused."""
        msgs = self.storage.get_many(core.hashes(args))
        if caller is not None:
            msgs = [m for m in msgs if self.entitled.may_hold(caller, m.pubkey)]
        return {"messages": [core.message_to_wire(m) for m in core.fitting(msgs, core.wire_bytes)]}

    # ------------------------------------------------------------------ admin ops

    async def op_admin_set_links(self, args: dict) -> dict:
        links = core.arg_map(args, "links", 100_000)
        if not all(isinstance(k, str) and len(k) <= 64 for k in links):
            raise RequestError(Status.BAD_REQUEST, "'links' keys must be node keys (hex)")
        new = {k: core.loopback_address(v, f"link {k[:16]}") for k, v in links.items()}
        old, self.links = self.links, new
        # Redial only the peers whose route changed; the registry's long poll stays up.
        changed = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
        for key in changed:
            self._links_open.discard(key)
            await self.pool.drop(key)
        return {"links": len(self.links), "redialled": len(changed)}

    async def op_admin_listen(self, args: dict) -> dict:
        addrs = [core.listen_address(a, "each address", self.host) for a in core.arg_list(args, "addresses", 256)]
        try:
            bound = await self._nursery.start(
                lambda task_status: serve(self.handle, addrs, capture=self.capture, network=self.network,
                                          gate=self.gate, task_status=task_status))
        except (OSError, ValueError) as exc:
            raise RequestError(Status.BAD_REQUEST, f"cannot listen: {exc}") from None
        self.listening.extend(bound)
        return {"addresses": [list(a) for a in bound]}

    async def op_admin_clock(self, args: dict) -> dict:
        offset = core.clock_offset(args.get("offset_ms"))
        self.clock.offset_ms = offset
        event(log, "clock offset", offset_ms=offset)
        return {"offset_ms": offset}

    async def op_admin_stop(self, args: dict) -> dict:
        self._nursery.start_soon(self._stop_soon)
        return {}

    async def _stop_soon(self) -> None:
        await trio.sleep(0.05)  # let the reply go out first
        self.stop()

    # ------------------------------------------------------------------ registry

    async def _registry_call(self, op: str, args: dict, timeout: float) -> Any:
        resp = await self.pool.call(REGISTRY_KEY, op, args, timeout=timeout)
        if not resp.ok:
            raise RequestError(resp.status, f"registry answered {resp.status}")
        return resp.body

    async def _follow_registry(self) -> None:
        meter.ROLE.set("registry-follow")
        registered = False
        height, epoch = -1, None  # the registry list we hold: its height and the registry run it came from
        while True:
            try:
                if not registered:
                    host, port = self.listening[0]
                    await self._registry_call("register", register_args(self.identity, host, port,
                                                                        self.clock.wall_ms()), 5.0)
                    registered = True
                    event(log, "registered", host=host, port=port)
                # The first list comes with the registry's recent swarm history (auth.Entitlements);
                # later ones, naming the registry run we hold a list from, only with what changed.
                args: dict[str, Any] = {"since_height": height, "wait_ms": 10_000, "history": height < 0}
                if epoch is not None:
                    args["epoch"] = epoch
                body = await self._registry_call("get_service_nodes", args, 15.0)
                if body["height"] < height:
                    # The registry forgot us (restarted without its state): register again.
                    registered, height, epoch = False, -1, None
                    continue
                if body.get("changed", True) and (body["height"] != height or body.get("epoch") != epoch):
                    if "since_height" in body:
                        view = self.view.apply_delta(body)  # ValueError unless it starts at our list
                    else:
                        view = SwarmView.from_registry(body, self.ed_hex)
                    height, epoch = view.height, body.get("epoch")
                    self._apply_view(view)
                    self.entitled.add_history(body.get("history"))  # differences from this view
                    # Registrations come in bursts (a boot, churn): let the burst finish rather than
                    # fetch once per change.
                    await trio.sleep(self.config.registry_settle_s)
            except (RpcError, RequestError, KeyError, TypeError, ValueError, AttributeError) as exc:
                event(log, "registry unreachable", logging.WARNING, error=type(exc).__name__)
                height, epoch = (-1, None) if isinstance(exc, (KeyError, TypeError, ValueError, AttributeError)) \
                    else (height, epoch)
                await self.pool.drop(REGISTRY_KEY)
                await trio.sleep(self.config.registry_poll_s)

    def _apply_view(self, view: SwarmView) -> None:
        old = self.view
        self.view = view
        self.entitled.update(view)
        old_peers = {p.ed25519_public for p in old.peers()} if old and old.my_swarm is not None else set()
        new_peers = {p.ed25519_public for p in view.peers()}
        for key, sender in list(self._senders.items()):
            if key[0] not in new_peers:
                sender.close()
                del self._senders[key]
        event(log, "swarm view", height=view.height, swarm_id=view.my_swarm, members=len(new_peers) + 1,
              joined=len(new_peers - old_peers), left=len(old_peers - new_peers))
        if old is None or old.my_swarm != view.my_swarm or new_peers - old_peers:
            self._ae_wake.set()  # push to new members and rehome at once

    # ------------------------------------------------------------------ anti-entropy

    async def _anti_entropy_loop(self) -> None:
        meter.ROLE.set("anti-entropy")
        while True:
            if self.view is None:
                await self._ae_wake.wait()  # nothing to compare before the first list
            with trio.move_on_after(self.config.anti_entropy_interval_s * self.rng.uniform(0.75, 1.25)):
                await self._ae_wake.wait()
            woken = self._ae_wake.is_set()
            if woken:
                # A new view: our new peers follow the same registry and may not list us yet
                # (they would refuse our handshake); give them the time they take to catch up.
                await trio.sleep(2 * self.config.registry_settle_s)
            self._ae_wake = trio.Event()
            view = self.view
            if view is None or "skip-replication" in self.bugs:
                continue
            state = (self.storage.index.version, view.height)
            async with trio.open_nursery() as nursery:
                if state != self._rehomed_at:
                    nursery.start_soon(self._rehome, view, state)
                if view.my_swarm is not None:
                    peers = [p.ed25519_public for p in view.peers() if self._ae_matched.get(p.ed25519_public) != state]
                    if woken:
                        # Every member of a swarm wakes with the same new view: of each pair, the
                        # lower key asks at once (the exchange is symmetric, and the peer asked
                        # notes the match); the higher asks in its next round if still unmatched.
                        peers = [p for p in peers if p > self.ed_hex]
                    if peers:
                        ours = self.storage.ae_digests(view.is_mine)  # once per round, for all peers
                        for peer in peers:
                            nursery.start_soon(self._sync_with, view, peer, ours, state)

    async def _sync_with(self, view: SwarmView, peer: str, ours: dict[str, str], state: tuple[int, int]) -> None:
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
                self._ae_matched[peer] = state  # equal: nothing to do until either side changes
                return
            my_buckets = self.storage.ae_buckets(list(their_buckets))
            differ = {pk: sorted(b for b in set(mine) | set(their_buckets[pk])
                                 if mine.get(b) != their_buckets[pk].get(b))
                      for pk, mine in my_buckets.items()}
            differ = {pk: bs for pk, bs in differ.items() if bs}
            if not differ:
                return
            resp = await self.pool.call(peer, "ae_hashes", {"buckets": differ}, timeout=timeout)
            if not resp.ok:
                return
            theirs = {pk: hs for pk, hs in core.ae_hashes_reply(resp.body).items() if pk in differ}
            mine = self.storage.ae_hashes({pk: differ[pk] for pk in theirs}, self.clock.now_ms())
            want, give, kill = [], [], []
            for pk, hs in theirs.items():
                if not view.is_mine(pk):
                    continue
                have = set(mine.get(pk, ()))
                there = set(hs)
                want += [h for h in there - have if not self.storage.tombstoned(h)]
                kill += [(pk, [h for h in there if self.storage.tombstoned(h)])]
                give += sorted(have - there)
            while want:
                # The peer answers with as many as fit in one reply; ask again for the rest.
                asked = set(want[:core.BATCH_COUNT])
                got = await self.pool.call(peer, "ae_fetch", {"hashes": want[:core.BATCH_COUNT]}, timeout=timeout)
                # Only what we asked for, of our accounts: anything else would be taken unchecked
                # (and a peer answering with other messages would keep this loop going forever).
                msgs = [m for m in core.ae_fetch_reply(got.body) if m.hash in asked and view.is_mine(m.pubkey)] \
                    if got.ok else []
                if not msgs:
                    break
                new = await self.commit.commit(msgs)
                self.stats["ae_fetched"] += sum(new)
                received = {m.hash for m in msgs}
                want = [h for h in want if h not in received]
            for i in range(0, len(give), core.BATCH_COUNT):
                for batch in core.batches(self.storage.get_many(give[i:i + core.BATCH_COUNT]), core.wire_bytes):
                    await self.pool.call(peer, "replicate", {"messages": [core.message_to_wire(m) for m in batch]},
                                         timeout=timeout)
                    self.stats["ae_pushed"] += len(batch)
            kill = [(pk, hs) for pk, hs in kill if hs]
            if kill:
                await self.pool.call(peer, "replicate_delete", {"messages": [list(k) for k in kill]}, timeout=timeout)
        except (RpcError, RequestError) as exc:
            event(log, "anti-entropy failed", logging.DEBUG, peer=peer[:16], error=type(exc).__name__)
            await self.pool.drop(peer)

    async def _rehome(self, view: SwarmView, state: tuple[int, int]) -> None:
        """Push messages that belong to another swarm to all its members, then drop them here.
        Once none is left astray at ``state``, the next rounds skip this until it changes."""
        now = self.clock.now_ms()
        stray = [pk for pk in self.storage.pubkeys() if not view.is_mine(pk)]
        if not stray:
            self._rehomed_at = state
            return
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
            if ok and self.view is view:
                # Every member of the right swarm holds them now: they are not ours to keep.
                for pk in pks:
                    self.storage.delete(pk, [m.hash for m in msgs if m.pubkey == pk])
                self.stats["rehomed"] += len(msgs)
                event(log, "rehomed", swarm_id=target, messages=len(msgs))

    async def _expiry_loop(self) -> None:
        meter.ROLE.set("expiry")
        while True:
            await trio.sleep(self.config.expiry_interval_s)
            removed = self.storage.delete_expired(self.clock.now_ms())
            if removed:
                event(log, "expired", removed=removed)
