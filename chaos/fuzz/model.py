"""Adversarial frames for every op a service node (and the registry) serves: the
fuzzer's pure half, in two modules.  No sockets, no clock, no trio: a frame is
made from a :class:`Draw` (where every choice comes from), a :class:`World`
(what the harness knows: nodes and their keys, accounts, stored hashes, the
admin token) and ``now_ms``.  Here: the draw, the world, arbitrary values and
:func:`judge`, which reads one answer; the frames of each op are made in
:mod:`chaos.fuzz.frames`; the trio driver is :mod:`chaos.fuzz.run`.

Strategy: most arguments are *well-typed but wrong* (real accounts of the
right or another swarm, real hashes, boundary ints such as 2**63 and -1,
lists one past their limit, valid signatures over other values, onion layers
properly encrypted to the node around garbage), the rest arbitrary msgpack
values, so the checks deep in a handler are reached as well as the first one.
A :class:`Draw` backed by ``random.Random`` makes the ``swarmnet fuzz``
stream; the tests back it with Hypothesis.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import msgpack

from nodes.core import MAX_DATA_BYTES
from testnet.base.onion import decode_reply
from nodes.server import ADMIN_OPS, CLIENT_OPS, HANDSHAKE_OPS, NODE_OPS
from testnet.base import crypto
from testnet.base.protocol import Status
from testnet.base.swarm import swarm_for

T = TypeVar("T")

# Every status PROTOCOL.md lists except 500: anything else is a finding.
LISTED_STATUSES = frozenset(int(s) for s in Status) - {int(Status.INTERNAL_ERROR)}
CONN_KINDS = ("anon", "member", "stranger", "registry")

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
BOUNDARY_INTS = (0, 1, -1, 2, 255, 256, 2**15 - 1, 2**15, -(2**15), -(2**15) - 1, 2**31 - 1, 2**31,
                 2**32, 2**53, INT64_MAX, 2**63, UINT64_MAX, INT64_MIN, INT64_MIN + 1,
                 INT64_MAX // 5000, INT64_MAX // 5000 + 1)
FLOATS = (0.0, -0.0, 0.5, 1.5, -1.0, math.nan, math.inf, -math.inf, 1e308, float(2**63))
# Text that trips naive checks: unicode digits pass str.isdigit(), 'İ'.lower() grows, NUL, an emoji.
PALETTE = "0123456789abcdefABCDEF xyz.-_|:/\\\x00\n\t²١߀İK😀'\"{}%"
NEAR_MISS_OPS = ("Store", "store ", " info", "op_store", "admin_stop2", "_fan_out", "__init__", "handle",
                 "info\x00", "replicate_all", "ONION", "node_hello2", "get_service_nodes", "stake", "x" * 64)
ONION_OPS = ("store", "retrieve", "delete", "expire", "get_swarm", "info")
TOO_BIG_DATA = bytes(MAX_DATA_BYTES + 1)  # contents do not matter, only the size
# Nesting a frame may carry inside its args and still pack and unpack (msgpack-python's
# packer stops near 1,020 levels; the envelope and a few levels of args sit above this).
MAX_NESTING = 990
REGISTRY_OPS = ("info", "get_service_nodes", "register", "deregister", "stake")
KNOWN_OPS = frozenset(CLIENT_OPS | NODE_OPS | HANDSHAKE_OPS | ADMIN_OPS) | set(REGISTRY_OPS)


# --------------------------------------------------------------------------- where choices come from


class Draw:
    """Every choice the generator makes.  Subclasses give :meth:`integer`, :meth:`binary`
    and :meth:`text`; the rest is derived from them (so Hypothesis can shrink it all)."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def binary(self, size: int) -> bytes:
        """Exactly ``size`` bytes (keys, nonces, data: their contents rarely matter, so a
        subclass may draw them from a seeded stream rather than choice by choice)."""
        raise NotImplementedError

    def text(self, max_size: int) -> str:
        raise NotImplementedError

    def chance(self, percent: int) -> bool:
        return self.integer(0, 99) < percent

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def weighted(self, table: Sequence[tuple[int, T]]) -> T:
        r = self.integer(0, sum(w for w, _ in table) - 1)
        for w, item in table:
            if r < w:
                return item
            r -= w
        raise AssertionError("unreachable")


class RandomDraw(Draw):
    """Choices from a seeded ``random.Random``: the ``swarmnet fuzz`` stream."""

    def __init__(self, seed: Any) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def binary(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def text(self, max_size: int) -> str:
        n = self.rng.randint(0, max_size)
        return "".join(self.rng.choices(PALETTE, k=n))


# --------------------------------------------------------------------------- what the harness knows


@dataclass(frozen=True)
class NodeInfo:
    name: str
    identity: crypto.Identity
    host: str
    port: int
    swarm_id: int

    @property
    def ed25519_public(self) -> str:
        return self.identity.ed25519_public.hex()


@dataclass(frozen=True)
class Account:
    identity: crypto.Identity
    swarm_id: int

    @property
    def session_id(self) -> str:
        return self.identity.session_id


@dataclass
class World:
    """Ground truth for making frames; the driver adds hashes as stores succeed."""

    nodes: list[NodeInfo]
    accounts: list[Account]
    admin_token: str
    listen_budget: int = 4  # listeners a fuzz run may really add (admin_listen that succeeds)
    hashes: dict[str, list[str]] = field(default_factory=dict)  # session id -> recent stored hashes

    @classmethod
    def build(cls, nodes: list[NodeInfo], identities: list[crypto.Identity], admin_token: str, **kw: Any) -> World:
        swarm_ids = sorted({n.swarm_id for n in nodes})
        accounts = [Account(i, swarm_for(i.session_id, swarm_ids)) for i in identities]
        return cls(nodes, accounts, admin_token, **kw)

    def note_stored(self, session_id: str, message_hash: str) -> None:
        recent = self.hashes.setdefault(session_id, [])
        if message_hash not in recent:
            recent.append(message_hash)
            del recent[:-32]

    def members(self, swarm_id: int) -> list[NodeInfo]:
        return [n for n in self.nodes if n.swarm_id == swarm_id]


@dataclass
class Frame:
    """One request to send, and what the rules allow for its answer."""

    target: str  # node name or "registry"
    kind: str  # the connection's kind: CONN_KINDS
    op: str
    args: dict[str, Any]
    expect: frozenset[int] | None = None  # None: any listed status
    reply_key: bytes | None = None  # an onion layer key: the answer's "data" must open with it
    inner_op: str | None = None  # the op inside that onion
    pubkey: str | None = None  # the account a successful store stores for

    def describe(self, limit: int = 400) -> str:
        try:
            args = repr(self.args)
        except RecursionError:
            args = "<args nested too deep for repr>"
        text = f"{self.kind}->{self.target} {self.op} {args}"
        return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- arbitrary values


def any_int(draw: Draw) -> int:
    kind = draw.integer(0, 9)
    if kind < 6:
        return draw.choice(BOUNDARY_INTS)
    if kind < 8:
        return draw.integer(-1000, 1000)
    return draw.integer(INT64_MIN, UINT64_MAX)


def any_text(draw: Draw) -> str:
    kind = draw.integer(0, 9)
    if kind < 5:
        return draw.text(24)
    if kind < 8:
        n = draw.choice((1, 32, 63, 64, 65, 66, 67))
        s = draw.binary((n + 1) // 2).hex()[:n]
        return s.upper() if draw.chance(30) else s
    if kind < 9:
        return "05" + draw.binary(32).hex()[: draw.choice((63, 64, 65))]
    return draw.text(8) * draw.integer(100, 600)


def any_bytes(draw: Draw) -> bytes:
    return draw.binary(draw.choice((0, 1, 16, 24, 31, 32, 33, 40, 64, draw.integer(0, 200))))


def deep_value(draw: Draw) -> Any:
    """Lists or maps nested hundreds deep: msgpack decodes them (its limit is about 1,000
    levels), and ``repr`` of one a thousand deep raises RecursionError."""
    value: Any = draw.choice((None, 0, "x", b""))
    as_map = draw.chance(50)
    for _ in range(draw.choice((200, 900, MAX_NESTING))):
        value = {"k": value} if as_map else [value]
    return value


def any_value(draw: Draw, depth: int = 0) -> Any:
    """An arbitrary msgpack value the protocol can carry (map keys are str or bytes)."""
    if depth == 0 and draw.chance(1):
        return deep_value(draw)
    kinds = 8 if depth < 3 else 6
    kind = draw.integer(0, kinds - 1)
    if kind == 0:
        return None
    if kind == 1:
        return draw.chance(50)
    if kind == 2:
        return any_int(draw)
    if kind == 3:
        return draw.choice(FLOATS)
    if kind == 4:
        return any_text(draw)
    if kind == 5:
        return any_bytes(draw)
    n = draw.integer(0, 5)
    if kind == 6:
        return [any_value(draw, depth + 1) for _ in range(n)]
    return {(any_text(draw) if draw.chance(80) else any_bytes(draw)): any_value(draw, depth + 1) for _ in range(n)}


def any_args(draw: Draw, keys: Sequence[str] = ()) -> dict[Any, Any]:
    """An args map of arbitrary values, under the op's own keys or others."""
    out: dict[Any, Any] = {}
    for _ in range(draw.integer(0, 6)):
        key = draw.choice(keys) if keys and draw.chance(70) else (any_text(draw) if draw.chance(85) else any_bytes(draw))
        out[key] = any_value(draw)
    return out


def maybe(draw: Draw, good: Any, *bad: Any) -> Any:
    """``good`` mostly; else one of the ``bad`` values or anything."""
    r = draw.integer(0, 99)
    if r < 72:
        return good
    if r < 92 and bad:
        return draw.choice(bad)
    return deep_value(draw) if draw.chance(10) else any_value(draw)


def big_len(draw: Draw, limit: int) -> int:
    """A length around ``limit`` (at it, one past it) or a small one."""
    if draw.chance(96):
        return draw.integer(1, 5)
    return draw.choice((0, limit - 1, limit, limit + 1))


def fake_hash(draw: Draw) -> str:
    return crypto.message_hash("05" + draw.binary(32).hex(), 0, draw.binary(8))


def unknown_op(draw: Draw) -> str:
    op = draw.choice(NEAR_MISS_OPS) if draw.chance(50) else draw.text(20)
    return op if 0 < len(op) <= 64 and op not in CLIENT_OPS | NODE_OPS | ADMIN_OPS | HANDSHAKE_OPS else "nope"


# --------------------------------------------------------------------------- judging an answer


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # None: the answer is one the rules allow
    inner_status: int | None = None  # an onion target's status, when the reply could be opened
    stored: tuple[str, str] | None = None  # (session id, hash) of a message now stored


def judge(frame: Frame, status: int, body: Any) -> Verdict:
    """Whether ``status``/``body`` is an allowed answer to ``frame``."""
    if status == Status.INTERNAL_ERROR:
        return Verdict(f"500 internal error: {body!r:.200}")
    if status not in LISTED_STATUSES:
        return Verdict(f"status {status} is not in PROTOCOL.md")
    if frame.expect is not None and status not in frame.expect:
        return Verdict(f"status {status}, the rules allow only {sorted(frame.expect)}")
    inner_status, inner_body = status, body
    if frame.reply_key is not None and status == Status.OK:
        blob = body.get("data") if isinstance(body, dict) else None
        try:
            inner_status, inner_body = decode_reply(frame.reply_key, blob)
        except (crypto.CryptoError, ValueError, TypeError, KeyError, msgpack.UnpackException):
            return Verdict("the onion reply does not open with the layer's key")
        if inner_status == Status.INTERNAL_ERROR:
            return Verdict(f"onion {frame.inner_op}: inner 500: {inner_body!r:.200}", inner_status)
        if inner_status not in LISTED_STATUSES:
            return Verdict(f"onion {frame.inner_op}: inner status {inner_status} is not in PROTOCOL.md", inner_status)
    stored = None
    op = frame.inner_op if frame.reply_key is not None else frame.op
    if op == "store" and inner_status == Status.OK and frame.pubkey and isinstance(inner_body, Mapping) \
            and isinstance(inner_body.get("hash"), str):
        stored = (frame.pubkey, inner_body["hash"])
    return Verdict(None, inner_status if frame.reply_key is not None else None, stored)
