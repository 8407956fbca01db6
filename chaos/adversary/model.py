"""The adversary's model, without the network: what it knows (accounts and
message hashes, the registry's view with past swarm assignments), how it
reads the run's history as it grows, the frames it sends, how much a reply
gave away, and its record (``adversary.jsonl``, format in CHECKERS.md).

No trio and no sockets here: ``chaos/adversary/attacks.py`` moves the bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import msgpack

from nodes.auth import Assignment
from testnet.base.clock import wall_ms
from testnet.base.jsonl import parse_lines
from testnet.base.protocol import HEADER
from testnet.registry import HISTORY_LENGTH
from testnet.base.swarm import swarm_for

__all__ = ["ADDRESS_BASE", "adversary_host", "planned_hosts", "wall_ms", "Knowledge", "HistoryTail", "NetView",
           "measure", "FRAMES", "FOLLOW_UP", "AttemptLog"]

# The adversary's addresses: 127.a.b.(16+h) in the run's block.  testnet/plan.py gives the
# block's first /24 to the run's own services (.1 controller, .2 registry, .3 Toxiproxy) and
# the other seven to nodes, users and proxies, so these cannot be anyone else's.
ADDRESS_BASE = 16
ADDRESSES = 16  # 127.a.b.16 .. 127.a.b.31
DELETE_WINDOW_S = 10.0  # how long after learning a hash the adversary keeps deleting it
MAX_PER_ACCOUNT = 200  # known hashes kept per account (newest)


def adversary_host(block: tuple[int, int], host: int) -> str:
    """The adversary's address number ``host`` (0-15) in the run's block."""
    if not 0 <= host < ADDRESSES:
        raise ValueError(f"the adversary has {ADDRESSES} addresses, not {host + 1}")
    a, b = block
    return f"127.{a}.{b}.{ADDRESS_BASE + host}"


def planned_hosts(plan: Any) -> set[str]:
    """Every address a network plan gives out (services, nodes, users, proxies)."""
    hosts = {plan.controller[0], plan.registry_host}
    if plan.toxiproxy:
        hosts.add(plan.toxiproxy[0])
    hosts.update(n.host for n in plan.nodes)
    hosts.update(u.host for u in plan.users)
    hosts.update(plan.proxy_hosts())
    return hosts


# --------------------------------------------------------------------------- what it knows (pure)


class Knowledge:
    """Accounts and the message hashes known for each, with when they were learned (s)."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)  # name -> Session ID
        self.names = {sid: name for name, sid in users.items()}
        self.hashes: dict[str, dict[str, float]] = {}
        self.buckets: dict[str, set[int]] = {}  # listed by a node: account -> buckets
        self.learned: Counter = Counter()  # source -> hashes
        self.mine: set[str] = set()  # hashes of messages it planted: it never deletes its own evidence

    def learn(self, pubkey: str, hashes: Iterable[str], now: float, source: str) -> None:
        known = self.hashes.setdefault(pubkey, {})
        for h in hashes:
            if isinstance(h, str) and h not in known and h not in self.mine:
                known[h] = now
                self.learned[source] += 1
        while len(known) > MAX_PER_ACCOUNT:
            del known[next(iter(known))]

    def learn_history(self, records: Iterable[Mapping[str, Any]], now: float) -> None:
        """Send invokes name the recipient and the message hash before the store is even made."""
        for r in records:
            if r.get("op") == "send" and r.get("type") == "invoke" and r.get("to") in self.users:
                self.learn(self.users[r["to"]], [r.get("hash")], now, "history")

    def recent(self, pubkey: str, now: float, window_s: float = DELETE_WINDOW_S) -> list[str]:
        return [h for h, t in self.hashes.get(pubkey, {}).items() if now - t <= window_s]

    def latest(self, pubkey: str, n: int = 20) -> list[str]:
        return list(self.hashes.get(pubkey, {}))[-n:]

    def accounts(self) -> list[str]:
        return sorted(set(self.hashes) | set(self.buckets))

    def name(self, pubkey: str) -> str:
        return self.names.get(pubkey) or f"listed:{pubkey[:10]}"


class HistoryTail:
    """New complete lines of a JSONL file since the last call (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self, limit: int = 1 << 20) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(limit)
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return parse_lines(lines)


@dataclass(frozen=True)
class NetView:
    """The registry's answer: every node's address and swarm, and past assignments."""

    nodes: Mapping[str, tuple[str, int, int]]  # ed25519 hex -> (host, port, swarm id)
    past: tuple[Assignment, ...] = ()

    @classmethod
    def from_registry(cls, body: Mapping[str, Any]) -> NetView:
        nodes = {n["ed25519_public"]: (str(n["host"]), int(n["port"]), int(n["swarm_id"]))
                 for n in body.get("nodes") or () if n.get("swarm_id") is not None}
        past = []
        for a in body.get("history") or ():
            try:  # nodes without a swarm yet are left out (the assignment still counts)
                if "differ" in a:  # the differences from this list (PROTOCOL.md)
                    then: dict[Any, Any] = {k: s for k, (_, _, s) in nodes.items()}
                    then.update(a["differ"])
                else:
                    then = a["swarms"]
                past.append(Assignment(int(a["height"]), {str(k): int(v) for k, v in then.items() if v is not None}))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return cls(nodes, tuple(past))

    @cached_property
    def swarm_ids(self) -> list[int]:
        return sorted({s for _, _, s in self.nodes.values()})

    def members(self, swarm_id: int) -> list[str]:
        return sorted(ed for ed, (_, _, s) in self.nodes.items() if s == swarm_id)

    def swarm_of(self, pubkey: str) -> int | None:
        return swarm_for(pubkey, self.swarm_ids) if self.swarm_ids else None

    def may_rehome(self, node: str, pubkey: str) -> bool:
        """Whether a node might count ``node`` as a recent member of ``pubkey``'s swarm (PROTOCOL.md:
        ``replicate`` accepts a node rehoming a swarm it left).  When the registry's history may be cut
        short, it might."""
        if len(self.past) >= HISTORY_LENGTH:
            return True
        return any(a.may_hold(node, pubkey) for a in self.past)


def measure(op: str, status: int | None, body: Any) -> tuple[int, int]:
    """(exposed, effect) of a reply: how much it handed the caller (messages, hashes, accounts
    listed) and how much it says it did (deleted, updated, stored)."""
    if status != 200 or not isinstance(body, dict):
        return 0, 0
    exposed = effect = 0
    if op in ("retrieve", "ae_fetch"):
        exposed = len(body.get("messages") or ())
    elif op == "ae_hashes":
        exposed = sum(len(v) for v in (body.get("hashes") or {}).values() if isinstance(v, list))
    elif op == "ae_digest":
        exposed = len(body.get("buckets") or {})
    for key in ("deleted", "updated", "stored"):
        v = body.get(key)
        effect += len(v) if isinstance(v, list) else v if isinstance(v, int) and not isinstance(v, bool) else 0
    if op == "store" and body.get("hash"):
        effect = 1
    return exposed, effect


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _ext_frame() -> bytes:
    return _frame({"id": 7, "op": "info", "args": {"x": msgpack.ExtType(5, b"abc")}})


# (variant, bytes sent, whether we then close our side, status wanted: None = closed without an answer)
FRAMES: tuple[tuple[str, bytes, bool, int | None], ...] = (
    ("oversized", HEADER.pack(2 << 20), False, 413),
    ("oversized-4GiB", HEADER.pack(0xFFFFFFFF), False, 413),
    ("not-msgpack", HEADER.pack(14) + b"\xc1\xc1 not msgpack", False, 400),
    ("not-a-map", _frame([1, 2, 3]), False, 400),
    ("negative-id", _frame({"id": -1, "op": "info", "args": {}}), False, 400),
    ("string-id", _frame({"id": "7", "op": "info", "args": {}}), False, 400),
    ("op-too-long", _frame({"id": 7, "op": "x" * 65, "args": {}}), False, 400),
    ("args-not-a-map", _frame({"id": 7, "op": "info", "args": [1]}), False, 400),
    ("ext-type", _ext_frame(), False, 400),
    # testnet/base/rpc.py answers 400 ("stream ended inside a frame"), then closes.
    ("truncated", HEADER.pack(100) + b"\x83\xa2id\x07", True, 400),
)
FOLLOW_UP = _frame({"id": 99, "op": "info", "args": {}})  # does the connection go on after a bad frame?


# --------------------------------------------------------------------------- the record


class AttemptLog:
    """adversary.jsonl: one line per attempt, flushed per line; counts what it wrote."""

    def __init__(self, path: Path, fault_id: int, max_attempts: int, now_ms: Callable[[], int] = wall_ms) -> None:
        self._f = open(path, "a", encoding="utf-8")
        self._now_ms = now_ms
        self.fault_id = fault_id
        self.max_attempts = max_attempts
        self.tally: Counter = Counter()

    @property
    def exhausted(self) -> bool:
        return self.tally["attempts"] + self.tally["flood_waves"] >= self.max_attempts

    def write(self, rec: dict[str, Any]) -> None:
        if self._f.closed:
            return
        rec = {"t": self._now_ms(), "fault": self.fault_id, **rec}
        self._f.write(json.dumps(rec, separators=(",", ":"), default=str) + "\n")
        self._f.flush()
        if rec.get("op") in ("error", "skipped"):
            self.tally[rec["op"]] += 1
            return
        if rec.get("expect") == "serve":
            self.tally["flood_waves"] += 1
            return
        if rec.get("expect") == "lie":  # what a hostile member says it did (nodes/hostile.py)
            self.tally["lies"] += sum(v for v in (rec.get("acts") or {}).values() if isinstance(v, int))
            return
        self.tally["attempts"] += 1
        self.tally[f"attack:{rec.get('attack')}"] += 1
        if rec.get("expect") == "refuse":
            self.tally["accepted" if rec.get("status") == 200 else "refused"] += 1
        if rec.get("expect") == "withhold" and rec.get("exposed"):
            self.tally["leaked"] += 1

    def close(self) -> None:
        self._f.close()
