"""Onion request relaying (Session's xchacha20 onion requests, simplified framing).

A node receives ``onion {ephemeral_key, data}``, opens its layer with its own
x25519 secret and finds either

* a relay instruction ``{"next": <ed25519 hex>, "ephemeral_key", "data"}`` —
  it resolves the next hop through its own node list (never an address from
  the onion), forwards ``onion`` over its persistent node connections and
  passes the reply back unchanged; or
* a final request ``{"request": {"op", "args"}}`` for itself — it runs the op
  and encrypts ``{"status", "body"}`` with this layer's key.

Path errors come back in the clear, as such: next hop unknown 502, timeout
504, bad layer 400.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable

import trio

from testnet.base import crypto, meter
from testnet.base.limits import AUTHENTICATED_SESSION_KEY
from testnet.base.protocol import Request, RequestError, Response, Status
from testnet.base.onion import LayerError, encode_reply, parse_layer
from testnet.base.rpc import ConnectError, Peer, Reply, RpcError, RpcTimeout

log = logging.getLogger("node.onion")

ONION_OPS = {"store", "retrieve", "delete", "expire", "get_swarm", "info"}
RELAY_TIMEOUT_S = 8.0


def install_onion(node: Any) -> None:
    """Give ``node`` (a :class:`nodes.server.Node`) its onion handler, and its fast path
    (``node.onion_take``): a layer to relay whose next hop is already connected is
    forwarded on the reader's turn and its reply passed back from the next hop's
    reader, and a store for this node as the target is committed and forwarded to the
    swarm from callbacks (``ClientOps.store_soon``), with no task waiting in either; any
    other request for the target, or a next hop still to dial, goes on in a task."""

    def open_layer(req: Request) -> tuple[str, Any, bytes]:
        eph, data = req.args.get("ephemeral_key"), req.args.get("data")
        if not isinstance(eph, bytes) or not isinstance(data, bytes):
            raise RequestError(Status.BAD_REQUEST, "onion needs ephemeral_key and data (bytes)")
        try:
            plaintext, key = crypto.open_layer_keyed(data, node.identity.x25519_secret, eph,
                                                      node.identity.x25519_public)
            kind, what = parse_layer(plaintext)
        except (crypto.CryptoError, LayerError) as exc:
            raise RequestError(Status.BAD_REQUEST, f"bad onion layer: {type(exc).__name__}") from None
        return kind, what, key

    def next_hop(what: Any, peer: Peer) -> tuple[str, bytes, bytes]:
        # The first hop is a client's guard; a relay is called by another node.
        meter.ROLE.set("relay" if peer.session.get(AUTHENTICATED_SESSION_KEY) else "guard")
        nxt, next_eph, next_data = what
        view = node.view
        if view is None or nxt not in view.nodes:
            raise RequestError(Status.BAD_GATEWAY, "next hop unknown")
        return nxt, next_eph, next_data

    def lost(nxt: str, exc: RpcError) -> RequestError:
        """The answer for a relay whose next hop did not answer (dropping a broken connection)."""
        if isinstance(exc, RpcTimeout):
            return RequestError(Status.GATEWAY_TIMEOUT, "next hop timed out")
        node.pool.drop_soon(nxt)
        if isinstance(exc, ConnectError):
            # Never reached the next hop: the request certainly went no further.
            return RequestError(Status.BAD_GATEWAY, "next hop unreachable")
        # Lost after sending: the request may have taken effect (found by the churn
        # scenario: a 502 here made clients report a delivered store as failed).
        return RequestError(Status.GATEWAY_TIMEOUT, "connection to next hop lost")

    async def relay(nxt: str, next_eph: bytes, next_data: bytes) -> tuple[int, Any]:
        try:
            resp = await node.pool.call(nxt, "onion", {"ephemeral_key": next_eph, "data": next_data},
                                        timeout=RELAY_TIMEOUT_S)
        except RpcError as exc:
            raise lost(nxt, exc) from None
        # Relays pass the reply back unchanged.
        return resp.status, resp.body

    async def misrelay(act: str, delay_s: float, nxt: str, next_eph: bytes, next_data: bytes) -> tuple[int, Any]:
        """A hostile relay (nodes/hostile.py, misrelay): drops the request (answering 504 once
        its caller has stopped waiting), delays it, or forwards it and again later."""
        if act == "drop":
            await trio.sleep(RELAY_TIMEOUT_S)
            raise RequestError(Status.GATEWAY_TIMEOUT, "next hop timed out")
        if act == "delay":
            await trio.sleep(delay_s)
            return await relay(nxt, next_eph, next_data)

        async def replay() -> None:
            await trio.sleep(delay_s)
            try:
                await relay(nxt, next_eph, next_data)
            except RequestError:
                pass

        node._nursery.start_soon(replay)
        return await relay(nxt, next_eph, next_data)

    def hostile_relay(nxt: str, next_eph: bytes, next_data: bytes) -> Awaitable[tuple[int, Any]] | None:
        if "misrelay" not in node.hostile:
            return None
        act, delay_s = node.hostile.relay_act()
        return None if act is None else misrelay(act, delay_s, nxt, next_eph, next_data)

    async def target(op: str, args: Any, key: bytes) -> tuple[int, Any]:
        meter.ROLE.set("target")
        if op not in ONION_OPS:
            return Status.OK, {"data": encode_reply(key, Status.NOT_FOUND, {"error": f"op {op!r:.40} not allowed"},
                                                    node.randbytes)}
        # Only the refusals a handler means (RequestError) are sealed for the client; any
        # other exception is a bug, answered 500 in the clear and logged with its traceback
        # by the server, like the same op sent directly.
        try:
            body = await node.client_op(op)(args)
            status = Status.OK
        except RequestError as exc:
            status, body = exc.status, exc.body
        return Status.OK, {"data": encode_reply(key, status, body, node.randbytes)}

    async def handle_onion(req: Request, peer: Peer) -> tuple[int, Any]:
        kind, what, key = open_layer(req)
        if kind == "relay":
            hop = next_hop(what, peer)
            return await (hostile_relay(*hop) or relay(*hop))
        return await target(*what, key)

    def take_onion(req: Request, peer: Peer, reply: Reply) -> Awaitable[tuple[int, Any]] | None:
        kind, what, key = open_layer(req)
        if kind != "relay":
            op, args = what
            if op != "store":
                return target(op, args, key)
            meter.ROLE.set("target")

            def stored(body: Any, error: Exception | None) -> None:
                token = meter.ROLE.set("target")
                try:
                    if error is None:
                        reply(Status.OK, {"data": encode_reply(key, Status.OK, body, node.randbytes)})
                    elif isinstance(error, RequestError):
                        reply(Status.OK, {"data": encode_reply(key, error.status, error.body, node.randbytes)})
                    else:  # a failing disk: answered in the clear, as the dispatcher answers it
                        refusal = node.disk_refusal(error)
                        reply(refusal.status, refusal.body)
                finally:
                    meter.ROLE.reset(token)

            try:
                node.clients.store_soon(args, stored)  # answered once every member has (no task waits)
            except RequestError as exc:
                stored(None, exc)
            return None
        nxt, next_eph, next_data = next_hop(what, peer)
        lie = hostile_relay(nxt, next_eph, next_data)
        if lie is not None:
            return lie
        conn = node.pool.get_nowait(nxt)
        if conn is None:
            return relay(nxt, next_eph, next_data)  # a dial first: in a task

        def answered(resp: Response | None, error: RpcError | None) -> None:
            if error is None:
                reply(resp.status, resp.body)  # type: ignore[union-attr]
            else:
                refusal = lost(nxt, error)
                reply(refusal.status, refusal.body)

        try:
            conn.call_soon("onion", {"ephemeral_key": next_eph, "data": next_data}, timeout=RELAY_TIMEOUT_S,
                           done=answered)
        except RpcError:
            return relay(nxt, next_eph, next_data)  # closed since: the pool dials again, in a task
        return None

    node.onion_handler = handle_onion
    node.onion_take = take_onion
