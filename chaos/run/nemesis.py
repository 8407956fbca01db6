"""Nemeses: each injects one kind of fault into a live testnet and always heals.

Every nemesis is an async context manager ``inject(net, fault)``: entering
starts the fault, leaving ends it, even on cancellation (heals are shielded
and bounded).  A nemesis only injects and heals; it never judges.

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

import logging
import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import trio

from testnet import links as L
from testnet.base.swarm import swarm_for

from chaos.schedule import Fault

log = logging.getLogger("chaos.run.nemesis")

HEAL_TIMEOUT_S = 30.0


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
    names = set(nodes)
    return [l.name for l in net.plan.links if (l.src in names or l.dst in names) and (users or not l.from_user)]


def _cut(net: Any, side_a: Iterable[str], side_b: Iterable[str], *, both: bool = True) -> list[str]:
    a, b = set(side_a), set(side_b)
    out = []
    for l in net.plan.links:
        if l.from_user:
            continue
        if (l.src in a and l.dst in b) or (both and l.src in b and l.dst in a):
            out.append(l.name)
    return out


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
        return [l.name for l in net.plan.links], {"all_links": True}
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


async def _heal_all(calls: list[tuple[Any, tuple]]) -> None:
    # The deadline grows with the calls: a partition of a large network heals thousands of
    # proxies, and a heal cut short would leave links cut for the rest of the run.
    with trio.CancelScope(shield=True):
        with trio.move_on_after(HEAL_TIMEOUT_S + HEAL_S_PER_CALL * len(calls)):
            async with trio.open_nursery() as nursery:
                for fn, args in calls:
                    async def one(fn=fn, args=args) -> None:
                        try:
                            await fn(*args)
                        except (L.LinkError, NemesisError):
                            pass
                    nursery.start_soon(one)


HEAL_S_PER_CALL = 0.01  # Toxiproxy answers a call in a few ms; calls run 40 at a time (trio's threads)
LINK_CALLS_AT_ONCE = 32  # Toxiproxy API calls in flight for one fault (a large partition is thousands)


async def _bounded_all(fn: Any, argss: list[tuple], limit: int = 8) -> None:
    """Run fn(*args) for each, at most ``limit`` at once."""
    sem = trio.Semaphore(limit)

    async def one(args: tuple) -> None:
        async with sem:
            await fn(*args)

    async with trio.open_nursery() as nursery:
        for args in argss:
            nursery.start_soon(one, args)


@asynccontextmanager
async def link_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    api = net.api
    if api is None:
        raise NemesisError("link faults need Toxiproxy links (this run uses --links direct)")
    proxies, desc = await resolve_links(net, fault)
    # What was applied is recorded as it happens, so that a start that fails half-way
    # (found by the mixed scenario: a node left while its links were being faulted)
    # still heals every toxic and proxy it touched.
    disabled: list[str] = []
    toxics: list[tuple[str, str]] = []
    try:
        if fault.kind == "link-down" or fault.family == "partition":
            # A disabled proxy closes live connections and refuses new ones: a cut link.
            async def disable(p: str) -> None:
                try:
                    await api.set_enabled(p, False)
                except L.ProxyGone:
                    return  # the link went with its node: nothing left to cut
                disabled.append(p)

            await _bounded_all(disable, [(p,) for p in proxies], LINK_CALLS_AT_ONCE)
        else:
            async def add(p: str, typ: str, attrs: dict[str, Any], stream: str) -> None:
                try:
                    toxics.append((p, await api.add_toxic(p, typ, attrs, stream=stream)))
                except L.ProxyGone:
                    return

            await _bounded_all(add, [(p, typ, a, s) for p in proxies for typ, a, s in _toxics(fault.kind, fault.params)],
                               LINK_CALLS_AT_ONCE)
        yield {**desc, "proxies": len(disabled) + len({p for p, _ in toxics})}
    finally:
        await _heal_all([(api.set_enabled, (p, True)) for p in disabled] +
                        [(api.remove_toxic, (p, n)) for p, n in toxics])


@asynccontextmanager
async def process_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    kind = fault.kind
    if kind == "join":
        added: list[str] = []
        try:
            for _ in range(int(fault.target.get("new", 1))):
                added.append(await net.node_add())
            yield {"nodes": added}
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
                for name in added:
                    if name in net.nodes:
                        await net.node_remove(name)
        return
    nodes = await resolve_nodes(net, fault)
    if kind == "kill":
        for n in nodes:
            await net.node_kill(n)
        try:
            yield {"nodes": nodes}
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
                for n in nodes:
                    await net.node_restart(n)
    elif kind == "pause":
        paused = []
        try:
            for n in nodes:
                await net.node_pause(n)
                paused.append(n)
            yield {"nodes": nodes}
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
                for n in paused:
                    await net.node_resume(n)
    elif kind == "leave":
        for n in nodes:
            await net.node_remove(n)
        replacements: list[str] = []
        try:
            yield {"nodes": nodes}
        finally:
            # Heal: the network gets its capacity back as a fresh node.
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
                for _ in nodes:
                    replacements.append(await net.node_add())
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
        await _heal_all([(reset, (n,)) for n in skewed])


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
