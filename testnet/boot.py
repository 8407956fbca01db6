"""Boot and teardown of a live run: in what order its processes start, when it
is ready, the boot check, and how it all stops.

:func:`live_run` is the one frame of a run's life, shared by
:func:`testnet.controller.open_testnet` (real processes) and
:func:`chaos.sim.testnet.open_sim_testnet` (the simulation): they differ
only in how they plan the run and which launcher starts its processes.

Boot: the secrets and a first run.json; then the registry, the Toxiproxy
servers and the zygote at once; then every node at once; then (with
Toxiproxy) each node's ingress listeners and the proxies made at boot; then,
while the swarm members' proxies are made, :func:`wait_ready`.  The launcher
(:mod:`testnet.launch`) says how each process starts; this module says when.
Teardown stops every process: Toxiproxy at once, the rest with SIGTERM and a
grace period, then the zygote.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import trio

from . import plan as P
from . import procs
from .base.bugs import NODE_BUGS
from .base.crypto import open_message, retrieve_signature_message, seal_message
from .base.protocol import RequestError
from .base.rpc import RpcError, call_once
from .runtime import ControllerError, NodeRuntime

if TYPE_CHECKING:
    from .controller import Testnet


CHECK_PASSED = "check passed: every node answers info, swarms formed, one message stored and retrieved"


@asynccontextmanager
async def live_run(make: Callable[[trio.Nursery], Testnet], *, ready_timeout_s: float, check: bool,
                   serve: Callable[[Testnet], Callable[[], Awaitable[Any]]] | None = None,
                   announce_check: bool = True) -> AsyncIterator[Testnet]:
    """A run from boot to teardown: ``make(nursery)`` gives the network, whose processes are
    watched in that nursery; ``serve(net)``, if given, is started there first (the control API);
    then :func:`boot`, the boot check (:func:`check_store_retrieve`, with ``check``; said through
    ``net.progress`` with ``announce_check``), and the ready network is yielded.  However the
    block ends, every process is stopped (:func:`teardown`, shielded from cancellation) and the
    nursery's other tasks are cancelled.  A failed boot is recorded as ``failed``."""
    async with trio.open_nursery() as nursery:
        net = make(nursery)
        if serve is not None:
            nursery.start_soon(serve(net))
        try:
            try:
                await net.boot(ready_timeout_s)
                if check:
                    await net.check_store_retrieve()
                    if announce_check:
                        net.progress(CHECK_PASSED)
            except BaseException:
                net.state = "failed"
                raise
            yield net
        finally:
            with trio.CancelScope(shield=True):
                await net.teardown()
            nursery.cancel_scope.cancel()


async def boot(net: Testnet, ready_timeout_s: float) -> None:
    """Start every process of ``net`` and wait until it is ready; ``net.state`` is then "ready"."""
    launcher, wiring = net.launcher, net.wiring
    net.recorder.write_secrets()
    net.save()
    budget_s = ready_timeout_s + 30
    deadline = trio.current_time() + budget_s
    step = "starting the registry, Toxiproxy and the zygote"
    try:
        with trio.fail_at(deadline):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(launcher.start_registry, net)
                if net.plan.links_mode == "toxiproxy":
                    nursery.start_soon(launcher.start_toxiproxy, net)
                if launcher.uses_zygote:
                    nursery.start_soon(launcher.start_zygote, net)
            net.progress(f"registry at {net.registry_address[0]}:{net.registry_address[1]}"
                         + (f", Toxiproxy at {net.api.url}" if net.api else ", links direct (no link faults)"))
            names = list(net.nodes)
            step = f"starting {len(names)} nodes"
            await launcher.start_nodes(net, names, ready_timeout_s)
            net.progress(f"{len(names)} nodes listening")
            if net.api is not None:
                step = "making the users' and the first links' proxies"
                await wiring.open_ingress(names)
                made = wiring.boot_links()
                await wiring.populate(made)
                net.progress(f"a link's proxy is made when first used ({len(net.plan.links):,} links in all)"
                             if net.proxies_on_use else f"{len(made):,} proxies created")
            net.save()
            step = "waiting for every node to be ready (a swarm, the registry's height)"
            async with trio.open_nursery() as nursery:
                if net.proxies_on_use:
                    nursery.start_soon(wiring.make_swarm_links, ready_timeout_s)
                # Its own deadline ends before the boot's, so that it can say which node is not ready.
                await wait_ready(net, max(1.0, min(ready_timeout_s, deadline - trio.current_time() - 10.0)))
    except trio.TooSlowError:
        raise procs.NotReady("network", f"not ready within {budget_s:g} s: still {step}{_load_note()}") from None
    net.state = "ready"
    net.save()


def _load_note() -> str:
    """The machine's load, when it may be why a deadline passed (more runnable processes than cores)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    return f" (load average {load:.0f} on {cores} cores)" if load > 2 * cores else ""


async def wait_ready(net: Testnet, timeout_s: float = 30.0, names: list[str] | None = None) -> None:
    """Until every running node (or ``names``) answers ``info`` with a swarm and the registry's height.

    Raises :class:`procs.NotReady` naming the first node that is not, with its log tail.
    """
    names = names or [n for n, rt in net.nodes.items() if rt.state == "running"]
    why: dict[str, str] = {}
    # Node -> the registry height at which it answered ready.  A node ready at the
    # registry's current height stays ready while that height holds: each round asks
    # only the others (a 1,000-node boot asked every node every 50 ms).
    ready: dict[str, int] = {}
    with trio.move_on_after(timeout_s):
        while True:
            for name in names:
                child = net.nodes[name].child
                if child is not None and not child.running:  # no point waiting for it
                    raise child.failure("exited before the network was ready", procs.NotReady)
            try:
                reg = await net.call("registry", "info")
            except (RpcError, RequestError) as exc:
                # A registry busy with a large network's boot may answer late: ask again.
                why = {"registry": f"does not answer info ({exc})"}
                await trio.sleep(0.2)
                continue
            if reg["nodes"] < len(names):
                # Not every node has registered yet: asking each one now only adds load.
                why = {"registry": f"{reg['nodes']} of {len(names)} nodes registered"}
                await trio.sleep(0.05)
                continue
            why = {}
            infos: dict[str, Any] = {}

            async def ask(name: str) -> None:
                try:
                    infos[name] = await net.call(name, "info", timeout=1.0)
                except (RpcError, RequestError) as exc:
                    why[name] = f"does not answer info ({exc})"

            async with trio.open_nursery() as nursery:
                for name in names:
                    if ready.get(name) != reg["height"]:
                        nursery.start_soon(ask, name)
            why = {k: v for k, v in why.items() if k not in infos}
            for name in names:  # in order: the first reason named is the first node's
                info = infos.get(name)
                if info is None:
                    continue
                rt = net.nodes[name]
                rt.swarm_id = info.get("swarm_id")
                if rt.swarm_id is None:
                    why[name] = "has no swarm yet"
                elif info.get("height") != reg["height"]:
                    why[name] = f"has seen registry height {info.get('height')}, registry is at {reg['height']}"
                else:
                    ready[name] = reg["height"]
            if not why and all(ready.get(n) == reg["height"] for n in names):
                return
            await trio.sleep(0.05)
    if "registry" in why:
        # Stuck at registration: name a node that has no swarm, with its own log tail.
        with trio.move_on_after(2.0):
            for n in names:
                try:
                    if (await net.call(n, "info", timeout=0.5)).get("swarm_id") is None:
                        why = {n: f"has no swarm yet ({why['registry']})"}
                        break
                except (RpcError, RequestError) as exc:
                    why = {n: f"does not answer info ({exc})"}
                    break
    name, reason = next(iter(why.items())) if why else ("registry", "has not seen every node register")
    child = net.nodes[name].child if name in net.nodes else net.registry
    tail = child.tail() if child else ""
    raise procs.NotReady(name, f"not ready after {timeout_s:.3g} s: {reason}", None, tail)


async def check_store_retrieve(net: Testnet, timeout_s: float = 10.0) -> dict[str, Any]:
    """Store one sealed message (first user to second) directly at a member of the recipient's
    swarm, through the users' own links; retrieve it (signed) from another member and open it."""
    plan = net.plan
    users = list(plan.users[:2]) or [P.make_user(net.run_dir, plan.seed, plan.block, 99)]
    sender, recipient = users[0], users[-1]
    rid, text = recipient.identity, f"swarmnet check {plan.run_id}".encode()
    any_node = next(n for n, rt in net.nodes.items() if rt.state == "running")
    members = [net.node_with_key(m["ed25519_public"]) for m in
               (await net.call(any_node, "get_swarm", {"pubkey": rid.session_id}))["nodes"]]

    async def user_call(user: P.UserPlan, node: NodeRuntime, op: str, args: dict[str, Any]) -> Any:
        table = net.plan.dial_table(user.name)
        host, port = table.get(node.plan.ed25519_public, node.address)
        if node.plan.ed25519_public in table:  # through the user's link: made on first use
            await net.wiring.open_user_link(user.name, node.plan.name)
        # The check's whole budget, not one call's: right after a large boot a store's fan-out
        # makes its members' links first (a 300-node boot's check store once took over 2 s).
        resp = await call_once(host, port, op, args, timeout=timeout_s, local_host=user.host,
                               network=net.network)
        if not resp.ok:
            raise ControllerError(f"check: {op} at {node.plan.name} answered {resp.status}: {resp.body!r:.200}")
        return resp.body

    # With a node bug injected on purpose, read back where it was stored: the bug may break
    # replication, and catching that is the checkers' job, not the boot check's.
    source = members[0] if set(plan.inject_bugs) & NODE_BUGS else members[-1]
    stored = await user_call(sender, members[0], "store", {
        "pubkey": rid.session_id, "namespace": 0,
        "data": seal_message(sender.identity, rid.session_id, text, net.randbytes),
        "ttl": 3_600_000, "timestamp": net.now_ms()})
    with trio.move_on_after(timeout_s):
        while True:
            ts = net.now_ms()
            got = await user_call(recipient, source, "retrieve", {
                "pubkey": rid.session_id, "namespace": 0, "timestamp": ts, "pubkey_ed25519":
                rid.ed25519_public.hex(), "signature": rid.sign(retrieve_signature_message(0, ts))})
            found = [m["data"] for m in got["messages"] if m["hash"] == stored["hash"]]
            if found:
                if open_message(rid, found[0]) != (text, sender.identity.session_id):
                    raise ControllerError("check: the retrieved message does not open to what was stored")
                net.check_result = {"hash": stored["hash"], "stored_at": members[0].plan.name,
                                    "retrieved_from": source.plan.name, "ok": True}
                net.save()
                return net.check_result
            await trio.sleep(0.1)
    raise ControllerError(f"check: message {stored['hash']} stored at {members[0].plan.name} was not "
                          f"retrievable from {source.plan.name} within {timeout_s:.3g} s")


def children(net: Testnet) -> list[procs.Child]:
    """Every process of the run the controller started (the zygote's own process apart)."""
    kids = [rt.child for rt in net.nodes.values() if rt.child is not None]
    return kids + [c for c in (net.registry, *net.toxiproxies) if c is not None]


async def teardown(net: Testnet) -> float:
    """Stop every process of the run; returns how long it took (s)."""
    start = time.monotonic()
    for rt in net.nodes.values():
        if rt.state in ("starting", "running", "paused"):
            rt.state = "stopped"
    failed, net.state = net.state == "failed", "stopping"
    async with trio.open_nursery() as nursery:
        # Toxiproxy keeps nothing: killed at once. Asked to stop, a server closes its proxies
        # one by one (3.2 s for 9,000 each at 300 nodes, longer than the nodes take).
        nursery.start_soon(functools.partial(procs.stop_children, net.toxiproxies, grace_s=0.0))
        nursery.start_soon(procs.stop_children, [c for c in children(net) if c not in net.toxiproxies])
    if net.zygote is not None:
        await net.zygote.stop()
    net.state = "failed" if failed else "stopped"
    elapsed = time.monotonic() - start
    try:
        net.save()
    except OSError:
        pass
    return elapsed
