"""Process control of a live run's nodes: kill, pause, resume, restart, add and
remove, one at a time; and the control API's requests (``swarmnet node ...``,
``status``, ``down``), which end here.

Each operation leaves the record (run.json) saying what it did.  A clock skew
or an injected fault is no process operation: it is an admin op on the node
(:meth:`testnet.controller.Testnet.admin`) or a link fault (:mod:`testnet.links`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import trio

from . import plan as P
from . import control_faults, procs, rundir
from .base.crypto import Identity
from .base.records import deregister_args
from .runtime import ControllerError, NodeRuntime

if TYPE_CHECKING:
    from .controller import Testnet


class NodeOps:
    """The node operations of ``net``."""

    def __init__(self, net: Testnet) -> None:
        self.net = net
        self._lock = trio.Lock()  # one node operation at a time

    def _running(self, name: str, *also: str) -> NodeRuntime:
        rt = self.net.node(name)
        if rt.state not in ("running", "starting", *also) or rt.child is None or not rt.child.running:
            raise ControllerError(f"{name} is {rt.state}, not running")
        return rt

    async def kill(self, name: str) -> None:
        """SIGKILL the node, running or paused (it stays dead until :meth:`restart`)."""
        async with self._lock:
            rt = self._running(name, "paused")
            rt.state = "killed"
            rt.child.kill()
            await rt.child.wait_exit(5.0)
            self.net.save()

    async def pause(self, name: str) -> None:
        """SIGSTOP the node: its sockets stay open but nothing answers."""
        async with self._lock:
            rt = self._running(name)
            rt.child.pause()
            rt.state = "paused"
            self.net.save()

    async def resume(self, name: str) -> None:
        """SIGCONT a paused node."""
        net = self.net
        async with self._lock:
            rt = net.node(name)
            if rt.state != "paused" or rt.child is None:
                raise ControllerError(f"{name} is {rt.state}, not paused")
            rt.child.resume()
            rt.state = "running"
            if rt.links_stale:
                await net.wiring.push_links(only=name)
            net.save()

    async def restart(self, name: str, timeout_s: float = 30.0, *,
                      running: Callable[[], None] | None = None) -> None:
        """Stop the node if it runs, then start it with the same key, database and ports
        (``running()`` is called once it runs again, before it is waited for to be ready)."""
        await self.restart_many([name], timeout_s, running=running)

    async def restart_many(self, names: list[str], timeout_s: float = 30.0, *,
                           running: Callable[[], None] | None = None,
                           spawned: Callable[[], None] | None = None) -> None:
        """:meth:`restart` for several nodes at once, as a rack comes back when its power
        does: all stopped, then all started together (``spawned()`` once every process of
        them runs, ``running()`` once they all listen)."""
        net = self.net
        async with self._lock:
            rts = [net.node(name) for name in names]
            live = [rt for rt in rts if rt.child is not None and rt.child.running]
            for rt in live:
                rt.state = "stopped"
            if live:
                await procs.stop_children([rt.child for rt in live])
            await net.launcher.start_nodes(net, list(names), timeout_s,
                                           **({"spawned": spawned} if spawned is not None else {}))
            if net.api is not None:
                await net.wiring.open_ingress(list(names))  # the proxies' upstreams, at the same ports again
            if running is not None:
                running()
            net.save()
        # Not holding the other node operations back while they catch up (a large network's
        # node takes seconds): they run again, and only they are waited for.
        await net.wait_ready(timeout_s, list(names))
        net.save()

    async def add(self, name: str | None = None, timeout_s: float = 30.0, *,
                  running: Callable[[], None] | None = None) -> str:
        """A new node (next free name unless given): new key, its links, everyone told. Returns its name
        (``running()`` is called once it runs and everyone was told, before the network is waited for)."""
        net = self.net
        async with self._lock:
            net.plan, node = P.with_node_added(net.plan, name)
            rundir.write_secret(node.seed_file, node.seed.hex() + "\n")
            await net.call("registry", "stake", {"token": net.plan.admin_token,
                                                 "ed25519_public": node.ed25519_public})
            net.nodes[node.name] = rt = NodeRuntime(node)
            net.by_key[node.ed25519_public] = rt
            net.nodes = dict(sorted(net.nodes.items(), key=lambda kv: kv[1].plan.index))
            await net.launcher.start_nodes(net, [node.name], timeout_s)
            if net.api is not None:
                await net.wiring.open_ingress([node.name])
                await net.wiring.populate(net.wiring.boot_links(touching=node.name))
                await net.wiring.push_links(exclude=node.name)
            if running is not None:
                running()
            net.save()
            await net.wait_ready(timeout_s)
            net.save()
            net.progress(f"{node.name} added at {rt.address[0]}:{rt.address[1]}")
            return node.name

    async def remove(self, name: str) -> None:
        """Deregister the node (signed with its own key), stop it and drop its links."""
        net = self.net
        async with self._lock:
            rt = net.node(name)
            identity = Identity.from_seed(bytes.fromhex(rundir.read_secret(rt.plan.seed_file)))
            await net.call("registry", "deregister", deregister_args(identity, net.now_ms()))
            if rt.child is not None:
                if rt.state == "paused":
                    rt.child.resume()
                await procs.stop_children([rt.child])
            await net.hang_up(name)
            gone = [link.name for link in net.plan.links_touching([name])]
            net.plan = P.with_node_removed(net.plan, name)
            rec = next(n for n in net.record()["nodes"] if n["name"] == name)
            net.removed.append({**rec, "state": "removed"})
            del net.nodes[name]
            net.by_key.pop(rt.plan.ed25519_public, None)
            if net.api is not None:
                async with trio.open_nursery() as nursery:
                    for proxy in gone:
                        nursery.start_soon(net.api.delete_proxy, proxy)
                await net.wiring.push_links()
            net.save()

    # ------------------------------------------------------------------ the control API

    async def action(self, action: str, name: str | None) -> Any:
        """Dispatch ``add|remove|kill|pause|resume|restart`` (the CLI's ``node`` commands)."""
        if action == "add":
            return {"name": await self.add(name)}
        if name is None:
            raise ControllerError(f"node {action} needs a node name")
        method = {"remove": self.remove, "kill": self.kill, "pause": self.pause,
                  "resume": self.resume, "restart": self.restart}.get(action)
        if method is None:
            raise ControllerError(f"unknown node action {action!r}")
        await method(name)
        return {"name": name, "state": self.net.nodes[name].state if name in self.net.nodes else "removed"}

    async def control(self, action: str, args: dict[str, Any]) -> Any:
        """One control API request (see :func:`rundir.serve_control`): ``ping``, ``status``, ``down``,
        ``node`` with ``what`` = add|remove|kill|pause|resume|restart and ``name``, ``partition``
        with ``swarms``, ``heal`` (see :mod:`testnet.control_faults`)."""
        net = self.net
        if action == "ping":
            return {"run_id": net.plan.run_id, "state": net.state}
        if action == "status":
            return await net.status()
        if action == "down":
            net.stop_requested.set()
            return {}
        if action in control_faults.ACTIONS:  # node, partition, heal: faults recorded in faults.jsonl
            return await control_faults.handle(net, action, args)
        raise ControllerError(f"unknown control action {action!r}")
