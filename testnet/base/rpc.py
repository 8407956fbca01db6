"""The trio edge of the wire protocol: servers, persistent multiplexed client
connections and a pool of them.

Only bytes and time move here; framing and validation live in
:mod:`testnet.base.protocol`.  Every wait has a deadline and every task belongs to
a nursery the caller owns.  Each part has a module of its own, and this one
names them all (import from here):

* :mod:`.rpc_wire` — bytes on one connection, capture, connection numbers;
* :mod:`.rpc_server` — :func:`serve`, :func:`serve_connection`, :class:`Peer`;
* :mod:`.rpc_client` — :class:`RpcConnection`, :func:`connect`, :func:`open_rpc`,
  :func:`call_once` and the errors of a call (:class:`RpcError` ...);
* :mod:`.rpc_pool` — :class:`ConnectionPool`.
"""

from __future__ import annotations

from .limits import ConnectionGate, ConnectionLimits
from .rpc_client import (DEFAULT_CONNECT_TIMEOUT, ConnectError, ConnectionLost, RpcConnection, RpcError, RpcTimeout,
                         StatusError, call_once, connect, open_rpc)
from .rpc_pool import POOL_IDLE_S, ConnectionPool
from .rpc_server import DEFAULT_MAX_IN_FLIGHT, Handler, Peer, serve, serve_connection
from .rpc_wire import RECEIVE_SIZE, Address, CaptureSink

__all__ = [
    "Address", "CaptureSink", "RECEIVE_SIZE",
    "Peer", "Handler", "serve", "serve_connection", "DEFAULT_MAX_IN_FLIGHT",
    "RpcError", "ConnectError", "ConnectionLost", "RpcTimeout", "StatusError",
    "RpcConnection", "connect", "open_rpc", "call_once", "DEFAULT_CONNECT_TIMEOUT",
    "ConnectionPool", "POOL_IDLE_S",
    "ConnectionGate", "ConnectionLimits",
]
