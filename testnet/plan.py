"""The testnet planner: options in, frozen records out — no processes,
sockets, clocks or randomness inside (after honcho's ``expand_processes``).

A run owns one /21 of 127.0.0.0/8, ``127.a.b.0/21`` with ``b`` a multiple
of 8, laid out so an address alone says what it is:

=====================  ===============================================
``127.a.b.1``          the controller's control API (its claim on the block)
``127.a.b.2``          the registry
``127.a.b.3:T+s``      the API of Toxiproxy server ``s`` (one or more)
``127.a.(b+1).i``      node ``i`` (``n01`` is ``.1``); nodes 255-508 in
                       ``127.a.(b+5)``, 509-1,016 (direct links only) in
                       ``127.a.(b+6)`` and ``127.a.(b+7)``
``127.a.(b+2).j``      user ``j`` (``alice`` is ``.1``)
``127.a.(b+3).i:P+k``  proxy of the link node ``i`` -> node ``k``; for
                       nodes 255-508, ``127.a.(b+6)``
``127.a.(b+4).j:P+k``  proxy of the link user ``j`` -> node ``k``
=====================  ===============================================

(``T`` = :data:`TOXIPROXY_PORT`; ``P`` = :data:`PROXY_PORT_BASE`, below
Linux's ephemeral port range.)  A large network's proxies are shared out
among several Toxiproxy servers by source (:meth:`NetworkPlan.server_of`),
so no process holds more listening sockets than its descriptor limit allows.
The links are not listed: each is derived from its two ends by the rules
above (:mod:`testnet.plan_links`), so a plan costs what its nodes cost, not
the N² of their links.

On a cluster (``swarmnet up --cluster``) the plan has a host dimension: each
node is placed on a host (:class:`HostPlan`, round-robin: ``n01`` on the
first, ``n02`` on the second, ...) and listens at that host's address (the
one other hosts reach it by) on a port of its own; its outgoing proxies
listen on its host's own loopback, served by its host's own Toxiproxy server,
at the address above of its place among that host's nodes (``n04``, the
second node of ``h1``, takes source address 2 there), so each host can hold
508 nodes and a cluster ``508 × hosts``, up to the 2,767 destinations a
proxy port can name below the ephemeral range; the users' proxies stay with
the controller (server 0).
Which block a run gets is derived from its run id (:func:`candidate_blocks`);
the controller takes the first one it can bind.  Every key seed is derived
from the run seed, so replaying a run reproduces its identities.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Literal, Union

from .base.crypto import Identity
from .plan_links import LinkNames, LinkPlan, LinkTable  # LinkPlan is known here as P.LinkPlan too

LinksMode = Literal["toxiproxy", "direct"]
LINKS_MODES: tuple[str, ...] = ("toxiproxy", "direct")
DISKS: tuple[str, ...] = ("model", "os")  # what sits under each node's SQLite (NetworkPlan.disk)
Address = tuple[str, int]
Block = tuple[int, int]

USER_NAMES = ("alice", "bob", "carol", "dave")
MAX_NODES = 2 * 254  # with proxies: nodes in /24s 1 and 5, their proxies' listen addresses in 3 and 6
MAX_NODES_DIRECT = 4 * 254  # without proxies nodes also take /24s 6 and 7 of the block
NODE_OFFSETS = (1, 5, 6, 7)  # the block's /24s that hold node addresses, 254 each
PROXY_SOURCE_OFFSETS = (3, 6)  # the /24s that hold the listen addresses of node i's outgoing proxies
MAX_USERS = 254
CONTROL_PORT = 29555  # fixed so that binding it is how a run claims its block
TOXIPROXY_PORT = 8474  # Toxiproxy's own default, on the run's own address
PROXY_PORT_BASE = 30000  # + destination node index; below the ephemeral range (32768-60999)
MAX_DESTINATIONS = 32767 - PROXY_PORT_BASE  # the highest node index a proxy's port can name
DEFAULT_NODES = 30
DEFAULT_USERS = 3
DEFAULT_MIN_SWARM = 5


class PlanError(ValueError):
    """The options cannot make a network."""


def node_name(index: int) -> str:
    """``n01``, ``n02``, ... (index from 1)."""
    return f"n{index:02d}"


def node_index(name: str) -> int:
    """Inverse of :func:`node_name`."""
    if not (name.startswith("n") and name[1:].isdigit()):
        raise PlanError(f"{name!r} is not a node name (n01, n02, ...)")
    return int(name[1:])


def user_name(index: int) -> str:
    """``alice``, ``bob``, ``carol``, ``dave``, then ``user05``, ``user06``, ... (index from 1)."""
    return USER_NAMES[index - 1] if index <= len(USER_NAMES) else f"user{index:02d}"


def derive_seed(run_seed: int, kind: str, name: str) -> bytes:
    """The 32-byte ed25519 seed of ``kind`` ("node"/"user") ``name`` in a run of seed ``run_seed``."""
    key = hashlib.blake2b(str(run_seed).encode(), digest_size=32).digest()
    return hashlib.blake2b(f"swarmnet/{kind}/{name}".encode(), key=key, digest_size=32).digest()


def derive_token(run_seed: int, run_id: str, purpose: str) -> str:
    """A 32-hex-character token for ``purpose`` (admin ops, the control API) in one run."""
    return hashlib.blake2b(f"swarmnet/token/{purpose}/{run_id}/{run_seed}".encode(), digest_size=16).hexdigest()


def candidate_blocks(run_id: str, count: int = 64) -> Iterator[Block]:
    """The blocks ``(a, b)`` a run may take, in preference order; derived from ``run_id`` only.

    ``a`` is 1..255 (127.0.x.x is left to everything else), ``b`` a multiple of 8.
    """
    for attempt in range(count):
        h = int.from_bytes(hashlib.blake2b(f"{run_id}/{attempt}".encode(), digest_size=8).digest(), "big")
        yield 1 + h % 255, 8 * ((h >> 16) % 32)


def _ip(block: Block, offset: int, host: int) -> str:
    a, b = block
    return f"127.{a}.{b + offset}.{host}"


@dataclass(frozen=True)
class HostPlan:
    """A cluster host: its name and the address the controller and other hosts reach it by."""

    name: str
    address: str


@dataclass(frozen=True)
class UserPlan:
    """One scripted user: its key seed, its own IP and where its secret lives."""

    name: str
    index: int
    seed: bytes = field(repr=False)
    host: str
    dir: Path
    seed_file: Path

    @cached_property
    def identity(self) -> Identity:
        return Identity.from_seed(self.seed)


@dataclass(frozen=True)
class NodePlan:
    """One service node.  ``port`` 0 lets the node pick (and report) a free port."""

    name: str
    index: int
    seed: bytes = field(repr=False)
    host: str
    port: int
    dir: Path
    db: Path
    log: Path
    stderr: Path
    seed_file: Path
    config_file: Path
    capture: Path  # every byte the node reads and writes (for the unlinkability checker)
    place: str | None = None  # the cluster host it runs on (None: the controller's machine)

    @cached_property
    def identity(self) -> Identity:
        return Identity.from_seed(self.seed)

    @property
    def ed25519_public(self) -> str:
        return self.identity.ed25519_public.hex()

    @property
    def x25519_public(self) -> str:
        return self.identity.x25519_public.hex()


Endpoint = Union[NodePlan, UserPlan]  # a link's source


@dataclass(frozen=True)
class NetworkPlan:
    """A run's plan.  Its links are not listed but derived from its nodes and users
    (:mod:`testnet.plan_links`): every ordered pair of nodes, and every user to every node,
    with Toxiproxy links; none direct."""

    run_id: str
    seed: int
    run_dir: Path
    block: Block
    links_mode: LinksMode
    min_swarm: int
    nodes: tuple[NodePlan, ...]
    users: tuple[UserPlan, ...]
    inject_bugs: tuple[str, ...] = ()
    capture: bool = True  # nodes record their traffic (capture.bin)
    toxiproxy_servers: int = 1  # the proxies are shared out among these many servers
    hosts: tuple[HostPlan, ...] = ()  # a cluster's hosts (none: one machine)
    disk: str = "model"  # "model": the harness's disk under SQLite (nodes/disk.py); "os": SQLite's own VFS

    @property
    def controller(self) -> Address:
        return (_ip(self.block, 0, 1), CONTROL_PORT)

    @property
    def registry_host(self) -> str:
        return _ip(self.block, 0, 2)

    @property
    def toxiproxy(self) -> Address | None:
        """The API of the first (often only) Toxiproxy server."""
        return self.toxiproxy_apis[0] if self.links_mode == "toxiproxy" else None

    @property
    def toxiproxy_apis(self) -> list[Address]:
        """Every Toxiproxy server's API, by server number."""
        if self.links_mode != "toxiproxy":
            return []
        return [(_ip(self.block, 0, 3), TOXIPROXY_PORT + s) for s in range(self.toxiproxy_servers)]

    def server_of(self, link_name: str) -> int:
        """Which Toxiproxy server holds the proxy of ``link_name`` (``src->dst``): by its source, so
        a node's outgoing proxies live together and every server gets a like share."""
        src = link_name.split("->", 1)[0]
        if self.hosts:  # the users' links at the controller's server, a node's at its host's
            if not (src[:1] == "n" and src[1:].isdigit()):
                return 0
            return 1 + self.host_index(self.node(src).place)
        index = node_index(src) if src[:1] == "n" and src[1:].isdigit() else self.user(src).index + 127
        return (index - 1) % self.toxiproxy_servers

    @property
    def admin_token(self) -> str:
        return derive_token(self.seed, self.run_id, "admin")

    @property
    def control_token(self) -> str:
        return derive_token(self.seed, self.run_id, "control")

    def host_index(self, name: str | None) -> int:
        for i, h in enumerate(self.hosts):
            if h.name == name:
                return i
        raise PlanError(f"no host named {name!r} in this run")

    def nodes_on(self, host: str) -> list[NodePlan]:
        """The nodes placed on cluster host ``host``."""
        return [n for n in self.nodes if n.place == host]

    def node(self, name: str) -> NodePlan:
        found = self._nodes_by_name.get(name)
        if found is None:
            raise PlanError(f"no node named {name!r} in this run")
        return found

    def user(self, name: str) -> UserPlan:
        found = self._users_by_name.get(name)
        if found is not None:
            return found
        raise PlanError(f"no user named {name!r} in this run")

    # ------------------------------------------------------------------ links, derived (plan_links)

    @property
    def proxied(self) -> bool:
        """Whether links go through Toxiproxy (every directed link a proxy)."""
        return self.links_mode == "toxiproxy"

    @property
    def link_count(self) -> int:
        """How many links the plan has: N(N-1) between nodes, U*N from users (0 direct)."""
        n = len(self.nodes)
        return n * (n - 1) + len(self.users) * n if self.proxied else 0

    @cached_property
    def links(self) -> LinkTable:
        """Every link, made as iterated (N² of them: see :class:`LinkTable`)."""
        return LinkTable(self)

    @cached_property
    def link_names(self) -> LinkNames:
        """Every link's name, as a set that lists nothing (``len`` and ``in`` are cheap: a
        fault on all links names them, and the proxy table asks which of them are made)."""
        return LinkNames(self)

    @cached_property
    def _nodes_by_name(self) -> dict[str, NodePlan]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def _users_by_name(self) -> dict[str, UserPlan]:
        return {u.name: u for u in self.users}

    def _source(self, name: str) -> Endpoint | None:
        return self._nodes_by_name.get(name) or self._users_by_name.get(name)

    def _ends(self, name: str) -> tuple[Endpoint, NodePlan] | None:
        """The ends of link ``name`` (``src->dst``), if the plan has that link."""
        src, sep, dst = name.partition("->")
        if not sep or not self.proxied:
            return None
        s, d = self._source(src), self._nodes_by_name.get(dst)
        return None if s is None or d is None or s is d else (s, d)

    def _sources(self) -> Iterator[tuple[Endpoint, list[NodePlan]]]:
        """Every source with the nodes it links to, in the plan's order of links."""
        if not self.proxied:
            return
        for s in self.nodes:
            yield s, [d for d in self.nodes if d is not s]
        for u in self.users:
            yield u, list(self.nodes)

    def _source_host(self, src: Endpoint) -> str:
        """Where ``src``'s outgoing proxies listen (one port per destination)."""
        if isinstance(src, UserPlan):
            return _ip(self.block, 4, src.index)
        return proxy_source_host(self.block, source_slot(src.index, len(self.hosts)))

    def _link_between(self, src: Endpoint, dst: NodePlan) -> LinkPlan:
        return LinkPlan(f"{src.name}->{dst.name}", src.name, dst.name,
                        (self._source_host(src), PROXY_PORT_BASE + dst.index), isinstance(src, UserPlan))

    def link(self, src: str, dst: str) -> LinkPlan:
        ends = self._ends(f"{src}->{dst}")
        if ends is None:
            raise PlanError(f"no proxied link {src}->{dst} in this run")
        return self._link_between(*ends)

    def link_named(self, name: str) -> LinkPlan | None:
        """The link whose proxy is called ``name`` (``src->dst``), if the plan has it."""
        ends = self._ends(name)
        return None if ends is None else self._link_between(*ends)

    def links_from(self, src: str) -> list[LinkPlan]:
        """The links leaving ``src`` (node or user), in node order."""
        s = self._source(src) if self.proxied else None
        if s is None:
            return []
        return [self._link_between(s, d) for d in self.nodes if d is not s]

    def links_touching(self, names: Iterable[str], *, users: bool = True) -> list[LinkPlan]:
        """The links from or to any of ``names`` (users' links too unless ``users`` is false),
        in the plan's order: time in proportion to what is returned, not to every link."""
        want = set(names)
        if not self.proxied or not want:
            return []
        touched = [d for d in self.nodes if d.name in want]
        sources: list[Endpoint] = [*self.nodes, *(self.users if users else ())]
        out = []
        for s in sources:
            dsts = self.nodes if s.name in want else touched
            out += [self._link_between(s, d) for d in dsts if d is not s]
        return out

    def links_between(self, side_a: Iterable[str], side_b: Iterable[str], *, both: bool = True) -> list[LinkPlan]:
        """The node links from ``side_a`` to ``side_b`` (and back, with ``both``), in the plan's
        order."""
        a, b = set(side_a), set(side_b)
        if not self.proxied:
            return []
        ends = [n for n in self.nodes if n.name in a or n.name in b]
        out = []
        for s in ends:
            for d in ends:
                if s is not d and ((s.name in a and d.name in b) or (both and s.name in b and d.name in a)):
                    out.append(self._link_between(s, d))
        return out

    def proxy_sources(self) -> dict[str, str]:
        """Where each source's outgoing proxies listen (one address, a port per destination),
        by source name in the plan's order; empty without proxies."""
        if not self.proxied:
            return {}
        return {s.name: self._source_host(s) for s in (*self.nodes, *self.users)}

    def proxy_ports(self) -> dict[str, int]:
        """The port that names each destination node in its proxies' addresses."""
        return {d.name: PROXY_PORT_BASE + d.index for d in self.nodes} if self.proxied else {}

    def proxy_hosts(self) -> set[str]:
        """Every address a proxy of the plan listens at (a source's proxies share one)."""
        n = len(self.nodes)
        return {h for name, h in self.proxy_sources().items() if n > (1 if name in self._nodes_by_name else 0)}

    def dial_table(self, src: str) -> dict[str, Address]:
        """What ``src`` (node or user) dials to reach each node, by node ed25519 hex.

        Empty in direct mode: everyone dials the addresses the registry publishes.
        """
        s = self._source(src) if self.proxied else None
        if s is None:
            return {}
        return {d.ed25519_public: (self._source_host(s), PROXY_PORT_BASE + d.index) for d in self.nodes if d is not s}


def node_host(block: Block, index: int) -> str:
    """Node ``index``'s address: 127.a.(b+1).index for the first 254, then the next node /24."""
    return _ip(block, NODE_OFFSETS[(index - 1) // 254], (index - 1) % 254 + 1)


def proxy_source_host(block: Block, index: int) -> str:
    """The listen address of the outgoing proxies (one port per destination) of the node in
    source slot ``index``: its node index on one machine, its place among its host's nodes
    on a cluster (:func:`source_slot`)."""
    return _ip(block, PROXY_SOURCE_OFFSETS[(index - 1) // 254], (index - 1) % 254 + 1)


def source_slot(index: int, hosts: int) -> int:
    """Node ``index``'s slot among the proxy source addresses: on a cluster (``hosts`` > 0)
    each host's loopback is its own, so slots count only the nodes placed on the same host
    (round-robin: the ``k``-th node of a host has slot ``k``)."""
    return (index - 1) // hosts + 1 if hosts else index


def max_nodes(links: str, hosts: int | None = 0) -> int:
    """How many nodes a plan can address: 508 with Toxiproxy on one machine (their
    proxies' source addresses), 1,016 direct; on a cluster of ``hosts`` hosts 508 a host,
    up to what a proxy's port can name (``None``: hosts not known yet)."""
    if links != "toxiproxy":
        return MAX_NODES_DIRECT
    if hosts is None:
        return MAX_DESTINATIONS
    return min(MAX_NODES * hosts, MAX_DESTINATIONS) if hosts else MAX_NODES


def place_of(hosts: tuple[HostPlan, ...], index: int) -> HostPlan | None:
    """The host node ``index`` runs on: round-robin over ``hosts`` (None without hosts)."""
    return hosts[(index - 1) % len(hosts)] if hosts else None


def make_node(run_dir: Path, seed: int, block: Block, index: int, hosts: tuple[HostPlan, ...] = ()) -> NodePlan:
    name = node_name(index)
    d = run_dir / "nodes" / name
    place = place_of(hosts, index)
    return NodePlan(
        name=name, index=index, seed=derive_seed(seed, "node", name),
        host=place.address if place else node_host(block, index), port=0,
        dir=d, db=d / "db.sqlite", log=d / "node.log", stderr=d / "stderr.log",
        seed_file=d / "seed", config_file=d / "config.json", capture=d / "capture.bin",
        place=place.name if place else None,
    )


def make_user(run_dir: Path, seed: int, block: Block, index: int) -> UserPlan:
    name = user_name(index)
    d = run_dir / "users" / name
    return UserPlan(name=name, index=index, seed=derive_seed(seed, "user", name), host=_ip(block, 2, index),
                    dir=d, seed_file=d / "seed")


def plan_network(*, nodes: int = DEFAULT_NODES, users: int = DEFAULT_USERS, min_swarm: int = DEFAULT_MIN_SWARM,
                 seed: int, links: str = "toxiproxy", run_dir: Path, run_id: str, block: Block,
                 inject_bugs: tuple[str, ...] | list[str] = (), capture: bool = True,
                 toxiproxy_servers: int = 1, hosts: tuple[HostPlan, ...] = (), disk: str = "model") -> NetworkPlan:
    """The whole network for one run; raises :class:`PlanError` on options that cannot work.
    With ``hosts`` (a cluster), nodes are placed on them and each host gets a Toxiproxy
    server of its own after the controller's (``toxiproxy_servers`` is then 1 + hosts)."""
    if disk not in DISKS:
        raise PlanError(f"disk must be one of {DISKS}, not {disk!r}")
    hosts = tuple(hosts)
    check_options(nodes=nodes, users=users, min_swarm=min_swarm, links=links, hosts=len(hosts))
    if hosts:
        if links != "toxiproxy":
            raise PlanError("a cluster run needs Toxiproxy links: users share the controller's address and are "
                            "told apart by their proxies")
        if len({h.name for h in hosts}) != len(hosts):
            raise PlanError(f"host names repeat: {[h.name for h in hosts]}")
        toxiproxy_servers = 1 + len(hosts)
    a, b = block
    if not (1 <= a <= 255 and 0 <= b <= 248 and b % 8 == 0):
        raise PlanError(f"block {block} is not 127.a.b.0/21 with a in 1..255 and b a multiple of 8")
    run_dir = Path(run_dir)
    node_plans = tuple(make_node(run_dir, seed, block, i, hosts) for i in range(1, nodes + 1))
    user_plans = tuple(make_user(run_dir, seed, block, j) for j in range(1, users + 1))
    return NetworkPlan(run_id=run_id, seed=seed, run_dir=run_dir, block=block, links_mode=links,  # type: ignore[arg-type]
                       min_swarm=min_swarm, nodes=node_plans, users=user_plans,
                       inject_bugs=tuple(inject_bugs), capture=capture,
                       toxiproxy_servers=toxiproxy_servers if links == "toxiproxy" else 1, hosts=hosts, disk=disk)


def check_options(*, nodes: int, users: int, min_swarm: int, links: str, hosts: int | None = 0) -> None:
    """Raise :class:`PlanError` if no network can be planned from these options (``hosts``:
    a cluster's host count, ``None`` while not known yet)."""
    if links not in LINKS_MODES:
        raise PlanError(f"links mode must be one of {LINKS_MODES}, not {links!r}")
    most = max_nodes(links, hosts)
    if not 1 <= nodes <= most:
        where = f" on {hosts} hosts" if hosts else " on a cluster" if hosts is None else ""
        raise PlanError(f"--nodes must be 1..{most} with {links} links{where}, not {nodes}")
    if not 0 <= users <= MAX_USERS:
        raise PlanError(f"--users must be 0..{MAX_USERS}, not {users}")
    if min_swarm < 1:
        raise PlanError(f"--min-swarm must be at least 1, not {min_swarm}")
    if min_swarm > nodes:
        raise PlanError(f"--min-swarm {min_swarm} is more than the {nodes} nodes: no swarm could form")


def with_node_added(plan: NetworkPlan, name: str | None = None) -> tuple[NetworkPlan, NodePlan]:
    """The plan grown by one node (the next free index unless ``name`` is given) and its links."""
    taken = {n.index for n in plan.nodes}
    index = node_index(name) if name else max(taken, default=0) + 1
    if index in taken:
        raise PlanError(f"node {node_name(index)} already exists")
    most = max_nodes(plan.links_mode, len(plan.hosts))
    if not 1 <= index <= most:
        raise PlanError(f"node index must be 1..{most}, not {index}")
    node = make_node(plan.run_dir, plan.seed, plan.block, index, plan.hosts)
    nodes = tuple(sorted(plan.nodes + (node,), key=lambda n: n.index))
    return replace(plan, nodes=nodes), node


def with_node_removed(plan: NetworkPlan, name: str) -> NetworkPlan:
    """The plan without node ``name`` (and so without the links that touch it)."""
    plan.node(name)
    return replace(plan, nodes=tuple(n for n in plan.nodes if n.name != name))


def node_config(plan: NetworkPlan, node: NodePlan, *, registry: Address, parent_pid: int | None,
                port: int | None = None, link_opener: Address | None = None) -> dict:
    """The JSON configuration of ``python -m nodes`` for ``node`` (see the node contract).

    ``link_opener``: where the node asks for the proxy of one of its links before its first
    dial (the controller makes proxies on first use); ``None`` when they all exist already.
    """
    return {
        "name": node.name,
        "seed_file": str(node.seed_file),
        "listen": [[node.host, node.port if port is None else port]],
        "db": str(node.db),
        "log": str(node.log),
        "capture": str(node.capture) if plan.capture else None,
        "registry": [registry[0], registry[1]],
        "links": {k: [h, p] for k, (h, p) in plan.dial_table(node.name).items()},
        "link_opener": list(link_opener) if link_opener else None,
        "admin_token": plan.admin_token,
        "parent_pid": parent_pid,
        "inject_bugs": list(plan.inject_bugs),
        **({"disk": plan.disk} if plan.disk != "model" else {}),
    }
