"""The network seam: how swarmnet code opens connections and listeners.

Nodes, the registry, clients and the controller never call trio's socket
functions directly; :mod:`testnet.base.rpc` asks a :class:`Network` passed in.
Real runs use :data:`TCP` (loopback sockets); the simulation passes its
in-memory network (``chaos/sim/network.py``), which hands out streams that
behave like TCP and listeners that ``trio.serve_listeners`` can serve.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import trio


def may_listen_on(host: str) -> bool:
    """Whether a swarmnet server may listen on ``host``: a loopback address, or one private
    address (a cluster host's, on the cluster's own network) — never a wildcard, a public
    or a link-local address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or (ip.is_private and not ip.is_unspecified and not ip.is_link_local)


class Network(Protocol):
    async def open_tcp_stream(self, host: str, port: int, *, local_address: str | None = None) -> Any: ...

    async def open_tcp_listeners(self, port: int, *, host: str, backlog: int | None = None) -> list[Any]: ...


class TcpNetwork:
    """Real TCP sockets through trio."""

    async def open_tcp_stream(self, host: str, port: int, *, local_address: str | None = None) -> trio.SocketStream:
        return await trio.open_tcp_stream(host, port, local_address=local_address)

    async def open_tcp_listeners(self, port: int, *, host: str, backlog: int | None = None) -> list[trio.SocketListener]:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)


TCP = TcpNetwork()
