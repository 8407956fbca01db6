"""Faults a person asks the controller for through its control API, recorded.

``swarmnet node kill``, ``swarmnet serve``'s buttons and any other holder of
the run's control token reach the controller with ``control {token, action,
...}`` (:func:`testnet.rundir.serve_control`).  The actions here act on the
network the way a chaos schedule's nemeses do, and each one lands in the
run's ``faults.jsonl`` as a nemesis' fault does (``start`` when it took
effect, ``end`` when it healed), so the report, ``swarmnet trace`` and a
watcher of the run see it beside the schedule's own:

* ``node {what, name}`` — ``kill`` (fault kind ``kill``, healed by a
  restart), ``pause`` (``pause``, healed by ``resume``), ``restart`` of a
  running node (``restart``: its stop and start), ``resume``; ``add`` and
  ``remove`` change the network and are not faults;
* ``partition {swarms: [a, b]}`` — every node link between the members of
  the two swarms (as the registry has them now) cut both ways (kind
  ``halves``, sides ``side_a``/``side_b``): needs Toxiproxy links;
* ``heal {}`` — ends every fault started here that is still on: partitions
  re-joined, paused nodes resumed, killed nodes restarted.

Fault ids are ``c1``, ``c2``, ... (a schedule's are integers), and every
target carries ``"by": "control"``.  Faults a chaos run's schedule started
are its own to heal; ``heal`` leaves them alone.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import trio

from . import links as L
from .runtime import ControllerError

FAULTS_FILE = "faults.jsonl"
ACTIONS = ("node", "partition", "heal")
LINK_CALLS_AT_ONCE = 32  # Toxiproxy calls in flight for one partition (a large one is thousands)
HEAL_TIMEOUT_S = 30.0


def _refusal(message: str) -> Exception:
    """The action cannot be done on this network (unknown swarm, no Toxiproxy, ...): the
    controller's own refusal, which its control API answers with 400 and the message."""
    return ControllerError(message)


def faults_of(net: Any) -> ControlFaults:
    """The :class:`ControlFaults` of a live network (one per network, made on first use)."""
    faults = getattr(net, "_control_faults", None)
    if faults is None:
        faults = net._control_faults = ControlFaults(net)
    return faults


async def handle(net: Any, action: str, args: dict[str, Any]) -> Any:
    """One control request of :data:`ACTIONS` on ``net`` (a :class:`testnet.controller.Testnet`)."""
    return await faults_of(net).handle(action, args)


class ControlFaults:
    """The faults started through one controller's control API, and their records."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self._ids = itertools.count(1)
        self._open: dict[str, dict[str, Any]] = {}  # fault id -> {"kind", "targets", "proxies"?}
        self._lock = trio.Lock()  # a heal must not race the partition it heals

    @property
    def path(self) -> Path:
        return Path(self.net.run_dir) / FAULTS_FILE

    def _record(self, fid: str, kind: str, phase: str, targets: dict[str, Any], **extra: Any) -> None:
        rec = {"t": self.net.now_ms(), "fault": fid, "kind": kind, "phase": phase, "targets": targets, **extra}
        # One write of one line in append mode: a chaos run's own log may append beside it.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def _start(self, kind: str, targets: dict[str, Any], **keep: Any) -> str:
        fid = f"c{next(self._ids)}"
        targets = {**targets, "by": "control"}
        self._record(fid, kind, "start", targets)
        self._open[fid] = {"kind": kind, "targets": targets, **keep}
        return fid

    def _end(self, fid: str, phase: str = "end", **extra: Any) -> None:
        f = self._open.pop(fid)
        self._record(fid, f["kind"], phase, f["targets"], **extra)

    def _open_for(self, kind: str, node: str) -> list[str]:
        return [fid for fid, f in self._open.items() if f["kind"] == kind and node in f["targets"].get("nodes", ())]

    def active(self) -> list[dict[str, Any]]:
        return [{"fault": fid, "kind": f["kind"], "targets": f["targets"]} for fid, f in self._open.items()]

    async def handle(self, action: str, args: dict[str, Any]) -> Any:
        if action == "node":
            return await self.node(str(args.get("what")), args.get("name"))
        if action == "partition":
            return await self.partition(args.get("swarms"))
        if action == "heal":
            return await self.heal()
        raise _refusal(f"unknown control action {action!r}")

    # ------------------------------------------------------------------ nodes

    async def node(self, what: str, name: Any) -> dict[str, Any]:
        net = self.net
        if what not in ("kill", "pause", "resume", "restart"):
            return await net.node_action(what, name)  # add / remove: not faults
        if not isinstance(name, str) or not name:
            raise _refusal(f"node {what} needs a node name")
        net.node(name)  # unknown names refused before anything is done
        fault: str | None = None
        if what == "kill":
            await net.node_kill(name)
            fault = self._start("kill", {"nodes": [name]})
        elif what == "pause":
            await net.node_pause(name)
            fault = self._start("pause", {"nodes": [name]})
        elif what == "resume":
            await net.node_resume(name)
            for fid in self._open_for("pause", name):
                self._end(fid)
        else:
            killed = self._open_for("kill", name)
            running = net.nodes[name].state in ("running", "paused", "starting")
            if running:
                fault = self._start("restart", {"nodes": [name]})
            try:
                await net.node_restart(name)
            except BaseException:
                if fault is not None:
                    self._end(fault, "error", error="the restart failed")
                raise
            for fid in killed + ([fault] if fault else []):
                self._end(fid)
            fault = None
        out = {"name": name, "state": net.nodes[name].state}
        return {**out, "fault": fault} if fault else out

    # ------------------------------------------------------------------ partitions

    async def _swarms(self) -> dict[str, int]:
        """Node name -> swarm id, as the registry says now."""
        body = await self.net.call("registry", "get_service_nodes", {}, timeout=5.0)
        by_key = {rt.plan.ed25519_public: name for name, rt in self.net.nodes.items()}
        return {by_key[n["ed25519_public"]]: int(n["swarm_id"]) for n in body["nodes"]
                if n.get("ed25519_public") in by_key and n.get("swarm_id") is not None}

    async def partition(self, swarms: Any) -> dict[str, Any]:
        net = self.net
        if (not isinstance(swarms, (list, tuple)) or len(swarms) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in swarms)):
            raise _refusal("partition needs 'swarms': two swarm ids (integers)")
        if swarms[0] == swarms[1]:
            raise _refusal("partition needs two different swarms")
        if net.api is None:
            raise _refusal("partitions need Toxiproxy links (this run uses --links direct)")
        async with self._lock:
            now = await self._swarms()
            sides = [sorted(n for n, s in now.items() if s == want) for want in swarms]
            for want, side in zip(swarms, sides):
                if not side:
                    raise _refusal(f"no swarm {want:016x} in the registry's list now")
            a, b = set(sides[0]), set(sides[1])
            proxies = [link.name for link in net.plan.links_between(a, b)]
            disabled: list[str] = []

            async def cut(p: str) -> None:
                try:
                    await net.api.set_enabled(p, False)
                except L.ProxyGone:
                    return  # the link went with its node
                disabled.append(p)

            try:
                await _bounded(cut, proxies)
            except BaseException:
                await self._enable(disabled)
                raise
            fid = self._start("halves", {"side_a": sides[0], "side_b": sides[1],
                                         "swarms": [f"{s:016x}" for s in swarms], "proxies": len(disabled)},
                              proxies=disabled)
        return {"fault": fid, "side_a": sides[0], "side_b": sides[1], "proxies": len(disabled)}

    async def _enable(self, proxies: list[str]) -> None:
        async def join(p: str) -> None:
            try:
                await self.net.api.set_enabled(p, True)
            except L.ProxyGone:
                pass

        with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
            await _bounded(join, proxies)

    # ------------------------------------------------------------------ heal

    async def heal(self) -> dict[str, Any]:
        """End every fault started here that is still on; what was healed and what could not be."""
        healed, failed = [], []
        async with self._lock:
            for fid, f in list(self._open.items()):
                try:
                    await self._heal_one(f)
                except Exception as exc:  # one stuck fault must not keep the others on
                    self._end(fid, "error", error=f"{type(exc).__name__}: {exc}"[:300])
                    failed.append({"fault": fid, "kind": f["kind"], "error": str(exc)[:300]})
                    continue
                if fid in self._open:
                    self._end(fid)
                healed.append({"fault": fid, "kind": f["kind"], "targets": f["targets"]})
        return {"healed": healed, "failed": failed}

    async def _heal_one(self, f: dict[str, Any]) -> None:
        net = self.net
        if f["kind"] == "halves":
            await self._enable(f.get("proxies") or [])
            return
        for name in f["targets"].get("nodes", ()):
            rt = net.nodes.get(name)
            if rt is None:
                continue  # removed since
            if f["kind"] == "pause" and rt.state == "paused":
                await net.node_resume(name)
            elif f["kind"] == "kill" and rt.state in ("killed", "exited", "stopped"):
                await net.node_restart(name)


async def _bounded(fn: Any, items: list[Any], limit: int = LINK_CALLS_AT_ONCE) -> None:
    sem = trio.Semaphore(limit)

    async def one(item: Any) -> None:
        async with sem:
            await fn(item)

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)
