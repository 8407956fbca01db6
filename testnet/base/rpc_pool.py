"""Persistent client connections keyed by peer (:class:`ConnectionPool`): made on
first use, replaced when broken or idle too long, with hooks for a handshake on
each new connection and for a refused dial.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Hashable

import trio

from .net import TCP, Network
from .protocol import DEFAULT_MAX_FRAME_SIZE, Response
from .rpc_client import DEFAULT_CONNECT_TIMEOUT, ConnectError, RpcConnection, RpcTimeout, connect
from .rpc_wire import CaptureSink

POOL_IDLE_S = 30.0  # a pooled connection idle this long is replaced (servers close theirs at 60 s)


class ConnectionPool:
    """Persistent connections keyed by peer, created on first use.

    ``resolve(key)`` gives the address to dial (and an optional local address
    to dial from); it is asked again after a connection breaks, so a peer's
    address may change.  A connection idle for ``idle_s`` is not reused but
    replaced: servers close idle connections (60 s by default,
    :class:`~testnet.base.limits.ConnectionLimits`), and a request sent as
    the server closes would be lost with the connection.  ``on_connect(key, conn, timeout)``, when given, runs
    on every new connection before its first call (a handshake); if it raises,
    the connection is closed and the call fails.  ``on_refused(key, timeout)``, when given,
    runs when a dial is refused (nothing listens there) and says whether to dial once more (a
    testnet node has its link's proxy made there); if it raises, the call fails.  Readers run
    in ``nursery``, which the owner keeps open for the pool's whole life.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        resolve: Callable[[Hashable], tuple[str, int, str | None]],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capture: CaptureSink | None = None,
        on_connect: Callable[[Hashable, RpcConnection, float], Awaitable[None]] | None = None,
        on_refused: Callable[[Hashable, float], Awaitable[bool]] | None = None,
        network: Network = TCP,
        idle_s: float = POOL_IDLE_S,
    ) -> None:
        self._on_refused = on_refused
        self._nursery = nursery
        self._idle_s = idle_s
        self._resolve = resolve
        self._on_connect = on_connect
        self._network = network
        self._connect_timeout = connect_timeout
        self._max_frame_size = max_frame_size
        self._capture = capture
        self._conns: dict[Hashable, RpcConnection] = {}
        self._locks: dict[Hashable, trio.Lock] = {}

    def _usable(self, conn: RpcConnection | None) -> bool:
        return conn is not None and not conn.closed and (
            conn.busy or trio.current_time() - conn.last_active < self._idle_s)

    def get_nowait(self, key: Hashable) -> RpcConnection | None:
        """The usable connection to ``key`` if there is one now (None: :meth:`get` would dial)."""
        conn = self._conns.get(key)
        return conn if self._usable(conn) else None

    async def get(self, key: Hashable, *, timeout: float | None = None) -> RpcConnection:
        conn = self._conns.get(key)
        if self._usable(conn):
            return conn  # type: ignore[return-value]
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if self._usable(conn):
                return conn  # type: ignore[return-value]
            if conn is not None and not conn.closed:
                await conn.aclose()  # idle too long: the server may be closing it right now
            ct = self._connect_timeout if timeout is None else min(timeout, self._connect_timeout)
            stream = await self._dial(key, ct)
            conn = RpcConnection(stream, max_frame_size=self._max_frame_size, capture=self._capture,
                                 name=str(key)[:16])
            await self._nursery.start(conn.run)
            if self._on_connect is not None:
                try:
                    await self._on_connect(key, conn, ct)
                except BaseException:
                    await conn.aclose()
                    raise
            self._conns[key] = conn
            return conn

    async def _dial(self, key: Hashable, timeout: float) -> trio.SocketStream:
        deadline = trio.current_time() + timeout
        host, port, local_host = self._resolve(key)
        try:
            return await connect(host, port, local_host=local_host, timeout=timeout, network=self._network)
        except ConnectError as exc:
            if not exc.refused or self._on_refused is None:
                raise
            if not await self._on_refused(key, max(deadline - trio.current_time(), 0.001)):
                raise
        host, port, local_host = self._resolve(key)
        return await connect(host, port, local_host=local_host, timeout=max(deadline - trio.current_time(), 0.001),
                             network=self._network)

    async def call(self, key: Hashable, op: str, args: dict[str, Any], *, timeout: float) -> Response:
        """Call ``op`` on peer ``key`` over its persistent connection, within ``timeout`` s overall."""
        deadline = trio.current_time() + timeout
        conn = await self.get(key, timeout=timeout)
        remaining = max(deadline - trio.current_time(), 0.0)
        if remaining >= 0.9 * timeout:
            return await conn.call(op, args, timeout=remaining)
        try:
            return await conn.call(op, args, timeout=remaining)
        except RpcTimeout:  # say the whole budget and where it went, not "no response in 0 s"
            raise RpcTimeout(f"{op} to {conn.name or conn.remote}: no response within {timeout:.3g} s "
                             f"(connecting took {timeout - remaining:.3g} s of it)") from None

    async def drop(self, key: Hashable) -> None:
        """Close the connection to ``key`` (the next call dials again)."""
        conn = self._conns.pop(key, None)
        if conn is not None:
            await conn.aclose()

    def drop_soon(self, key: Hashable) -> None:
        """:meth:`drop` for callbacks, which cannot await: the connection's reader closes it."""
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close_soon()

    async def aclose(self) -> None:
        for key in list(self._conns):
            await self.drop(key)

    def __len__(self) -> int:
        return sum(1 for c in self._conns.values() if not c.closed)
