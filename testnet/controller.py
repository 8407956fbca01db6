"""The testnet controller: boots a planned network, keeps its record, acts on
its nodes and tears it all down.

``async with open_testnet(Options(nodes=6, min_swarm=3)) as net:`` yields a
live :class:`Testnet` once every node answers ``info`` with a swarm and the
registry's height.  Leaving the block stops every process of the run
(SIGTERM, SIGKILL after a grace period).  Every controller serves a small
control API on the run's own loopback address (``controller`` in
``run.json``).  ``swarmnet up`` (and its detached supervisor, ``python -m
testnet.cli supervise``) keeps one up until a signal or a ``down`` request.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from . import links as L
from . import plan as P
from . import procs, rundir
from .base.bugs import NODE_BUGS
from .base.crypto import (BadSignature, Identity, link_open_message, open_message, retrieve_signature_message,
                          seal_message, verify_request)
from .base.protocol import RequestError, Status
from .registry import deregister_args
from .base.net import TCP, Network
from .base.rpc import ConnectionPool, RpcError, call_once

Progress = Callable[[str], None]
CALL_TIMEOUT_S = 2.0
OPEN_LINK_TIMEOUT_S = 10.0  # a node waits this long for its link's proxy (a boot asks for thousands at once)
BOOT_CALL_TIMEOUT_S = 30.0  # for the calls a boot makes to every node at once


class ControllerError(Exception):
    """A request to the controller cannot be done (unknown node, wrong state, ...)."""


def error_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, as trio nurseries raise them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in error_leaves(sub)]
    return [exc]


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

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_dir": None if self.run_dir is None else str(self.run_dir),
                "runs_dir": str(self.runs_dir), "inject_bugs": list(self.inject_bugs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Options:
        return cls(**{**d, "run_dir": None if d.get("run_dir") is None else Path(d["run_dir"]),
                      "runs_dir": Path(d["runs_dir"]), "inject_bugs": tuple(d["inject_bugs"])})


@dataclass
class NodeRuntime:
    """What the controller knows of one node beyond its plan."""

    plan: P.NodePlan
    state: str = "starting"
    child: procs.Child | None = None
    port: int = 0  # its main port, kept across restarts
    ingress: dict[str, int] = field(default_factory=dict)  # user -> local port of the node
    swarm_id: int | None = None
    exit_code: int | None = None
    links_stale: bool = False  # the dial table changed while it was paused: push it on resume
    ingress_open: bool = False  # this process of the node listens at its ingress ports

    @property
    def address(self) -> tuple[str, int]:
        return (self.plan.host, self.port)


class Testnet:
    """A live network.  Made by :func:`open_testnet`; every method is safe to call from its trio run."""

    def __init__(self, plan: P.NetworkPlan, nursery: trio.Nursery, *, progress: Progress | None = None,
                 zygote: bool = True, toxiproxy_binary: Path | None = None, network: Network = TCP,
                 proxies_on_use: bool = True) -> None:
        self.plan = plan
        self.network = network
        self.randbytes: Any = None  # the check message's sealing randomness: libsodium's, unless simulated
        self.run_dir = plan.run_dir
        self._nursery = nursery
        self._progress = progress or (lambda msg: None)
        self.nodes: dict[str, NodeRuntime] = {n.name: NodeRuntime(n) for n in plan.nodes}
        self.removed: list[dict[str, Any]] = []
        self.registry: procs.Child | None = None
        self.registry_address: tuple[str, int] = (plan.registry_host, 0)
        self.toxiproxies: list[procs.Child] = []  # the servers sharing the proxies (plan.toxiproxy_apis)
        self.api: L.ProxyTable | None = None
        # Node links' proxies made when a node first dials them (see links.ProxyTable); users'
        # links, few, are made at boot.
        self.proxies_on_use = proxies_on_use and plan.links_mode == "toxiproxy"
        self._by_key: dict[str, NodeRuntime] = {rt.plan.ed25519_public: rt for rt in self.nodes.values()}
        self._links_saved: Any = None  # what links.json was last written for (see save)
        self.state = "starting"
        self.started_ms = int(time.time() * 1000)
        self.stop_requested = trio.Event()
        self.check_result: dict[str, Any] | None = None
        self._use_zygote = zygote
        self.zygote: procs.Zygote | None = None
        self._lock = trio.Lock()  # one node operation at a time
        self.create_time = procs.process_create_time(os.getpid())
        self.toxiproxy_binary = toxiproxy_binary
        self._pool = ConnectionPool(nursery, self._resolve, connect_timeout=CALL_TIMEOUT_S, network=network)

    def now_ms(self) -> int:
        """The controller's clock (the simulation's is virtual)."""
        return int(time.time() * 1000)

    # ------------------------------------------------------------------ lookups

    def _resolve(self, name: Any) -> tuple[str, int, str | None]:
        if name == "registry":
            return (*self.registry_address, None)
        return (*self.nodes[name].address, None)

    def node(self, name: str) -> NodeRuntime:
        try:
            return self.nodes[name]
        except KeyError:
            raise ControllerError(f"no node {name!r} in this run (nodes: {', '.join(self.nodes)})") from None

    def user_identity(self, name: str) -> Identity:
        return self.plan.user(name).identity

    def user_host(self, name: str) -> str:
        """The user's own IP: bind it as the source address of its connections."""
        return self.plan.user(name).host

    def user_links(self, name: str) -> dict[str, tuple[str, int]]:
        """Where user ``name`` dials each node (by ed25519 hex): its proxies, or the nodes themselves."""
        table = {rt.plan.ed25519_public: rt.address for rt in self.nodes.values()}
        table.update(self.plan.dial_table(name))
        return table

    def proxy_name(self, src: str, dst: str) -> str:
        """The Toxiproxy proxy of the directed link ``src`` -> ``dst`` (for :mod:`testnet.links` faults)."""
        return self.plan.link(src, dst).name

    def proxy_spec(self, name: str) -> dict[str, str]:
        """Link ``name``'s proxy as Toxiproxy takes it (see :class:`links.ProxyTable`)."""
        link = self.plan.link_named(name)
        if link is None:
            raise L.ProxyGone(f"no link {name} in this run")
        up = self.upstream(link)
        if up is None:
            raise L.LinkError(f"link {name}: {link.dst} has not listened yet")
        return {"name": name, "listen": f"{link.listen[0]}:{link.listen[1]}", "upstream": f"{up[0]}:{up[1]}"}

    async def open_link(self, args: dict[str, Any]) -> dict[str, Any]:
        """A node asks for the proxy of its link to another when its first dial of it is refused
        (``open_link {src, dst, signature}``: both nodes' ed25519 keys, hex, signed by ``src``;
        PROTOCOL.md).  Answers once the proxy exists, with every fault on the link applied."""
        src_key, dst_key, sig = args.get("src"), args.get("dst"), args.get("signature")
        if not (isinstance(src_key, str) and isinstance(dst_key, str) and isinstance(sig, bytes)):
            raise RequestError(Status.BAD_REQUEST, "open_link needs 'src' and 'dst' (hex keys) and 'signature' (bytes)")
        src = self._by_key.get(src_key)
        if src is None:
            raise RequestError(Status.FORBIDDEN, "open_link: 'src' is not a node of this run")
        try:
            verify_request(bytes.fromhex(src_key), link_open_message(src_key, dst_key), sig)
        except BadSignature as exc:
            raise RequestError(Status.UNAUTHORIZED, f"open_link: {exc}") from None
        dst = self._by_key.get(dst_key)
        if dst is None:
            raise RequestError(Status.NOT_FOUND, "open_link: 'dst' is not a node of this run")
        if self.api is None or self.state not in ("starting", "ready"):
            raise RequestError(Status.NOT_READY, f"open_link: no proxies to make (the run is {self.state})")
        name = self.plan.link(src.plan.name, dst.plan.name).name
        try:
            with trio.fail_after(OPEN_LINK_TIMEOUT_S):
                await self.api.open(name)
        except L.LinkError as exc:
            raise RequestError(Status.NOT_READY, f"open_link {name}: {exc}") from None
        except trio.TooSlowError:
            raise RequestError(Status.GATEWAY_TIMEOUT,
                               f"open_link {name}: not made in {OPEN_LINK_TIMEOUT_S:g} s") from None
        return {"link": name}

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

    # ------------------------------------------------------------------ the record

    def record(self) -> dict[str, Any]:
        """run.json as it stands (schema in RUNDIR.md)."""
        return rundir.build_record(self)

    def save(self) -> None:
        """Write run.json, and links.json first if the link table changed since it was written
        (a 500-node network has 251,000 links: run.json alone is rewritten on every node event)."""
        if self.plan.links and all(rt.port for rt in self.nodes.values()):  # else upstreams are unknown
            key = (id(self.plan.links), tuple((rt.port, tuple(rt.ingress.items())) for rt in self.nodes.values()))
            if key != self._links_saved:
                rundir.write_links(self.run_dir / rundir.LINKS_JSON, rundir.build_links(self))
                self._links_saved = key
        rundir.write_json_atomic(self.run_dir / rundir.RUN_JSON, self.record())

    def upstream(self, link: P.LinkPlan) -> tuple[str, int] | None:
        """Where the proxy of ``link`` leads: the node, or its ingress listener for that user."""
        dst = self.nodes.get(link.dst)
        if dst is None or not dst.port:
            return None
        if link.from_user:
            port = dst.ingress.get(link.src)
            return (dst.plan.host, port) if port else None
        return dst.address

    # ------------------------------------------------------------------ boot

    def _write_files(self) -> None:
        rundir.write_secret(self.run_dir / rundir.ADMIN_TOKEN_FILE, self.plan.admin_token + "\n")
        rundir.write_secret(self.run_dir / rundir.CONTROL_TOKEN_FILE, self.plan.control_token + "\n")
        for u in self.plan.users:
            rundir.write_secret(u.seed_file, u.seed.hex() + "\n")
        for rt in self.nodes.values():
            rundir.write_secret(rt.plan.seed_file, rt.plan.seed.hex() + "\n")
        (self.run_dir / "registry").mkdir(exist_ok=True)
        # The registry lets only these keys register (new nodes are staked as they are added).
        rundir.write_secret(self.run_dir / "registry" / "stakes.json",
                            json.dumps([rt.plan.ed25519_public for rt in self.nodes.values()]))

    async def _boot(self, ready_timeout_s: float) -> None:
        self._write_files()
        self.save()
        with trio.fail_after(ready_timeout_s + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._start_registry)
                if self.plan.links_mode == "toxiproxy":
                    nursery.start_soon(self._start_toxiproxy)
                if self._use_zygote:
                    nursery.start_soon(self._start_zygote)
            self._progress(f"registry at {self.registry_address[0]}:{self.registry_address[1]}"
                           + (f", Toxiproxy at {self.api.url}" if self.api else ", links direct (no link faults)"))
            names = list(self.nodes)
            await self._start_nodes(names, ready_timeout_s)
            self._progress(f"{len(names)} nodes listening")
            if self.api is not None:
                await self._open_ingress(names)
                made = self._boot_links()
                await self._populate(made)
                self._progress(f"{len(made):,} proxies created" + (
                    f" (users' links); a node link's proxy is made when first used ({len(self.plan.links):,} "
                    "links in all)" if self.proxies_on_use else ""))
            self.save()
            async with trio.open_nursery() as nursery:
                if self.proxies_on_use:
                    nursery.start_soon(self._make_swarm_links, ready_timeout_s)
                await self.wait_ready(ready_timeout_s)
        self.state = "ready"
        self.save()

    async def _make_swarm_links(self, timeout_s: float) -> None:
        """Make the proxies between the members of each swarm as soon as the registry publishes
        its first list (its genesis): every member starts anti-entropy with every other at once,
        and one /populate per server beats thousands of open_link calls.  Other links are made
        on first use."""
        try:
            body = await self.call("registry", "get_service_nodes", {"since_height": -1, "wait_ms": 30_000},
                                   timeout=min(timeout_s, 35.0))
        except (RpcError, RequestError):
            return  # the nodes ask for their links themselves
        swarms: dict[Any, list[str]] = {}
        for rec in body.get("nodes") or ():
            rt = self._by_key.get(rec.get("ed25519_public"))
            if rt is not None and rec.get("swarm_id") is not None:
                swarms.setdefault(rec["swarm_id"], []).append(rt.plan.name)
        wanted = [{"name": self.plan.link(a, b).name} for members in swarms.values()
                  for a in members for b in members if a != b]
        try:
            assert self.api is not None
            await self.api.populate(wanted)
        except L.LinkError as exc:
            self._progress(f"not every swarm link made at once ({exc}); the nodes ask for the rest")
            return
        self._progress(f"{len(wanted):,} proxies made between swarm members")

    async def _start_registry(self) -> None:
        d = self.run_dir / "registry"
        argv = procs.python_argv("testnet.registry", "--host", self.plan.registry_host, "--port", "0",
                                 "--min-swarm", str(self.plan.min_swarm), "--seed", str(self.plan.seed),
                                 "--state", str(d / "state.json"), "--log", str(d / "registry.log"),
                                 "--admin-token-file", str(self.run_dir / rundir.ADMIN_TOKEN_FILE),
                                 "--stakes", str(d / "stakes.json"), "--genesis",
                                 "--parent-pid", str(os.getpid()))
        child, rfd = procs.spawn("registry", argv, stderr=d / "stderr.log", logs=(d / "registry.log",))
        self.registry = child
        self._nursery.start_soon(child.watch)
        ready = await procs.read_ready_line(child, rfd, 20.0)
        self.registry_address = tuple(ready["addresses"][0])  # type: ignore[assignment]
        await self.call("registry", "info", timeout=5.0)

    def _boot_links(self, touching: str | None = None) -> list[P.LinkPlan]:
        """The links whose proxies are made at once (of those touching node ``touching``, if given):
        all of them, or only the users' when node links are made on first use."""
        links = ([link for user in self.plan.users for link in self.plan.links_from(user.name)]
                 if self.proxies_on_use else self.plan.links)
        return [link for link in links if touching in (None, link.src, link.dst)]

    async def _start_toxiproxy(self) -> None:
        apis = []
        for i, (host, port) in enumerate(self.plan.toxiproxy_apis):
            log = self.run_dir / ("toxiproxy.log" if i == 0 else f"toxiproxy-{i}.log")
            child, api = L.spawn_toxiproxy(host, port, log=log, seed=self.plan.seed + i,
                                           binary=self.toxiproxy_binary)
            self.toxiproxies.append(child)
            apis.append(api)
            self._nursery.start_soon(child.watch)
        self.api = L.ProxyTable(L.ToxiproxyServers(apis, self.plan.server_of), self.proxy_spec, self._nursery)
        async with trio.open_nursery() as nursery:
            for child, api in zip(self.toxiproxies, apis):
                nursery.start_soon(L.wait_toxiproxy, child, api)

    async def _start_zygote(self) -> None:
        self.zygote = procs.Zygote.launch("nodes.__main__:main", stderr=self.run_dir / "zygote.log",
                                           preload=("nodes.server", "nodes.onion"))
        await self.zygote.wait_ready(self._nursery)

    async def _spawn_node(self, rt: NodeRuntime) -> tuple[procs.Child, int]:
        n = rt.plan
        cfg = P.node_config(self.plan, n, registry=self.registry_address, parent_pid=os.getpid(), port=rt.port,
                            link_opener=self.plan.controller if self.proxies_on_use else None)
        n.dir.mkdir(parents=True, exist_ok=True)
        rundir.write_secret(n.config_file, json.dumps(cfg, indent=1))
        args = ["--config", str(n.config_file)]
        if self.zygote is not None:
            return await self.zygote.spawn(n.name, args, stderr=n.stderr, logs=(n.log,))
        return procs.spawn(n.name, procs.python_argv("nodes", *args), stderr=n.stderr, logs=(n.log,))

    async def _start_nodes(self, names: list[str], timeout_s: float) -> None:
        """Spawn the nodes and read their readiness lines, all at once."""
        async def start(rt: NodeRuntime) -> None:
            rt.state, rt.exit_code = "starting", None
            child, rfd = await self._spawn_node(rt)
            rt.child = child
            self._nursery.start_soon(self._watch_node, rt, child)
            line = await procs.read_ready_line(child, rfd, timeout_s)
            rt.port = int(line["addresses"][0][1])
            rt.state, rt.ingress_open = "running", False
            if self.plan.links_mode == "toxiproxy":
                await self._open_ingress([rt.plan.name])  # each node as it comes up, not all after

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(start, self.nodes[name])

    async def _watch_node(self, rt: NodeRuntime, child: procs.Child) -> None:
        await child.watch()
        if rt.child is child:
            rt.exit_code = child.returncode
            if rt.state in ("starting", "running", "paused"):
                rt.state = "exited"  # nobody asked it to stop
            if self.state in ("ready", "starting"):
                self.save()

    async def _open_ingress(self, names: list[str]) -> None:
        """A listener per user on each node of ``names`` (the upstream of that user's proxy), so the
        node can tell users apart at the transport layer; same ports again after a restart."""
        users = [u.name for u in self.plan.users]

        async def ingress(rt: NodeRuntime) -> None:
            want = [[rt.plan.host, rt.ingress.get(u, 0)] for u in users]
            # At boot every node is asked at once: a large network on two cores answers slowly
            # (500 nodes: connecting alone took the whole 2 s of a call).
            got = await self.admin(rt.plan.name, "admin_listen", addresses=want, timeout=BOOT_CALL_TIMEOUT_S)
            rt.ingress = {u: int(a[1]) for u, a in zip(users, got["addresses"])}
            rt.ingress_open = True

        if users:
            async with trio.open_nursery() as nursery:
                for name in names:
                    if not self.nodes[name].ingress_open:
                        nursery.start_soon(ingress, self.nodes[name])

    async def _populate(self, wanted: tuple[P.LinkPlan, ...] | list[P.LinkPlan]) -> None:
        """Create the proxies of ``wanted`` links whose destination has run (has an upstream)."""
        assert self.api is not None
        items = [(link, self.upstream(link)) for link in wanted]
        items = [(link, up) for link, up in items if up is not None]
        self._check_bindable([link.listen for link, _ in items])
        await self.api.populate([{"name": link.name, "listen": f"{link.listen[0]}:{link.listen[1]}",
                                  "upstream": f"{up[0]}:{up[1]}"} for link, up in items])

    def _check_bindable(self, addresses: list[tuple[str, int]]) -> None:
        L.check_bindable(addresses)

    async def wait_ready(self, timeout_s: float = 30.0, names: list[str] | None = None) -> None:
        """Until every running node (or ``names``) answers ``info`` with a swarm and the registry's height.

        Raises :class:`procs.NotReady` naming the first node that is not, with its log tail.
        """
        names = names or [n for n, rt in self.nodes.items() if rt.state == "running"]
        why: dict[str, str] = {}
        # Node -> the registry height at which it answered ready.  A node ready at the
        # registry's current height stays ready while that height holds: each round asks
        # only the others (a 1,000-node boot asked every node every 50 ms).
        ready: dict[str, int] = {}
        with trio.move_on_after(timeout_s):
            while True:
                for name in names:
                    child = self.nodes[name].child
                    if child is not None and not child.running:  # no point waiting for it
                        raise child.failure("exited before the network was ready", procs.NotReady)
                try:
                    reg = await self.call("registry", "info")
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
                        infos[name] = await self.call(name, "info", timeout=1.0)
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
                    rt = self.nodes[name]
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
                        if (await self.call(n, "info", timeout=0.5)).get("swarm_id") is None:
                            why = {n: f"has no swarm yet ({why['registry']})"}
                            break
                    except (RpcError, RequestError) as exc:
                        why = {n: f"does not answer info ({exc})"}
                        break
        name, reason = next(iter(why.items())) if why else ("registry", "has not seen every node register")
        child = self.nodes[name].child if name in self.nodes else self.registry
        tail = child.tail() if child else ""
        raise procs.NotReady(name, f"not ready after {timeout_s:.3g} s: {reason}", None, tail)

    # ------------------------------------------------------------------ checks

    async def check_store_retrieve(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Store one sealed message (first user to second) directly at a member of the recipient's
        swarm, through the users' own links; retrieve it (signed) from another member and open it."""
        users = list(self.plan.users[:2]) or [P.make_user(self.run_dir, self.plan.seed, self.plan.block, 99)]
        sender, recipient = users[0], users[-1]
        rid, text = recipient.identity, f"swarmnet check {self.plan.run_id}".encode()
        any_node = next(n for n, rt in self.nodes.items() if rt.state == "running")
        members = [self._node_by_key(m["ed25519_public"]) for m in
                   (await self.call(any_node, "get_swarm", {"pubkey": rid.session_id}))["nodes"]]

        async def user_call(user: P.UserPlan, node: NodeRuntime, op: str, args: dict[str, Any]) -> Any:
            host, port = self.plan.dial_table(user.name).get(node.plan.ed25519_public, node.address)
            resp = await call_once(host, port, op, args, timeout=CALL_TIMEOUT_S, local_host=user.host,
                                   network=self.network)
            if not resp.ok:
                raise ControllerError(f"check: {op} at {node.plan.name} answered {resp.status}: {resp.body!r:.200}")
            return resp.body

        # With a node bug injected on purpose, read back where it was stored: the bug may break
        # replication, and catching that is the checkers' job, not the boot check's.
        source = members[0] if set(self.plan.inject_bugs) & NODE_BUGS else members[-1]
        stored = await user_call(sender, members[0], "store", {
            "pubkey": rid.session_id, "namespace": 0,
            "data": seal_message(sender.identity, rid.session_id, text, self.randbytes),
            "ttl": 3_600_000, "timestamp": self.now_ms()})
        with trio.move_on_after(timeout_s):
            while True:
                ts = self.now_ms()
                got = await user_call(recipient, source, "retrieve", {
                    "pubkey": rid.session_id, "namespace": 0, "timestamp": ts, "pubkey_ed25519":
                    rid.ed25519_public.hex(), "signature": rid.sign(retrieve_signature_message(0, ts))})
                found = [m["data"] for m in got["messages"] if m["hash"] == stored["hash"]]
                if found:
                    if open_message(rid, found[0]) != (text, sender.identity.session_id):
                        raise ControllerError("check: the retrieved message does not open to what was stored")
                    self.check_result = {"hash": stored["hash"], "stored_at": members[0].plan.name,
                                         "retrieved_from": source.plan.name, "ok": True}
                    self.save()
                    return self.check_result
                await trio.sleep(0.1)
        raise ControllerError(f"check: message {stored['hash']} stored at {members[0].plan.name} was not "
                              f"retrievable from {source.plan.name} within {timeout_s:.3g} s")

    def _node_by_key(self, ed_hex: str) -> NodeRuntime:
        for rt in self.nodes.values():
            if rt.plan.ed25519_public == ed_hex:
                return rt
        raise ControllerError(f"no node with key {ed_hex[:12]}…")

    # ------------------------------------------------------------------ node operations

    async def node_kill(self, name: str) -> None:
        """SIGKILL the node, running or paused (it stays dead until :meth:`node_restart`)."""
        async with self._lock:
            rt = self._running(name, "paused")
            rt.state = "killed"
            rt.child.kill()
            await rt.child.wait_exit(5.0)
            self.save()

    async def node_pause(self, name: str) -> None:
        """SIGSTOP the node: its sockets stay open but nothing answers."""
        async with self._lock:
            rt = self._running(name)
            rt.child.pause()
            rt.state = "paused"
            self.save()

    async def node_resume(self, name: str) -> None:
        """SIGCONT a paused node."""
        async with self._lock:
            rt = self.node(name)
            if rt.state != "paused" or rt.child is None:
                raise ControllerError(f"{name} is {rt.state}, not paused")
            rt.child.resume()
            rt.state = "running"
            if rt.links_stale:
                await self._push_links(only=name)
            self.save()

    async def node_restart(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop the node if it runs, then start it with the same key, database and ports."""
        async with self._lock:
            rt = self.node(name)
            if rt.child is not None and rt.child.running:
                rt.state = "stopped"
                await procs.stop_children([rt.child])
            await self._start_nodes([name], timeout_s)
            if self.api is not None:
                await self._open_ingress([name])  # the proxies' upstreams, at the same ports again
            self.save()
            await self.wait_ready(timeout_s, [name])
            self.save()

    async def node_add(self, name: str | None = None, timeout_s: float = 30.0) -> str:
        """A new node (next free name unless given): new key, its links, everyone told. Returns its name."""
        async with self._lock:
            self.plan, node = P.with_node_added(self.plan, name)
            rundir.write_secret(node.seed_file, node.seed.hex() + "\n")
            await self.call("registry", "stake", {"token": self.plan.admin_token,
                                                  "ed25519_public": node.ed25519_public})
            self.nodes[node.name] = rt = NodeRuntime(node)
            self._by_key[node.ed25519_public] = rt
            self.nodes = dict(sorted(self.nodes.items(), key=lambda kv: kv[1].plan.index))
            await self._start_nodes([node.name], timeout_s)
            if self.api is not None:
                await self._open_ingress([node.name])
                await self._populate(self._boot_links(touching=node.name))
                await self._push_links(exclude=node.name)
            self.save()
            await self.wait_ready(timeout_s)
            self.save()
            self._progress(f"{node.name} added at {rt.address[0]}:{rt.address[1]}")
            return node.name

    async def node_remove(self, name: str) -> None:
        """Deregister the node (signed with its own key), stop it and drop its links."""
        async with self._lock:
            rt = self.node(name)
            identity = Identity.from_seed(bytes.fromhex(rundir.read_secret(rt.plan.seed_file)))
            await self.call("registry", "deregister", deregister_args(identity, self.now_ms()))
            if rt.child is not None:
                if rt.state == "paused":
                    rt.child.resume()
                await procs.stop_children([rt.child])
            await self._pool.drop(name)
            gone = [link.name for link in self.plan.links if name in (link.src, link.dst)]
            self.plan = P.with_node_removed(self.plan, name)
            rec = next(n for n in self.record()["nodes"] if n["name"] == name)
            self.removed.append({**rec, "state": "removed"})
            del self.nodes[name]
            self._by_key.pop(rt.plan.ed25519_public, None)
            if self.api is not None:
                async with trio.open_nursery() as nursery:
                    for proxy in gone:
                        nursery.start_soon(self.api.delete_proxy, proxy)
                await self._push_links()
            self.save()

    async def _push_links(self, exclude: str | None = None, only: str | None = None) -> None:
        """Send running nodes their current dial table (admin_set_links); a paused node gets
        it when resumed, a dead one from its config when restarted."""
        async def push(rt: NodeRuntime) -> None:
            table = {k: list(v) for k, v in self.plan.dial_table(rt.plan.name).items()}
            await self.admin(rt.plan.name, "admin_set_links", links=table)
            rt.links_stale = False

        async with trio.open_nursery() as nursery:
            for rt in self.nodes.values():
                if rt.plan.name == exclude or only not in (None, rt.plan.name):
                    continue
                if rt.state == "running":
                    nursery.start_soon(push, rt)
                elif rt.state == "paused":
                    rt.links_stale = True

    def _running(self, name: str, *also: str) -> NodeRuntime:
        rt = self.node(name)
        if rt.state not in ("running", "starting", *also) or rt.child is None or not rt.child.running:
            raise ControllerError(f"{name} is {rt.state}, not running")
        return rt

    async def control(self, action: str, args: dict[str, Any]) -> Any:
        """One control API request (see :func:`rundir.serve_control`): ``ping``, ``status``, ``down``,
        or ``node`` with ``what`` = add|remove|kill|pause|resume|restart and ``name``."""
        if action == "ping":
            return {"run_id": self.plan.run_id, "state": self.state}
        if action == "status":
            return await self.status()
        if action == "down":
            self.stop_requested.set()
            return {}
        if action == "node":
            return await self.node_action(str(args.get("what")), args.get("name"))
        raise ControllerError(f"unknown control action {action!r}")

    async def node_action(self, action: str, name: str | None) -> Any:
        """Dispatch ``add|remove|kill|pause|resume|restart`` (the CLI's ``node`` commands)."""
        if action == "add":
            return {"name": await self.node_add(name)}
        if name is None:
            raise ControllerError(f"node {action} needs a node name")
        method = {"remove": self.node_remove, "kill": self.node_kill, "pause": self.node_pause,
                  "resume": self.node_resume, "restart": self.node_restart}.get(action)
        if method is None:
            raise ControllerError(f"unknown node action {action!r}")
        await method(name)
        return {"name": name, "state": self.nodes[name].state if name in self.nodes else "removed"}

    # ------------------------------------------------------------------ status and teardown

    async def status(self) -> dict[str, Any]:
        """Live status of every process of the run (see :func:`rundir.gather_status`)."""
        return await rundir.gather_status(self.record())

    def children(self) -> list[procs.Child]:
        kids = [rt.child for rt in self.nodes.values() if rt.child is not None]
        return kids + [c for c in (self.registry, *self.toxiproxies) if c is not None]

    async def teardown(self) -> float:
        """Stop every process of the run; returns how long it took (s)."""
        start = time.monotonic()
        for rt in self.nodes.values():
            if rt.state in ("starting", "running", "paused"):
                rt.state = "stopped"
        failed, self.state = self.state == "failed", "stopping"
        async with trio.open_nursery() as nursery:
            # Toxiproxy keeps nothing: killed at once. Asked to stop, a server closes its proxies
            # one by one (3.2 s for 9,000 each at 300 nodes, longer than the nodes take).
            nursery.start_soon(functools.partial(procs.stop_children, self.toxiproxies, grace_s=0.0))
            nursery.start_soon(procs.stop_children, [c for c in self.children() if c not in self.toxiproxies])
        if self.zygote is not None:
            await self.zygote.stop()
        self.state = "failed" if failed else "stopped"
        elapsed = time.monotonic() - start
        try:
            self.save()
        except OSError:
            pass
        return elapsed


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
                          capture=opts.capture,
                          toxiproxy_servers=servers)
    (progress or (lambda m: None))(f"run {run_id} in {run_dir}")
    async with trio.open_nursery() as nursery:
        net = Testnet(plan, nursery, progress=progress, zygote=opts.zygote, toxiproxy_binary=binary,
                      proxies_on_use=opts.proxies_on_use)
        nursery.start_soon(functools.partial(
            rundir.serve_control, claim, plan.control_token, net.control,
            (ControllerError, P.PlanError, procs.ProcError, L.LinkError, RpcError, RequestError),
            open_link=net.open_link if net.proxies_on_use else None))
        try:
            try:
                await net._boot(opts.ready_timeout_s)
                if opts.check:
                    await net.check_store_retrieve()
                    progress and progress("check passed: every node answers info, swarms formed, "
                                          "one message stored and retrieved")
            except BaseException:
                net.state = "failed"
                raise
            yield net
        finally:
            with trio.CancelScope(shield=True):
                await net.teardown()
            nursery.cancel_scope.cancel()
