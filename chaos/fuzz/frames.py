"""The frames of each op, for :mod:`chaos.fuzz.model` (pure: see there).  Per op, the
arguments a well-behaved caller would send with one or more of them wrong in a
way that reaches past the first check: real accounts of the target's swarm
(past the 421) or another (the 403), real stored hashes, signatures made by
the account over the very values sent, onion layers sealed to the node.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack

from nodes.auth import auth_message
from nodes.core import MAX_HASHES_PER_REQUEST, MAX_NODE_ITEMS, MAX_TTL_MS, MIN_TTL_MS
from testnet.base.onion import encode_relay, encode_request
from nodes.server import ADMIN_OPS, CLIENT_OPS, HANDSHAKE_OPS, NODE_OPS
from nodes.storage import ae_bucket
from testnet.base import crypto
from testnet.base.protocol import Status
from testnet.registry import deregister_message, register_message

from chaos.fuzz.model import (INT64_MAX, INT64_MIN, LISTED_STATUSES, ONION_OPS, REGISTRY_OPS, TOO_BIG_DATA, UINT64_MAX, Account,
                   Draw, Frame, NodeInfo, World, any_args, any_bytes, any_text, any_value, big_len, fake_hash, maybe,
                   unknown_op)

LISTED_STATUSES_AND_500 = LISTED_STATUSES | {int(Status.INTERNAL_ERROR)}


# --------------------------------------------------------------------------- typed fields


class Ctx:
    """One frame's making: the draw, the world, the target node and the time."""

    def __init__(self, draw: Draw, world: World, target: NodeInfo | None, now_ms: int) -> None:
        self.draw, self.world, self.target, self.now = draw, world, target, now_ms

    def account(self) -> Account:
        """Mostly one of the target's swarm (the handlers past the 421), else any."""
        mine = [a for a in self.world.accounts if self.target and a.swarm_id == self.target.swarm_id]
        return self.draw.choice(mine if mine and self.draw.chance(70) else self.world.accounts)

    def pubkey(self, acc: Account) -> Any:
        sid = acc.session_id
        return maybe(self.draw, sid, sid.upper(), sid[:-1], sid + "0", "15" + sid[2:], sid.encode(),
                     "05" + "zz" * 32, sid[:-1] + "²", "", 5)

    def pubkey_key(self, acc: Account) -> str | bytes:
        """An account id as a map key (map keys are str or bytes on the wire)."""
        pk = self.pubkey(acc)
        return pk if isinstance(pk, (str, bytes)) else type(pk).__name__  # never str(): it may be nested deep

    def known_hash(self, acc: Account, fallback: str) -> str:
        """One of the account's stored hashes, when there are any.  The choices made never
        depend on what is stored (Hypothesis replays them against a network that moved on)."""
        known = self.world.hashes.get(acc.session_id, [])
        use, at = self.draw.chance(60), self.draw.integer(0, 31)
        return known[at % len(known)] if use and known else fallback

    def hashes_of(self, acc: Account) -> list[str]:
        n = big_len(self.draw, MAX_HASHES_PER_REQUEST)
        out = [self.known_hash(acc, fake_hash(self.draw)) for _ in range(min(n, 5))]
        if n > 5:  # long lists: cheap repeats of real-looking hashes
            out = (out * (n // len(out) + 1))[:n] if out else []
        return out

    def hash_list(self, acc: Account) -> Any:
        return maybe(self.draw, self.hashes_of(acc), [], [1], ["x" * 65], [""], ["ü" * 43], "abc", [None], [b"h"],
                     [fake_hash(self.draw)] * (MAX_HASHES_PER_REQUEST + 1))

    def namespace(self) -> Any:
        return maybe(self.draw, self.draw.choice((0, 0, 0, 1, -1, 2**15 - 1, -(2**15))),
                     2**15, -(2**15) - 1, 2**63, UINT64_MAX, INT64_MIN, True, False, 1.0)

    def timestamp(self, window_ms: int) -> Any:
        now = self.now
        return maybe(self.draw, now, now + window_ms + 1, now - window_ms - 1, 0, -1, 2**63, UINT64_MAX,
                     INT64_MIN, True, float(now), str(now))

    def signed(self, acc: Account, message: Callable[[], bytes]) -> dict[str, Any]:
        """``pubkey_ed25519`` and ``signature``: by the account over ``message`` when it can be made."""
        try:
            sig = acc.identity.sign(message())
        except (crypto.CryptoError, TypeError, ValueError, AttributeError):
            sig = self.draw.binary(64)
        other = self.draw.choice(self.world.accounts).identity
        ed = acc.identity.ed25519_public.hex()
        return {"pubkey_ed25519": maybe(self.draw, ed, other.ed25519_public.hex(), ed.upper(), "zz" * 32, ed[:-2],
                                        acc.identity.ed25519_public),
                "signature": maybe(self.draw, sig, self.draw.binary(64), sig[:-1], sig + b"\0",
                                   other.sign(b"retrieve"), sig.hex())}


def drop_or_garbage(draw: Draw, args: dict[str, Any]) -> dict[Any, Any]:
    """Now and then a key goes missing or a stray one comes along."""
    if args and draw.chance(8):
        args.pop(draw.choice(list(args)))
    if draw.chance(5):
        args[any_text(draw) if draw.chance(80) else any_bytes(draw)] = any_value(draw)
    return args


# --------------------------------------------------------------------------- client ops


def store_args(c: Ctx) -> tuple[dict[str, Any], Account]:
    acc, d = c.account(), c.draw
    data = d.binary(d.choice((0, 1, 32, 100, 1000))) if d.chance(97) else \
        d.choice((TOO_BIG_DATA[:-1], TOO_BIG_DATA))
    args = {"pubkey": c.pubkey(acc), "namespace": c.namespace(),
            "data": maybe(d, data, "text", TOO_BIG_DATA, None, [b"x"]),
            "ttl": maybe(d, d.choice((MIN_TTL_MS, 3_600_000, MAX_TTL_MS)), MIN_TTL_MS - 1, MAX_TTL_MS + 1, 0, -1,
                         2**63, UINT64_MAX, True, 60_000.0),
            "timestamp": c.timestamp(10_000)}
    return args, acc


def retrieve_args(c: Ctx) -> dict[str, Any]:
    acc, d = c.account(), c.draw
    args = {"pubkey": c.pubkey(acc), "namespace": c.namespace(), "timestamp": c.timestamp(60_000),
            "last_hash": maybe(d, c.known_hash(acc, ""), "", None, 0, 1, [], ["h"], {"a": 1}, b"bytes",
                               "x" * 5000, True, fake_hash(d))}
    args.update(c.signed(acc, lambda: crypto.retrieve_signature_message(args["namespace"], args["timestamp"])))
    return args


def delete_args(c: Ctx) -> dict[str, Any]:
    acc = c.account()
    args = {"pubkey": c.pubkey(acc), "hashes": c.hash_list(acc)}
    args.update(c.signed(acc, lambda: crypto.delete_signature_message(args["hashes"])))
    return args


def expire_args(c: Ctx) -> dict[str, Any]:
    acc, d = c.account(), c.draw
    args = {"pubkey": c.pubkey(acc), "hashes": c.hash_list(acc),
            "expiry": maybe(d, c.now + d.choice((1_000, 60_000, MAX_TTL_MS)), c.now + MAX_TTL_MS + 1, 0, -1, 1,
                            2**63, UINT64_MAX, INT64_MIN, True, float(c.now))}
    args.update(c.signed(acc, lambda: crypto.expire_signature_message(args["expiry"], args["hashes"])))
    return args


def client_args(c: Ctx, op: str) -> tuple[dict[str, Any], str | None]:
    """Args of a client op (also the inner request of an onion) and the account a store is for."""
    if op == "store":
        args, acc = store_args(c)
        return args, acc.session_id
    if op == "retrieve":
        return retrieve_args(c), None
    if op == "delete":
        return delete_args(c), None
    if op == "expire":
        return expire_args(c), None
    if op == "get_swarm":
        return {"pubkey": c.pubkey(c.account())}, None
    return ({} if c.draw.chance(70) else any_args(c.draw)), None  # info


# --------------------------------------------------------------------------- node-to-node ops


def wire_message(c: Ctx, acc: Account, *, spoil: bool = True) -> Any:
    """One replicated copy, spoiled in one field a third of the time (unless ``spoil`` is false)."""
    d = c.draw
    ns = d.choice((0, 0, 1, -(2**15)))
    data = d.binary(d.choice((0, 10, 200)))
    ts = c.now - d.integer(0, 60_000)
    item: list[Any] = [acc.session_id, ns, crypto.message_hash(acc.session_id, ns, data), data, ts, ts + 3_600_000]
    if spoil and d.chance(35):
        at = d.integer(0, 5)
        item[at] = d.choice({
            0: (acc.session_id.upper(), "05" + "0" * 63, 5),
            1: (True, 2**15, -(2**15) - 1, 2**63, None),
            2: (fake_hash(d), "", 7),
            3: ("text", TOO_BIG_DATA, b"", None),
            4: (2**63, UINT64_MAX, -1, True, INT64_MAX, 1.5),
            5: (0, 2**63, UINT64_MAX, True, INT64_MIN, INT64_MAX),
        }[at])
        if at in (1, 3) and isinstance(item[1], int) and isinstance(item[3], bytes) and d.chance(50):
            try:  # keep the hash right, so only the changed field is wrong
                item[2] = crypto.message_hash(acc.session_id, item[1], item[3])
            except crypto.CryptoError:
                pass
    if d.chance(5):
        return d.choice((tuple(item), item[:5], item + [0], {str(i): v for i, v in enumerate(item)}, "abcdef", any_value(d)))
    return item


def node_args(c: Ctx, op: str) -> dict[str, Any]:
    d = c.draw
    if d.chance(15):
        return any_args(d, ("messages", "swarm_id", "digests", "buckets", "hashes"))
    acc = c.account()
    n = big_len(d, MAX_NODE_ITEMS)
    if op == "replicate":
        if d.chance(25):  # a whole batch a member may push: one bad copy refuses every copy of a request
            return {"messages": [wire_message(c, acc, spoil=False) for _ in range(min(n, 4))]}
        msgs = [wire_message(c, acc if d.chance(80) else c.account()) for _ in range(min(n, 4))]
        if n > 4:  # a long batch of small, valid copies
            empty = [acc.session_id, 0, crypto.message_hash(acc.session_id, 0, b""), b"", c.now, c.now + 60_000]
            msgs += [empty] * (n - len(msgs))
        return {"messages": maybe(d, msgs, {}, "x", [[]], None)}
    if op == "replicate_delete":
        item = [c.pubkey(acc), c.hash_list(acc)]
        small = [acc.session_id, [fake_hash(d)]]  # many entries, each small: the frame stays in bounds
        bad_item = d.choice(([item[0]], item + [1], {"a": 1}, item[0], [item[0], "h"]))
        return {"messages": maybe(d, [item] + [small] * (n - 1), [bad_item], [small] * (MAX_NODE_ITEMS + 1), {}, "x")}
    if op == "replicate_expire":
        expiry = maybe(d, c.now + 60_000, -1, 0, 2**63, UINT64_MAX, INT64_MIN, True, 1.5)
        item = [c.pubkey(acc), c.hash_list(acc), expiry]
        small = [acc.session_id, [fake_hash(d)], c.now + 60_000]
        return {"messages": maybe(d, [item] + [small] * (n - 1), [item[:2]], [item + [0]], [expiry],
                                  [small] * (MAX_NODE_ITEMS + 1), {}, None)}
    if op == "ae_digest":
        others = [x.swarm_id for x in c.world.nodes]
        sid = maybe(d, c.target.swarm_id if c.target else 0, d.choice(others), 2**63, UINT64_MAX, -1, True, "1")
        digests = {c.pubkey_key(c.account()): maybe(d, f"{d.integer(0, 2**128 - 1):032x}-{d.integer(0, 9)}",
                                                "", "x" * 129, 5, None, b"d") for _ in range(d.integer(0, 4))}
        return {"swarm_id": sid, "digests": maybe(d, digests, [], "x", {b"k": "d"})}
    if op == "ae_hashes":
        b = ae_bucket(c.now)
        buckets = [maybe(d, b - d.integer(0, 20), -1, 2**63 - 1, INT64_MAX // 5000, INT64_MAX // 5000 + 1,
                         UINT64_MAX, True, 1.5, "7") for _ in range(min(n, 8))]
        wanted = {c.pubkey_key(c.account()): maybe(d, buckets, [], "x", None, list(range(MAX_NODE_ITEMS + 1)))
                  for _ in range(d.integer(0, 3))}
        return {"buckets": maybe(d, wanted, [], "x", {b"k": [1]})}
    return {"hashes": c.hash_list(acc)}  # ae_fetch


def handshake_args(c: Ctx, op: str) -> dict[str, Any]:
    d = c.draw
    if op == "node_hello":
        return {} if d.chance(60) else any_args(d)
    who = d.choice(c.world.nodes).identity
    me = who.ed25519_public.hex()
    receiver = c.target.ed25519_public if c.target else me
    sig = who.sign(auth_message(me, receiver, d.binary(32)))  # over a challenge the node never issued
    return drop_or_garbage(d, {"ed25519_public": maybe(d, me, me.upper(), "zz" * 32, me[:-1] + "²", 1,
                                                       who.ed25519_public),
                               "signature": maybe(d, sig, d.binary(64), sig[:10], me)})


# --------------------------------------------------------------------------- admin ops


def bad_address(c: Ctx, *, loopback: bool = True) -> Any:
    """A [host, port] entry, mostly wrong; with ``loopback`` False never one that would bind."""
    d = c.draw
    host = d.choice(("127.0.0.1", "127.0.0.²", "127.0.0.١", "127.0.0.256", "127.1", "127.0.0.01", "10.0.0.1",
                     "localhost", "", "127.0.0.1 ", "::1", "127.0.0.1.5", "١٢٧.0.0.1"))
    if not loopback and host == "127.0.0.1":
        host = "127.0.0.1x"
    port = d.choice((0, 1, 80, 65535, 65536, -1, 2**63, UINT64_MAX, True, 1.5, "80"))
    return maybe(d, [host, port], [host], [host, port, 0], host, {"host": host}, [port, host])


def admin_args(c: Ctx, op: str) -> tuple[dict[str, Any], bool]:
    """The args and whether the token is the right one."""
    d = c.draw
    right = op != "admin_stop" and d.chance(60)
    token = c.world.admin_token if right else maybe(d, "wrong", "wröng-tökén", c.world.admin_token.encode(), "",
                                                    c.world.admin_token + "x", c.world.admin_token + "²", None)
    args: dict[str, Any] = {} if (not right and d.chance(10)) else {"token": token}
    if op == "admin_set_links":
        links: dict[Any, Any] = {}
        for _ in range(d.integer(0, 3)):
            if d.chance(30):
                n = d.choice(c.world.nodes)  # a real node, at its real address: routing unchanged
                links[n.ed25519_public] = [n.host, n.port]
            else:
                key = maybe(d, d.binary(32).hex(), "x" * 65, "")
                if isinstance(key, (str, bytes)):
                    links[key] = bad_address(c) if d.chance(60) else ["127.0.0.1", 1]
        args["links"] = maybe(d, links, [], "x", None, {b"k": ["127.0.0.1", 1]})
    elif op == "admin_listen":
        t = c.target
        addrs = [bad_address(c, loopback=False) for _ in range(d.integer(0, 3))]
        if t is not None and d.chance(30):
            addrs.append([t.host, t.port])  # in use: refused, never a 500
        if d.chance(2) and t is not None and c.world.listen_budget > 0:
            c.world.listen_budget -= 1
            addrs = [[t.host, 0]]  # a real new listener, like the controller's ingress ports
        args["addresses"] = maybe(d, addrs, [], "x", None, [[t.host, t.port]] * 2 if t else [])
    elif op == "admin_clock":
        args["offset_ms"] = maybe(d, d.choice((0, 0, 0, 1_000, -30_000)), 2**63, INT64_MIN, UINT64_MAX, True,
                                  1.5, "5", 10**15, -(10**15))
    return drop_or_garbage(d, args) if not right or op != "admin_listen" else args, right


# --------------------------------------------------------------------------- onion


def onion_args(c: Ctx) -> tuple[dict[str, Any], bytes | None, str | None, str | None]:
    """``onion {ephemeral_key, data}``, the key that opens the target's reply, its inner op and store account."""
    d, t = c.draw, c.target
    assert t is not None
    if d.chance(20):
        eph = maybe(d, d.binary(32), bytes(32), d.binary(31), d.binary(33), "k" * 32)
        data = maybe(d, d.binary(d.integer(0, 100)), b"", d.binary(39), "data")
        return {"ephemeral_key": eph, "data": data}, None, None, None
    key: bytes | None = None
    inner_op = pubkey = None
    kind = d.integer(0, 9)
    if kind == 0:
        plain = d.binary(d.integer(0, 64))
    elif kind == 1:
        plain = msgpack.packb(any_value(d), use_bin_type=True)
    elif kind == 2:
        ext = msgpack.ExtType(d.integer(0, 127), d.binary(d.integer(0, 8))) if d.chance(80) else \
            msgpack.Timestamp(d.integer(0, 2**34 - 1), 0)
        plain = msgpack.packb(maybe(d, {"request": {"op": "store", "args": {"pubkey": ext}}}, ext,
                                    {"next": ext}, {"request": ext}), use_bin_type=True)
    elif kind == 3:
        plain = msgpack.packb({"request": maybe(d, {"op": d.choice(ONION_OPS), "args": any_value(d)},
                                                {"op": any_value(d)}, [1], None)}, use_bin_type=True)
    elif kind <= 5:  # a relay layer, its next hop and blob more or less right
        hop = d.choice([n for n in c.world.nodes if n is not t] or c.world.nodes)
        nxt = maybe(d, hop.ed25519_public, d.binary(32).hex(), hop.ed25519_public.upper(), t.ed25519_public,
                    hop.ed25519_public[:-1])
        if d.chance(60):
            op = d.choice(ONION_OPS)
            inner, pubkey = client_args(Ctx(d, c.world, hop, c.now), op)
            eph2, blob, key = crypto.seal_layer_keyed(encode_request(op, inner), hop.identity.x25519_public, d.binary)
            inner_op = op
        else:
            eph2, blob = d.binary(32), d.binary(d.integer(0, 80))
        eph2 = maybe(d, eph2, d.binary(31), "e")
        try:
            plain = encode_relay(nxt, eph2, blob, {"pad": d.binary(4)} if d.chance(10) else None)
        except TypeError:
            plain = msgpack.packb({"next": nxt, "ephemeral_key": eph2, "data": blob}, use_bin_type=True)
        if not (isinstance(nxt, str) and nxt.lower() == hop.ed25519_public and isinstance(eph2, bytes)
                and len(eph2) == 32):
            key = inner_op = pubkey = None  # the relay refuses it: no target answers
    else:  # a request for the target itself
        op = d.choice(ONION_OPS) if d.chance(85) else d.choice(("admin_clock", "replicate", "node_auth", "onion",
                                                              "admin_stop", any_text(d)))
        inner, pubkey = client_args(c, op) if op in ONION_OPS else (any_args(d), None)
        inner_op = op
        try:
            plain = encode_request(op, inner, {"pad": 1} if d.chance(10) else None)
        except (TypeError, ValueError):
            plain = msgpack.packb({"request": {"op": op, "args": inner}}, use_bin_type=True)
    eph, blob, layer_key = crypto.seal_layer_keyed(plain, t.identity.x25519_public, d.binary)
    if kind not in (4, 5):  # a layer for the target itself: whatever it answers with 200 must open
        key, inner_op = layer_key, inner_op or "?"
    return {"ephemeral_key": eph, "data": blob}, key, inner_op, pubkey


# --------------------------------------------------------------------------- frames


NODE_OP_LIST = sorted(NODE_OPS)
CLIENT_OP_LIST = sorted(CLIENT_OPS)
ADMIN_OP_LIST = sorted(ADMIN_OPS)
HANDSHAKE_OP_LIST = sorted(HANDSHAKE_OPS)
# Which family of ops a connection of each kind sends, in what proportion.
MIX = {
    "anon": ((55, "client"), (20, "onion"), (6, "handshake"), (8, "node"), (7, "admin"), (4, "unknown")),
    "member": ((70, "node"), (10, "client"), (5, "onion"), (5, "handshake"), (5, "admin"), (5, "unknown")),
    "stranger": ((70, "node"), (10, "client"), (5, "onion"), (5, "handshake"), (5, "admin"), (5, "unknown")),
}


def make_frame(draw: Draw, world: World, target: NodeInfo, kind: str, now_ms: int) -> Frame:
    """One frame for node ``target`` on a connection of ``kind`` (anon, member or stranger)."""
    c = Ctx(draw, world, target, now_ms)
    family = draw.weighted(MIX[kind])
    if family == "client":
        op = draw.choice([o for o in CLIENT_OP_LIST if o != "onion"])
        if draw.chance(12):
            return Frame(target.name, kind, op, any_args(draw, ("pubkey", "namespace", "data", "ttl", "timestamp",
                                                                "hashes", "signature", "pubkey_ed25519")))
        args, pubkey = client_args(c, op)
        return Frame(target.name, kind, op, drop_or_garbage(draw, args), pubkey=pubkey)
    if family == "onion":
        args, key, inner_op, pubkey = onion_args(c)
        return Frame(target.name, kind, "onion", args, reply_key=key, inner_op=inner_op, pubkey=pubkey)
    if family == "handshake":
        op = draw.choice(HANDSHAKE_OP_LIST)
        return Frame(target.name, kind, op, handshake_args(c, op))
    if family == "node":
        op = draw.choice(NODE_OP_LIST)
        # Checked before any argument: a stranger to the node list gets 401, whatever it sends.
        expect = frozenset({Status.UNAUTHORIZED}) if kind == "anon" else None
        return Frame(target.name, kind, op, drop_or_garbage(draw, node_args(c, op)), expect=expect)
    if family == "admin":
        op = draw.choice(ADMIN_OP_LIST)
        args, right = admin_args(c, op)
        return Frame(target.name, kind, op, args, expect=None if right else frozenset({Status.UNAUTHORIZED}))
    return Frame(target.name, kind, unknown_op(draw), any_args(draw), expect=frozenset({Status.NOT_FOUND}))


# --------------------------------------------------------------------------- the registry


def make_registry_frame(draw: Draw, world: World, now_ms: int) -> Frame:
    d = draw
    op = d.choice(REGISTRY_OPS) if d.chance(92) else unknown_op(d)
    expect = None
    if op == "info":
        args: dict[Any, Any] = {} if d.chance(70) else any_args(d)
    elif op == "get_service_nodes":
        args = {"since_height": maybe(d, d.integer(-1, 3), None, 2**63, UINT64_MAX, True, "1"),
                "wait_ms": maybe(d, d.integer(0, 200), -1, 2**63, True, 1.5),
                "history": maybe(d, d.chance(50), 1, "yes", None)}
        args = {k: v for k, v in args.items() if d.chance(70)}
    elif op == "register":
        n = d.choice(world.nodes)
        ed, x = n.ed25519_public, n.identity.x25519_public.hex()
        host, port, ts = n.host, n.port, now_ms
        # Signed by the node itself, at its own address: a re-registration that changes nothing.
        sig = n.identity.sign(register_message(ed, x, host, port, ts))
        args = {"ed25519_public": maybe(d, ed, ed.upper(), "zz" * 32, d.binary(32).hex()),
                "x25519_public": maybe(d, x, ed, x[:-1]),
                "host": maybe(d, host, "localhost", "127.000.0.1", "::1", "127.0.0.²", 7),
                "port": maybe(d, port, 0, 65536, -1, True, UINT64_MAX),
                "timestamp": maybe(d, ts, ts + 60_001, -1, 2**63, True),
                "signature": maybe(d, sig, d.binary(64), sig[:-1], "sig")}
        args = drop_or_garbage(d, args)
        if d.chance(10):
            args[b"bytes-key"] = 1  # keys of two types side by side
    elif op == "deregister":
        # Never a valid signature by a registered node: only by a stranger (404) or none at all.
        who = crypto.Identity.from_seed(d.binary(32)) if d.chance(50) else d.choice(world.nodes).identity
        ed, ts = who.ed25519_public.hex(), now_ms
        sig = who.sign(deregister_message(ed, ts)) if who not in [n.identity for n in world.nodes] else d.binary(64)
        args = drop_or_garbage(d, {"ed25519_public": maybe(d, ed, ed.upper(), 5),
                                   "timestamp": maybe(d, ts, 2**63, -1, True), "signature": maybe(d, sig, b"", "s")})
    elif op == "stake":
        right = d.chance(50)
        args = {"token": world.admin_token if right else maybe(d, "wrong", "wröng", None, 5)}
        if right:
            args["ed25519_public"] = maybe(d, crypto.Identity.from_seed(d.binary(32)).ed25519_public.hex(), "zz",
                                           5, None)
        else:
            expect = frozenset({Status.UNAUTHORIZED})
        args = drop_or_garbage(d, args) if d.chance(50) else args
        if d.chance(10):
            args[b"bytes-key"] = 1
    else:
        args, expect = any_args(d), frozenset({Status.NOT_FOUND})
    return Frame("registry", "registry", op, args, expect=expect)


# --------------------------------------------------------------------------- a peer that answers garbage


class PeerScript:
    """What a fake swarm peer answers to the node that dials it (the victim): the handshake
    mostly right, so that anti-entropy gets past it; then, per step, answers that lead one
    step further (account ids of the victim's swarm, buckets that differ, hashes of messages
    this peer can really hand over) or garbage."""

    def __init__(self, draw: Draw, world: World, victim: NodeInfo, posing_as: NodeInfo) -> None:
        self.draw, self.world, self.victim, self.posing_as = draw, world, victim, posing_as
        self.offered: dict[str, list[Any]] = {}  # hash -> a valid wire message we announced

    def reply(self, op: str, args: Any, now_ms: int) -> tuple[int, Any]:
        d = self.draw
        status = Status.OK if d.chance(95) else d.choice(sorted(LISTED_STATUSES_AND_500))
        if op == "node_hello":
            return Status.OK, maybe(d, {"challenge": d.binary(32), "ed25519_public": self.posing_as.ed25519_public},
                                    {"challenge": d.binary(31), "ed25519_public": self.posing_as.ed25519_public}, [])
        if op == "node_auth":
            return (Status.OK if d.chance(95) else status), {"node": self.posing_as.ed25519_public}
        if op == "onion":
            # The victim relays this answer unchanged to the fuzzer, which must not take it
            # for the victim's own: a plain path error.
            return Status.BAD_REQUEST, {"error": "fake peer"}
        return status, self._body(op, args if isinstance(args, dict) else {}, now_ms)

    def _body(self, op: str, args: dict[str, Any], now_ms: int) -> Any:
        d = self.draw

        def mostly(good: Any, *bad: Any) -> Any:  # right far more often than maybe(): each step leads on
            return good if d.chance(80) else maybe(d, good, *bad)

        c = Ctx(d, self.world, self.victim, now_ms)
        mine = [a for a in self.world.accounts if a.swarm_id == self.victim.swarm_id] or self.world.accounts
        if op == "ae_digest":
            b = ae_bucket(now_ms)
            buckets = {mostly(d.choice(mine).session_id, c.pubkey_key(d.choice(mine))):
                       mostly([[mostly(b - d.integer(0, 5), -1, 2**63, True),
                                mostly(f"{d.integer(0, 2**64):032x}-1", 5)] for _ in range(d.integer(1, 3))],
                              "x", [[1]], {})
                       for _ in range(d.integer(1, 3))}
            return mostly({"buckets": buckets}, {"buckets": []}, {"buckets": None}, [], {})
        if op == "ae_hashes":
            wanted = args.get("buckets") if isinstance(args.get("buckets"), dict) else {}
            hashes = {}
            for pk in list(wanted)[:4]:
                acc = next((a for a in self.world.accounts if a.session_id == pk), None)
                hs = [self._offer(acc, now_ms) if acc and d.chance(70) else fake_hash(d) for _ in range(d.integer(0, 3))]
                hashes[pk] = mostly(hs, [1], "h", None, ["x" * 65])
            return mostly({"hashes": hashes}, {"hashes": []}, {"hashes": {"zz": ["h"]}}, [], None)
        if op == "ae_fetch":
            asked = args.get("hashes") if isinstance(args.get("hashes"), list) else []
            msgs = [self.offered[h] for h in asked if isinstance(h, str) and h in self.offered]
            extra = self._offer(d.choice(mine), now_ms)  # one nobody asked for
            msgs = mostly(msgs, msgs + [self.offered[extra]], [[1, 2, 3]], "m",
                          [m[:5] for m in msgs] or [[]], [m[:4] + [2**63, 2**64 - 1] for m in msgs] or [[]])
            return mostly({"messages": msgs}, {"messages": None}, [], None)
        if op in ("replicate", "replicate_delete", "replicate_expire"):
            return maybe(d, {"stored": 1}, {"deleted": "x"}, None, [])
        return any_value(d)

    def _offer(self, acc: Account, now_ms: int) -> str:
        """A valid message of ``acc`` this peer can hand over when asked; its hash."""
        data = self.draw.binary(16)
        ts = now_ms - self.draw.integer(0, 20_000)
        h = crypto.message_hash(acc.session_id, 0, data)
        self.offered[h] = [acc.session_id, 0, h, data, ts, ts + 3_600_000]
        if len(self.offered) > 2000:
            self.offered.pop(next(iter(self.offered)))
        return h
