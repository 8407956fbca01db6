"""Admin ops: the testnet controller's levers on a running node (PROTOCOL.md,
"Service node: admin ops"): its link table, extra listeners, its clock offset
a graceful stop, and the byzantine nemesis' switch (:mod:`nodes.hostile`).  The token is checked by the dispatcher
(:meth:`nodes.server.Node.handle`) before any of these runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable

import trio

from testnet.base.logs import event
from testnet.base.protocol import RequestError, Status

from . import core
from .dialing import Dialer
from .hostile import Hostility
from .disk import Disk, DiskFaultError
from .storage import Storage, StorageError, hashes_at_restart

log = logging.getLogger("node")

STOP_DELAY_S = 0.05  # let admin_stop's reply go out first
POWER_LOSS_EXIT = 137  # as a SIGKILL: the controller sees a node that died
LOST_LISTED = 5_000  # hashes of lost messages a power loss's log line names, at most


class AdminOps:
    def __init__(self, *, dialer: Dialer, listen: Callable[[list[tuple[str, int]]], Awaitable[list[tuple[str, int]]]],
                 clock: Any, stop: Callable[[], None], nursery: trio.Nursery, hostile: Hostility,
                 disk: Disk | None = None, storage: Storage | None = None, own_host: str = "",
                 honest_again: Callable[[], None] = lambda: None,
                 halt: Callable[[int], None] = os._exit) -> None:
        self.honest_again = honest_again  # a disarmed node catches up with its swarm (anti-entropy) at once
        self.disk = disk
        self.storage = storage  # what a power loss took is read from it and from the files after
        self.own_host = own_host  # where it listens: a cluster host's address may take more listeners too
        self.halt = halt  # a power loss ends the process on the spot: no cleanup, no reply
        self.dialer = dialer
        self.hostile = hostile
        self.listen = listen
        self.clock = clock
        self.stop = stop
        self._nursery = nursery

    def ops(self) -> dict[str, Callable[[dict], Any]]:
        return {"admin_set_links": self.set_links, "admin_listen": self.add_listeners, "admin_clock": self.set_clock,
                "admin_stop": self.stop_soon, "admin_disk": self.disk_command,
                "admin_byzantine": self.set_hostile}

    async def disk_command(self, args: dict) -> dict:
        """The harness's disk (nodes.disk): {"action": "arm", "fault", params...},
        {"action": "heal", "fault"?}, {"action": "status"}, or {"action": "power_loss",
        "torn"?, "seed"?} — which reverts every un-synced write and ends the process."""
        if self.disk is None:
            raise RequestError(Status.NOT_FOUND, "this node has no controllable disk")
        action = args.get("action")
        try:
            if action == "arm":
                params = args.get("params") or {}
                if not isinstance(params, dict):
                    raise DiskFaultError("'params' must be a map")
                self.disk.arm(args.get("fault"), **{str(k): v for k, v in params.items()})
            elif action == "heal":
                self.disk.heal(args.get("fault"))
            elif action == "power_loss":
                seed = args.get("seed")
                if seed is not None:
                    if not isinstance(seed, int) or isinstance(seed, bool):
                        raise DiskFaultError("'seed' must be an int")
                    self.disk.rng.seed(seed)
                self._power_loss(bool(args.get("torn")))
                self.halt(POWER_LOSS_EXIT)
                await trio.sleep_forever()  # a simulated process: its cancel scope ends us here
            elif action != "status":
                raise DiskFaultError(f"action must be arm, heal, status or power_loss, got {action!r:.40}")
        except DiskFaultError as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        if action in ("arm", "heal"):
            event(log, f"disk {action}", fault=args.get("fault"), status=self.disk.status())
        return self.disk.status()

    def _power_loss(self, torn: bool) -> None:
        """The disk loses power; the log says what it took: the messages this node held
        (committed, perhaps acknowledged) that a restart on the files left will not hold —
        for ``swarmnet trace`` to show an acknowledged write lost.  No await: nothing else
        runs between the loss and the halt."""
        assert self.disk is not None
        held: set[str] = set()
        if self.storage is not None:
            try:
                held = self.storage.hashes()
            except StorageError:  # a failing disk: what it held cannot be listed
                pass
        report = self.disk.power_loss(torn=torn)
        kept, unusable = hashes_at_restart(self.storage.path) if self.storage is not None else (set(), None)
        lost = sorted(h[:16] for h in held - kept)
        event(log, "power loss", **report.to_json(), held=len(held), lost=len(lost), lost_hashes=lost[:LOST_LISTED],
              **({"unusable": unusable} if unusable else {}))

    async def set_links(self, args: dict) -> dict:
        links = core.arg_map(args, "links", 100_000)
        if not all(isinstance(k, str) and len(k) <= 64 for k in links):
            raise RequestError(Status.BAD_REQUEST, "'links' keys must be node keys (hex)")
        new = {k: core.loopback_address(v, f"link {k[:16]}") for k, v in links.items()}
        redialled = await self.dialer.set_links(new)
        return {"links": len(self.dialer.links), "redialled": redialled}

    async def add_listeners(self, args: dict) -> dict:
        addrs = [core.listen_address(a, "each address", self.own_host)
                 for a in core.arg_list(args, "addresses", 256)]
        try:
            bound = await self.listen(addrs)
        except (OSError, ValueError) as exc:
            raise RequestError(Status.BAD_REQUEST, f"cannot listen: {exc}") from None
        return {"addresses": [list(a) for a in bound]}

    async def set_clock(self, args: dict) -> dict:
        offset = core.clock_offset(args.get("offset_ms"))
        self.clock.offset_ms = offset
        event(log, "clock offset", offset_ms=offset)
        return {"offset_ms": offset}

    async def set_hostile(self, args: dict) -> dict:
        """Arm the behaviours named (nodes.hostile); the answer lists them and every lie told
        since the node started (``acts``), which the nemesis records."""
        armed = self.hostile.arm(args.get("behaviours"))
        event(log, "hostile", behaviours=armed)
        if not armed:
            self.honest_again()
        return {"behaviours": armed, "acts": dict(self.hostile.acts)}

    async def stop_soon(self, args: dict) -> dict:
        self._nursery.start_soon(self._stop_later)
        return {}

    async def _stop_later(self) -> None:
        await trio.sleep(STOP_DELAY_S)
        self.stop()
