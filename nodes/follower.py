"""Following the registry: a node registers itself, then long-polls the
registry's service-node list and keeps the newest as its :class:`SwarmView`.

The follower owns the view and what the node learns with it: who is
registered and which swarms nodes were in (:class:`nodes.auth.Entitlements`).
On a new view it closes the forwarders of peers that left and, when the node
has new peers or a new swarm, wakes anti-entropy.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

from testnet.base import crypto, meter
from testnet.base.logs import event
from testnet.base.protocol import RequestError
from testnet.base.records import register_args
from testnet.base.rpc import RpcError

from . import auth
from .core import NodeConfig, SwarmView
from .dialing import REGISTRY_KEY, Dialer
from .replication import Fanout

log = logging.getLogger("node")


class RegistryFollower:
    def __init__(self, config: NodeConfig, identity: crypto.Identity, *, dialer: Dialer, wall_ms: Callable[[], int],
                 listening: Callable[[], list[tuple[str, int]]], entitled: auth.Entitlements, fanout: Fanout,
                 wake_anti_entropy: Callable[[], None]) -> None:
        self.config = config
        self.identity = identity
        self.ed_hex = identity.ed25519_public.hex()
        self.dialer = dialer
        self.wall_ms = wall_ms
        self.listening = listening
        self.entitled = entitled
        self.fanout = fanout
        self.wake_anti_entropy = wake_anti_entropy
        self.view: SwarmView | None = None

    async def _registry_call(self, op: str, args: dict, timeout: float) -> Any:
        assert self.dialer.pool is not None
        resp = await self.dialer.pool.call(REGISTRY_KEY, op, args, timeout=timeout)
        if not resp.ok:
            raise RequestError(resp.status, f"registry answered {resp.status}")
        return resp.body

    async def run(self) -> None:
        meter.ROLE.set("registry-follow")
        registered = False
        height, epoch = -1, None  # the registry list we hold: its height and the registry run it came from
        while True:
            try:
                if not registered:
                    host, port = self.listening()[0]
                    await self._registry_call("register", register_args(self.identity, host, port,
                                                                        self.wall_ms()), 5.0)
                    registered = True
                    event(log, "registered", host=host, port=port)
                # The first list comes with the registry's recent swarm history (auth.Entitlements);
                # later ones, naming the registry run we hold a list from, only with what changed.
                args: dict[str, Any] = {"since_height": height, "wait_ms": 10_000, "history": height < 0}
                if epoch is not None:
                    args["epoch"] = epoch
                body = await self._registry_call("get_service_nodes", args, 15.0)
                if body["height"] < height:
                    # The registry forgot us (restarted without its state): register again.
                    registered, height, epoch = False, -1, None
                    continue
                if body.get("changed", True) and (body["height"] != height or body.get("epoch") != epoch):
                    if "since_height" in body:
                        view = self.view.apply_delta(body)  # ValueError unless it starts at our list
                    else:
                        view = SwarmView.from_registry(body, self.ed_hex)
                    height, epoch = view.height, body.get("epoch")
                    self.apply_view(view)
                    self.entitled.add_history(body.get("history"))  # differences from this view
                    # Registrations come in bursts (a boot, churn): let the burst finish rather than
                    # fetch once per change.
                    await trio.sleep(self.config.registry_settle_s)
            except (RpcError, RequestError, KeyError, TypeError, ValueError, AttributeError) as exc:
                event(log, "registry unreachable", logging.WARNING, error=type(exc).__name__)
                height, epoch = (-1, None) if isinstance(exc, (KeyError, TypeError, ValueError, AttributeError)) \
                    else (height, epoch)
                assert self.dialer.pool is not None
                await self.dialer.pool.drop(REGISTRY_KEY)
                await trio.sleep(self.config.registry_poll_s)

    def apply_view(self, view: SwarmView) -> None:
        old = self.view
        self.view = view
        self.entitled.update(view)
        old_peers = {p.ed25519_public for p in old.peers()} if old and old.my_swarm is not None else set()
        new_peers = {p.ed25519_public for p in view.peers()}
        self.fanout.keep_only(new_peers)
        event(log, "swarm view", height=view.height, swarm_id=view.my_swarm, members=len(new_peers) + 1,
              joined=len(new_peers - old_peers), left=len(old_peers - new_peers))
        if old is None or old.my_swarm != view.my_swarm or new_peers - old_peers:
            self.wake_anti_entropy()  # push to new members and rehome at once
