"""The attacker every attack family acts through: what it knows (every node's
address and swarm from the public registry; every message's hash as it is
sent, by tailing the run's ``history.jsonl`` — an omniscient attacker, the
strongest case for the checkers; nothing of a user's keys), its connections
and its record of every attempt (``adversary.jsonl``, format: CHECKERS.md).

It attacks the nodes' real listening addresses (the registry's), never through
the harness's link proxies, from its own loopback addresses,
``127.a.b.16``-``31`` in the run's block (beside the run's controller,
registry and Toxiproxy; checked against every planned address), so parallel
runs stay apart and users' rate limits are untouched.  Every network wait has
a deadline; attempts are capped by ``max_attempts``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import trio

from nodes.auth import authenticate
from nodes.storage import AE_BUCKET_MS
from testnet.base import crypto
from testnet.base.net import TCP
from testnet.base.protocol import Response
from testnet.base.rpc import ConnectionPool, RpcError, call_once
from testnet.plan import derive_seed
from testnet.registry import deregister_args

from chaos.checkers.authority import ADVERSARY_FILE
from chaos.run.nemesis import NemesisError
from chaos.schedule import Fault

from .model import AttemptLog, HistoryTail, Knowledge, NetView, adversary_host, measure, planned_hosts, wall_ms

__all__ = ["Attacker", "CALL_TIMEOUT_S", "FAKE_HASH"]

HOST_STRANGER, HOST_LIAR, HOST_FRAMES, HOST_PROBE = 0, 1, 2, 3
HOSTS_FLOOD = (8, 9, 10, 11)  # a flood spreads over these (a per-address cap meets each)
CALL_TIMEOUT_S = 2.0
REFRESH_S = 3.0  # how often the registry is asked again
LISTING_WINDOW_MS = 60_000  # buckets asked for: the last minute's
# A plausible life (a day): a planted copy must be stopped by authority, not by the
# expiry bound replicate now applies (which stops a 30-day plant whoever sends it).
JUNK_EXPIRY_MS = 24 * 3600 * 1000
FAKE_HASH = "A" * 43


class Attacker:
    """One adversary fault's attacker: its knowledge, its connections (a pool in the fault's
    nursery) and its record — what every attack family acts through.  :meth:`open_pool`
    opens the connections; :meth:`close` (after the nursery is done) closes what is left
    and undoes a registration."""

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
        self.record(attack, op, key[-1], resp, error, expect=expect, want=want, victim=victim, variant=variant,
                     planted=planted, as_=self.node_name(key[1]) if key[0] == "liar" else "stranger")
        return resp

    def record(self, attack: str, op: str, node: str, resp: Response | None, error: str | None, *, expect: str,
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

    def open_pool(self, nursery: trio.Nursery) -> None:
        """The attacker's connections, owned by ``nursery`` (the fault's)."""
        self.pool = ConnectionPool(nursery, self._resolve, connect_timeout=CALL_TIMEOUT_S,
                                   on_connect=self._on_connect, network=self.network)

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

