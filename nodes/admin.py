"""Admin ops: the testnet controller's levers on a running node (PROTOCOL.md,
"Service node: admin ops"): its link table, extra listeners, its clock offset
a graceful stop, and the byzantine nemesis' switch (:mod:`nodes.hostile`).  The token is checked by the dispatcher
(:meth:`nodes.server.Node.handle`) before any of these runs.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from testnet.base.logs import event
from testnet.base.protocol import RequestError, Status

from . import core
from .dialing import Dialer
from .hostile import Hostility

log = logging.getLogger("node")

STOP_DELAY_S = 0.05  # let admin_stop's reply go out first


class AdminOps:
    def __init__(self, *, dialer: Dialer, listen: Callable[[list[tuple[str, int]]], Awaitable[list[tuple[str, int]]]],
                 clock: Any, stop: Callable[[], None], nursery: trio.Nursery, hostile: Hostility) -> None:
        self.dialer = dialer
        self.hostile = hostile
        self.listen = listen
        self.clock = clock
        self.stop = stop
        self._nursery = nursery

    def ops(self) -> dict[str, Callable[[dict], Any]]:
        return {"admin_set_links": self.set_links, "admin_listen": self.add_listeners, "admin_clock": self.set_clock,
                "admin_stop": self.stop_soon, "admin_byzantine": self.set_hostile}

    async def set_links(self, args: dict) -> dict:
        links = core.arg_map(args, "links", 100_000)
        if not all(isinstance(k, str) and len(k) <= 64 for k in links):
            raise RequestError(Status.BAD_REQUEST, "'links' keys must be node keys (hex)")
        new = {k: core.loopback_address(v, f"link {k[:16]}") for k, v in links.items()}
        redialled = await self.dialer.set_links(new)
        return {"links": len(self.dialer.links), "redialled": redialled}

    async def add_listeners(self, args: dict) -> dict:
        addrs = [core.loopback_address(a, "each address") for a in core.arg_list(args, "addresses", 256)]
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
        armed = self.hostile.arm(args.get("behaviours"))
        event(log, "hostile", behaviours=armed)
        return {"behaviours": armed}

    async def stop_soon(self, args: dict) -> dict:
        self._nursery.start_soon(self._stop_later)
        return {}

    async def _stop_later(self) -> None:
        await trio.sleep(STOP_DELAY_S)
        self.stop()
