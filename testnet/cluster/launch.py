"""The controller's side of a cluster run: a link to each host's agent, the
processes there as the controller sees them, and a launcher that starts a
run's processes on the hosts.

* :class:`HostLink` — calls to one agent, each with a deadline, and the pump
  of its process exits; a host whose agent is gone (its Ray worker killed,
  the machine lost) is *lost*: every process there counts as exited, and the
  run records which nodes went with it (never a hang).
* :class:`RemoteChild` — a process on a host with the surface of
  :class:`testnet.procs.Child`, so node operations and teardown act on it
  unchanged; signals go through the agent, exits come back as its events.
* :class:`AgentToxiproxy` — a host's Toxiproxy API, reached through its agent
  (the API listens on the host's loopback only).
* :class:`ClusterLauncher` — the registry and the users' Toxiproxy server
  here, on the controller's cluster address; each host's Toxiproxy server
  and nodes through its agent.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any, Callable

import trio

from .. import links as L
from .. import plan as P
from .. import procs
from ..launch import spawn_registry
from .agent import HostAgent

AGENT_START_TIMEOUT_S = 60.0  # a Ray worker process for the actor, then the agent's own start
CALL_TIMEOUT_S = 15.0
EVENTS_WAIT_S = 2.0
UNAVAILABLE_GRACE_S = 20.0  # an agent Ray calls unavailable this long is lost
SIGNAL_NAMES = {signal.SIGKILL: "kill", signal.SIGTERM: "term", signal.SIGSTOP: "stop", signal.SIGCONT: "cont"}
CONCURRENCY = {"control": 1, "events": 1, "io": 16}  # signals in order; the exits' long poll apart
AGENTS_ERROR_SAID_S = 5.0  # see ClusterLauncher.agents_up
BULK_S_PER_CALL = 0.01  # a host's Toxiproxy answers a pipelined call in well under this


class HostLost(Exception):
    """A host's agent did not answer: it is gone (the host is then marked lost to the run),
    unavailable for now, or too slow for the call's deadline (the message says which)."""


def agent_class(ray: Any) -> Any:
    """:class:`HostAgent` as a Ray actor class."""
    return ray.remote(num_cpus=0, concurrency_groups=CONCURRENCY, max_restarts=0)(HostAgent)


def local_address_towards(address: str) -> str:
    """This machine's address on the route to ``address`` (what a host reaches us by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # no packet is sent: only the route is chosen
        return s.getsockname()[0]


class HostLink:
    """The controller's handle on one host's agent."""

    def __init__(self, ray: Any, name: str, address: str, actor: Any) -> None:
        self.ray = ray
        self.name = name
        self.address = address
        self.actor = actor
        self.lost: str | None = None  # why, once lost
        self.closing = False  # the controller ends the agent itself: its death is no loss
        self.hello: dict[str, Any] = {}
        self.children: dict[tuple[str, int], RemoteChild] = {}
        self.on_lost: list[Callable[[HostLink], None]] = []

    def _lose(self, why: str) -> None:
        if self.lost is not None or self.closing:
            return
        self.lost = why
        for child in list(self.children.values()):
            child.gone()
        for fn in self.on_lost:
            fn(self)

    async def call(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S, group: str = "io") -> Any:
        """``method(*args)`` on the agent; its result.  Raises :class:`HostLost` when the agent
        is gone, and marks the host lost."""
        if self.lost is not None:
            raise HostLost(f"host {self.name} is lost ({self.lost})")
        ref = getattr(self.actor, method).options(concurrency_group=group).remote(*args)
        exc_types = self.ray.exceptions
        try:
            return await trio.to_thread.run_sync(lambda: self.ray.get(ref, timeout=timeout_s),
                                                 abandon_on_cancel=True)
        except exc_types.ActorUnavailableError as exc:
            raise HostLost(f"host {self.name}: its agent is unavailable ({str(exc)[:200]})") from None
        except exc_types.RayActorError as exc:
            self._lose(f"its agent died: {str(exc).splitlines()[0][:200]}")
            raise HostLost(f"host {self.name} is lost ({self.lost})") from None
        except exc_types.GetTimeoutError:
            self.ray.cancel(ref)
            raise HostLost(f"host {self.name}: {method} did not answer in {timeout_s:g} s") from None

    def fire(self, method: str, *args: Any) -> None:
        """``method(*args)`` on the agent, in order with the other fired calls, without waiting."""
        if self.lost is None:
            getattr(self.actor, method).options(concurrency_group="control").remote(*args)

    async def pump(self) -> None:
        """Deliver the agent's process exits to their :class:`RemoteChild` until the host is lost
        or this task is cancelled."""
        seen = 0
        unavailable_since: float | None = None
        while self.lost is None and not self.closing:
            try:
                events = await self.call("events", seen, EVENTS_WAIT_S, timeout_s=EVENTS_WAIT_S + CALL_TIMEOUT_S,
                                         group="events")
                unavailable_since = None
            except HostLost as exc:
                if self.lost is not None or self.closing:
                    return
                now = trio.current_time()
                unavailable_since = unavailable_since if unavailable_since is not None else now
                if now - unavailable_since > UNAVAILABLE_GRACE_S:
                    self._lose(str(exc))
                    return
                await trio.sleep(0.5)
                continue
            for ev in events:
                seen = max(seen, ev["seq"])
                child = self.children.get((ev["name"], ev["pid"]))
                if child is not None:
                    child.exit(ev["code"])

    def tail_sync(self, name: str, n: int = 15) -> str:
        if self.lost is not None:
            return f"(host {self.name} is lost: {self.lost})"
        try:
            return self.ray.get(self.actor.tail.options(concurrency_group="io").remote(name, n), timeout=5.0)
        except Exception as exc:
            return f"(no log tail from host {self.name}: {type(exc).__name__})"


class RemoteChild(procs.Signals):
    """A process on a cluster host, with the surface of :class:`testnet.procs.Child`."""

    def __init__(self, link: HostLink, name: str, pid: int, create_time: float | None, agent_name: str = "") -> None:
        self.link = link
        self.name = name
        self.agent_name = agent_name or name  # what the agent calls it
        self.pid = pid
        self.create_time = create_time
        self.returncode: int | None = None
        self.exited = trio.Event()
        self.ready: dict[str, Any] | None = None
        self._paused = False
        link.children[(self.agent_name, pid)] = self

    @property
    def host(self) -> str:
        return self.link.name

    def exit(self, code: int | None) -> None:
        self.returncode = code
        self.link.children.pop((self.agent_name, self.pid), None)
        self.exited.set()

    def gone(self) -> None:
        """Its host is lost: the process went with it."""
        self.exit(None)

    def tail(self, n: int = 15) -> str:
        return self.link.tail_sync(self.agent_name, n)

    def failure(self, reason: str, cls: type[procs.ChildFailed] = procs.ChildFailed) -> procs.ChildFailed:
        return cls(f"{self.name} on {self.host}", reason, self.returncode, self.tail())

    def send_signal(self, sig: int) -> bool:
        if self.exited.is_set():
            return False
        if sig == signal.SIGSTOP:
            self._paused = True
        elif sig in (signal.SIGCONT, signal.SIGKILL):
            self._paused = False
        self.link.fire("signal", self.agent_name, SIGNAL_NAMES[sig])
        return True

    def state(self) -> str:
        if self.exited.is_set():
            return "dead"
        return "paused" if self._paused else "alive"

    async def watch(self) -> None:
        await self.exited.wait()

    def abandon_watch(self) -> None:
        pass

    async def wait_exit(self, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            await self.exited.wait()
        return self.exited.is_set()


class AgentToxiproxy(L.ToxiproxyApi):
    """A host's Toxiproxy server, its API reached through the host's agent."""

    def __init__(self, link: HostLink, host: str, port: int) -> None:
        super().__init__(host, port)
        self.link = link

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port} on {self.link.name}"

    def call_sync(self, method: str, path: str, json: Any = None, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.link.lost is not None:
            raise L.LinkError(f"toxiproxy on host {self.link.name}: the host is lost ({self.link.lost})")
        ray = self.link.ray
        ref = self.link.actor.toxiproxy_call.options(concurrency_group="io").remote(method, path, json, timeout_s)
        try:
            out = ray.get(ref, timeout=timeout_s + CALL_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise L.LinkError(f"toxiproxy on host {self.link.name} unreachable: {type(exc).__name__}") from None
        if "error" in out:
            raise (L.ProxyGone if out.get("gone") else L.LinkError)(f"host {self.link.name}: {out['error']}")
        return out["ok"]

    async def calls(self, calls: Any, *, timeout_s: float | None = None, **_: Any) -> list[L.CallFailure | None]:
        """Many calls at once, pipelined by the agent on its host (see :meth:`ToxiproxyApi.calls`);
        a lost host fails them all, never raises."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s

        def failed(reason: str) -> list[L.CallFailure | None]:
            return [L.CallFailure(self.server, c.text, c.proxy, None, reason) for c in calls]

        try:
            out = await self.link.call("toxiproxy_calls", [tuple(c) for c in calls], timeout_s,
                                       timeout_s=timeout_s + CALL_TIMEOUT_S + BULK_S_PER_CALL * len(calls))
        except HostLost as exc:
            return failed(str(exc))
        if isinstance(out, dict):
            return failed(f"host {self.link.name}: {out.get('error')}")
        return [None if f is None else L.CallFailure(**f) for f in out]


def _raise(result: Any, what: str) -> Any:
    """``result`` unless it is an agent's error record, then raise it as the controller's error."""
    if isinstance(result, dict) and "error" in result:
        if result.get("reason"):
            raise procs.NotReady(result.get("name") or what, result["reason"], result.get("exit_code"),
                                 result.get("tail") or "")
        raise procs.SpawnError(f"{what}: {result['error']}")
    return result


class ClusterLauncher:
    """Starts a cluster run's processes: the registry and the users' Toxiproxy server on this
    machine (at the controller's cluster address), everything else on the hosts."""

    def __init__(self, links: dict[str, HostLink], *, address: str, toxiproxy_binary: Path | None = None,
                 control: tuple[str, int] | None = None) -> None:
        self.links = links  # host name -> its agent
        self.address = address  # the controller's address on the cluster network
        self.toxiproxy_binary = toxiproxy_binary
        self.control = control  # where nodes ask for their links' proxies (open_link)
        self.uses_zygote = True  # each host forks its nodes from a zygote of its own (start_zygote)
        self._agents_up: trio.Event | None = None
        self._agents_error: BaseException | None = None

    async def agents_up(self, net: Any) -> None:
        """Every host's agent answering and running this swarmnet (waited for once, by the first
        step that needs them: meanwhile the registry starts here); else a clear error."""
        if self._agents_up is None:
            self._agents_up = trio.Event()
            try:
                await self._hello_all(net)
            except BaseException as exc:
                self._agents_error = exc
                raise
            finally:
                self._agents_up.set()
        else:
            await self._agents_up.wait()
            if self._agents_error is not None:
                # The first caller raises the agents' error in this same boot, whose nursery then
                # cancels this step: wait for that rather than say it again (once per host and
                # step, it was).  Bounded, should this caller be outside that nursery.
                await trio.sleep(AGENTS_ERROR_SAID_S)
                raise procs.SpawnError(f"the host agents did not start ({self._agents_error})")

    async def _hello_all(self, net: Any) -> None:
        from .driver import ClusterError, same_swarmnet

        problems: list[str] = []

        async def hello(link: HostLink) -> None:
            try:
                link.hello = await link.call("hello", timeout_s=AGENT_START_TIMEOUT_S)
            except HostLost as exc:
                problems.append(str(exc))

        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                nursery.start_soon(hello, link)
        if problems:
            raise ClusterError("the host agents did not start: " + "; ".join(problems))
        same_swarmnet({name: link.hello.pop("swarmnet") for name, link in self.links.items()})
        net.progress(f"host agents up on {', '.join(self.links)}, each running this swarmnet")

    def check_bindable(self, addresses: list[tuple[str, int]]) -> None:
        """Only the users' proxies listen here; the hosts' own servers refuse what they cannot bind."""
        local = [a for a in addresses if not self._on_host(a)]
        L.check_bindable(local)

    def _on_host(self, address: tuple[str, int]) -> bool:
        octets = address[0].split(".")
        return len(octets) == 4 and octets[0] == "127" and int(octets[2]) % 8 in P.PROXY_SOURCE_OFFSETS

    async def start_registry(self, net: Any) -> None:
        await spawn_registry(net, self.address)  # other hosts' nodes reach it at the cluster address

    async def start_toxiproxy(self, net: Any) -> None:
        plan = net.plan
        (host, port), remote = plan.toxiproxy_apis[0], plan.toxiproxy_apis[1:]
        # The users' links: this machine.  Each server joins net.toxiproxies as soon as it runs,
        # so that a boot failing half-way still stops it.
        child, api = L.spawn_toxiproxy(host, port, log=net.run_dir / "toxiproxy.log", seed=plan.seed,
                                       binary=self.toxiproxy_binary)
        net.toxiproxies.append(child)
        net.nursery.start_soon(child.watch)
        apis: list[L.ToxiproxyApi] = [api, *(AgentToxiproxy(self.links[plan.hosts[i].name], h, p)
                                            for i, (h, p) in enumerate(remote))]
        net.api = L.ProxyTable(L.ToxiproxyServers(apis, plan.server_of), net.proxy_spec, net.nursery)

        async def on_host(s: int, h: str, p: int) -> None:
            await self.agents_up(net)
            link = self.links[plan.hosts[s - 1].name]
            got = _raise(await link.call("start_toxiproxy", h, p, plan.seed + s, f"toxiproxy-{s}.log"),
                         f"Toxiproxy cannot start on host {link.name}")
            net.toxiproxies.append(RemoteChild(link, f"toxiproxy-{s}", got["pid"], got["create_time"], "toxiproxy"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(L.wait_toxiproxy, child, api)
            for s, (h, p) in enumerate(remote, start=1):
                nursery.start_soon(on_host, s, h, p)
        net.toxiproxies.sort(key=lambda c: 0 if c is child else int(c.name.rsplit("-", 1)[1]))

    async def start_zygote(self, net: Any) -> None:
        """The hosts' zygotes, one per host (the controller forks no node)."""
        await self.agents_up(net)
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                async def one(link: HostLink = link) -> None:
                    _raise(await link.call("start_zygote", timeout_s=AGENT_START_TIMEOUT_S), f"zygote on {link.name}")
                nursery.start_soon(one)

    async def start_nodes(self, net: Any, names: list[str], timeout_s: float, *,
                          spawned: Callable[[], None] | None = None) -> None:
        """Start ``names`` on their hosts, all at once; each host's ingress listeners as its nodes come up
        (a host answers once its nodes listen: ``spawned()`` is called then)."""
        by_host: dict[str, list[str]] = {}
        for name in names:
            by_host.setdefault(net.nodes[name].plan.place, []).append(name)

        async def on_host(host: str, group: list[str]) -> None:
            link = self.links[host]
            specs = []
            for name in group:
                rt = net.nodes[name]
                rt.state, rt.exit_code = "starting", None
                cfg = P.node_config(net.plan, rt.plan, registry=net.registry_address, parent_pid=None, port=rt.port,
                                    link_opener=self.control if net.proxies_on_use else None)
                specs.append({"name": name, "config": cfg, "seed_hex": rt.plan.seed.hex()})
            try:
                started = _raise(await link.call("start_nodes", specs, timeout_s, timeout_s=timeout_s + CALL_TIMEOUT_S),
                                 f"nodes on {host}")
            except HostLost as exc:
                raise procs.NotReady(group[0], str(exc)) from None
            for name in group:
                rt, got = net.nodes[name], started.get(name) or {"error": "no answer"}
                if "error" in got:
                    _raise(got, name)
                child = RemoteChild(link, name, got["pid"], got["create_time"])
                rt.child = child
                net.nursery.start_soon(watch_node, net, rt, child)
                rt.port = int(got["port"])
                rt.state, rt.ingress_open = "running", False
            if net.plan.links_mode == "toxiproxy":
                await net.wiring.open_ingress(group)

        async with trio.open_nursery() as nursery:
            for host, group in by_host.items():
                nursery.start_soon(on_host, host, group)
        if spawned is not None:
            spawned()


async def watch_node(net: Any, rt: Any, child: Any) -> None:
    """Until ``child`` (the node's current process) exits; then record how, unless it was asked to
    stop (as :func:`testnet.launch.watch_node` on one machine); a lost host's nodes are ``lost``."""
    await child.watch()
    if rt.child is child:
        rt.exit_code = child.returncode
        if rt.state in ("starting", "running", "paused"):
            rt.state = "lost" if child.link.lost is not None else "exited"
        if net.state in ("ready", "starting"):
            net.save()

