"""How a node reaches others: the registry at its configured address, peers at
the address the registry lists — or, on a testnet with Toxiproxy links, at
the address of this node's link to them — and the handshake that opens every
connection to another node (:mod:`nodes.auth`).

A link's proxy may not exist yet (a testnet makes them on first use): a
refused dial asks the testnet's link opener once, signed with our key, and
dials again.  The opener is testnet plumbing, not part of the modelled
network: its connection is not captured.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from testnet.base import crypto
from testnet.base.net import Network
from testnet.base.rpc import ConnectionPool, RpcError

from . import auth
from .capture import CaptureFile
from .core import NodeConfig, SwarmView

REGISTRY_KEY = "registry"


class Dialer:
    """This node's dial table and its connection pools (made by :meth:`open`, in the
    node's nursery): ``pool`` to the registry and to peers, keyed by ed25519 hex."""

    def __init__(self, config: NodeConfig, identity: crypto.Identity, *, network: Network,
                 capture: CaptureFile | None, view: Callable[[], SwarmView | None]) -> None:
        self.config = config
        self.identity = identity
        self.ed_hex = identity.ed25519_public.hex()
        self.network = network
        self.capture = capture
        self._view = view
        self.links: dict[str, tuple[str, int]] = dict(config.links)
        self._links_open: set[str] = set()  # links whose proxy the link opener has said exists
        self._opener: ConnectionPool | None = None  # to the link opener (config.link_opener)
        self.pool: ConnectionPool | None = None

    @property
    def host(self) -> str:
        return self.config.listen[0][0]

    def open(self, nursery: trio.Nursery) -> ConnectionPool:
        self.pool = ConnectionPool(nursery, self.resolve, capture=self.capture, network=self.network,
                                   connect_timeout=self.config.replication_timeout_s,
                                   on_connect=self._authenticate_to,
                                   on_refused=self._open_link if self.config.link_opener else None)
        if self.config.link_opener:  # testnet plumbing: not captured, not the modelled network
            opener = (*self.config.link_opener, self.host)
            self._opener = ConnectionPool(nursery, lambda key: opener, network=self.network,
                                          connect_timeout=self.config.replication_timeout_s)
        return self.pool

    def resolve(self, key: Any) -> tuple[str, int, str | None]:
        if key == REGISTRY_KEY:
            return self.config.registry[0], self.config.registry[1], self.host
        if key in self.links:
            h, p = self.links[key]
            return h, p, self.host
        view = self._view()
        rec = view.nodes.get(key) if view else None
        if rec is None:
            raise RpcError(f"no address known for node {str(key)[:12]}")
        return rec.host, rec.port, self.host

    async def _open_link(self, key: Any, timeout: float) -> bool:
        """A dial through one of the testnet's links was refused: its proxy may not be made
        yet (they are made on first use).  Ask the testnet's controller (``link_opener``) to
        make it, signed with our key, and dial again.  Once it said so the proxy stays while
        the link does: a refused dial after that is a cut link, and we do not ask again."""
        if key not in self.links or key in self._links_open or self._opener is None:
            return False
        args = {"src": self.ed_hex, "dst": key,
                "signature": self.identity.sign(crypto.link_open_message(self.ed_hex, key))}
        resp = await self._opener.call("controller", "open_link", args, timeout=timeout)
        if not resp.ok:
            why = resp.body.get("error") if isinstance(resp.body, dict) else resp.body
            raise RpcError(f"no link to {str(key)[:12]}: {why}")
        self._links_open.add(key)
        return True

    async def _authenticate_to(self, key: Any, conn: Any, timeout: float) -> None:
        """Every connection to another node starts with our handshake (nodes/auth.py)."""
        if key != REGISTRY_KEY:
            await auth.authenticate(conn, self.identity, str(key), timeout=timeout)

    async def set_links(self, new: dict[str, tuple[str, int]]) -> int:
        """Replace the dial table; redial only the peers whose route changed (the registry's
        long poll stays up).  How many were redialled."""
        assert self.pool is not None
        old, self.links = self.links, new
        changed = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
        for key in changed:
            self._links_open.discard(key)
            await self.pool.drop(key)
        return len(changed)
