"""Disk nemeses: faults of the disk under a node's SQLite (nodes/disk.py), driven
through the node's ``admin_disk`` op — in real processes and in the simulation alike
(a simulated node's disk is the same object, reached by the same op).

* ``power-loss`` — at the same instant on every targeted node (one node, a set, a
  whole swarm): each puts its files back as their last syncs left them (``torn``:
  a seeded prefix of the pending writes kept, the next one torn) and stops on the
  spot; the heal restarts them on what survived.
* ``disk-full`` — writes fail with SQLITE_FULL until healed.
* ``disk-error`` — reads, writes and/or syncs (``ops``) fail with I/O errors.
* ``disk-slow`` — each sync takes ``sync_ms`` (paid before an acknowledgement).
* ``corrupt`` — pages read back from the database have bits flipped (``rate``).

A node restarted meanwhile (another fault) comes back on a healthy disk: armed
faults live in the node's process, as a real disk's controller state would not —
the heal simply finds nothing to undo.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from testnet.base.protocol import RequestError
from testnet.base.rpc import RpcError
from testnet.runtime import ControllerError

from chaos.run.nemesis import HEAL_TIMEOUT_S, NemesisError, _heal_all, healing, register, resolve_nodes, took_effect
from chaos.schedule import Fault

log = logging.getLogger("chaos.run.disk")

POWER_LOSS_CALL_S = 2.0  # the node dies mid-call: no answer comes
_ARMED = {"disk-full": "full", "disk-error": "error", "disk-slow": "slow", "corrupt": "corrupt"}
KINDS = ("power-loss", *_ARMED)


async def _power_loss(net: Any, nodes: list[str], fault: Fault) -> None:
    torn = bool(fault.params.get("torn", False))
    seed = int(fault.params.get("seed", 0))

    async def one(i: int, name: str) -> None:
        try:
            await net.admin(name, "admin_disk", action="power_loss", torn=torn, seed=seed * 1000 + i,
                            timeout=POWER_LOSS_CALL_S)
        except (RpcError, RequestError, ControllerError):  # the node ends during the call: no answer comes
            pass

    # One nursery: every node loses power in the same turn of the event loop.
    async with trio.open_nursery() as nursery:
        for i, name in enumerate(nodes):
            nursery.start_soon(one, i, name)
    took_effect()  # every call ended with its node: the power is off; what follows is the controller's record
    for name in nodes:
        try:
            await net.node_kill(name)  # the controller's record: killed, not crashed
        except ControllerError:  # already recorded as exited
            pass


@asynccontextmanager
async def disk_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    nodes = [n for n in await resolve_nodes(net, fault) if n in net.nodes]
    if fault.kind == "power-loss":
        try:
            await _power_loss(net, nodes, fault)
            yield {"nodes": nodes, "torn": bool(fault.params.get("torn", False))}
        finally:
            # The power comes back to all of them at once, and the heal took effect once they
            # all run again (their readiness is the network's recovery).  One by one, a rack's
            # last node ran a second or more after its planned time.
            back = [n for n in nodes if n in net.nodes]
            with healing(f"fault {fault.id} ({fault.kind})", HEAL_TIMEOUT_S * max(1, len(nodes))):
                if back:
                    # The power is back once their processes run: each booting (opening and
                    # checking its database, listening) is its own recovery, as a machine's is.
                    await net.node_restart_many(back, spawned=took_effect)
        return
    if fault.kind not in _ARMED:
        raise NemesisError(f"{fault.kind} is not a disk fault")
    name = _ARMED[fault.kind]
    params = {k: v for k, v in fault.params.items() if k in ("ops", "sync_ms", "rate")}
    armed: list[str] = []
    try:
        for n in nodes:
            await net.admin(n, "admin_disk", action="arm", fault=name, params=params)
            armed.append(n)
        yield {"nodes": nodes, "fault": name, **params}
    finally:
        async def heal(n: str) -> None:
            if n in net.nodes and net.nodes[n].state == "running":
                try:
                    await net.admin(n, "admin_disk", action="heal", fault=name)
                except (RpcError, RequestError):  # gone meanwhile: its next process has a healthy disk
                    pass
        await _heal_all(f"fault {fault.id} ({fault.kind})", [(heal, (n,)) for n in armed])


register("disk", disk_fault)
