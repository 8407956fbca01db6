"""Scripted users: send to random others at a set rate through onion paths,
poll their swarms, and write a Jepsen-style history (one JSON line per event).

A workload only produces operations and records what happened; checkers in
``chaos.checkers`` judge the history.  History format: CHECKERS.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import msgpack
import trio

from testnet.base import crypto
from testnet.base.clock import wall_ms
from testnet.base.net import TCP, Network
from testnet.base.jsonl import read_jsonl

from .client import Client, ClientError, OutcomeUnknown

log = logging.getLogger("workload")

POLL_INTERVAL_S = 0.5
MAX_CONCURRENT_SENDS = 64
DEFAULT_TTL_MS = 24 * 3600 * 1000


def body_digest(plaintext: bytes) -> str:
    return hashlib.blake2b(plaintext, digest_size=16).hexdigest()


class HistoryWriter:
    """Appends history records as JSON lines, flushed per record (the harness may be killed)."""

    def __init__(self, path: str | os.PathLike[str], now_ms: Callable[[], int] = wall_ms) -> None:
        self.now_ms = now_ms
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")
        self.records = 0

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("t", self.now_ms())
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        self.records += 1

    def close(self) -> None:
        self._f.close()


read_history = read_jsonl  # a torn last line (kill -9) is skipped
@dataclass
class UserSpec:
    """One scripted user: identity, loopback host, and its dial table (ed hex -> address)."""

    name: str
    identity: crypto.Identity
    host: str | None
    dial: dict[str, tuple[str, int]] = field(default_factory=dict)
    link_opener: tuple[str, int] | None = None  # where to ask for a link's proxy (testnet: made on first use)


@dataclass
class WorkloadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    unknown: int = 0
    received: int = 0
    delete_requests: int = 0
    undelivered_at_end: int = 0
    duration_s: float = 0.0


class ScriptedUser:
    """A client plus inbox state: last hash per namespace, hashes seen."""

    def __init__(self, spec: UserSpec, client: Client, history: HistoryWriter, names_by_id: dict[str, str],
                 *, delete_fraction: float = 0.0, rng: random.Random | None = None, sim: bool = False) -> None:
        self.spec = spec
        self.sim = sim  # seal messages with the client's seeded randomness
        self.delete_fraction = delete_fraction
        self.rng = rng or random.Random()
        self.deletes = 0
        self.client = client
        self.history = history
        self.names_by_id = names_by_id
        # Storage order differs between swarm members (a node that caught up by
        # anti-entropy holds old messages after new ones), so a last hash only
        # means something to the node that gave it: keep one per (node,
        # namespace), as Session clients do.
        self.last_hash: dict[tuple[str, int], str] = {}
        self.seen: set[str] = set()
        self.received_ids: set[str] = set()

    async def poll(self, namespaces: Iterable[int]) -> int:
        """Retrieve new messages in every namespace; records each first-seen hash; then deletes
        ``delete_fraction`` of the new ones."""
        got = 0
        fresh: list[str] = []
        for ns in namespaces:
            more = True
            while more:
                try:
                    res = await self.client.retrieve(namespace=ns, last_hash_for=lambda node: self.last_hash.get((node, ns)),
                                                     now_ms=self.history.now_ms())
                except ClientError as exc:
                    self.history.write({"type": "fail", "op": "poll", "process": self.spec.name, "namespace": ns,
                                        "error": str(exc)[:200]})
                    return got
                msgs = res.body.get("messages") or []
                more = bool(res.body.get("more")) and bool(msgs)
                for m in msgs:
                    self.last_hash[(res.target, ns)] = m["hash"]
                    if m["hash"] in self.seen:
                        continue  # deduplicate by hash, as Session clients do
                    if not isinstance(m.get("data"), bytes) or \
                            crypto.message_hash(self.client.session_id, ns, m["data"]) != m["hash"]:
                        # Content that is not its hash's for this account (altered by a lying member,
                        # or another account's message): refused and not marked seen, so the true
                        # copy is taken from another member.
                        self.history.write({"type": "ok", "op": "receive", "process": self.spec.name,
                                            "hash": m["hash"], "namespace": ns, "msg_id": None, "sender": None,
                                            "body_digest": None, "error": "not its hash's", "rejected": True})
                        continue
                    self.seen.add(m["hash"])
                    got += 1
                    if self._record_receive(m, ns):
                        fresh.append(m["hash"])  # only what opened as a workload message to us
        doomed = [h for h in fresh if self.rng.random() < self.delete_fraction]
        if doomed:
            await self.delete(doomed)
        return got

    async def delete(self, hashes: list[str]) -> None:
        """Delete these (received) messages from the swarm; the outcome goes to the history."""
        self.deletes += 1
        base = {"op": "delete", "process": self.spec.name, "id": f"{self.spec.name}-del-{self.deletes}"}
        self.history.write({**base, "type": "invoke", "hashes": hashes})
        try:
            res = await self.client.delete(hashes)
        except OutcomeUnknown as exc:
            self.history.write({**base, "type": "info", "error": str(exc)[:200]})
            return
        except ClientError as exc:
            self.history.write({**base, "type": "fail", "error": str(exc)[:200]})
            return
        self.history.write({**base, "type": "ok", "deleted": len(res.body.get("deleted") or []),
                            "target": res.target})

    def _record_receive(self, m: dict[str, Any], ns: int) -> bool:
        """Record one received message; whether it opened as a workload message for this user."""
        rec: dict[str, Any] = {"type": "ok", "op": "receive", "process": self.spec.name, "hash": m["hash"],
                               "namespace": ns, "msg_id": None, "sender": None, "body_digest": None, "error": None}
        try:
            plaintext, sender = crypto.open_message(self.spec.identity, m["data"])
            rec["sender"] = sender
            rec["body_digest"] = body_digest(plaintext)
        except (crypto.CryptoError, ValueError, TypeError) as exc:
            rec["error"] = type(exc).__name__
            self.history.write(rec)
            return False
        try:
            body = msgpack.unpackb(plaintext, raw=False)
            rec["msg_id"] = body.get("id") if isinstance(body, dict) else None
        except (ValueError, TypeError, msgpack.UnpackException):
            pass
        if rec["msg_id"]:
            self.received_ids.add(rec["msg_id"])
        else:
            # Opened and signed for us, but not a workload message (e.g. `swarmnet send`).
            rec["foreign"] = True
        self.history.write(rec)
        return bool(rec["msg_id"])


def make_body(msg_id: str, sender: str, recipient: str, rng: random.Random, size: int) -> bytes:
    return msgpack.packb({"id": msg_id, "from": sender, "to": recipient, "pad": rng.randbytes(max(size, 0))},
                         use_bin_type=True)


async def send_one(user: ScriptedUser, recipient: ScriptedUser, msg_id: str, *, namespace: int, rng: random.Random,
                   body_bytes: int, ttl_ms: int, stats: WorkloadStats, acked: dict[str, str]) -> None:
    plaintext = make_body(msg_id, user.spec.name, recipient.spec.name, rng, body_bytes)
    blob = crypto.seal_message(user.spec.identity, recipient.spec.identity.session_id, plaintext,
                               user.client.randbytes if user.sim else None)
    h = user.history
    t0 = h.now_ms()
    h.write({"type": "invoke", "op": "send", "process": user.spec.name, "msg_id": msg_id, "from": user.spec.name,
             "to": recipient.spec.name, "namespace": namespace, "ttl_ms": ttl_ms,
             "body_digest": body_digest(plaintext), "hash": crypto.message_hash(recipient.spec.identity.session_id,
                                                                                 namespace, blob), "t": t0})
    stats.sent += 1
    base = {"op": "send", "process": user.spec.name, "msg_id": msg_id}
    try:
        res = await user.client.store(recipient.spec.identity.session_id, blob, namespace=namespace, ttl_ms=ttl_ms,
                                      now_ms=h.now_ms())
    except OutcomeUnknown as exc:
        stats.unknown += 1
        h.write({**base, "type": "info", "error": str(exc)[:200], "latency_ms": h.now_ms() - t0})
        return
    except ClientError as exc:
        stats.failed += 1
        h.write({**base, "type": "fail", "error": str(exc)[:200], "latency_ms": h.now_ms() - t0})
        return
    stats.ok += 1
    acked[msg_id] = recipient.spec.name
    h.write({**base, "type": "ok", "hash": res.body.get("hash"), "path": res.path, "target": res.target,
             "attempts": res.attempts, "latency_ms": h.now_ms() - t0,
             "swarm": {k[:16]: v.get("status") for k, v in (res.body.get("swarm") or {}).items()},
             "vouched": [k[:16] for k in res.vouched]})


async def run_workload(specs: Sequence[UserSpec], registry: tuple[str, int], history_path: str | os.PathLike[str], *,
                       messages: int | None = None, duration_s: float | None = None, rate: float = 20.0,
                       namespaces: Sequence[int] = (0,), seed: int = 0, body_bytes: int = 64,
                       ttl_ms: int = DEFAULT_TTL_MS, drain_s: float = 20.0, client_bugs: Iterable[str] = (),
                       delete_fraction: float = 0.0, poll_interval_s: float = POLL_INTERVAL_S,
                       senders: Sequence[str] | None = None, receivers: Sequence[str] | None = None,
                       on_progress: Any = None,
                       before_drain: Any = None, now_ms: Callable[[], int] = wall_ms, network: Network = TCP,
                       entropy: Callable[[str], crypto.RandBytes] | None = None) -> WorkloadStats:
    """Drive ``specs`` users: ``messages`` sends (or for ``duration_s``) at ``rate``/s overall.

    ``senders`` limits who sends, ``receivers`` who is sent to.  After the last send,
    users keep polling for up to ``drain_s`` until every acknowledged message
    has reached its recipient.  Each user checks its inbox every ``poll_interval_s``
    (±20 %): until then its new messages wait in its swarm.  Recipients delete ``delete_fraction`` of what they
    receive (Session's delete, signed, through onion paths).  ``before_drain`` (an async callable) runs
    between the last send and the drain, users still polling: a chaos run
    heals its faults and waits its quiet period there.

    Time (``now_ms``), the network and, with ``entropy`` (user name ->
    randbytes), every nonce and ephemeral key come from the caller: the
    simulation passes virtual and seeded ones; real runs keep the wall clock,
    TCP and libsodium's CSPRNG.
    """
    if len(specs) < 2:
        raise ValueError("a workload needs at least 2 users")
    if messages is None and duration_s is None:
        raise ValueError("give messages or duration_s")
    if rate <= 0:
        raise ValueError("rate must be > 0 messages/s")
    rng = random.Random(seed)
    history = HistoryWriter(history_path, now_ms)
    stats = WorkloadStats()
    acked: dict[str, str] = {}
    names_by_id = {s.identity.session_id: s.name for s in specs}
    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            users = {}
            for s in specs:
                client = Client(s.identity, name=s.name, host=s.host, nursery=nursery, registry=registry,
                                bugs=client_bugs, rng=random.Random(rng.random()), network=network,
                                link_opener=s.link_opener,
                                **({"randbytes": entropy(s.name)} if entropy else {}))
                client.directory.dial = dict(s.dial)
                await client.refresh_nodes()
                users[s.name] = ScriptedUser(s, client, history, names_by_id, delete_fraction=delete_fraction,
                                             rng=random.Random(f"{seed}-{s.name}-deletes"), sim=entropy is not None)
            sender_names = list(senders) if senders else list(users)
            receiver_names = list(receivers) if receivers else list(users)
            stop_polling = trio.Event()

            async def poller(u: ScriptedUser) -> None:
                while not stop_polling.is_set():
                    n = await u.poll(namespaces)
                    stats.received += n
                    with trio.move_on_after(poll_interval_s * rng.uniform(0.8, 1.2)):
                        await stop_polling.wait()

            async with trio.open_nursery() as pollers:
                for u in users.values():
                    pollers.start_soon(poller, u)
                limiter = trio.CapacityLimiter(MAX_CONCURRENT_SENDS)
                async with trio.open_nursery() as sends:
                    seq = 0
                    deadline = started + duration_s if duration_s is not None else math.inf
                    while (messages is None or seq < messages) and trio.current_time() < deadline:
                        sender = users[rng.choice(sender_names)]
                        recipient = users[rng.choice([n for n in receiver_names if n != sender.spec.name])]
                        seq += 1
                        msg_id = f"{sender.spec.name}-{seq}"
                        ns = rng.choice(list(namespaces))

                        async def one(sender=sender, recipient=recipient, msg_id=msg_id, ns=ns) -> None:
                            async with limiter:
                                await send_one(sender, recipient, msg_id, namespace=ns, rng=rng,
                                               body_bytes=body_bytes, ttl_ms=ttl_ms, stats=stats, acked=acked)

                        sends.start_soon(one)
                        if on_progress is not None:
                            on_progress(stats)
                        await trio.sleep(rng.expovariate(rate))
                if before_drain is not None:
                    await before_drain()
                # Drain: poll until every acknowledged message reached its recipient.
                with trio.move_on_after(drain_s):
                    while True:
                        missing = [m for m, r in acked.items() if m not in users[r].received_ids]
                        if not missing:
                            break
                        await trio.sleep(POLL_INTERVAL_S / 2)
                stop_polling.set()
            # Final poll so the history holds everything that arrived.
            for u in users.values():
                stats.received += await u.poll(namespaces)
            stats.undelivered_at_end = sum(1 for m, r in acked.items() if m not in users[r].received_ids)
            stats.delete_requests = sum(u.deletes for u in users.values())
            for u in users.values():
                await u.client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        stats.duration_s = trio.current_time() - started
        history.write({"type": "info", "op": "workload-end", "process": "workload", "stats": stats.__dict__})
        history.close()
    return stats
