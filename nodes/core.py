"""The service node's rules, without I/O: configuration, the swarm view, op
validation and rate limiting.  Time is always passed in (ms since epoch, or
seconds for the token bucket); nothing here touches a socket, trio or a clock.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator, Mapping, Sized, TypeVar

from testnet.base import crypto
from testnet.base.bugs import NODE_BUGS, UnknownBug, check_bugs
from testnet.base.limits import ConnectionLimits
from testnet.base.protocol import RequestError, Status
from testnet.base.records import NodeRecord  # the registry's record, as nodes receive it
from testnet.base.swarm import swarm_for

from .storage import AE_BUCKET_MS, StoredMessage

VERSION = "swarmnet-node/0.1"

# oxen-storage-server's limits.
MAX_DATA_BYTES = 76_800
MIN_TTL_MS = 10_000
MAX_TTL_MS = 14 * 24 * 3600 * 1000
# A deleted message must never come back from a peer's copy: its hash is remembered
# (a tombstone) for as long as any copy could still be alive.
TOMBSTONE_MS = MAX_TTL_MS
# Frames are capped at 1 MiB (testnet.base.protocol).  Whatever a node packs into one
# request or reply — replicated batches, anti-entropy fetches, retrieved
# messages — stays within this many bytes of payload, leaving room for the
# envelope and, for onion replies, the encryption around it.
WIRE_BUDGET_BYTES = 512 * 1024
BATCH_COUNT = 500  # and at most this many items

T = TypeVar("T")
STORE_CLOCK_WINDOW_MS = 10_000
SIGNED_CLOCK_WINDOW_MS = 60_000
MAX_HASHES_PER_REQUEST = 1000
NAMESPACE_RANGE = range(-(2**15), 2**15)
# SQLite stores signed 64-bit integers: a time beyond this is refused at the edge, never
# handed to the database (where it raises OverflowError, not an SQLite error).
MAX_TIME_MS = 2**63 - 1
# The clock-skew fault moves a node's clock by seconds or minutes; a year keeps every
# time it computes (now, now + 14 days for tombstones) positive and far inside int64.
MAX_CLOCK_OFFSET_MS = 365 * 24 * 3600 * 1000
_HEX66 = re.compile(r"[0-9a-f]{66}")



class ConfigError(Exception):
    """The node's configuration file is missing or wrong."""


REPLICA_COMMIT_WINDOW_MS = 0.0


def _window_ms(value: Any) -> float:
    try:
        ms = float(value)
    except (TypeError, ValueError):
        ms = -1.0
    if not 0 <= ms <= 1000:
        raise ConfigError(f"'replica_commit_window_ms' must be in [0, 1000], got {value!r:.40}")
    return ms


def _disk_kind(value: Any) -> str:
    if value not in ("model", "os"):
        raise ConfigError(f"'disk' must be 'model' or 'os', got {value!r:.40}")
    return value


@dataclass(frozen=True)
class NodeConfig:
    name: str
    seed_file: str
    listen: tuple[tuple[str, int], ...]
    db: str
    log: str | None
    registry: tuple[str, int]
    capture: str | None = None
    capture_buffer_bytes: int = 1 << 20  # fewer writes under load; the simulation of 1,000 nodes takes less
    links: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    link_opener: tuple[str, int] | None = None  # ask there for a link's proxy before its first dial
    admin_token: str = ""
    clock_offset_ms: int = 0
    parent_pid: int | None = None
    anti_entropy_interval_s: float = 2.0
    expiry_interval_s: float = 10.0
    registry_poll_s: float = 1.0
    registry_settle_s: float = 0.1  # after a new list, before asking again: a burst of changes is one fetch
    replication_timeout_s: float = 2.0
    # A replica holds a copy's commit up to this long for later copies to share its
    # transaction (fewer transactions under load, at this much latency): 0 commits at the
    # end of the loop turn the copy arrived in (nodes.replication.GroupCommit).
    replica_commit_window_ms: float = REPLICA_COMMIT_WINDOW_MS
    rate_limit_burst: int = 600
    rate_limit_per_second: float = 300.0
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    inject_bugs: tuple[str, ...] = ()
    disk: str = "model"  # "model": the harness's disk (nodes/disk.py) under SQLite; "os": SQLite's own VFS

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NodeConfig:
        try:
            listen = tuple((str(h), int(p)) for h, p in raw["listen"])
            if not listen:
                raise ConfigError("'listen' needs at least one address")
            rate = raw.get("rate_limit") or {}
            try:
                # Client bugs may be listed too (one list per run); the node acts on its own.
                bugs = tuple(b for b in check_bugs(list(raw.get("inject_bugs") or ())) if b in NODE_BUGS)
            except UnknownBug as exc:
                raise ConfigError(f"unknown injected bugs: {exc}") from None
            return cls(
                name=str(raw["name"]),
                seed_file=str(raw["seed_file"]),
                listen=listen,
                db=str(raw["db"]),
                log=raw.get("log"),
                registry=(str(raw["registry"][0]), int(raw["registry"][1])),
                capture=raw.get("capture"),
                capture_buffer_bytes=int(raw.get("capture_buffer_bytes", 1 << 20)),
                links={str(k): (str(v[0]), int(v[1])) for k, v in (raw.get("links") or {}).items()},
                link_opener=(str(raw["link_opener"][0]), int(raw["link_opener"][1]))
                if raw.get("link_opener") else None,
                admin_token=str(raw.get("admin_token", "")),
                clock_offset_ms=clock_offset(int(raw.get("clock_offset_ms", 0)), ConfigError),
                parent_pid=raw.get("parent_pid"),
                anti_entropy_interval_s=float(raw.get("anti_entropy_interval_s", 2.0)),
                expiry_interval_s=float(raw.get("expiry_interval_s", 10.0)),
                registry_poll_s=float(raw.get("registry_poll_s", 1.0)),
                registry_settle_s=float(raw.get("registry_settle_s", 0.1)),
                replication_timeout_s=float(raw.get("replication_timeout_s", 2.0)),
                replica_commit_window_ms=_window_ms(raw.get("replica_commit_window_ms", REPLICA_COMMIT_WINDOW_MS)),
                rate_limit_burst=int(rate.get("burst", 600)),
                rate_limit_per_second=float(rate.get("per_second", 300.0)),
                connection_limits=ConnectionLimits(**(raw.get("connection_limits") or {})),
                inject_bugs=bugs,
                disk=_disk_kind(raw.get("disk", "model")),
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"bad node configuration: {type(exc).__name__}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeConfig:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read node configuration {path}: {exc}") from None
        return cls.from_dict(raw)

    def identity(self) -> crypto.Identity:
        try:
            with open(self.seed_file, encoding="ascii") as f:
                return crypto.Identity.from_seed(bytes.fromhex(f.read().strip()))
        except (OSError, ValueError, crypto.CryptoError) as exc:
            raise ConfigError(f"cannot read the node's seed file: {type(exc).__name__}") from None


# --------------------------------------------------------------------------- swarm view


SWARM_OF_CACHE = 65_536  # accounts whose swarm a view remembers


def _record(n: Mapping[str, Any]) -> NodeRecord:
    # Interned: a node keeps these keys in its view, its senders and its entitlements,
    # and the nodes of one process (the simulation) share them.
    return NodeRecord(sys.intern(str(n["ed25519_public"])), sys.intern(str(n["x25519_public"])),
                      sys.intern(str(n["host"])), int(n["port"]), int(n["swarm_id"]))


@dataclass(frozen=True)
class SwarmView:
    """The registry's node list as one node sees it at one height."""

    height: int
    nodes: Mapping[str, NodeRecord]
    me: str

    @classmethod
    def from_registry(cls, body: Mapping[str, Any], me: str) -> SwarmView:
        nodes = {}
        for n in body["nodes"]:
            rec = _record(n)
            nodes[rec.ed25519_public] = rec
        return cls(int(body["height"]), nodes, me)

    def apply_delta(self, body: Mapping[str, Any]) -> SwarmView:
        """The list after a registry delta from this view's height ({"since_height",
        "nodes": [records added or changed], "removed": [ed25519 hex]}); ValueError
        when the delta does not start at this view's height."""
        if int(body["since_height"]) != self.height:
            raise ValueError(f"delta from height {body['since_height']} applied to a view at {self.height}")
        nodes = dict(self.nodes)
        for key in body["removed"]:
            nodes.pop(str(key), None)
        for n in body["nodes"]:
            rec = _record(n)
            nodes[rec.ed25519_public] = rec
        return SwarmView(int(body["height"]), nodes, self.me)

    @cached_property
    def swarm_ids(self) -> list[int]:
        return sorted({n.swarm_id for n in self.nodes.values()})

    @cached_property
    def my_swarm(self) -> int | None:
        rec = self.nodes.get(self.me)
        return rec.swarm_id if rec else None

    @cached_property
    def _by_swarm(self) -> dict[int, list[NodeRecord]]:
        # Grouped once per view: members() is asked on every info, 421 and rehoming round.
        out: dict[int, list[NodeRecord]] = {}
        for n in sorted(self.nodes.values(), key=lambda n: n.ed25519_public):
            out.setdefault(n.swarm_id, []).append(n)
        return out

    def members(self, swarm_id: int | None) -> list[NodeRecord]:
        return list(self._by_swarm.get(swarm_id, ())) if swarm_id is not None else []

    @cached_property
    def _peers(self) -> list[NodeRecord]:
        return [n for n in self.members(self.my_swarm) if n.ed25519_public != self.me]

    def peers(self) -> list[NodeRecord]:
        """Members of my swarm other than me."""
        return list(self._peers)

    @cached_property
    def _peer_keys(self) -> frozenset[str]:
        return frozenset(p.ed25519_public for p in self._peers)

    def peer_keys(self) -> frozenset[str]:
        """The ed25519 keys (hex) of :meth:`peers`."""
        return self._peer_keys

    @cached_property
    def _swarm_of(self) -> dict[str, int]:
        return {}

    def swarm_of(self, pubkey: str) -> int | None:
        # Asked for every message a node stores, replicates or is sent (several times each);
        # remembered per view, at most SWARM_OF_CACHE accounts.
        cache = self._swarm_of
        sid = cache.get(pubkey)
        if sid is None:
            ids = self.swarm_ids
            if not ids:
                return None
            sid = swarm_for(pubkey, ids)
            if len(cache) >= SWARM_OF_CACHE:
                cache.clear()
            cache[pubkey] = sid
        return sid

    def is_mine(self, pubkey: str) -> bool:
        mine = self.my_swarm
        return mine is not None and self.swarm_of(pubkey) == mine

    def wrong_swarm(self, pubkey: str) -> RequestError:
        """The 421 answer: the right swarm's id and members (oxen-storage-server)."""
        target = self.swarm_of(pubkey)
        return RequestError(Status.WRONG_SWARM, "pubkey belongs to another swarm", {
            "error": "wrong swarm", "swarm_id": target,
            "nodes": [n.to_wire() for n in self.members(target)],
        })


def require_view(view: SwarmView | None) -> SwarmView:
    """The view of a node that has a swarm (503 before its first list places it in one)."""
    if view is None or view.my_swarm is None:
        raise RequestError(Status.NOT_READY, "node has no swarm yet")
    return view


# --------------------------------------------------------------------------- validation


def _bad(msg: str, status: int = Status.BAD_REQUEST) -> RequestError:
    return RequestError(status, msg)


def _int(args: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = args.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(f"'{key}' must be an integer")
    return v


def clock_offset(value: Any, error: Callable[[str], Exception] = _bad) -> int:
    """An injected clock offset (ms): an integer of at most a year either way."""
    if not is_int(value) or abs(value) > MAX_CLOCK_OFFSET_MS:
        raise error(f"'offset_ms' must be an integer within ±{MAX_CLOCK_OFFSET_MS} ms")
    return value


def _bytes(args: Mapping[str, Any], key: str) -> bytes:
    v = args.get(key)
    if not isinstance(v, bytes):
        raise _bad(f"'{key}' must be bytes")
    return v


def is_pubkey(value: Any) -> bool:
    """Whether ``value`` is an account id as stored: 66 lowercase hex characters."""
    return isinstance(value, str) and _HEX66.fullmatch(value) is not None


def session_pubkey(args: Mapping[str, Any]) -> str:
    v = args.get("pubkey")
    if not isinstance(v, str) or not _HEX66.fullmatch(v.lower()):
        raise _bad("'pubkey' must be a 66-character hex account id")
    return v.lower()


def namespace(args: Mapping[str, Any]) -> int:
    ns = _int(args, "namespace", 0)
    if ns not in NAMESPACE_RANGE:
        raise _bad("'namespace' must fit in 16 bits")
    return ns


def hashes(args: Mapping[str, Any]) -> list[str]:
    v = args.get("hashes")
    if not isinstance(v, list) or not v or len(v) > MAX_HASHES_PER_REQUEST:
        raise _bad(f"'hashes' must be a list of 1..{MAX_HASHES_PER_REQUEST} message hashes")
    if not all(isinstance(h, str) and 0 < len(h) <= 64 for h in v):
        raise _bad("every hash must be a short string")
    return v


def validate_store(args: Mapping[str, Any], now_ms: int) -> StoredMessage:
    """A store request as the message to keep, or the status it deserves."""
    pubkey = session_pubkey(args)
    ns = namespace(args)
    data = _bytes(args, "data")
    if len(data) > MAX_DATA_BYTES:
        raise _bad(f"data of {len(data)} bytes exceeds {MAX_DATA_BYTES}", Status.TOO_LARGE)
    ttl = _int(args, "ttl")
    if not MIN_TTL_MS <= ttl <= MAX_TTL_MS:
        raise _bad(f"ttl must be between {MIN_TTL_MS} and {MAX_TTL_MS} ms")
    ts = _int(args, "timestamp")
    if abs(ts - now_ms) > STORE_CLOCK_WINDOW_MS:
        raise _bad("timestamp is more than 10 s from the node's clock", Status.CLOCK_OUT_OF_RANGE)
    return StoredMessage(pubkey, ns, crypto.message_hash(pubkey, ns, data), data, ts, ts + ttl)


def check_signed(args: Mapping[str, Any], pubkey: str, message: bytes) -> None:
    """The account's ed25519 signature over ``message`` (401 when wrong)."""
    ed = args.get("pubkey_ed25519")
    sig = args.get("signature")
    if not isinstance(ed, str) or not isinstance(sig, bytes):
        raise _bad("'pubkey_ed25519' (hex) and 'signature' (bytes) are required", Status.UNAUTHORIZED)
    try:
        ed_bytes = bytes.fromhex(ed)
        if pubkey.startswith("05"):
            # A 05 account's ed25519 key must convert to its x25519 Session ID.
            crypto.check_account(pubkey, ed_bytes)
        crypto.verify_request(ed_bytes, message, sig)
    except (ValueError, crypto.CryptoError):
        raise _bad("signature does not verify for this account", Status.UNAUTHORIZED) from None


def validate_retrieve(args: Mapping[str, Any], now_ms: int) -> tuple[str, int, str | None]:
    pubkey = session_pubkey(args)
    ns = namespace(args)
    ts = _int(args, "timestamp")
    last = args.get("last_hash") or None
    if last is not None and not isinstance(last, str):
        raise _bad("'last_hash' must be a string")
    check_signed(args, pubkey, crypto.retrieve_signature_message(ns, ts))
    if abs(ts - now_ms) > SIGNED_CLOCK_WINDOW_MS:
        raise _bad("timestamp is more than 60 s from the node's clock", Status.CLOCK_OUT_OF_RANGE)
    return pubkey, ns, last


def validate_delete(args: Mapping[str, Any]) -> tuple[str, list[str]]:
    pubkey = session_pubkey(args)
    hs = hashes(args)
    check_signed(args, pubkey, crypto.delete_signature_message(hs))
    return pubkey, hs


def validate_expire(args: Mapping[str, Any], now_ms: int) -> tuple[str, list[str], int]:
    pubkey = session_pubkey(args)
    hs = hashes(args)
    expiry = _int(args, "expiry")
    if expiry > now_ms + MAX_TTL_MS:
        raise _bad("expiry is more than 14 days ahead")
    check_signed(args, pubkey, crypto.expire_signature_message(expiry, hs))
    return pubkey, hs, expiry


# --------------------------------------------------------------------------- node-op arguments
# Node ops carry nested lists; each is checked whole here, at the edge, so no
# handler meets a wrong type (a 400 naming the argument, never a 500).

MAX_NODE_ITEMS = 10 * BATCH_COUNT  # entries in one node-op list
MAX_BUCKET = MAX_TIME_MS // AE_BUCKET_MS - 1  # the last bucket whose end time fits in int64


def arg_list(args: Mapping[str, Any], key: str, max_len: int = MAX_NODE_ITEMS) -> list[Any]:
    v = args.get(key)
    if not isinstance(v, list) or len(v) > max_len:
        raise _bad(f"'{key}' must be a list of at most {max_len} entries")
    return v


def arg_map(args: Mapping[str, Any], key: str, max_len: int = MAX_NODE_ITEMS) -> dict[Any, Any]:
    v = args.get(key)
    if not isinstance(v, dict) or len(v) > max_len:
        raise _bad(f"'{key}' must be a map of at most {max_len} entries")
    return v


def is_int(v: Any) -> bool:
    """An int that is not a bool (msgpack gives both)."""
    return isinstance(v, int) and not isinstance(v, bool)



def replicated_messages(args: Mapping[str, Any]) -> list[StoredMessage]:
    """``replicate {messages: [[pubkey, namespace, hash, data, timestamp, expiry], …]}``."""
    return [message_from_wire(i) for i in arg_list(args, "messages")]


def ae_digest_args(args: Mapping[str, Any]) -> tuple[int, dict[str, str]]:
    """``ae_digest {swarm_id, digests: {pubkey: digest}}``."""
    swarm_id = _int(args, "swarm_id")
    digests = arg_map(args, "digests")
    if not all(is_pubkey(pk) and isinstance(d, str) and len(d) <= 128 for pk, d in digests.items()):
        raise _bad("'digests' must map account ids to digest strings")
    return swarm_id, digests


def ae_buckets_args(args: Mapping[str, Any]) -> dict[str, list[int]]:
    """``ae_hashes {buckets: {pubkey: [bucket, …]}}``; a bucket's times must fit in int64."""
    wanted = arg_map(args, "buckets")
    if not all(is_pubkey(pk) and isinstance(bs, list) and len(bs) <= MAX_NODE_ITEMS and all(
            is_int(b) and 0 <= b <= MAX_BUCKET for b in bs) for pk, bs in wanted.items()):
        raise _bad("'buckets' must map account ids to lists of bucket numbers")
    return wanted


# A peer's answers during anti-entropy are input too: a registered node that answers
# garbage must cost one round with it, never a TypeError in the node's own loop.


def bad_reply(op: str, what: str) -> RequestError:
    """502: a peer answered ``op`` with something that is not a valid answer."""
    return RequestError(Status.BAD_GATEWAY, f"peer's {op} answer: {what}")


def ae_digest_reply(body: Any) -> dict[str, dict[int, str]]:
    """A peer's ``ae_digest`` answer ``{"buckets": {pubkey: [[bucket, digest], …]}}`` as
    pubkey -> bucket -> digest (502 when malformed)."""
    buckets = body.get("buckets") if isinstance(body, dict) else None
    if not isinstance(buckets, dict):
        raise bad_reply("ae_digest", "'buckets' must be a map")
    out = {}
    for pk, pairs in buckets.items():
        if not (is_pubkey(pk) and isinstance(pairs, list) and all(
                isinstance(p, list) and len(p) == 2 and is_int(p[0]) and 0 <= p[0] <= MAX_BUCKET
                and isinstance(p[1], str) for p in pairs)):
            raise bad_reply("ae_digest", "'buckets' must map account ids to [[bucket, digest], …]")
        out[pk] = dict(pairs)
    return out


def ae_hashes_reply(body: Any) -> dict[str, list[str]]:
    """A peer's ``ae_hashes`` answer ``{"hashes": {pubkey: [hash, …]}}`` (502 when malformed)."""
    found = body.get("hashes") if isinstance(body, dict) else None
    if not (isinstance(found, dict) and all(
            is_pubkey(pk) and isinstance(hs, list) and all(isinstance(h, str) and 0 < len(h) <= 64 for h in hs)
            for pk, hs in found.items())):
        raise bad_reply("ae_hashes", "'hashes' must map account ids to lists of hashes")
    return found


def ae_fetch_reply(body: Any) -> list[StoredMessage]:
    """A peer's ``ae_fetch`` answer ``{"messages": [...]}``, each message checked as a replicated one."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(msgs, list):
        raise bad_reply("ae_fetch", "'messages' must be a list")
    try:
        return [message_from_wire(m) for m in msgs]
    except RequestError as exc:
        raise bad_reply("ae_fetch", str(exc)) from None


def loopback_address(value: Any, what: str) -> tuple[str, int]:
    """A ``[host, port]`` pair on 127.0.0.0/8 (admin ops never point a node elsewhere); the
    host an IPv4 literal in canonical form (no "127.1", no "127.0.0.01", no non-ASCII digits)."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and is_int(value[1]) and 0 <= value[1] <= 65535):
        raise _bad(f"{what} must be [host, port] with port in 0..65535")
    host = value[0]
    try:
        ip = ipaddress.IPv4Address(host) if host.isascii() else None
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback or str(ip) != host:
        raise _bad(f"{what}: host must be an address in 127.0.0.0/8")
    return host, value[1]


def listen_address(value: Any, what: str, own_host: str) -> tuple[str, int]:
    """Where an admin op may make a node listen: on 127.0.0.0/8 (:func:`loopback_address`), or
    on the node's own address (a cluster host's), never elsewhere."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == own_host and not own_host.startswith("127."):
        if not (is_int(value[1]) and 0 <= value[1] <= 65535):
            raise _bad(f"{what} must be [host, port] with port in 0..65535")
        return own_host, value[1]
    return loopback_address(value, what)


def wire_bytes(m: StoredMessage) -> int:
    """A generous estimate of a message's size on the wire: its data plus hash, pubkey and numbers."""
    return len(m.data) + 200


def batches(items: Iterable[T], size: Callable[[T], int], *, budget: int = WIRE_BUDGET_BYTES,
            max_count: int = BATCH_COUNT) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` within ``budget`` bytes (by ``size``) and ``max_count``
    items; an item too big for the budget travels alone."""
    batch: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if batch and (used + n > budget or len(batch) >= max_count):
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += n
    if batch:
        yield batch


def fitting(items: Iterable[T], size: Callable[[T], int], *, budget: int = WIRE_BUDGET_BYTES,
            max_count: int | None = None) -> list[T]:
    """The leading items that fit in one batch (see :func:`batches`; no count limit by
    default): what one reply or request carries, the rest waiting for the next."""
    return next(batches(items, size, budget=budget, max_count=max_count or 1 << 62), [])


def hash_list_bytes(entry: tuple[Any, Sized]) -> int:
    """Wire estimate of a (pubkey, [hash or bucket, ...]) entry."""
    return 80 + 50 * len(entry[1])


def message_to_wire(m: StoredMessage) -> list[Any]:
    return [m.pubkey, m.namespace, m.hash, m.data, m.timestamp, m.expiry]


def message_from_wire(item: Any) -> StoredMessage:
    """A replicated message ``[pubkey, namespace, hash, data, timestamp, expiry]``; its hash
    must be the hash of its content, its times fit in int64."""
    if not (isinstance(item, (list, tuple)) and len(item) == 6):
        raise _bad("each replicated message must be [pubkey, namespace, hash, data, timestamp, expiry]")
    pubkey, ns, h, data, ts, expiry = item
    pubkey = pubkey.lower() if isinstance(pubkey, str) else pubkey
    if not (is_pubkey(pubkey) and is_int(ns) and ns in NAMESPACE_RANGE and isinstance(h, str)
            and isinstance(data, bytes) and len(data) <= MAX_DATA_BYTES
            and is_int(ts) and 0 <= ts <= MAX_TIME_MS and is_int(expiry) and 1 <= expiry <= MAX_TIME_MS):
        raise _bad("malformed replicated message: [66-hex pubkey, int16 namespace, hash, data (bytes), "
                   "timestamp ms, expiry ms] with times in int64")
    if crypto.message_hash(pubkey, ns, data) != h:
        raise _bad("replicated message hash does not match its content")
    return StoredMessage(pubkey, ns, h, data, ts, expiry)


# --------------------------------------------------------------------------- rate limit


class TokenBucket:
    """Per-source request budget (oxen-storage-server: 600 burst, 300/s)."""

    def __init__(self, burst: int, per_second: float, max_sources: int = 10_000) -> None:
        self.burst = burst
        self.per_second = per_second
        self.max_sources = max_sources
        self._buckets: dict[Any, tuple[float, float]] = {}

    def allow(self, source: Any, now_s: float, cost: int = 1) -> bool:
        """Take ``cost`` tokens from ``source``'s bucket; False (nothing taken) if it has fewer."""
        tokens, last = self._buckets.get(source, (float(self.burst), now_s))
        tokens = min(float(self.burst), tokens + (now_s - last) * self.per_second)
        if tokens < cost:
            self._buckets[source] = (tokens, now_s)
            return False
        if len(self._buckets) >= self.max_sources and source not in self._buckets:
            # Forget full buckets first: they carry no information.
            full = [k for k, (t, l) in self._buckets.items() if t + (now_s - l) * self.per_second >= self.burst]
            for k in full:
                del self._buckets[k]
        self._buckets[source] = (tokens - cost, now_s)
        return True
