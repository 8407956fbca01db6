"""The Session-style client: onion paths, store / retrieve / delete, swarm
cache with 421 handling, retries on new paths, node failure counting.

Modelled on Session's desktop client: 2 guards kept across requests, paths of
3 distinct hops (a guard + 2 random nodes) ending at a random member of the
target swarm (a 4th node); a node is dropped after 3 failures; on 421 the
swarm cache is replaced with the returned members and the request retried.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import trio

from testnet.base.onion import decode_reply, encode_relay, encode_request
from testnet.base import crypto
from testnet.base.protocol import Status
from testnet.base.net import TCP, Network
from testnet.base.rpc import ConnectError, ConnectionPool, RpcError, RpcTimeout, call_once
from testnet.base.swarm import swarm_for

log = logging.getLogger("client")

GUARD_COUNT = 2
PATH_HOPS = 3
NODE_FAILURE_LIMIT = 3
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 4
STORE_ROUNDS = 2  # targets a store is made at when one's answer cannot be trusted
DEFAULT_TTL_MS = 14 * 24 * 3600 * 1000



class ClientError(Exception):
    """A client operation failed for certain (outcome: fail)."""


class OutcomeUnknown(ClientError):
    """A request may or may not have taken effect (outcome: info)."""


@dataclass(frozen=True, slots=True)
class ServiceNode:
    ed25519_public: str
    x25519_public: str
    host: str
    port: int
    swarm_id: int

    @classmethod
    def from_wire(cls, n: Mapping[str, Any]) -> ServiceNode:
        return cls(str(n["ed25519_public"]), str(n["x25519_public"]), str(n["host"]), int(n["port"]),
                   int(n["swarm_id"]))


@dataclass
class RequestResult:
    status: int
    body: Any
    path: list[str]
    target: str
    attempts: int
    # An earlier attempt may have taken effect (it was lost after sending): a refusal
    # now does not mean the operation did not happen.
    maybe_done_before: bool = False
    # A store: the members (ed25519 hex) whose signed result says they hold it.
    vouched: list[str] = field(default_factory=list)

    def refused(self, what: str) -> ClientError:
        """The error for a non-200 answer: certain only if no earlier attempt may have worked."""
        msg = f"{what} refused: status {self.status}: {_reason(self.body)}"
        if self.maybe_done_before:
            return OutcomeUnknown(msg + " (an earlier attempt may have taken effect)")
        return ClientError(msg)


@dataclass
class Directory:
    """What a client knows of the network: nodes, and how to dial each one."""

    nodes: dict[str, ServiceNode] = field(default_factory=dict)
    height: int = 0
    dial: dict[str, tuple[str, int]] = field(default_factory=dict)  # ed hex -> address via this user's link

    def update(self, body: Mapping[str, Any]) -> None:
        self.nodes = {n["ed25519_public"]: ServiceNode.from_wire(n) for n in body["nodes"]}
        self.height = int(body["height"])

    def address(self, ed_hex: str) -> tuple[str, int]:
        if ed_hex in self.dial:
            return self.dial[ed_hex]
        n = self.nodes[ed_hex]
        return n.host, n.port

    def swarm_members(self, swarm_id: int) -> list[ServiceNode]:
        return [n for n in self.nodes.values() if n.swarm_id == swarm_id]


def build_onion(path: Sequence[ServiceNode], target: ServiceNode, op: str, args: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None,
                randbytes: crypto.RandBytes = crypto.random_bytes) -> tuple[bytes, bytes, bytes]:
    """Layers for ``path`` then ``target``: (first hop's ephemeral key, its blob, the reply key).

    Each layer is sealed to one node's x25519 key with a fresh ephemeral key
    and names the next hop by its ed25519 key only.
    """
    eph, blob, reply_key = crypto.seal_layer_keyed(encode_request(op, args, extra),
                                                   bytes.fromhex(target.x25519_public), randbytes)
    nxt = target
    for hop in reversed(path):
        eph, blob = crypto.seal_layer(encode_relay(nxt.ed25519_public, eph, blob, extra),
                                      bytes.fromhex(hop.x25519_public), randbytes)
        nxt = hop
    return eph, blob, reply_key


class Client:
    """One user's view of the network. Its connections live in ``nursery``."""

    def __init__(self, identity: crypto.Identity, *, name: str, host: str | None, nursery: trio.Nursery,
                 registry: tuple[str, int], directory: Directory | None = None,
                 bugs: Iterable[str] = (), rng: random.Random | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S, randbytes: crypto.RandBytes = crypto.random_bytes,
                 network: Network = TCP, link_opener: tuple[str, int] | None = None) -> None:
        self.identity = identity
        self.name = name
        self.host = host
        self.registry = registry
        self.directory = directory or Directory()
        self.bugs = set(bugs)
        self.rng = rng or random.Random()  # paths, targets
        self.randbytes = randbytes  # onion layers' ephemeral keys and nonces
        self.network = network
        self.timeout_s = timeout_s
        self.guards: list[str] = []
        self.failures: dict[str, int] = {}
        self.dropped: set[str] = set()
        self.swarm_cache: dict[str, list[ServiceNode]] = {}
        # Testnet plumbing, not the modelled network: where to ask for a link's proxy (made on
        # first use), and the links it said exist.
        self.link_opener = link_opener
        self._links_open: set[str] = set()
        self.pool = ConnectionPool(nursery, self._resolve, connect_timeout=min(5.0, timeout_s), network=network,
                                   on_refused=self._open_link if link_opener else None)

    @property
    def session_id(self) -> str:
        return self.identity.session_id

    def _resolve(self, key: Any) -> tuple[str, int, str | None]:
        host, port = self.directory.address(key)
        return host, port, self.host

    async def _open_link(self, key: Any, timeout: float) -> bool:
        """A dial through one of our testnet links was refused: its proxy may not be made yet.
        Ask the testnet's controller for it (``open_link``, signed with our key, as a node
        does) and dial again.  Once it said the proxy exists, a refused dial is a cut link and
        we do not ask again.  Nothing reached the node either way: a failure is a ConnectError."""
        if key not in self.directory.dial or key in self._links_open or self.link_opener is None:
            return False
        me = self.identity.ed25519_public.hex()
        args = {"src": me, "dst": key, "signature": self.identity.sign(crypto.link_open_message(me, key))}
        try:
            resp = await call_once(self.link_opener[0], self.link_opener[1], "open_link", args, timeout=timeout,
                                   local_host=self.host, network=self.network)
        except RpcError as exc:
            raise ConnectError(f"no link to {str(key)[:12]}: its opener: {exc}", refused=True) from None
        if resp is None or not resp.ok:
            why = resp.body.get("error") if resp is not None and isinstance(resp.body, dict) else resp and resp.body
            raise ConnectError(f"no link to {str(key)[:12]}: {why or 'no answer in time'}", refused=True)
        self._links_open.add(key)
        return True

    async def refresh_nodes(self) -> None:
        """Fetch the node list from the registry."""
        try:
            resp = await call_once(self.registry[0], self.registry[1], "get_service_nodes", {},
                                   timeout=self.timeout_s, local_host=self.host, network=self.network)
        except RpcError as exc:
            raise ClientError(f"registry unreachable: {exc}") from None
        if not resp.ok:
            raise ClientError(f"registry answered {resp.status}")
        self.directory.update(resp.body)
        self.swarm_cache.clear()
        self.guards = [g for g in self.guards if g in self.directory.nodes]

    # ------------------------------------------------------------------ paths

    def _usable(self) -> list[str]:
        return sorted(k for k in self.directory.nodes if k not in self.dropped)

    def _fail(self, node: str) -> None:
        self.failures[node] = self.failures.get(node, 0) + 1
        if self.failures[node] >= NODE_FAILURE_LIMIT:
            self.dropped.add(node)
            if node in self.guards:
                self.guards.remove(node)

    def _ok(self, nodes: Iterable[str]) -> None:
        for n in nodes:
            self.failures.pop(n, None)

    def choose_path(self, target: ServiceNode) -> list[ServiceNode]:
        """A guard + 2 random relays, all distinct and distinct from the target."""
        usable = [k for k in self._usable() if k != target.ed25519_public]
        if len(usable) < PATH_HOPS or len(self.dropped) > len(self.directory.nodes) // 2:
            # Too much of the network looked dead to build a path: forgive and start over
            # (found by the smoke run: on a small network a client stopped polling for good).
            self.dropped.clear()
            self.failures.clear()
            usable = [k for k in self._usable() if k != target.ed25519_public]
        if len(usable) < PATH_HOPS:
            raise ClientError(f"need {PATH_HOPS} relays besides the target, know {len(usable)}")
        self.guards = [g for g in self.guards if g in usable and g not in self.dropped]
        while len(self.guards) < GUARD_COUNT:
            candidates = [k for k in usable if k not in self.guards]
            if not candidates:
                break
            self.guards.append(self.rng.choice(candidates))
        guards_here = [g for g in self.guards if g != target.ed25519_public]
        guard = self.rng.choice(guards_here or usable)
        relays = self.rng.sample([k for k in usable if k != guard], PATH_HOPS - 1)
        return [self.directory.nodes[k] for k in [guard, *relays]]

    def swarm_for(self, session_id: str) -> list[ServiceNode]:
        cached = self.swarm_cache.get(session_id)
        if cached:
            return cached
        ids = sorted({n.swarm_id for n in self.directory.nodes.values()})
        if not ids:
            raise ClientError("no service nodes known")
        members = self.directory.swarm_members(swarm_for(session_id, ids))
        self.swarm_cache[session_id] = members
        return members

    # ------------------------------------------------------------------ requests

    async def onion_request(self, path: Sequence[ServiceNode], target: ServiceNode, op: str,
                            args: Mapping[str, Any]) -> tuple[int, Any]:
        """One request along one path: the target's (status, body).

        Raises :class:`RpcError` or a path error status as ``ClientError``.
        """
        extra = {"client": self.session_id} if "client-id-in-layers" in self.bugs else None
        hops = [] if "one-hop-path" in self.bugs else list(path)
        eph, blob, key = build_onion(hops, target, op, args, extra, self.randbytes)
        first = hops[0] if hops else target
        resp = await self.pool.call(first.ed25519_public, "onion", {"ephemeral_key": eph, "data": blob},
                                    timeout=self.timeout_s)
        if resp.status != Status.OK or not isinstance(resp.body, dict) or "data" not in resp.body:
            raise PathError(resp.status, resp.body)
        try:
            return decode_reply(key, resp.body["data"])
        except (crypto.CryptoError, ValueError, KeyError, TypeError):
            raise PathError(Status.BAD_GATEWAY, "reply does not open") from None

    async def request(self, session_id: str, op: str,
                      args: Mapping[str, Any] | Callable[[str], Mapping[str, Any]], *,
                      max_attempts: int = MAX_ATTEMPTS) -> RequestResult:
        """``op`` at a member of ``session_id``'s swarm, retrying on new paths and after 421.

        Raises :class:`OutcomeUnknown` when some attempt may have reached the
        target and none gave a definite answer; :class:`ClientError` otherwise.
        """
        if not self.directory.nodes:
            await self.refresh_nodes()
        maybe_sent = False
        last_error = "no attempt"
        path: list[ServiceNode] = []
        target: ServiceNode | None = None
        for attempt in range(1, max_attempts + 1):
            members = [m for m in self.swarm_for(session_id) if m.ed25519_public not in self.dropped] \
                or self.swarm_for(session_id)
            # Prefer members that have not failed lately (Session drops a node after 3 failures).
            fresh = [m for m in members if not self.failures.get(m.ed25519_public)]
            target = self.rng.choice(fresh or members)
            path = self.choose_path(target)
            try:
                status, body = await self.onion_request(
                    path, target, op, args(target.ed25519_public) if callable(args) else args)
            except PathError as exc:
                last_error = f"path error {exc.status}"
                # Any hop, or the target behind the last relay, may be the dead one.
                for hop in [*path, target]:
                    self._fail(hop.ed25519_public)
                if exc.status == Status.GATEWAY_TIMEOUT:
                    maybe_sent = True
                continue
            except RpcTimeout:
                last_error = "timeout"
                maybe_sent = True
                self._fail(path[0].ed25519_public)
                await self.pool.drop(path[0].ed25519_public)
                continue
            except RpcError as exc:
                last_error = type(exc).__name__
                if not isinstance(exc, ConnectError):
                    maybe_sent = True  # lost after sending: it may have reached the target
                self._fail(path[0].ed25519_public)
                await self.pool.drop(path[0].ed25519_public)
                continue
            self._ok(h.ed25519_public for h in path)
            if status == Status.WRONG_SWARM and isinstance(body, dict) and body.get("nodes"):
                # Session: replace the cached swarm with the returned members, retry.
                self.swarm_cache[session_id] = [ServiceNode.from_wire(n) for n in body["nodes"]]
                for n in self.swarm_cache[session_id]:
                    self.directory.nodes.setdefault(n.ed25519_public, n)
                last_error = "421 wrong swarm"
                continue
            if status in (Status.NOT_READY, Status.INTERNAL_ERROR, Status.RATE_LIMITED):
                last_error = f"status {status}"
                self._fail(target.ed25519_public)
                continue
            return RequestResult(status, body, [h.ed25519_public for h in path], target.ed25519_public, attempt,
                                 maybe_sent)
        if maybe_sent:
            raise OutcomeUnknown(f"{op}: outcome unknown after {max_attempts} attempts ({last_error})")
        raise ClientError(f"{op}: failed after {max_attempts} attempts ({last_error})")

    async def store(self, recipient: str, data: bytes, *, namespace: int = 0, ttl_ms: int = DEFAULT_TTL_MS,
                    now_ms: int) -> RequestResult:
        """Store at a member of the recipient's swarm.  Each member's result in the answer is
        signed by that member (PROTOCOL.md, store); only results whose signature verifies
        count (``vouched``).  A target whose answer carries a result that does not verify
        lies about its peers: it is dropped and the store is made again through another
        member, as is one that no member's signature vouches for."""
        args = {"pubkey": recipient, "namespace": namespace, "data": data, "ttl": ttl_ms, "timestamp": now_ms}
        want = crypto.message_hash(recipient, namespace, data)
        maybe_done = False
        why = ""
        for _ in range(STORE_ROUNDS):
            res = await self.request(recipient, "store", args)
            res.maybe_done_before = res.maybe_done_before or maybe_done
            if res.status != Status.OK:
                # Found by the mixed scenario: a store lost after sending, retried on a node whose
                # clock was skewed, came back 406 — yet the first attempt had stored it.
                raise res.refused("store")
            res.vouched, forged = self._vouched(recipient, want, res.body)
            if res.vouched and not forged:
                return res
            maybe_done = True  # the target may hold it all the same
            why = "a member's result does not verify" if forged else "no member's signed result"
            for _ in range(NODE_FAILURE_LIMIT):  # a lying member: not asked again
                self._fail(res.target)
        raise OutcomeUnknown(f"store: {why} after {STORE_ROUNDS} targets")

    def _vouched(self, recipient: str, want: str, body: Any) -> tuple[list[str], bool]:
        """The members of ``recipient``'s swarm whose signed result in a store's answer says
        they hold message ``want``, and whether any result carried a signature that does not
        verify (a forged acknowledgement: an honest target passes on only its peers' own)."""
        results = body.get("swarm") if isinstance(body, dict) else None
        if not isinstance(results, dict) or body.get("hash") != want:
            return [], False
        members = {m.ed25519_public for m in self.swarm_for(recipient)}
        vouched, forged = [], False
        for key, r in results.items():
            sig = r.get("signature") if isinstance(r, dict) else None
            if sig is None or r.get("status") != Status.OK:
                continue
            try:
                root = crypto.results_root_from(want, r.get("proof") or [])
                crypto.verify_request(bytes.fromhex(key), crypto.store_result_message(key, root), sig)
            except (ValueError, TypeError, crypto.CryptoError):
                forged = True
                continue
            if key in members:
                vouched.append(key)
        return sorted(vouched), forged

    async def retrieve(self, *, namespace: int = 0, last_hash: str | None = None, now_ms: int,
                       last_hash_for: Callable[[str], str | None] | None = None) -> RequestResult:
        """Messages after a last hash; ``last_hash_for(target ed hex)`` picks it per node (storage
        order is per node), else ``last_hash`` is sent to whichever member answers."""
        sig = crypto.sign_request(self.identity, crypto.retrieve_signature_message(namespace, now_ms))

        def args(target: str) -> dict[str, Any]:
            last = last_hash_for(target) if last_hash_for is not None else last_hash
            return {"pubkey": self.session_id, "namespace": namespace, "last_hash": last or "",
                    "timestamp": now_ms, "pubkey_ed25519": self.identity.ed25519_public.hex(), "signature": sig}

        res = await self.request(self.session_id, "retrieve", args)
        if res.status != Status.OK:
            raise ClientError(f"retrieve refused: status {res.status}: {_reason(res.body)}")  # a read changes nothing
        return res

    async def delete(self, hashes: list[str]) -> RequestResult:
        sig = crypto.sign_request(self.identity, crypto.delete_signature_message(hashes))
        args = {"pubkey": self.session_id, "hashes": hashes, "pubkey_ed25519": self.identity.ed25519_public.hex(),
                "signature": sig}
        res = await self.request(self.session_id, "delete", args)
        if res.status != Status.OK:
            raise res.refused("delete")
        return res

    async def aclose(self) -> None:
        await self.pool.aclose()


class PathError(ClientError):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"path error {status}: {_reason(body)}")
        self.status = status


def _reason(body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])[:200]
    return repr(body)[:200]
