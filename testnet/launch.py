"""How a run's processes are started and watched: the registry, the Toxiproxy
servers, the zygote that forks nodes, and the nodes.

:class:`ProcessLauncher` starts real OS processes (:mod:`testnet.procs`).  The
controller asks its launcher only for these steps, in the order
:mod:`testnet.boot` gives, so another place to run the same processes is one
more launcher beside this one: the simulation's
(:class:`chaos.sim.testnet.SimLauncher`) runs each as tasks in its own trio run.
Its interface is :class:`Launcher`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import trio

from . import links as L
from . import plan as P
from . import procs, rundir
from .runtime import NodeRuntime

if TYPE_CHECKING:
    from .controller import Testnet


class Launcher(Protocol):
    """What the controller asks of the place its processes run (``start_zygote(net)`` too,
    a warm process to fork nodes from, when ``uses_zygote``)."""

    uses_zygote: bool

    def check_bindable(self, addresses: list[tuple[str, int]]) -> None:
        """Raise :class:`testnet.links.LinkError` if a proxy could not listen at one of ``addresses``."""

    async def start_registry(self, net: Testnet) -> None:
        """The registry answering; sets ``net.registry`` and ``net.registry_address``."""

    async def start_toxiproxy(self, net: Testnet) -> None:
        """The proxy servers answering; sets ``net.toxiproxies`` and ``net.api``."""

    async def start_nodes(self, net: Testnet, names: list[str], timeout_s: float, *,
                          spawned: Callable[[], None] | None = None) -> None:
        """Every node of ``names`` listening: its ``child``, ``port`` and state set, watched by
        :func:`watch_node`; ``spawned()`` once every process of them runs (before they listen)."""


async def watch_node(net: Testnet, rt: NodeRuntime, child: procs.Child) -> None:
    """Until ``child`` (the node's current process) exits; then record how, unless it was asked to stop."""
    await child.watch()
    if rt.child is child:
        rt.exit_code = child.returncode
        if rt.state in ("starting", "running", "paused"):
            rt.state = "exited"  # nobody asked it to stop
        if net.state in ("ready", "starting"):
            net.save()


# Nodes run this much below the harness's CPU priority (nice): on a machine with more runnable
# processes than cores — 300 nodes on two — the controller, which starts and heals faults on time,
# and the Toxiproxy servers, which are the network, get a core first when they need one, and the
# nodes have the rest (they are the system under test, not the clock it is tested against).
# SWARMNET_NODE_NICE=0 runs them beside the harness.
NODE_NICE = int(os.environ.get("SWARMNET_NODE_NICE", "5"))


class ProcessLauncher:
    """Real processes, each in its own process group, that die with the controller."""

    def __init__(self, *, zygote: bool = True, toxiproxy_binary: Path | None = None) -> None:
        self.uses_zygote = zygote
        self.toxiproxy_binary = toxiproxy_binary

    def check_bindable(self, addresses: list[tuple[str, int]]) -> None:
        L.check_bindable(addresses)

    async def start_registry(self, net: Testnet) -> None:
        await spawn_registry(net, net.plan.registry_host)

    async def start_toxiproxy(self, net: Testnet) -> None:
        apis = []
        for i, (host, port) in enumerate(net.plan.toxiproxy_apis):
            log = net.run_dir / ("toxiproxy.log" if i == 0 else f"toxiproxy-{i}.log")
            child, api = L.spawn_toxiproxy(host, port, log=log, seed=net.plan.seed + i,
                                           binary=self.toxiproxy_binary)
            net.toxiproxies.append(child)
            apis.append(api)
            net.nursery.start_soon(child.watch)
        net.api = L.ProxyTable(L.ToxiproxyServers(apis, net.plan.server_of), net.wiring.proxy_spec, net.nursery)
        async with trio.open_nursery() as nursery:
            for child, api in zip(net.toxiproxies, apis):
                nursery.start_soon(L.wait_toxiproxy, child, api)

    async def start_zygote(self, net: Testnet) -> None:
        net.zygote = procs.Zygote.launch("nodes.__main__:main", stderr=net.run_dir / "zygote.log",
                                          preload=("nodes.server", "nodes.onion"), nice=NODE_NICE)
        await net.zygote.wait_ready(net.nursery)

    async def start_nodes(self, net: Testnet, names: list[str], timeout_s: float, *,
                          spawned: Callable[[], None] | None = None) -> None:
        """Spawn the nodes and read their readiness lines, all at once."""
        left = [len(names)]

        async def start(rt: NodeRuntime) -> None:
            rt.state, rt.exit_code = "starting", None
            child, rfd = await self._spawn_node(net, rt)
            rt.child = child
            net.nursery.start_soon(watch_node, net, rt, child)
            left[0] -= 1
            if left[0] == 0 and spawned is not None:
                spawned()
            line = await procs.read_ready_line(child, rfd, timeout_s)
            rt.port = int(line["addresses"][0][1])
            rt.state, rt.ingress_open = "running", False
            if net.plan.links_mode == "toxiproxy":
                await net.wiring.open_ingress([rt.plan.name])  # each node as it comes up, not all after

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(start, net.nodes[name])

    async def _spawn_node(self, net: Testnet, rt: NodeRuntime) -> tuple[procs.Child, int]:
        n = rt.plan
        cfg = P.node_config(net.plan, n, registry=net.registry_address, parent_pid=os.getpid(), port=rt.port,
                            link_opener=net.plan.controller if net.proxies_on_use else None)
        n.dir.mkdir(parents=True, exist_ok=True)
        rundir.write_secret(n.config_file, json.dumps(cfg, indent=1))
        args = ["--config", str(n.config_file)]
        if net.zygote is not None:
            return await net.zygote.spawn(n.name, args, stderr=n.stderr, logs=(n.log,))
        return procs.spawn(n.name, procs.python_argv("nodes", *args), stderr=n.stderr, logs=(n.log,), nice=NODE_NICE)


async def spawn_registry(net: Testnet, host: str) -> None:
    """The registry process at ``host`` (a free port), for every launcher of real processes;
    returns once it answers."""
    d = net.run_dir / "registry"
    argv = procs.python_argv("testnet.registry", "--host", host, "--port", "0",
                             "--min-swarm", str(net.plan.min_swarm), "--seed", str(net.plan.seed),
                             "--state", str(d / "state.json"), "--log", str(d / "registry.log"),
                             "--admin-token-file", str(net.run_dir / rundir.ADMIN_TOKEN_FILE),
                             "--stakes", str(d / "stakes.json"), "--genesis",
                             "--parent-pid", str(os.getpid()))
    child, rfd = procs.spawn("registry", argv, stderr=d / "stderr.log", logs=(d / "registry.log",))
    net.registry = child
    net.nursery.start_soon(child.watch)
    ready = await procs.read_ready_line(child, rfd, 20.0)
    net.registry_address = tuple(ready["addresses"][0])  # type: ignore[assignment]
    await net.call("registry", "info", timeout=5.0)
