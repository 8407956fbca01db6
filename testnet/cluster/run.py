"""One network spread over a Ray cluster's hosts: ``swarmnet up --cluster ADDRESS``.

The controller, the registry and the users stay where ``up`` runs, on this
machine's address on the cluster network; every node runs on a host, started
by that host's agent (:mod:`.agent`), which also runs the Toxiproxy server of
the host's outgoing links.  The plan is the one-machine plan with a host
dimension (:class:`testnet.plan.HostPlan`): nodes placed round-robin, each
listening at its host's address.  Nodes ask the controller for their links'
proxies (``open_link``, same signature as on one machine) at the control
API's second listener, on the cluster address.

The run directory has the local layout: each host's databases, captures and
logs come home through Ray at teardown, and on demand (:func:`collect`,
``swarmnet collect``; a chaos run collects before its checkers), so every
checker, the report and ``trace`` work unchanged.  ``run.json`` says where
each node runs (``place``) and, under ``cluster``, each host and any host
lost during the run with the nodes that went with it; the checkers' verdict
is then unknown, naming the lost hosts.
"""

from __future__ import annotations

import functools
import io
import secrets
import socket
import sys
import tarfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from .. import boot as B
from .. import links as L
from .. import plan as P
from .. import procs, rundir
from ..base.protocol import RequestError
from ..base.rpc import RpcError
from ..controller import ControllerError, Options, Testnet
from ..record import Recorder
from .driver import ClusterError, ClusterHost, cluster_hosts, connect, disconnect, on_host
from .launch import CALL_TIMEOUT_S, ClusterLauncher, HostLink, HostLost, agent_class, local_address_towards
from .local import HOST_RESOURCE

Progress = Callable[[str], None]
AGENT_SHARE = 0.001  # of a host's swarmnet_host resource: the marker an agent needs, leaving room for other runs
COLLECT_TIMEOUT_S = 120.0


class ClusterRecorder(Recorder):
    """run.json of a cluster run: the one-machine record, with where each node and Toxiproxy
    server runs (``place``) and the hosts under ``cluster`` (RUNDIR.md)."""

    net: ClusterTestnet

    def record(self) -> dict[str, Any]:
        net = self.net
        rec = super().record()
        for n in rec["nodes"]:
            n["place"] = net.nodes[n["name"]].plan.place
        for s, server in enumerate((rec.get("toxiproxy") or {}).get("servers") or []):
            server["place"] = None if s == 0 else net.plan.hosts[s - 1].name
        rec["cluster"] = {
            **net.cluster,
            "hosts": [{"name": h.name, "address": h.address, "state": "lost" if net.links[h.name].lost else "up",
                       "agent": net.links[h.name].hello, "nodes": [n.name for n in net.plan.nodes_on(h.name)]}
                      for h in net.plan.hosts],
            "lost_hosts": net.lost_hosts,
        }
        return rec


class ClusterTestnet(Testnet):
    """A :class:`Testnet` whose nodes run on cluster hosts (see the module docstring): its
    launcher is a :class:`ClusterLauncher`; it knows its hosts and which were lost."""

    def __init__(self, plan: P.NetworkPlan, nursery: trio.Nursery, launcher: ClusterLauncher, *,
                 cluster: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(plan, nursery, launcher, **kwargs)
        self.launcher: ClusterLauncher = launcher
        self.links = launcher.links
        self.cluster = cluster  # the cluster's address, the controller's address and port there
        self.lost_hosts: dict[str, dict[str, Any]] = {}  # host -> {"reason", "nodes"}
        self.recorder = ClusterRecorder(self)
        for link in self.links.values():
            link.on_lost.append(self._host_lost)

    def _host_lost(self, link: HostLink) -> None:
        nodes = []
        for rt in self.nodes.values():
            if rt.plan.place == link.name:
                nodes.append(rt.plan.name)
                if rt.state in ("starting", "running", "paused"):
                    rt.state = "lost"
        self.lost_hosts[link.name] = {"reason": link.lost, "nodes": nodes}
        self.progress(f"host {link.name} lost ({link.lost}): {', '.join(nodes) or 'no node'} went with it")
        try:
            self.save()
        except OSError:
            pass

    async def control(self, action: str, args: dict[str, Any]) -> Any:
        if action == "collect":
            return {"collected": await collect(self)}
        return await super().control(action, args)

    async def teardown(self) -> float:
        """Stop every process as on one machine, then each host's leftovers; bring each host's
        files home and end the agents."""
        try:
            return await super().teardown()
        finally:
            await self._end_hosts()

    async def _end_hosts(self) -> None:
        """Per host, at once: whatever still runs there stopped, its files home, its agent ended."""
        async def end(link: HostLink) -> None:
            try:
                left = await link.call("stop", timeout_s=CALL_TIMEOUT_S + 10)
                if left:
                    link.hello["left_running"] = left
                await _bring_home(link, self.run_dir)
            except HostLost:
                pass
            await _close_agent(link)

        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                nursery.start_soon(end, link)
        try:
            self.save()
        except OSError:
            pass


async def _close_agent(link: HostLink) -> None:
    link.closing = True
    try:
        await link.call("close", timeout_s=CALL_TIMEOUT_S + 10)
    except HostLost:
        pass
    try:
        link.ray.kill(link.actor, no_restart=True)
    except Exception:
        pass  # already gone


async def _bring_home(link: HostLink, run_dir: Path) -> int:
    data = await link.call("collect", timeout_s=COLLECT_TIMEOUT_S)
    await trio.to_thread.run_sync(unpack_into, data, run_dir)
    return len(data)


async def collect(net: ClusterTestnet) -> dict[str, int]:
    """Bring every reachable host's files of the run into the run directory (the local layout);
    bytes received per host."""
    got: dict[str, int] = {}

    async def one(link: HostLink) -> None:
        try:
            got[link.name] = await _bring_home(link, net.run_dir)
        except HostLost:
            pass

    async with trio.open_nursery() as nursery:
        for link in net.links.values():
            if link.lost is None:
                nursery.start_soon(one, link)
    return got


def unpack_into(data: bytes, run_dir: Path) -> None:
    """A host's packed files, into ``run_dir`` (no absolute paths, no links out: tarfile's data filter)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(run_dir, filter="data")


# ---------------------------------------------------------------------------- open_cluster_testnet


def choose_hosts(ray: Any, wanted: int | None) -> list[ClusterHost]:
    """The hosts a run may use: those offering the ``swarmnet_host`` resource, the first
    ``wanted`` of them by name (that they run this swarmnet, their agents say)."""
    offered = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and (n.get("Resources") or {}).get(HOST_RESOURCE)}
    hosts = [h for h in cluster_hosts(ray) if h.node_id in offered]  # their swarmnet: the agents' hello says
    if not hosts:
        raise ClusterError(f"no host of the cluster offers the resource {HOST_RESOURCE!r}: start each host with "
                           f"ray start --resources='{{\"{HOST_RESOURCE}\": 1}}'")
    if wanted is not None:
        if not 1 <= wanted <= len(hosts):
            raise ClusterError(f"--hosts {wanted}: the cluster has {len(hosts)} hosts "
                               f"({', '.join(h.name for h in hosts)})")
        hosts = hosts[:wanted]
    return hosts


def _start_agents(ray: Any, hosts: list[ClusterHost], run_id: str, run_dir: Path) -> dict[str, HostLink]:
    """An agent for each host, asked for and not waited for: their Ray worker processes start
    while the controller starts its own part (the launcher waits for them, :meth:`agents_up`)."""
    Agent = agent_class(ray)
    links = {}
    for h in hosts:
        actor = Agent.options(name=f"swarmnet-{run_id}-{h.name}", resources={HOST_RESOURCE: AGENT_SHARE},
                              scheduling_strategy=on_host(ray, h)).remote(run_id, h.name, str(run_dir))
        links[h.name] = HostLink(ray, h.name, h.address, actor)
    return links


@asynccontextmanager
async def open_cluster_testnet(opts: Options, *, progress: Progress | None = None) -> AsyncIterator[ClusterTestnet]:
    """:func:`testnet.controller.open_testnet` on the cluster at ``opts.cluster`` (``opts.hosts``
    of its hosts, default all): boot, yield once ready, tear down (files home) however it ends."""
    say = progress or (lambda m: None)
    if opts.links != "toxiproxy":
        raise ClusterError("a cluster run needs Toxiproxy links (--links toxiproxy)")
    P.check_options(nodes=opts.nodes, users=opts.users, min_swarm=opts.min_swarm, links=opts.links, hosts=opts.hosts)
    binary = L.find_toxiproxy(opts.toxiproxy_binary)  # the users' server, here; fail early
    procs.raise_open_files_limit()
    was_connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    ray = await trio.to_thread.run_sync(connect, opts.cluster)
    sockets: list[socket.socket] = []
    try:
        hosts = await trio.to_thread.run_sync(choose_hosts, ray, opts.hosts)
        address = local_address_towards(hosts[0].address)
        run_id = opts.run_id or rundir.new_run_id()
        seed = opts.seed if opts.seed is not None else secrets.randbits(63)
        run_dir = (Path(opts.run_dir).absolute() if opts.run_id and opts.run_dir
                   else rundir.create_run_dir(run_id, opts.run_dir, opts.runs_dir))
        block, claim = rundir.claim_block(run_id)
        # Nodes on the hosts reach the control API here (open_link); the CLI keeps the loopback one.
        outer = socket.socket()
        sockets += [claim, outer]
        outer.bind((address, 0))
        outer.listen(socket.SOMAXCONN)
        plan = P.plan_network(nodes=opts.nodes, users=opts.users, min_swarm=opts.min_swarm, seed=seed,
                              links=opts.links, run_dir=run_dir, run_id=run_id, block=block,
                              inject_bugs=opts.inject_bugs, capture=opts.capture,
                              hosts=tuple(P.HostPlan(h.name, h.address) for h in hosts))
        say(f"run {run_id} in {run_dir}; cluster {opts.cluster}: "
            + ", ".join(f"{h.name} ({h.address}, {len(plan.nodes_on(h.name))} nodes)" for h in hosts))
        links = _start_agents(ray, hosts, run_id, run_dir)
        control = (address, outer.getsockname()[1])
        launcher = ClusterLauncher(links, address=address, toxiproxy_binary=binary, control=control)

        def make(nursery: trio.Nursery) -> ClusterTestnet:
            net = ClusterTestnet(plan, nursery, launcher, cluster={"address": opts.cluster, "controller": list(control)},
                                 progress=progress, proxies_on_use=opts.proxies_on_use)
            for link in links.values():
                nursery.start_soon(link.pump)
            return net

        def serve(net: Testnet) -> Callable[[], Awaitable[None]]:
            refusals = (ControllerError, P.PlanError, procs.ProcError, L.LinkError, RpcError, RequestError, HostLost)

            async def both() -> None:
                async with trio.open_nursery() as nursery:
                    for sock in (claim, outer):
                        nursery.start_soon(functools.partial(rundir.serve_control, sock, plan.control_token,
                                                             net.control, refusals, open_link=net.open_link))
            return both

        async with B.live_run(make, ready_timeout_s=opts.ready_timeout_s, check=opts.check, serve=serve) as net:
            yield net  # type: ignore[misc]
    finally:
        for sock in sockets:
            sock.close()
        if not was_connected:
            await trio.to_thread.run_sync(disconnect)


def open_network(opts: Options, *, progress: Progress | None = None) -> Any:
    """:func:`open_cluster_testnet` when ``opts.cluster`` names a cluster, else
    :func:`testnet.controller.open_testnet`: a network where the options say."""
    if opts.cluster:
        return open_cluster_testnet(opts, progress=progress)
    from ..controller import open_testnet

    return open_testnet(opts, progress=progress)

