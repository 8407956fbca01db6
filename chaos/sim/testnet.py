"""Simulated processes: the controller's :class:`testnet.controller.Testnet`
with its children replaced by tasks in this one trio run (:class:`SimLauncher`).

Only how a child is started and signalled changes; everything else — the
plan, the run directory, the registry protocol, node operations, the record
— is the controller's own code.  A node is the unchanged
:class:`nodes.server.Node` given the world's clock, seeded randomness and the
simulated network; a :class:`SimChild` stands for its process:

* SIGKILL / SIGTERM cancel the node's tasks wherever they are; SQLite stays
  real, so what was committed survives and what was not is lost;
* SIGSTOP / SIGCONT pause and resume the node's host on the network (its
  peers' bytes wait in the buffers; its own timers still fire, a difference
  from a stopped process that this model accepts);
* the registry runs in process on the same network; Toxiproxy is
  :class:`chaos.sim.toxiproxy.SimToxiproxy`.

Logs go to each process's usual file in the run directory, routed by a
context variable that every task of a node inherits, with virtual times.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import random
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from nodes.core import NodeConfig
from nodes.disk import Disk
from nodes.onion import install_onion
from nodes.server import Clock, Node
from testnet import plan as P
from testnet import procs, rundir
from testnet.controller import NodeRuntime, Options, Testnet
from testnet.boot import live_run
from testnet.launch import watch_node
from testnet.base.logs import JsonFormatter
from testnet.registry import run_registry

from .network import SimNetwork
from .toxiproxy import SimToxiproxy
from .wire import DEFAULT_PROFILE, Wire, model_for

# Virtual time starts here (2030-01-01T00:00:00Z) in every run, so a seed
# gives the same timestamps: histories compare byte for byte.
EPOCH_S = 1_893_456_000.0
SIM_BLOCK = (250, 0)  # addresses exist only in the simulated network: one fixed block

_current_proc: contextvars.ContextVar[str] = contextvars.ContextVar("swarmnet_sim_proc", default="sim")


class SimWorld:
    """Time, randomness and the network of one simulated run.

    ``seed`` is the run's seed (keys, schedule and workload, as in a real run);
    ``variant`` picks everything else — nonces, jitter, timer phases, the
    scheduler's choices — so one real run's plan can be tried under many
    interleavings (``swarmnet sim reproduce``).  ``wire`` names the profile of
    the time hops and syncs take (``wire.py``): each route's base delay comes
    from the seed, each chunk's and sync's jitter from the variant.
    """

    def __init__(self, seed: int, variant: int = 0, wire: str = DEFAULT_PROFILE) -> None:
        self.seed = seed
        self.variant = variant
        self.wire = model_for(wire, seed, self.rng("wire"))
        self.net = SimNetwork(Wire(self.wire))

    @property
    def scheduler_seed(self) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}/{self.variant}/scheduler".encode()).digest()[:8], "big")

    def now_s(self) -> float:
        return EPOCH_S + trio.current_time()

    def now_ms(self) -> int:
        return int(self.now_s() * 1000)

    def rng(self, *names: object) -> random.Random:
        """An independent stream per purpose (string seeds hash with SHA-512: stable across processes)."""
        return random.Random("/".join([str(self.seed), str(self.variant), *map(str, names)]))

    def randbytes(self, *names: object) -> Any:
        return self.rng("bytes", *names).randbytes

    def disk(self, name: str, life: int) -> Disk:
        """A node's simulated disk: no OS syncs; each sync takes the wire profile's time,
        paid on the node's clock as a slow disk's is."""
        sync_time = None if self.wire.instant else self.wire.sync_time(self.rng("sync", name, life))
        return Disk(self.rng("disk", name, life), real_sync=False, sync_time=sync_time)


class SimChild(procs.Signals):
    """A simulated process: the same surface as :class:`testnet.procs.Child`, no pid."""

    pid = None
    create_time = None

    def __init__(self, name: str, net: SimNetwork, host: str, logs: tuple[Path | None, ...] = ()) -> None:
        self.name = name
        self.net = net
        self.host = host
        self.logs = logs
        self.returncode: int | None = None
        self.exited = trio.Event()
        self.scope = trio.CancelScope()

    def tail(self, n: int = 15) -> str:
        return procs.tail_lines(self.logs, n)

    def failure(self, reason: str, cls: type[procs.ChildFailed] = procs.ChildFailed) -> procs.ChildFailed:
        return cls(self.name, reason, self.returncode, self.tail())

    def send_signal(self, sig: int) -> bool:
        if self.exited.is_set():
            return False
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if self.returncode is None:
                self.returncode = -int(sig) if sig == signal.SIGKILL else 0
            self.net.resume(self.host)
            self.scope.cancel()
        elif sig == signal.SIGSTOP:
            self.net.pause(self.host)
        elif sig == signal.SIGCONT:
            self.net.resume(self.host)
        return True

    def state(self) -> str:
        if self.exited.is_set():
            return "dead"
        return "paused" if self.net.paused(self.host) else "alive"

    async def watch(self) -> None:
        await self.exited.wait()

    def abandon_watch(self) -> None:
        pass

    async def wait_exit(self, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            await self.exited.wait()
        return self.exited.is_set()


class SimLauncher:
    """The run's processes as tasks of this trio run: a :mod:`testnet.launch` launcher.
    Every proxy is made at boot (:class:`SimToxiproxy`'s cost little, and no node asks a
    controller for its links: the simulation serves no control API)."""

    uses_zygote = False  # nothing to fork: a node is an object in this process

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self._lives: dict[str, int] = {}

    def check_bindable(self, addresses: list[tuple[str, int]]) -> None:
        pass  # the simulated network's addresses are free by construction

    async def start_registry(self, net: Testnet) -> None:
        d = net.run_dir / "registry"
        child = SimChild("registry", self.world.net, net.plan.registry_host, (d / "registry.log",))
        stakes = [rt.plan.ed25519_public for rt in net.nodes.values()]

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            _current_proc.set("registry")
            try:
                with child.scope:
                    # No state file: a worker thread writing it would let virtual time run on.
                    await run_registry(net.plan.registry_host, 0, min_swarm=net.plan.min_swarm, seed=net.plan.seed,
                                       admin_token=net.plan.admin_token, stakes=stakes, network=self.world.net,
                                       now_ms=self.world.now_ms, genesis=True, task_status=task_status)
            finally:
                child.exited.set()

        net.registry = child  # type: ignore[assignment]
        bound = await net.nursery.start(run)
        net.registry_address = tuple(bound[0])  # type: ignore[assignment]

    async def start_toxiproxy(self, net: Testnet) -> None:
        net.api = SimToxiproxy(self.world.net, net.nursery, self.world.rng("toxiproxy"))  # type: ignore[assignment]

    async def start_nodes(self, net: Testnet, names: list[str], timeout_s: float, *,
                          spawned: Callable[[], None] | None = None) -> None:
        if spawned is not None:
            spawned()  # a simulated process runs as soon as it is made
        for name in names:  # in order: the same seed starts them the same way
            await self._start_node(net, net.nodes[name])

    async def _start_node(self, net: Testnet, rt: NodeRuntime) -> None:
        n = rt.plan
        life = self._lives[n.name] = self._lives.get(n.name, 0) + 1
        cfg = P.node_config(net.plan, n, registry=net.registry_address, parent_pid=None, port=rt.port)
        n.dir.mkdir(parents=True, exist_ok=True)
        rundir.write_secret(n.config_file, json.dumps(cfg, indent=1))
        # Small capture buffers: a thousand nodes share this process's memory.
        config = NodeConfig.from_dict({**cfg, "log": None, "capture_buffer_bytes": 64 * 1024})
        child = SimChild(n.name, self.world.net, n.host, (n.log,))
        node = Node(config, clock=Clock(config.clock_offset_ms, source=self.world.now_s),
                    randbytes=self.world.randbytes(n.name, life), rng=self.world.rng(n.name, life),
                    network=self.world.net, disk=self.world.disk(n.name, life),
                    halt=lambda code: child.kill())
        install_onion(node)
        rt.state, rt.exit_code, rt.child = "starting", None, child  # type: ignore[assignment]

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            _current_proc.set(n.name)
            try:
                with child.scope:
                    await node.run(task_status=task_status)
                    child.returncode = 0  # stopped itself (admin_stop)
            finally:
                child.exited.set()

        listening = await net.nursery.start(run)
        net.nursery.start_soon(watch_node, net, rt, child)
        rt.port = int(listening[0][1])
        # A new process listens at none of its users' ingress ports yet: open_ingress must open
        # them again (as ProcessLauncher says).  Left True, a restarted node was never given
        # them, so every user path through it broke; once a power loss had restarted every
        # node, no user reached any node for the rest of the run.
        rt.state, rt.ingress_open = "running", False


class _ProcLogs(logging.Handler):
    """Each record to the log file of the simulated process that emitted it."""

    def __init__(self, path_of: Any, now_s: Any) -> None:
        super().__init__()
        self._path_of = path_of
        self._open: dict[str, Any] = {}
        self._now_s = now_s

    def emit(self, record: logging.LogRecord) -> None:
        proc = _current_proc.get()
        path = self._path_of(proc)
        if path is None:
            return
        record.created = self._now_s()
        f = self._open.get(proc)
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._open[proc] = open(path, "a", encoding="utf-8")
        f.write(JsonFormatter(proc).format(record) + "\n")

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        super().close()


@asynccontextmanager
async def open_sim_testnet(options: Options, world: SimWorld, *, progress: Any = None) -> AsyncIterator[Testnet]:
    """:func:`testnet.controller.open_testnet` for the simulation: the same plan and run
    directory; no address block to claim and no control API (nothing outside this
    process can reach the simulated network)."""
    # The plan's run id is part of what a run does (the boot check's text): the same for every
    # run of a seed; the directory gets a fresh, time-stamped name.
    run_id = options.run_id or f"sim-{world.seed}-{world.variant}"
    run_dir = rundir.create_run_dir(f"{rundir.new_run_id()}-sim", Path(options.run_dir) if options.run_dir else None,
                                    options.runs_dir)
    plan = P.plan_network(nodes=options.nodes, users=options.users, min_swarm=options.min_swarm, seed=world.seed,
                          links=options.links, run_dir=run_dir, run_id=run_id, block=SIM_BLOCK,
                          inject_bugs=options.inject_bugs, capture=options.capture)
    nets: list[Testnet] = []

    def path_of(proc: str) -> Path | None:
        if proc == "registry":
            return run_dir / "registry" / "registry.log"
        rt = nets[0].nodes.get(proc) if nets else None
        return rt.plan.log if rt is not None else None

    handler = _ProcLogs(path_of, world.now_s)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    def make(nursery: trio.Nursery) -> Testnet:
        net = Testnet(plan, nursery, SimLauncher(world), progress=progress, network=world.net,
                      clock=world.now_ms, randbytes=world.randbytes("controller"), proxies_on_use=False)
        nets.append(net)
        world.net.attach_wire()
        return net

    try:
        # No check line among the simulation's progress: its output stays as it always was.
        async with live_run(make, ready_timeout_s=options.ready_timeout_s, check=options.check,
                            announce_check=False) as net:
            yield net
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
