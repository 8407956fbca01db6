"""Nemeses: each injects one kind of fault into a live testnet and always heals.

Every nemesis is an async context manager ``inject(net, fault)``: entering
starts the fault, leaving ends it, even on cancellation (heals are shielded
and bounded).  A start that fails part-way heals what it did, then raises;
a heal that fails, or runs out of time, raises what failed (:class:`HealFailed`),
once it has healed all it could.  A nemesis only injects and heals; it never judges.

Families (see chaos.scenario.NEMESES):
* link — Toxiproxy toxics (latency, bandwidth, timeout, reset_peer, slicer) or
  a disabled proxy on a set of directed links;
* partition — the directed node-to-node links crossing a cut are disabled
  (isolate one node, split a swarm, random halves, a bridge, one-way);
* process — kill -9 then restart, SIGSTOP then SIGCONT, join new nodes then
  remove them, deregister a node then add a fresh one in its place;
* clock — the node's clock offset (admin_clock), reset to 0 at the end;
* adversary — an attacker using the network (chaos/adversary): attack
  loops that run while the fault is active and stop, their connections
  closed, when it ends.

Families that live in rooms of their own (the adversary) register their
context manager here with :func:`register` when imported, so this module
never imports them (the runner loads them).
"""

from __future__ import annotations

import contextvars
import logging
import random
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import trio

from testnet import links as L
from testnet.base.swarm import swarm_for

from chaos.schedule import Fault

log = logging.getLogger("chaos.run.nemesis")

HEAL_TIMEOUT_S = 30.0


class PhaseClock:
    """The times of the phase being played (set by the player per phase, read by nemeses):
    ``planned`` (trio time), when it ``took_effect`` (None: when its work was done), when its
    first change was made if that was before it was asked for (``began``), and — set by a
    nemesis at its start — ``heal_estimate``: how long its heal's work would take, asked
    just before the heal so that the player can centre that work on the planned end."""

    __slots__ = ("planned", "effect", "began", "heal_estimate")

    def __init__(self, planned: float | None = None) -> None:
        self.planned = planned
        self.effect: float | None = None
        self.began: float | None = None
        self.heal_estimate: Callable[[], float] | None = None

    async def begin(self, work_s: float) -> None:
        """Wait until the phase's work of about ``work_s`` should begin — half of it before the
        planned time, half after — and note when it began if that is before the planned time."""
        if self.planned is None:
            return
        await trio.sleep_until(self.planned - max(0.0, work_s) / 2)
        now = trio.current_time()
        if now < self.planned:
            self.began = now


# The phase being played (see PhaseClock): set by the player per phase.
_clock: contextvars.ContextVar[PhaseClock | None] = contextvars.ContextVar("swarmnet_fault_clock", default=None)


def phase_clock() -> PhaseClock | None:
    """The clock of the phase being played in this task (None outside the player)."""
    return _clock.get()


def took_effect() -> None:
    """Say that the phase of the fault being played took effect now — a restarted or added node
    runs, before the nemesis waits for it to be ready (the network's recovery, not the fault)."""
    clock = _clock.get()
    if clock is not None:
        clock.effect = trio.current_time()


@contextmanager
def playing(clock: PhaseClock) -> Iterator[PhaseClock]:
    """For the player: ``clock`` is the phase's clock for the block."""
    token = _clock.set(clock)
    try:
        yield clock
    finally:
        _clock.reset(token)


class NemesisError(Exception):
    """A fault cannot be applied to this network (no Toxiproxy, unknown node, ...)."""


# family -> ``factory(net, fault)`` returning the fault's async context manager,
# for families registered from other rooms (chaos.adversary).
_REGISTERED: dict[str, Callable[[Any, Fault], Any]] = {}


def register(family: str, factory: Callable[[Any, Fault], Any]) -> None:
    """Make ``inject`` use ``factory`` for faults of ``family``."""
    _REGISTERED[family] = factory


async def live_swarms(net: Any) -> dict[str, int]:
    """Node name -> swarm id, as the registry says now."""
    body = await net.call("registry", "get_service_nodes", {}, timeout=5.0)
    by_key = {rt.plan.ed25519_public: name for name, rt in net.nodes.items()}
    return {by_key[n["ed25519_public"]]: int(n["swarm_id"]) for n in body["nodes"] if n["ed25519_public"] in by_key}


async def swarm_members_of_user(net: Any, user: str) -> list[str]:
    swarms = await live_swarms(net)
    sid = net.user_identity(user).session_id
    target = swarm_for(sid, sorted(set(swarms.values())))
    return sorted(n for n, s in swarms.items() if s == target)


async def resolve_nodes(net: Any, fault: Fault) -> list[str]:
    """The concrete nodes a process/clock fault acts on."""
    t = fault.target
    if "node" in t:
        return [t["node"]]
    if "nodes" in t:
        return list(t["nodes"])
    if "swarm-of-user" in t:
        members = await swarm_members_of_user(net, t["swarm-of-user"])
        rng = random.Random(t.get("pick", 0))
        return sorted(rng.sample(members, min(int(t.get("count", 1)), len(members))))
    raise NemesisError(f"fault {fault.id} ({fault.kind}) names no node")


def _node_links(net: Any, nodes: Iterable[str], *, users: bool = True) -> list[str]:
    """The links from or to ``nodes``, in the plan's order (never every link listed)."""
    return [l.name for l in net.plan.links_touching(nodes, users=users)]


def _cut(net: Any, side_a: Iterable[str], side_b: Iterable[str], *, both: bool = True) -> list[str]:
    """The node links from ``side_a`` to ``side_b`` (and back, with ``both``), in the plan's order."""
    return [l.name for l in net.plan.links_between(side_a, side_b, both=both)]


_SIDED = ("isolate", "split-swarm", "halves", "one-way", "bridge")  # kinds whose links resolve_links picks


async def resolve_links(net: Any, fault: Fault) -> tuple[list[str], dict[str, Any]]:
    """The proxies a link or partition fault acts on, and a description for faults.jsonl."""
    t = fault.target
    kind = fault.kind
    if kind == "isolate":
        node = t["node"]
        return _node_links(net, [node]), {"nodes": [node]}
    if kind == "split-swarm":
        members = await swarm_members_of_user(net, t["swarm-of-user"])
        rng = random.Random(t.get("pick", 0))
        rng.shuffle(members)
        half = max(1, len(members) // 2)
        a, b = sorted(members[:half]), sorted(members[half:])
        return _cut(net, a, b), {"side_a": a, "side_b": b}
    if kind in ("halves", "one-way"):
        a, b = t["side_a"], t["side_b"]
        a, b = [n for n in a if n in net.nodes], [n for n in b if n in net.nodes]
        return _cut(net, a, b, both=kind == "halves"), {"side_a": a, "side_b": b, "one_way": kind == "one-way"}
    if kind == "bridge":
        a, b = [n for n in t["side_a"] if n in net.nodes], [n for n in t["side_b"] if n in net.nodes]
        return _cut(net, a, b), {"side_a": a, "side_b": b, "bridge": t.get("bridge")}
    if t.get("all-links"):
        # Listed in the plan's order (the simulation's replay depends on it); a real run's
        # proxy table takes the plan's set itself (link_fault).
        return list(net.plan.link_names), {"all_links": True}
    if "node-links" in t:
        return _node_links(net, [t["node-links"]]), {"nodes": [t["node-links"]]}
    if "links" in t:
        return [net.proxy_name(s, d) for s, d in t["links"]], {"links": t["links"]}
    if "node" in t or "nodes" in t:
        nodes = [t["node"]] if "node" in t else t["nodes"]
        return _node_links(net, nodes), {"nodes": nodes}
    raise NemesisError(f"fault {fault.id} ({kind}) names no links")


def _toxics(kind: str, p: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(toxic type, attributes, stream) for a link fault kind."""
    if kind == "latency":
        a = {"latency": int(p.get("latency_ms", 50)), "jitter": int(p.get("jitter_ms", 0))}
        return [("latency", a, "upstream"), ("latency", a, "downstream")]
    if kind == "bandwidth":
        a = {"rate": int(p.get("rate_kbps", 16))}
        return [("bandwidth", a, "upstream"), ("bandwidth", a, "downstream")]
    if kind == "blackhole":
        # Toxiproxy's timeout toxic with timeout 0 drops data until removed.
        return [("timeout", {"timeout": 0}, "upstream")]
    if kind == "reset-peer":
        return [("reset_peer", {"timeout": int(p.get("timeout_ms", 0))}, "upstream")]
    if kind == "slicer":
        a = {"average_size": int(p.get("average_size", 64)), "size_variation": int(p.get("size_variation", 32)),
             "delay": int(p.get("delay_us", 500))}
        return [("slicer", a, "upstream"), ("slicer", a, "downstream")]
    raise NemesisError(f"{kind} is not a toxic")


class HealFailed(Exception):
    """A heal did not finish: the errors of the calls that failed (``errors``), or its deadline."""

    def __init__(self, message: str, errors: list[BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@contextmanager
def healing(what: str, timeout_s: float) -> Iterator[None]:
    """Shielded from cancellation (a nemesis always heals) and bounded by ``timeout_s``:
    raises :class:`HealFailed`, naming ``what``, when the heal is cut off by its deadline."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout_s) as scope:
            yield
    if scope.cancelled_caught:
        raise HealFailed(f"{what}: not healed within {timeout_s:g} s")


async def _heal_all(what: str, calls: list[tuple[Any, tuple]]) -> None:
    """Every call at once, all tried whatever the others do; raises :class:`HealFailed` with
    each error when some failed.  The deadline grows with the calls."""
    errors: list[BaseException] = []
    with healing(what, HEAL_TIMEOUT_S + HEAL_S_PER_CALL * len(calls)):
        async with trio.open_nursery() as nursery:
            for fn, args in calls:
                async def one(fn=fn, args=args) -> None:
                    try:
                        await fn(*args)
                    except L.ProxyGone:
                        pass  # its link went with its node: nothing left to heal
                    except Exception as exc:
                        errors.append(exc)
                nursery.start_soon(one)
    if errors:
        raise HealFailed(f"{what}: {len(errors)} of {len(calls)} heals failed", errors)


HEAL_S_PER_CALL = 0.01  # for the calls of one heal (one per node)
HEAL_S_PER_LINK = 0.001  # a link fault's heal: its calls go in bulk, each connection bounded; this backs them up


def _cuts(fault: Fault) -> bool:
    """True when ``fault`` cuts its links (a disabled proxy), False when it adds toxics."""
    return fault.kind == "link-down" or fault.family == "partition"


@asynccontextmanager
async def link_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    """A cut (disabled proxies) or toxics on the fault's links, recorded at once for links not
    made yet and sent in bulk to the made ones (testnet.proxies.ProxyTable.fault_links), healed
    the same way.  A start that fails part-way heals what it did, then raises what failed."""
    api = net.api
    if api is None:
        raise NemesisError("link faults need Toxiproxy links (this run uses --links direct)")
    if fault.target.get("all-links") and fault.kind not in _SIDED and isinstance(api, L.ProxyTable):
        # The plan's own set of every link name, made once (a set of 92,100 names built at the
        # fault's time took 0.1-0.4 s of a loaded machine); the simulation's table keeps the list,
        # whose order its seeded replay depends on.
        proxies, desc = net.plan.link_names, {"all_links": True}
    else:
        proxies, desc = await resolve_links(net, fault)
    cut = _cuts(fault)
    toxics = () if cut else _toxics(fault.kind, fault.params)
    what = f"fault {fault.id} ({fault.kind})"
    failed: L.BatchError | None = None
    clock = phase_clock()
    if clock is not None and hasattr(api, "estimate_s"):
        # Thousands of made links take a second or more of calls: half before the planned
        # time, half after (the player woke this nemesis early for it: prepares()).
        await clock.begin(api.estimate_s(proxies, 1 if cut else len(toxics), "cut" if cut else "toxic"))
    try:
        applied = await api.fault_links(proxies, cut=cut, toxics=toxics)
    except L.BatchError as exc:
        applied, failed = exc.done, exc
    if clock is not None and hasattr(api, "estimate_s"):
        clock.heal_estimate = lambda: api.estimate_s(applied.names, applied.calls_per_link, applied.work)

    async def heal() -> None:
        with healing(what, HEAL_TIMEOUT_S + HEAL_S_PER_LINK * applied.links):
            await api.heal_links(applied)

    if failed is not None:
        try:
            await heal()
        except (L.LinkError, HealFailed) as exc:
            raise HealFailed("its start failed, and so did the heal of what it did", [failed, exc]) from None
        raise failed
    try:
        yield {**desc, "proxies": applied.links, **({"calls": applied.calls} if hasattr(applied, "calls") else {})}
    finally:
        await heal()


@asynccontextmanager
async def process_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    kind = fault.kind
    what = f"fault {fault.id} ({kind})"
    if kind == "join":
        added: list[str] = []
        try:
            for _ in range(int(fault.target.get("new", 1))):
                added.append(await net.node_add(running=took_effect))
            yield {"nodes": added}
        finally:
            with healing(what, HEAL_TIMEOUT_S):
                for name in added:
                    if name in net.nodes:
                        await net.node_remove(name)
        return
    nodes = await resolve_nodes(net, fault)
    if kind == "kill":
        killed = []
        try:
            for n in nodes:
                await net.node_kill(n)
                killed.append(n)  # a kill that fails part-way still restarts those it killed
            yield {"nodes": nodes}
        finally:
            with healing(what, HEAL_TIMEOUT_S):
                for n in killed:
                    await net.node_restart(n, running=took_effect)
    elif kind == "pause":
        paused = []
        try:
            for n in nodes:
                await net.node_pause(n)
                paused.append(n)
            yield {"nodes": nodes}
        finally:
            with healing(what, HEAL_TIMEOUT_S):
                for n in paused:
                    await net.node_resume(n)
    elif kind == "leave":
        removed = []
        replacements: list[str] = []
        try:
            for n in nodes:
                await net.node_remove(n)
                removed.append(n)
            yield {"nodes": nodes}
        finally:
            # Heal: the network gets its capacity back as a fresh node.
            with healing(what, HEAL_TIMEOUT_S):
                for _ in removed:
                    replacements.append(await net.node_add(running=took_effect))
    else:
        raise NemesisError(f"{kind} is not a process fault")


@asynccontextmanager
async def clock_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    nodes = await resolve_nodes(net, fault)
    offset = int(fault.params.get("offset_ms", 30_000))
    skewed = []
    try:
        for n in nodes:
            await net.admin(n, "admin_clock", offset_ms=offset)
            skewed.append(n)
        yield {"nodes": nodes, "offset_ms": offset}
    finally:
        async def reset(n: str) -> None:
            if n in net.nodes and net.nodes[n].state == "running":
                await net.admin(n, "admin_clock", offset_ms=0)
        await _heal_all(f"fault {fault.id} ({fault.kind})", [(reset, (n,)) for n in skewed])


PREPARE_S = 1.0  # a nemesis that centres its work on the planned time is entered this early


def prepares(net: Any, fault: Fault) -> bool:
    """Whether ``fault``'s nemesis is entered :data:`PREPARE_S` before its planned time, to find
    its links and begin its calls early (:meth:`PhaseClock.begin`): link faults on real proxies.
    The simulation's proxies change at one instant, so its faults are entered on time."""
    return fault.family in ("link", "partition") and hasattr(net.api, "estimate_s")


def inject(net: Any, fault: Fault) -> Any:
    """The context manager for ``fault``'s family."""
    family = fault.family
    if family in ("link", "partition"):
        return link_fault(net, fault)
    if family == "process":
        return process_fault(net, fault)
    if family == "clock":
        return clock_fault(net, fault)
    if family in _REGISTERED:
        return _REGISTERED[family](net, fault)
    raise NemesisError(f"no nemesis for {fault.kind} (family {family!r} is not loaded)")
