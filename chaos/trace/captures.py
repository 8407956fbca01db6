"""Every node's capture replayed with the keys in the run directory, for
``swarmnet trace``: what the unlinkability checker observes, plus the wire
facts a journey needs and the checker does not keep.

The observations (who connected, what each onion layer said, the blobs that
cross hops) come from :func:`chaos.checkers.unlinkability.observe_node`,
unchanged.  A second, frame-level pass over the same capture adds:

* times and statuses: when each onion request arrived, when it was forwarded,
  when the next hop answered and when this node answered (clear-text path
  errors included);
* node-to-node copies: every ``replicate`` / ``ae_fetch`` / ``replicate_delete``
  that named a message hash, sent or served, with its peer, status and
  whether the caller had proved a node key on that connection (node-to-node
  ops travel in the clear; a caller that never did is a stranger, served
  only under the injected bug no-node-auth);
* a target's own reply, reopened with its layer key (the node derives it from
  its own x25519 secret): a store's status and per-member results, the hashes
  a retrieve returned, the hashes a delete removed;
* requests that never reached a node: a relay whose forwarded blob no capture
  received is reopened with its own key, and the blob it meant to forward is
  opened with the next node's key (the harness holds every key), so even a
  request dropped on the way names its op and message.

Peers are named from run.json: an outgoing connection by its remote address
(a Toxiproxy listen address or a node's own), an incoming node connection by
the ``node_auth`` key it proved, a user by address or ingress port.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import msgpack
from nacl import bindings as sodium

from chaos.checkers.unlinkability import Observation, UserKeys, observe_node
from nodes.capture import capture_messages
from testnet.base.onion import LayerError, decode_reply, parse_layer
from testnet.base import crypto
from testnet.base.protocol import Request, Response

__all__ = ["blob_digest", "Call", "Copy", "Opened", "Replayed", "NodeKeys", "replay_captures"]

COPY_OPS = ("replicate", "ae_fetch", "replicate_delete")
FINAL_OPS = ("store", "retrieve", "delete", "expire")
MAX_LAYERS = 8


def blob_digest(data: bytes) -> bytes:
    """The digest the unlinkability checker keys blobs by (blake2b-128): Observation.received etc."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(slots=True)
class Call:
    """One onion request on one node's connection, and what became of it."""

    node: str
    t: int  # request seen (ms, the node's wall clock: captures are never skewed)
    peer: str | None  # node, user or "registry" at the other end, when known
    reply_t: int | None = None
    status: int | None = None
    error: str | None = None  # a clear-text error body's reason


@dataclass(slots=True)
class Copy:
    """A message hash named by a node-to-node op in one node's capture."""

    node: str  # whose capture
    op: str  # replicate | ae_fetch | replicate_delete
    side: str  # "sent" (this node called, or served an ae_fetch) | "received"
    t: int
    peer: str | None
    reply_t: int | None = None
    status: int | None = None
    # For an op an incoming caller made (a copy or delete received, an ae_fetch served): whether it had
    # proved a node key on this connection (node_auth answered 200); None for this node's own calls.
    authenticated: bool | None = None
    remote: str | None = None  # the other end's host, for a caller no name is known for


@dataclass(slots=True)
class Opened:
    """A final request opened with its node's key (or a request that never got there)."""

    op: str
    account: str | None  # the request's pubkey
    hashes: list[str]  # store: its hash; delete/expire: the hashes named
    last_hash: str | None = None  # retrieve
    status: int | None = None  # the target's answer inside its reply, when the reply was seen
    body: dict[str, Any] = field(default_factory=dict)  # summary: hash, swarm, hashes, deleted, more, error
    unreached: list[str] = field(default_factory=list)  # nodes whose layers were opened though they never got them


@dataclass
class NodeKeys:
    """What the replay needs about one node: name, keys, files."""

    name: str
    ed25519_hex: str
    x25519_secret: bytes
    capture: Path


@dataclass
class Replayed:
    """Everything the captures of a run say, indexed for journeys."""

    observations: list[Observation] = field(default_factory=list)
    stats: dict[str, Counter] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # node -> why its capture could not be replayed
    served: dict[tuple[str, bytes], Call] = field(default_factory=dict)  # (node, blob received) -> onion served
    called: dict[tuple[str, bytes], Call] = field(default_factory=dict)  # (node, blob sent) -> onion forwarded
    opened: dict[tuple[str, bytes], Opened] = field(default_factory=dict)  # (node, blob received) -> its request
    copies: dict[str, list[Copy]] = field(default_factory=lambda: defaultdict(list))  # hash -> copies
    deletes: dict[str, list[Copy]] = field(default_factory=lambda: defaultdict(list))  # hash -> replicate_delete
    ae_rounds: dict[str, list[tuple[int, str | None]]] = field(default_factory=lambda: defaultdict(list))
    span: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> first and last record t
    # Client ops sent straight to a node, no onion (the controller's boot check, tools): as one-hop observations.
    direct: list[Observation] = field(default_factory=list)


@dataclass
class _Conn:
    """What the pass keeps per connection."""

    caller: str | None = None  # the node that proved its key on this (incoming) connection: node_auth answered 200
    pending: dict[tuple[str, int], tuple[str, Any]] = field(default_factory=dict)  # (request dir, id) -> what


def _reason(body: Any) -> str | None:
    return str(body.get("error"))[:200] if isinstance(body, dict) and "error" in body else None


def _summary(status: int, body: Any) -> dict[str, Any]:
    """What a journey needs of a target's decrypted answer."""
    if not isinstance(body, dict):
        return {}
    out: dict[str, Any] = {}
    if status != 200:
        out["error"] = _reason(body)
    if "hash" in body:
        out["hash"] = body["hash"]
    if isinstance(body.get("swarm"), dict):
        out["swarm"] = {str(k): (v.get("status") if isinstance(v, dict) else v) for k, v in body["swarm"].items()}
    if isinstance(body.get("messages"), list):
        out["hashes"] = [m.get("hash") for m in body["messages"] if isinstance(m, dict)]
        out["more"] = bool(body.get("more"))
    for key in ("deleted", "updated"):
        if isinstance(body.get(key), list):
            out[key] = [str(h) for h in body[key]]
    return out


def _request_summary(op: str, args: Mapping[str, Any]) -> Opened:
    account = args.get("pubkey") if isinstance(args.get("pubkey"), str) else None
    hashes: list[str] = []
    if op == "store":
        try:
            hashes = [crypto.message_hash(account or "", args.get("namespace", 0), args.get("data") or b"")]
        except (crypto.CryptoError, TypeError, ValueError):
            pass
    elif isinstance(args.get("hashes"), list):
        hashes = [h for h in args["hashes"] if isinstance(h, str)]
    last = args.get("last_hash") if op == "retrieve" and isinstance(args.get("last_hash"), str) else None
    return Opened(op, account, hashes, last or None)


class _Opener:
    """Opens layers with any node's key: the node's own, and the next ones' for requests that never got there."""

    def __init__(self, keys: Mapping[str, NodeKeys], users: Iterable[str] = ()) -> None:
        self.by_ed = {k.ed25519_hex: k for k in keys.values()}
        self.users = set(users)
        self.pub: dict[str, bytes] = {}

    def open(self, node: NodeKeys, eph: bytes, data: bytes) -> tuple[Opened | None, bytes | None]:
        """The request inside (following relay layers through the next nodes' keys) and the first layer's key."""
        first_key = None
        unreached: list[str] = []
        for depth in range(MAX_LAYERS):
            pub = self.pub.get(node.name)
            if pub is None:
                pub = self.pub[node.name] = sodium.crypto_scalarmult_base(node.x25519_secret)
            try:
                plaintext, key = crypto.open_layer_keyed(data, node.x25519_secret, eph, pub)
                kind, what = parse_layer(plaintext)
            except (crypto.CryptoError, LayerError, ValueError):
                return None, first_key
            if depth == 0:
                first_key = key
            else:
                unreached.append(node.name)
            if kind == "request":
                op, args = what
                opened = _request_summary(op, args)
                opened.unreached = unreached
                return opened, first_key
            nxt, eph, data = what
            node = self.by_ed.get(nxt)
            if node is None:
                return None, first_key
        return None, first_key


def _copy_hashes(op: str, args: Mapping[str, Any]) -> list[str]:
    """The message hashes a replicate or replicate_delete names (PROTOCOL.md: node-to-node ops)."""
    msgs = args.get("messages")
    out: list[str] = []
    for m in msgs if isinstance(msgs, list) else ():
        if op == "replicate" and isinstance(m, list) and len(m) > 2 and isinstance(m[2], str):
            out.append(m[2])
        elif op == "replicate_delete" and isinstance(m, list) and len(m) > 1 and isinstance(m[1], list):
            out += [h for h in m[1] if isinstance(h, str)]
    return out


def _wire_pass(node: NodeKeys, out: Replayed, reopen: set[bytes], opener: _Opener,
               peer_of_remote: Callable[[tuple[str, int]], str | None],
               peer_of_incoming: Callable[[tuple[str, int], tuple[str, int]], str | None]) -> None:
    """One frame-level pass over ``node``'s capture (see the module docstring)."""
    conns: dict[tuple, _Conn] = {}
    first = last = None
    for t, key, direction, local, remote, msg in capture_messages(str(node.capture)):
        if not isinstance(t, int) or isinstance(t, bool):
            continue
        first = t if first is None else first
        last = t
        conn = conns.setdefault(key, _Conn())
        if isinstance(msg, Request):
            _on_request(node, out, conn, direction, t, local, remote, msg, reopen, opener, peer_of_remote,
                        peer_of_incoming)
        elif isinstance(msg, Response):
            _on_response(node.name, out, conn, direction, t, msg)
    if first is not None:
        out.span[node.name] = (first, last)


def _on_request(node: NodeKeys, out: Replayed, conn: _Conn, direction: str, t: int, local: tuple[str, int],
                remote: tuple[str, int], msg: Request, reopen: set[bytes], opener: _Opener,
                peer_of_remote: Callable[[tuple[str, int]], str | None],
                peer_of_incoming: Callable[[tuple[str, int], tuple[str, int]], str | None]) -> None:
    args = msg.args
    if direction == "in" and msg.op == "node_auth" and isinstance(args.get("ed25519_public"), str):
        # Only the node's 200 makes it the caller: a stranger may claim any key (a forged handshake).
        caller = opener.by_ed.get(args["ed25519_public"].lower())
        conn.pending[(direction, msg.id)] = ("auth", caller.name if caller is not None else None)
        return
    peer = peer_of_remote(remote) if direction == "out" else (conn.caller or peer_of_incoming(local, remote))
    if msg.op == "onion":
        data, eph = args.get("data"), args.get("ephemeral_key")
        if not isinstance(data, bytes):
            return
        call = Call(node.name, t, peer)
        digest = blob_digest(data)
        key = None
        if direction == "in":
            out.served[(node.name, digest)] = call
            if digest in reopen and isinstance(eph, bytes):
                opened, key = opener.open(node, eph, data)
                if opened is not None:
                    out.opened[(node.name, digest)] = opened
        else:
            out.called[(node.name, digest)] = call
        conn.pending[(direction, msg.id)] = ("onion", (call, key, out.opened.get((node.name, digest))
                                                        if direction == "in" else None))
    elif msg.op in ("store", "retrieve", "delete") and direction == "in":
        opened = _request_summary(msg.op, args)
        proof = args.get("data") if msg.op == "store" else args.get("signature")
        digest = blob_digest(proof if isinstance(proof, bytes) else repr(sorted(args.items())).encode())
        user = peer if peer in opener.users else None
        out.direct.append(Observation(node.name, t, remote, local, user, "request", digest, op=msg.op,
                                      account=None, store_hash=opened.hashes[0] if msg.op == "store" and
                                      opened.hashes else None))
        call = Call(node.name, t, peer)
        out.served[(node.name, digest)] = call
        out.opened[(node.name, digest)] = opened
        conn.pending[(direction, msg.id)] = ("direct", (call, opened))
    elif msg.op == "ae_fetch":
        # What is fetched shows in the reply: the messages the server had and let the caller hold.
        conn.pending[(direction, msg.id)] = ("ae_fetch", (peer, None if direction == "out" else conn.caller is not None,
                                                          None if direction == "out" else remote[0]))
    elif msg.op in COPY_OPS:
        hashes = _copy_hashes(msg.op, args)
        side = "sent" if direction == "out" else "received"
        auth = None if direction == "out" else conn.caller is not None
        copies = [Copy(node.name, msg.op, side, t, peer, authenticated=auth,
                       remote=None if direction == "out" else remote[0]) for _ in hashes]
        index = out.deletes if msg.op == "replicate_delete" else out.copies
        for h, c in zip(hashes, copies):
            index[h].append(c)
        conn.pending[(direction, msg.id)] = ("copies", copies)
    elif msg.op == "ae_hashes" and direction == "out":
        out.ae_rounds[node.name].append((t, peer))


def _on_response(name: str, out: Replayed, conn: _Conn, direction: str, t: int, msg: Response) -> None:
    request_dir = "out" if direction == "in" else "in"
    what = conn.pending.pop((request_dir, msg.id), None)
    if what is None:
        return
    kind, item = what
    body = msg.body
    if kind == "auth":
        if msg.status == 200:
            conn.caller = item
    elif kind == "onion":
        call, key, opened = item
        call.reply_t, call.status, call.error = t, msg.status, _reason(body)
        if opened is not None and key is not None and isinstance(body, dict) and isinstance(body.get("data"), bytes):
            try:
                status, inner = decode_reply(key, body["data"])
            except (crypto.CryptoError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                return
            opened.status, opened.body = status, _summary(status, inner)
    elif kind == "direct":
        call, opened = item
        call.reply_t, call.status, call.error = t, msg.status, _reason(body)
        opened.status, opened.body = msg.status, _summary(msg.status, body)
    elif kind == "copies":
        for c in item:
            c.reply_t, c.status = t, msg.status
    elif kind == "ae_fetch" and msg.status == 200 and isinstance(body, dict):
        side = "received" if direction == "in" else "sent"  # fetched by this node, or served to the caller
        for m in body.get("messages") or ():
            if isinstance(m, list) and len(m) > 2 and isinstance(m[2], str):
                peer, auth, host = item
                out.copies[m[2]].append(Copy(name, "ae_fetch", side, t, peer, t, msg.status, auth, host))


def replay_captures(keys: Mapping[str, NodeKeys], users: Iterable[UserKeys], *, user_hosts: Mapping[str, str],
                    ingress: Mapping[str, Mapping[str, int]], peer_of_remote: Callable[[tuple[str, int]], str | None],
                    hosts: Mapping[str, str]) -> Replayed:
    """``user_hosts`` and ``ingress`` name users as the checker does; ``hosts`` names other callers by
    address (nodes in direct mode, the controller); ``peer_of_remote`` names where an outgoing connection went."""
    users = list(users)
    out = Replayed()
    for name, k in keys.items():
        if not k.capture.exists():
            out.missing[name] = "no capture file"
            continue
        ports = {p: u for u, p in (ingress.get(name) or {}).items()}
        obs, stats = observe_node(name, k.capture, k.x25519_secret, users, user_hosts=user_hosts,
                                  ingress_ports=ports)
        out.observations.extend(obs)
        out.stats[name] = stats
    received = {o.received for o in out.observations}
    reopen: dict[str, set[bytes]] = defaultdict(set)
    for o in out.observations:
        if (o.kind == "request" and o.op in FINAL_OPS) or (o.kind == "relay" and o.forwarded not in received):
            reopen[o.node].add(o.received)
    opener = _Opener(keys, [u.name for u in users])
    for name, k in keys.items():
        if name in out.missing:
            continue
        ports = {p: u for u, p in (ingress.get(name) or {}).items()}

        def incoming(local: tuple[str, int], remote: tuple[str, int], ports=ports) -> str | None:
            return user_hosts.get(remote[0]) or ports.get(local[1]) or hosts.get(remote[0])

        _wire_pass(k, out, reopen[name], opener, peer_of_remote, incoming)
    return out
