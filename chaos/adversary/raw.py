"""The adversary's attacks below the protocol, on raw connections: malformed
and oversized frames, and connection floods.  Each is one function that
opens its connections through the run's network, waits with deadlines,
closes everything it opened and returns what happened (the record's fields,
CHECKERS.md); ``chaos/adversary/attacks.py`` runs them and records the results.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import msgpack
import trio

from testnet.base.protocol import EOF, HEADER, NEED_DATA, Connection, RemoteProtocolError, Response
from testnet.base.rpc import RpcError, call_once

from chaos.adversary.model import FOLLOW_UP

__all__ = ["read_response", "send_frame", "FLOOD_STYLES", "flood"]

# How a flood's connections misbehave: say nothing; stop inside a frame's length, or inside
# its body; or trickle a valid request one byte at a time (a frame deadline cuts it).
FLOOD_STYLES = ("idle", "partial-header", "partial-body", "drip")
DRIP_INTERVAL_S = 0.5
_DRIP = HEADER.pack(len(_body := msgpack.packb({"id": 1, "op": "info", "args": {}}))) + _body


async def read_response(stream: Any, conn: Connection) -> Response | None:
    """The next response on a raw connection; None when it closes first (or breaks the framing)."""
    while True:
        try:
            ev = conn.next_event()
        except RemoteProtocolError:
            return None
        if isinstance(ev, Response):
            return ev
        if ev is EOF:
            return None
        if ev is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))  # b"" is the end of the stream


async def send_frame(network: Any, host: str, port: int, local: str, data: bytes, *, eof: bool,
                     timeout_s: float) -> dict[str, Any]:
    """Send ``data`` on a fresh connection (then our end of stream, with ``eof``) and read one
    answer.  Returns ``{"status", "error"?, "connection_goes_on"?}``: after a 400 the
    connection must still serve a valid request."""
    out: dict[str, Any] = {"status": None}
    with trio.move_on_after(3 * timeout_s) as scope:
        try:
            with trio.fail_after(timeout_s):
                stream = await network.open_tcp_stream(host, port, local_address=local)
        except (OSError, trio.TooSlowError) as exc:
            out["error"] = f"connect: {type(exc).__name__}"
            return out
        try:
            conn = Connection()
            await stream.send_all(data)
            if eof:
                await stream.send_eof()
            resp = await read_response(stream, conn)
            out["status"] = resp.status if resp is not None else None
            if resp is not None and resp.status == 400 and not eof:
                await stream.send_all(FOLLOW_UP)
                follow = await read_response(stream, conn)
                out["connection_goes_on"] = follow is not None and follow.status == 200
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            out["error"] = type(exc).__name__
        finally:
            await trio.aclose_forcefully(stream)
    if scope.cancelled_caught:
        out["error"] = "no answer in time"
    return out


async def flood(network: Any, host: str, port: int, sources: Sequence[str], probe_from: str, *, connections: int,
                hold_s: float, timeout_s: float) -> dict[str, Any]:
    """``connections`` connections at (host, port) from ``sources`` in turn, misbehaving in each
    of FLOOD_STYLES, held ``hold_s``; meanwhile a fresh connection from ``probe_from`` asks
    ``info``.  Returns what the node did: connections opened, closed by it, statuses it
    answered (a connection cap answers 429), and the probe's status and time."""
    streams: list[Any] = []
    tally: Counter = Counter()
    statuses: Counter = Counter()
    probe: dict[str, Any] = {}
    opening = trio.Semaphore(50)

    async def drip(s: Any) -> None:
        with trio.move_on_after(hold_s):
            try:
                for b in _DRIP:
                    await s.send_all(bytes([b]))
                    await trio.sleep(DRIP_INTERVAL_S)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the node closed it: the reader counts that

    async def one(i: int, nursery: trio.Nursery) -> None:
        style = FLOOD_STYLES[i % len(FLOOD_STYLES)]
        try:
            async with opening:
                with trio.fail_after(timeout_s):
                    s = await network.open_tcp_stream(host, port, local_address=sources[i % len(sources)])
        except (OSError, trio.TooSlowError):
            tally["connect_failed"] += 1
            return
        streams.append(s)
        tally["opened"] += 1
        conn = Connection()
        try:
            with trio.move_on_after(hold_s):
                if style == "partial-header":
                    await s.send_all(b"\x00\x00")
                elif style == "partial-body":
                    await s.send_all(HEADER.pack(64) + b"\x83\xa2id")
                elif style == "drip":
                    nursery.start_soon(drip, s)
                while data := await s.receive_some(4096):
                    conn.receive_data(data)
                    while isinstance(ev := conn.next_event(), Response):
                        statuses[str(ev.status)] += 1
                tally["closed_by_node"] += 1  # end of stream: the node let go
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError, OSError):
            tally["closed_by_node"] += 1

    async def probe_node() -> None:
        await trio.sleep(hold_s / 2)
        t0 = trio.current_time()
        try:
            resp = await call_once(host, port, "info", {}, timeout=timeout_s, local_host=probe_from, network=network)
            probe["probe_status"] = resp.status
        except RpcError as exc:
            probe.update(probe_status=None, probe_error=type(exc).__name__)
        probe["probe_ms"] = round((trio.current_time() - t0) * 1000, 1)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe_node)
            for i in range(connections):
                nursery.start_soon(one, i, nursery)
    finally:
        with trio.CancelScope(shield=True):
            for s in streams:
                await trio.aclose_forcefully(s)
    return {"connections": connections, "sources": len(sources), "opened": tally["opened"],
            "connect_failed": tally["connect_failed"], "closed_by_node": tally["closed_by_node"],
            "statuses": dict(statuses), "hold_s": hold_s, **probe}
