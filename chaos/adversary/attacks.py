"""The adversary: a byzantine nemesis that uses the network as an attacker would.

While its fault is active it runs attack loops in its own nursery and records
every attempt, with what the node answered, in ``adversary.jsonl`` (format:
CHECKERS.md); leaving the fault cancels them and closes every connection they
opened.  Like every nemesis it only injects: the authority checker judges the
record.  Attacks (``params.attacks``, chaos.scenario.ADVERSARY_ATTACKS):

* ``stranger`` — node ops with no node authentication, for real users'
  accounts: list (``ae_digest``, ``ae_hashes``), read (``ae_fetch``), delete
  (``replicate_delete``, every member of every swarm, every round, for each
  message it knows of), expire, and plant messages (``replicate``, also with a
  hash that is not the content's); handshakes that must fail (no challenge,
  an unregistered key, a registered node's key signed by another, a captured
  signature replayed on another connection); registry writes (register an
  unstaked key, deregister a real node, stake without the token);
* ``signatures`` — retrieve, delete and expire of users' accounts signed by
  the adversary's own key (claiming the victim's account, the victim's ed25519
  key or another user's), a stale retrieve, and valid signatures replayed
  with other arguments;
* ``abuse`` — stores outside the rules (TTL too long or short, timestamps an
  hour or a day off, data over 76,800 bytes);
* ``frames`` — announced lengths over 1 MiB, bodies that are not valid
  requests, a frame cut short;
* ``flood`` — waves of idle and mid-frame-stalled connections at one node at a
  time, while a probe checks the node still answers someone else;
* ``liar`` — a registered node (its key stolen from the harness) acting for a
  swarm it is not in: deletes, expiries, listings and fetches of that swarm's
  accounts, and pushes into a synthetic account of it.

What it knows: every node's address and swarm from the public registry;
every message's hash as it is sent, by tailing the run's ``history.jsonl``
(an omniscient attacker: the strongest case for the checkers); nothing of a
user's keys.  It attacks the nodes' real listening addresses (the registry's),
never through the harness's link proxies, from its own loopback addresses,
``127.a.b.16``-``31`` in the run's block (beside the run's controller,
registry and Toxiproxy; checked against every planned address), so parallel
runs stay apart and users' rate limits are untouched.
Every network wait has a deadline; attempts are capped by ``max_attempts``.
What it knows and records, without the network: ``chaos/adversary/model.py``.
"""

from __future__ import annotations

import math
import random
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

import trio

from nodes.auth import auth_args, auth_message, authenticate
from nodes.storage import AE_BUCKET_MS
from testnet.base import crypto
from testnet.base.net import TCP
from testnet.plan import derive_seed
from testnet.base.protocol import Response
from testnet.registry import deregister_args, deregister_message, register_args
from testnet.base.rpc import ConnectionPool, RpcError, call_once, open_rpc

from chaos.adversary.model import (FRAMES, AttemptLog, HistoryTail, Knowledge, NetView, adversary_host, measure,
                              planned_hosts, wall_ms)
from chaos.adversary.raw import flood, send_frame
from chaos.checkers.authority import ADVERSARY_FILE
from chaos.run.nemesis import HEAL_TIMEOUT_S, NemesisError, register
from chaos.scenario import ScenarioError, check_adversary_params
from chaos.schedule import Fault

__all__ = ["Adversary", "adversary_fault"]

HOST_STRANGER, HOST_LIAR, HOST_FRAMES, HOST_PROBE = 0, 1, 2, 3
HOSTS_FLOOD = (8, 9, 10, 11)  # a flood spreads over these (a per-address cap meets each)
CALL_TIMEOUT_S = 2.0
REFRESH_S = 3.0  # how often the registry is asked again
LISTING_WINDOW_MS = 60_000  # buckets asked for: the last minute's
# A plausible life (a day): a planted copy must be stopped by authority, not by the
# expiry bound replicate now applies (which stops a 30-day plant whoever sends it).
JUNK_EXPIRY_MS = 24 * 3600 * 1000
FAKE_HASH = "A" * 43

# --------------------------------------------------------------------------- the attacker


class Adversary:
    """One adversary fault's attacker: its knowledge, its connections (a pool in the fault's
    nursery) and its record.  :meth:`start` launches one loop per attack; :meth:`close`
    (after the nursery is done) closes what is left and undoes a registration."""

    def __init__(self, net: Any, fault: Fault, params: Mapping[str, Any]) -> None:
        self.net = net
        self.fault = fault
        self.p = params
        plan = net.plan
        # The run's network and clock: real ones, or the simulation's.
        self.network = getattr(net, "network", TCP)
        self.now_ms: Callable[[], int] = getattr(net, "now_ms", wall_ms)
        self.host = {k: adversary_host(plan.block, h) for k, h in
                     (("stranger", HOST_STRANGER), ("liar", HOST_LIAR), ("frames", HOST_FRAMES), ("probe", HOST_PROBE))}
        self.flood_hosts = [adversary_host(plan.block, h) for h in HOSTS_FLOOD]
        clash = ({*self.host.values(), *self.flood_hosts}) & planned_hosts(plan)
        if clash:
            raise NemesisError(f"the adversary's addresses {sorted(clash)} are the network's own")
        self.rng = random.Random(f"{plan.seed}/adversary/{fault.id}")
        self.me = crypto.Identity.from_seed(derive_seed(plan.seed, "adversary", "mallory"))
        self.users = {u.name: net.user_identity(u.name) for u in plan.users}
        self.know = Knowledge({n: i.session_id for n, i in self.users.items()})
        self.tail = HistoryTail(Path(net.run_dir) / "history.jsonl")
        self.log = AttemptLog(Path(net.run_dir) / ADVERSARY_FILE, fault.id, int(params["max_attempts"]), self.now_ms)
        self.view: NetView | None = None
        self._view_at = -math.inf
        self._refresh_lock = trio.Lock()
        self.pool: ConnectionPool | None = None
        self.registered = False  # set if the registry ever took our key: undone on exit
        self._noted: set[str] = set()

    # ---------------------------------------------------------------- plumbing

    def describe(self) -> dict[str, Any]:
        return {"attacks": list(self.p["attacks"]), "source": self.host["stranger"], "log": ADVERSARY_FILE}

    def summary(self) -> dict[str, Any]:
        t = self.log.tally
        return {"attempts": t["attempts"], "refused": t["refused"], "accepted": t["accepted"], "leaked": t["leaked"],
                "flood_waves": t["flood_waves"], "errors": t["error"], "learned": dict(self.know.learned)}

    def node_name(self, ed: str) -> str:
        for name, rt in self.net.nodes.items():
            if rt.plan.ed25519_public == ed:
                return name
        return ed[:12]

    def node_identity(self, ed: str) -> crypto.Identity | None:
        for rt in self.net.nodes.values():
            if rt.plan.ed25519_public == ed:
                return rt.plan.identity
        return None

    def _resolve(self, key: Any) -> tuple[str, int, str | None]:
        if key[0] == "registry":
            host, port = self.net.registry_address
            return host, port, self.host["stranger"]
        rec = self.view.nodes.get(key[-1]) if self.view else None
        if rec is None:
            raise RpcError(f"no address for node {key[-1][:12]}")
        return rec[0], rec[1], self.host["liar" if key[0] == "liar" else "stranger"]

    async def _on_connect(self, key: Any, conn: Any, timeout: float) -> None:
        if key[0] == "liar":  # a registered node's own handshake, with its stolen key
            await authenticate(conn, self.node_identity(key[1]), key[2], timeout=timeout)

    async def refresh(self) -> NetView | None:
        now = trio.current_time()
        self.know.learn_history(self.tail.read_new(), now)
        if now - self._view_at < REFRESH_S:
            return self.view
        async with self._refresh_lock:
            if trio.current_time() - self._view_at >= REFRESH_S:
                try:
                    resp = await self.pool.call(("registry",), "get_service_nodes", {"history": True},
                                                timeout=CALL_TIMEOUT_S)
                    if resp.ok:
                        self.view = NetView.from_registry(resp.body)
                        self._view_at = trio.current_time()
                except RpcError:
                    await self.pool.drop(("registry",))
        return self.view

    def note(self, attack: str, why: str) -> None:
        """Record once that an attack could not be made (e.g. the liar needs two swarms)."""
        if why not in self._noted:
            self._noted.add(why)
            self.log.write({"attack": attack, "op": "skipped", "why": why})

    async def attempt(self, key: Any, op: str, args: dict[str, Any], *, attack: str, expect: str = "refuse",
                      want: int | None = None, victim: str | None = None, variant: str | None = None,
                      planted: Iterable[str] = ()) -> Response | None:
        """One call over the pool, recorded; the response, or None when there was none."""
        if self.log.exhausted:
            return None
        resp, error = None, None
        try:
            resp = await self.pool.call(key, op, args, timeout=CALL_TIMEOUT_S)
        except RpcError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            await self.pool.drop(key)
        self._record(attack, op, key[-1], resp, error, expect=expect, want=want, victim=victim, variant=variant,
                     planted=planted, as_=self.node_name(key[1]) if key[0] == "liar" else "stranger")
        return resp

    def _record(self, attack: str, op: str, node: str, resp: Response | None, error: str | None, *, expect: str,
                want: int | None, victim: str | None, variant: str | None, planted: Iterable[str] = (),
                as_: str = "stranger", **extra: Any) -> None:
        status = resp.status if resp is not None else None
        exposed, effect = measure(op, status, resp.body if resp is not None else None)
        rec = {"attack": attack, "op": op, "variant": variant, "node": node if node == "registry" else
               self.node_name(node), "as": as_, "victim": victim, "expect": expect, "want": want, "status": status,
               "exposed": exposed, "effect": effect, **extra}
        if error:
            rec["error"] = error
        planted = list(planted)
        if planted:
            rec["planted"] = planted
        self.log.write(rec)

    def junk(self, pubkey: str) -> tuple[list[Any], str]:
        """A message for ``pubkey`` nobody sent: its wire form (replicate) and hash."""
        data = b"adversary junk " + self.rng.randbytes(32)
        now = self.now_ms()
        h = crypto.message_hash(pubkey, 0, data)
        self.know.mine.add(h)
        return [pubkey, 0, h, data, now, now + JUNK_EXPIRY_MS], h

    def buckets(self, pubkey: str) -> list[int]:
        now = self.now_ms()
        recent = range((now - LISTING_WINDOW_MS) // AE_BUCKET_MS, now // AE_BUCKET_MS + 1)
        return sorted(set(recent) | self.know.buckets.get(pubkey, set()))[-100:]

    def accounts_in(self, view: NetView, swarm_id: int) -> list[str]:
        return [pk for pk in sorted(set(self.know.accounts()) | set(self.know.names))
                if view.swarm_of(pk) == swarm_id]

    # ---------------------------------------------------------------- loops

    def start(self, nursery: trio.Nursery) -> None:
        self.pool = ConnectionPool(nursery, self._resolve, connect_timeout=CALL_TIMEOUT_S,
                                   on_connect=self._on_connect, network=self.network)
        rounds = {"stranger": (self._stranger, 1.0), "signatures": (self._signatures, 2.0),
                  "abuse": (self._abuse, 3.0), "frames": (self._frames, 3.0), "liar": (self._liar, 1.5)}
        for attack in self.p["attacks"]:
            if attack == "flood":
                nursery.start_soon(self._guard, attack, self._flood_loop)
            else:
                fn, pace = rounds[attack]
                nursery.start_soon(self._guard, attack, partial(self._rounds, fn, pace))

    async def _guard(self, attack: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception as exc:  # a broken attack is recorded; it must not end the run
            self.log.write({"attack": attack, "op": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})

    async def _rounds(self, fn: Callable[[NetView, int], Awaitable[None]], pace: float) -> None:
        r = 0
        while not self.log.exhausted:
            view = await self.refresh()
            if view is not None and view.nodes:
                await fn(view, r)
                r += 1
            await trio.sleep(self.p["interval_s"] * pace)
        self.note("all", f"max_attempts ({self.p['max_attempts']}) reached: attacks stopped")

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        if self.registered:  # a nemesis heals: take back a registration that should never have happened
            host, port = self.net.registry_address
            try:
                await call_once(host, port, "deregister", deregister_args(self.me, self.now_ms()),
                                timeout=CALL_TIMEOUT_S, local_host=self.host["stranger"], network=self.network)
            except RpcError:
                pass
        self.log.close()

    # ---------------------------------------------------------------- stranger

    STRANGER_OPS = ("ae_digest", "ae_hashes", "ae_fetch", "replicate_expire", "replicate", "replicate-bad-hash")

    async def _stranger(self, view: NetView, r: int) -> None:
        now = trio.current_time()
        async with trio.open_nursery() as n:
            for sid in view.swarm_ids:
                members = view.members(sid)
                items = [[pk, hs] for pk in self.accounts_in(view, sid) if (hs := self.know.recent(pk, now))]
                victims = ",".join(self.know.name(pk) for pk, _ in items)
                for m in members if items else ():
                    n.start_soon(partial(self.attempt, ("stranger", m), "replicate_delete", {"messages": items},
                                         attack="stranger", want=401, victim=victims))
                op = self.STRANGER_OPS[(r + sid) % len(self.STRANGER_OPS)]
                n.start_soon(self._stranger_other, view, sid, members[r % len(members)], op)
        if r % 10 == 0:
            await self._handshakes(view, r)
        if r % 20 == 5:
            await self._registry(view)

    async def _stranger_other(self, view: NetView, sid: int, node: str, op: str) -> None:
        key = ("stranger", node)
        accounts = self.accounts_in(view, sid)
        users = [pk for pk in accounts if pk in self.know.names]
        if op == "ae_digest":
            resp = await self.attempt(key, op, {"swarm_id": sid, "digests": {}}, attack="stranger", want=401,
                                      victim=f"swarm {sid}")
            if resp is not None and resp.ok:  # listed: remember accounts and buckets for ae_hashes
                for pk, pairs in (resp.body.get("buckets") or {}).items():
                    self.know.buckets.setdefault(pk, set()).update(b for b, _ in pairs)
        elif op == "ae_hashes" and accounts:
            resp = await self.attempt(key, op, {"buckets": {pk: self.buckets(pk) for pk in accounts[:50]}},
                                      attack="stranger", want=401, victim=",".join(map(self.know.name, accounts)))
            if resp is not None and resp.ok:
                now = trio.current_time()
                for pk, hs in (resp.body.get("hashes") or {}).items():
                    self.know.learn(pk, hs, now, "listed")
        elif op == "ae_fetch":
            hs = [h for pk in accounts for h in self.know.latest(pk, 20)][:100]
            if hs:
                await self.attempt(key, op, {"hashes": hs}, attack="stranger", want=401,
                                   victim=",".join(map(self.know.name, accounts)))
        elif op == "replicate_expire":
            items = [[pk, hs, 1] for pk in accounts if (hs := self.know.latest(pk, 20))]
            if items:
                await self.attempt(key, op, {"messages": items}, attack="stranger", want=401,
                                   victim=",".join(self.know.name(pk) for pk, _, _ in items))
        elif op in ("replicate", "replicate-bad-hash") and users:
            pk = self.rng.choice(users)
            msg, h = self.junk(pk)
            planted = [h]
            if op == "replicate-bad-hash":
                msg[2] = crypto.message_hash(pk, 0, b"what the hash claims")
                planted.append(msg[2])
                self.know.mine.add(msg[2])
            await self.attempt(key, "replicate", {"messages": [msg]}, attack="stranger", want=401,
                               victim=self.know.name(pk), variant=op, planted=planted)

    async def _handshakes(self, view: NetView, r: int) -> None:
        """node_auth attempts that must fail, each on a fresh connection; then a node op on it."""
        target = sorted(view.nodes)[r % len(view.nodes)]
        host, port, _ = view.nodes[target]
        other = next((ed for ed in sorted(view.nodes) if ed != target and self.node_identity(ed)), None)
        me = self.me.ed25519_public.hex()
        for variant in ("no-challenge", "unregistered-key", "claimed-key", "replayed-challenge"):
            if variant in ("claimed-key", "replayed-challenge") and other is None:
                continue
            resp, error, follow = None, None, None
            try:
                with trio.move_on_after(3 * CALL_TIMEOUT_S):
                    async with open_rpc(host, port, local_host=self.host["stranger"], timeout=CALL_TIMEOUT_S,
                                        network=self.network) as c:
                        if variant == "no-challenge":
                            args = {"ed25519_public": me,
                                    "signature": self.me.sign(auth_message(me, target, bytes(32)))}
                        else:
                            hi = await c.call("node_hello", {}, timeout=CALL_TIMEOUT_S)
                            challenge = hi.body.get("challenge") if hi.ok and isinstance(hi.body, dict) else bytes(32)
                            if variant == "unregistered-key":
                                args = auth_args(self.me, target, challenge)
                            elif variant == "claimed-key":
                                args = {"ed25519_public": other,
                                        "signature": self.me.sign(auth_message(other, target, challenge))}
                            else:  # a registered node's signature captured from another connection
                                args = auth_args(self.node_identity(other), target, bytes(32))
                        resp = await c.call("node_auth", args, timeout=CALL_TIMEOUT_S)
                        follow = await c.call("ae_digest", {"swarm_id": view.nodes[target][2], "digests": {}},
                                              timeout=CALL_TIMEOUT_S)
            except RpcError as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            claims = self.node_name(other) if variant in ("claimed-key", "replayed-challenge") else "stranger"
            self._record("stranger", "node_auth", target, resp, error, expect="refuse", want=401, victim=None,
                         variant=variant, as_=claims)
            if follow is not None:
                self._record("stranger", "ae_digest", target, follow, None, expect="refuse", want=401,
                             victim=f"swarm {view.nodes[target][2]}", variant=f"after-{variant}")

    async def _registry(self, view: NetView) -> None:
        """Registry writes without authority: an unstaked key, a forged deregister, a stake without the token."""
        now = self.now_ms()
        real = sorted(view.nodes)[0]
        forged = {"ed25519_public": real, "timestamp": now, "signature": self.me.sign(deregister_message(real, now))}
        for op, args, want, variant in (
                ("register", register_args(self.me, self.host["stranger"], 9, now), 403, "unstaked-key"),
                ("deregister", forged, 401, "forged-signature"),
                ("stake", {"token": "0" * 32, "ed25519_public": self.me.ed25519_public.hex()}, 401, "no-token")):
            resp = await self.attempt(("registry",), op, args, attack="stranger", want=want, variant=variant,
                                      victim=self.node_name(real) if op == "deregister" else None)
            if op == "register" and resp is not None and resp.ok:
                self.registered = True

    # ---------------------------------------------------------------- signatures

    SIGNED = ("retrieve/forged-key", "retrieve/victim-key", "retrieve/other-user-key", "retrieve/stale",
              "retrieve/replayed-namespace", "delete/forged-key", "delete/victim-key", "delete/replayed-hashes",
              "expire/forged-key", "expire/victim-key", "expire/replayed-expiry")

    async def _signatures(self, view: NetView, r: int) -> None:
        op, variant = self.SIGNED[r % len(self.SIGNED)].split("/")
        names = sorted(self.users)
        name = names[(r // len(self.SIGNED)) % len(names)]
        victim = self.users[name]
        other = self.users[names[(names.index(name) + 1) % len(names)]]
        own = variant in ("stale", "replayed-namespace", "replayed-hashes", "replayed-expiry")
        pubkey = self.me.session_id if own else victim.session_id
        sid = view.swarm_of(pubkey)
        members = view.members(sid) if sid is not None else []
        if not members:
            return
        node = self.rng.choice(members)
        me_ed = self.me.ed25519_public.hex()
        claimed = {"forged-key": me_ed, "victim-key": victim.ed25519_public.hex(),
                   "other-user-key": other.ed25519_public.hex()}.get(variant, me_ed)
        now = self.now_ms()
        hs = self.know.latest(victim.session_id, 20) or [FAKE_HASH]
        want = 401
        if op == "retrieve":
            ts = now - 5 * 60_000 if variant == "stale" else now
            sig = self.me.sign(crypto.retrieve_signature_message(0, ts))  # a valid one only for our own account
            args = {"pubkey": pubkey, "namespace": 1 if variant == "replayed-namespace" else 0, "last_hash": "",
                    "timestamp": ts, "pubkey_ed25519": claimed, "signature": sig}
            want = 406 if variant == "stale" else 401
        elif op == "delete":
            signed = [FAKE_HASH] if variant == "replayed-hashes" else hs
            args = {"pubkey": pubkey, "hashes": hs, "pubkey_ed25519": claimed,
                    "signature": self.me.sign(crypto.delete_signature_message(signed))}
        else:
            expiry = now + 11_000
            signed_expiry = expiry + 60_000 if variant == "replayed-expiry" else expiry
            args = {"pubkey": pubkey, "hashes": hs, "expiry": expiry, "pubkey_ed25519": claimed,
                    "signature": self.me.sign(crypto.expire_signature_message(signed_expiry, hs))}
        await self.attempt(("stranger", node), op, args, attack="signatures", want=want, variant=variant,
                           victim="self" if own else name)

    # ---------------------------------------------------------------- abuse

    STORES = (("ttl-too-long", 15 * 24 * 3600 * 1000, 0, 64, 400), ("ttl-too-short", 5_000, 0, 64, 400),
              ("timestamp-hour-ago", 3600_000, -3600_000, 64, 406),
              ("timestamp-day-ahead", 3600_000, 24 * 3600_000, 64, 406),
              ("data-too-large", 3600_000, 0, 80_000, 413))

    async def _abuse(self, view: NetView, r: int) -> None:
        variant, ttl, skew, size, want = self.STORES[r % len(self.STORES)]
        names = sorted(self.users)
        name = names[(r // len(self.STORES)) % len(names)]
        pubkey = self.users[name].session_id
        members = view.members(view.swarm_of(pubkey))
        data = self.rng.randbytes(size)
        self.know.mine.add(crypto.message_hash(pubkey, 0, data))
        await self.attempt(("stranger", self.rng.choice(members)), "store",
                           {"pubkey": pubkey, "namespace": 0, "data": data, "ttl": ttl,
                            "timestamp": self.now_ms() + skew},
                           attack="abuse", want=want, variant=variant, victim=name,
                           planted=[crypto.message_hash(pubkey, 0, data)])

    # ---------------------------------------------------------------- frames

    async def _frames(self, view: NetView, r: int) -> None:
        variant, data, eof, want = FRAMES[r % len(FRAMES)]
        nodes = sorted(view.nodes)
        target = nodes[(r // len(FRAMES)) % len(nodes)]
        host, port, _ = view.nodes[target]
        out = await send_frame(self.network, host, port, self.host["frames"], data, eof=eof, timeout_s=CALL_TIMEOUT_S)
        self.log.write({"attack": "frames", "op": "frame", "variant": variant, "node": self.node_name(target),
                        "as": "stranger", "victim": None, "expect": "refuse", "want": want, "exposed": 0, "effect": 0,
                        **out})

    # ---------------------------------------------------------------- flood

    async def _flood_loop(self) -> None:
        r = 0
        while not self.log.exhausted:
            view = await self.refresh()
            if view is not None and view.nodes:
                await self._flood_wave(view, r)
                r += 1
            await trio.sleep(1.0)
        self.note("all", f"max_attempts ({self.p['max_attempts']}) reached: attacks stopped")

    async def _flood_wave(self, view: NetView, r: int) -> None:
        """One wave at one node, from several addresses or (every other wave) from one, so that
        a per-address connection cap meets it."""
        target = sorted(view.nodes)[r % len(view.nodes)]
        host, port, _ = view.nodes[target]
        sources = self.flood_hosts if r % 2 == 0 else self.flood_hosts[:1]
        out = await flood(self.network, host, port, sources, self.host["probe"],
                          connections=int(self.p["flood_connections"]), hold_s=float(self.p["flood_hold_s"]),
                          timeout_s=CALL_TIMEOUT_S)
        self.log.write({"attack": "flood", "op": "flood", "node": self.node_name(target), "as": "stranger",
                        "expect": "serve", **out})

    # ---------------------------------------------------------------- liar

    LIAR_OPS = ("replicate_delete", "replicate_expire", "ae_digest", "ae_hashes", "ae_fetch", "replicate")

    def synthetic_account(self, view: NetView, swarm_id: int, liar: str) -> tuple[str, bool]:
        """A made-up account of ``swarm_id``, preferably one the liar was never a member for
        (so the rehoming rule cannot let its push through); and whether it might."""
        fallback = None
        for _ in range(256):
            pk = "05" + self.rng.randbytes(32).hex()
            if view.swarm_of(pk) != swarm_id:
                continue
            if not view.may_rehome(liar, pk):
                return pk, False
            fallback = fallback or pk
        return fallback or "05" + "00" * 32, True

    async def _liar(self, view: NetView, r: int) -> None:
        if len(view.swarm_ids) < 2:
            self.note("liar", "one swarm only: no node is outside an account's swarm")
            return
        liars = [ed for ed in sorted(view.nodes) if self.node_identity(ed) is not None]
        if not liars:
            return
        liar = self.rng.choice(liars)
        theirs = self.rng.choice([s for s in view.swarm_ids if s != view.nodes[liar][2]])
        target = self.rng.choice(view.members(theirs))
        key = ("liar", liar, target)
        users = [pk for pk in self.accounts_in(view, theirs) if pk in self.know.names]
        known = [pk for pk in users if self.know.latest(pk)]
        pk = self.rng.choice(known or users) if users else self.synthetic_account(view, theirs, liar)[0]
        victim = self.know.name(pk) if pk in self.know.names else "synthetic"
        hs = self.know.latest(pk, 20) or [FAKE_HASH]
        op = self.LIAR_OPS[r % len(self.LIAR_OPS)]
        if op == "replicate_delete":
            await self.attempt(key, op, {"messages": [[pk, hs]]}, attack="liar", want=403, victim=victim)
        elif op == "replicate_expire":
            await self.attempt(key, op, {"messages": [[pk, hs, 1]]}, attack="liar", want=403, victim=victim)
        elif op == "ae_digest":
            await self.attempt(key, op, {"swarm_id": theirs, "digests": {}}, attack="liar", want=403,
                               victim=f"swarm {theirs}")
        elif op == "ae_hashes":
            await self.attempt(key, op, {"buckets": {pk: self.buckets(pk)}}, attack="liar", want=403, victim=victim)
        elif op == "ae_fetch":
            real = [h for h in hs if h != FAKE_HASH]
            if real:  # the reply must leave out every message of an account the liar may not hold
                await self.attempt(key, op, {"hashes": real}, attack="liar", expect="withhold", want=200,
                                   victim=victim)
        else:
            synthetic, rehoming = self.synthetic_account(view, theirs, liar)
            msg, h = self.junk(synthetic)
            # When the rehoming rule may apply, either answer is the protocol's: no status is wanted.
            await self.attempt(key, op, {"messages": [msg]}, attack="liar", want=None if rehoming else 403,
                               victim="synthetic", expect="rehoming" if rehoming else "refuse", planted=[h])


@asynccontextmanager
async def adversary_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    """The adversary nemesis: attacks while the block runs; leaving it stops every attack and closes
    every connection.  What it yields gains a summary of the attempts once it ends."""
    try:
        params = check_adversary_params(fault.params, f"fault {fault.id}")
    except ScenarioError as exc:
        raise NemesisError(str(exc)) from None
    adversary = Adversary(net, fault, params)
    desc = adversary.describe()
    try:
        async with trio.open_nursery() as nursery:
            adversary.start(nursery)
            try:
                yield desc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
            await adversary.close()
        desc.update(adversary.summary())


register("adversary", adversary_fault)
