"""The testnet controller: boots a planned network, keeps its record, acts on
its nodes and tears it all down.

``async with open_testnet(Options(nodes=6, min_swarm=3)) as net:`` yields a
live :class:`Testnet` once every node answers ``info`` with a swarm and the
registry's height.  Leaving the block stops every process of the run
(SIGTERM, SIGKILL after a grace period).  Every controller serves a small
control API on the run's own loopback address (``controller`` in
``run.json``).  ``swarmnet up`` (and its detached supervisor, ``python -m
testnet.cli supervise``) keeps one up until a signal or a ``down`` request.

:class:`Testnet` is the face of a live run: the state its parts share (the
plan, each node's :class:`~testnet.runtime.NodeRuntime`, the registry,
Toxiproxy) and every call other code makes.  The work is done by parts each
readable alone:

* :mod:`testnet.boot` — the order of boot and teardown, readiness, the boot check;
* :mod:`testnet.launch` — how each process starts (real processes; the
  simulation passes its own launcher);
* :mod:`testnet.wiring` — the links: proxies, their upstreams, dial tables;
* :mod:`testnet.nodeops` — process control (kill, pause, resume, restart, add,
  remove) and the control API's requests;
* :mod:`testnet.record` — run.json, links.json and the secrets.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from . import boot as B
from . import links as L
from . import plan as P
from . import procs, rundir
from .base.clock import wall_ms
from .base.crypto import Identity
from .base.net import TCP, Network
from .base.protocol import RequestError, Status
from .base.rpc import ConnectionPool, RpcError
from .launch import Launcher, ProcessLauncher
from .nodeops import NodeOps
from .record import Recorder
from .runtime import (BOOT_CALL_TIMEOUT_S, CALL_TIMEOUT_S, OPEN_LINK_TIMEOUT_S, ControllerError, NodeRuntime,
                      error_leaves)
from .wiring import Wiring

__all__ = ["Options", "Testnet", "open_testnet", "NodeRuntime", "ControllerError", "error_leaves",
           "CALL_TIMEOUT_S", "OPEN_LINK_TIMEOUT_S", "BOOT_CALL_TIMEOUT_S"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    """What ``swarmnet up`` asks for; everything else is planned."""

    nodes: int = P.DEFAULT_NODES
    users: int = P.DEFAULT_USERS
    min_swarm: int = P.DEFAULT_MIN_SWARM
    links: str = "toxiproxy"
    seed: int | None = None
    run_dir: Path | None = None
    runs_dir: Path = rundir.DEFAULT_RUNS_DIR
    run_id: str | None = None
    inject_bugs: tuple[str, ...] = ()
    ready_timeout_s: float = 60.0
    check: bool = True  # store one message and retrieve it once ready
    zygote: bool = True  # fork nodes from a warm process (see procs.Zygote)
    capture: bool = True  # nodes record their traffic for the unlinkability checker
    toxiproxy_binary: str | None = None
    toxiproxy_servers: int | None = None  # None: as many as the open-files limit needs (links.servers_needed)
    proxies_on_use: bool = True  # a node link's proxy is made when first dialled (False: all at boot)
    cluster: str | None = None  # a Ray cluster's head (HOST:PORT): nodes on its hosts (testnet/cluster)
    hosts: int | None = None  # how many of the cluster's hosts (None: all)
    # The disk under each node's SQLite: the harness's model (nodes/disk.py: faults, power
    # loss) or "os", SQLite's default VFS straight on the OS (no disk faults; bench node
    # compares the two).
    disk: str = "model"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_dir": None if self.run_dir is None else str(self.run_dir),
                "runs_dir": str(self.runs_dir), "inject_bugs": list(self.inject_bugs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Options:
        return cls(**{**d, "run_dir": None if d.get("run_dir") is None else Path(d["run_dir"]),
                      "runs_dir": Path(d["runs_dir"]), "inject_bugs": tuple(d["inject_bugs"])})


class Testnet:
    """A live network.  Made by :func:`open_testnet`; every method is safe to call from its trio run.

    ``launcher`` starts its processes (default: real ones, :class:`~testnet.launch.ProcessLauncher`);
    ``network``, ``clock`` (ms) and ``randbytes`` are the controller's own seams (the simulation's
    are virtual)."""

    def __init__(self, plan: P.NetworkPlan, nursery: trio.Nursery, launcher: Launcher | None = None, *,
                 progress: Progress | None = None, network: Network = TCP, clock: Callable[[], int] | None = None,
                 randbytes: Any = None, proxies_on_use: bool = True) -> None:
        self.plan = plan
        self.network = network
        self.randbytes = randbytes  # the check message's sealing randomness: libsodium's unless given
        self._clock = clock or wall_ms
        self.run_dir = plan.run_dir
        self.nursery = nursery  # the run's: process watchers, proxy makers and connection readers live here
        self.progress: Progress = progress or (lambda msg: None)
        self.launcher: Launcher = launcher or ProcessLauncher()
        self.nodes: dict[str, NodeRuntime] = {n.name: NodeRuntime(n) for n in plan.nodes}
        self.by_key: dict[str, NodeRuntime] = {rt.plan.ed25519_public: rt for rt in self.nodes.values()}
        self.removed: list[dict[str, Any]] = []
        self.registry: procs.Child | None = None
        self.registry_address: tuple[str, int] = (plan.registry_host, 0)
        self.toxiproxies: list[procs.Child] = []  # the servers sharing the proxies (plan.toxiproxy_apis)
        self.api: L.ProxyTable | None = None
        self.zygote: procs.Zygote | None = None
        # Links' proxies made when a node or a user first dials them (see links.ProxyTable).
        self.proxies_on_use = proxies_on_use and plan.links_mode == "toxiproxy"
        self.state = "starting"
        self.started_ms = self.now_ms()
        self.stop_requested = trio.Event()
        self.check_result: dict[str, Any] | None = None
        self.create_time = procs.process_create_time(os.getpid())
        self._pool = ConnectionPool(nursery, self._resolve, connect_timeout=CALL_TIMEOUT_S, network=network)
        self.recorder = Recorder(self)
        self.wiring = Wiring(self)
        self.ops = NodeOps(self)

    def now_ms(self) -> int:
        """The controller's clock (the simulation's is virtual)."""
        return self._clock()

    # ------------------------------------------------------------------ lookups and calls

    def _resolve(self, name: Any) -> tuple[str, int, str | None]:
        if name == "registry":
            return (*self.registry_address, None)
        return (*self.nodes[name].address, None)

    def node(self, name: str) -> NodeRuntime:
        try:
            return self.nodes[name]
        except KeyError:
            raise ControllerError(f"no node {name!r} in this run (nodes: {', '.join(self.nodes)})") from None

    def node_with_key(self, ed_hex: str) -> NodeRuntime:
        try:
            return self.by_key[ed_hex]
        except KeyError:
            raise ControllerError(f"no node with key {ed_hex[:12]}…") from None

    def user_identity(self, name: str) -> Identity:
        return self.plan.user(name).identity

    def user_host(self, name: str) -> str:
        """The user's own IP: bind it as the source address of its connections."""
        return self.plan.user(name).host

    async def call(self, name: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call ``op`` on node ``name`` (or ``"registry"``) over the controller's own direct connection."""
        resp = await self._pool.call(name, op, args or {}, timeout=timeout)
        if resp.status != Status.OK:
            raise RequestError(resp.status, f"{name} answered {op} with {resp.status}: {resp.body!r:.200}")
        return resp.body

    async def admin(self, name: str, op: str, *, timeout: float = CALL_TIMEOUT_S, **args: Any) -> Any:
        """An admin op (``admin_clock``, ...) on node ``name``, with the run's admin token."""
        return await self.call(name, op, {"token": self.plan.admin_token, **args}, timeout=timeout)

    async def hang_up(self, name: str) -> None:
        """Close the controller's connection to ``name`` (a call after this dials again)."""
        await self._pool.drop(name)

    # ------------------------------------------------------------------ links (testnet.wiring)

    def user_links(self, name: str) -> dict[str, tuple[str, int]]:
        return self.wiring.user_links(name)

    def proxy_name(self, src: str, dst: str) -> str:
        return self.wiring.proxy_name(src, dst)

    def proxy_spec(self, name: str) -> dict[str, str]:
        return self.wiring.proxy_spec(name)

    def upstream(self, link: P.LinkPlan) -> tuple[str, int] | None:
        return self.wiring.upstream(link)

    async def open_link(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.wiring.open_link(args)

    @property
    def user_link_opener(self) -> tuple[str, int] | None:
        """Where a user asks for its links' proxies (``None``: all made at boot)."""
        return self.wiring.link_opener

    # ------------------------------------------------------------------ the record (testnet.record)

    def record(self) -> dict[str, Any]:
        """run.json as it stands (schema in RUNDIR.md)."""
        return self.recorder.record()

    def save(self) -> None:
        self.recorder.save()

    async def status(self) -> dict[str, Any]:
        """Live status of every process of the run (see :func:`rundir.gather_status`)."""
        return await rundir.gather_status(self.record())

    # ------------------------------------------------------------------ boot and teardown (testnet.boot)

    async def boot(self, ready_timeout_s: float) -> None:
        await B.boot(self, ready_timeout_s)

    async def wait_ready(self, timeout_s: float = 30.0, names: list[str] | None = None) -> None:
        await B.wait_ready(self, timeout_s, names)

    async def check_store_retrieve(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return await B.check_store_retrieve(self, timeout_s)

    def children(self) -> list[procs.Child]:
        return B.children(self)

    async def teardown(self) -> float:
        return await B.teardown(self)

    # ------------------------------------------------------------------ process control (testnet.nodeops)

    async def node_kill(self, name: str) -> None:
        await self.ops.kill(name)

    async def node_pause(self, name: str) -> None:
        await self.ops.pause(name)

    async def node_resume(self, name: str) -> None:
        await self.ops.resume(name)

    async def node_restart(self, name: str, timeout_s: float = 30.0, *,
                           running: Callable[[], None] | None = None) -> None:
        await self.ops.restart(name, timeout_s, running=running)

    async def node_restart_many(self, names: list[str], timeout_s: float = 30.0, *,
                                running: Callable[[], None] | None = None,
                                spawned: Callable[[], None] | None = None) -> None:
        await self.ops.restart_many(names, timeout_s, running=running, spawned=spawned)

    async def node_add(self, name: str | None = None, timeout_s: float = 30.0, *,
                       running: Callable[[], None] | None = None) -> str:
        return await self.ops.add(name, timeout_s, running=running)

    async def node_remove(self, name: str) -> None:
        await self.ops.remove(name)

    async def node_action(self, action: str, name: str | None) -> Any:
        return await self.ops.action(action, name)

    async def control(self, action: str, args: dict[str, Any]) -> Any:
        return await self.ops.control(action, args)


# ---------------------------------------------------------------------------- open_testnet


@asynccontextmanager
async def open_testnet(options: Options | None = None, *, progress: Progress | None = None,
                       **kwargs: Any) -> AsyncIterator[Testnet]:
    """Boot a network (``Options`` or its fields as keywords) and yield it once ready;
    stop every process of it when the block ends, however it ends."""
    opts = options or Options(**kwargs)
    if opts.cluster:
        raise ControllerError("a cluster run opens with testnet.cluster.run.open_network (or open_cluster_testnet)")
    P.check_options(nodes=opts.nodes, users=opts.users, min_swarm=opts.min_swarm, links=opts.links)
    run_id = opts.run_id or rundir.new_run_id()
    seed = opts.seed if opts.seed is not None else secrets.randbits(63)
    binary = L.find_toxiproxy(opts.toxiproxy_binary) if opts.links == "toxiproxy" else None  # fail early
    open_files, _ = procs.raise_open_files_limit()  # every process we start inherits it
    servers = 1
    if opts.links == "toxiproxy":  # fail early, before anything is made
        servers = opts.toxiproxy_servers or L.servers_needed(opts.nodes, opts.users, open_files)
    run_dir = (Path(opts.run_dir).absolute() if opts.run_id and opts.run_dir
               else rundir.create_run_dir(run_id, opts.run_dir, opts.runs_dir))
    block, claim = rundir.claim_block(run_id)  # options are checked: planning cannot fail now
    plan = P.plan_network(nodes=opts.nodes, users=opts.users, min_swarm=opts.min_swarm, seed=seed,
                          links=opts.links, run_dir=run_dir, run_id=run_id, block=block, inject_bugs=opts.inject_bugs,
                          capture=opts.capture, disk=opts.disk,
                          toxiproxy_servers=servers)
    (progress or (lambda m: None))(f"run {run_id} in {run_dir}")

    def make(nursery: trio.Nursery) -> Testnet:
        return Testnet(plan, nursery, ProcessLauncher(zygote=opts.zygote, toxiproxy_binary=binary),
                       progress=progress, proxies_on_use=opts.proxies_on_use)

    def serve(net: Testnet) -> Callable[[], Awaitable[None]]:
        return functools.partial(
            rundir.serve_control, claim, plan.control_token, net.control,
            (ControllerError, P.PlanError, procs.ProcError, L.LinkError, RpcError, RequestError),
            open_link=net.open_link if net.proxies_on_use else None)

    async with B.live_run(make, ready_timeout_s=opts.ready_timeout_s, check=opts.check, serve=serve) as net:
        yield net
