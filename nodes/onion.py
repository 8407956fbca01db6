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
from typing import Any

from testnet.base import crypto, meter
from testnet.base.limits import AUTHENTICATED_SESSION_KEY
from testnet.base.protocol import Request, RequestError, Status
from testnet.base.onion import LayerError, encode_reply, parse_layer
from testnet.base.rpc import ConnectError, Peer, RpcError, RpcTimeout

log = logging.getLogger("node.onion")

ONION_OPS = {"store", "retrieve", "delete", "expire", "get_swarm", "info"}
RELAY_TIMEOUT_S = 8.0


def install_onion(node: Any) -> None:
    """Give ``node`` (a :class:`nodes.server.Node`) its onion handler."""

    async def handle_onion(req: Request, peer: Peer) -> tuple[int, Any]:
        eph, data = req.args.get("ephemeral_key"), req.args.get("data")
        if not isinstance(eph, bytes) or not isinstance(data, bytes):
            raise RequestError(Status.BAD_REQUEST, "onion needs ephemeral_key and data (bytes)")
        try:
            plaintext, key = crypto.open_layer_keyed(data, node.identity.x25519_secret, eph,
                                                      node.identity.x25519_public)
            kind, what = parse_layer(plaintext)
        except (crypto.CryptoError, LayerError) as exc:
            raise RequestError(Status.BAD_REQUEST, f"bad onion layer: {type(exc).__name__}") from None
        if kind == "relay":
            # The first hop is a client's guard; a relay is called by another node.
            meter.ROLE.set("relay" if peer.session.get(AUTHENTICATED_SESSION_KEY) else "guard")
            nxt, next_eph, next_data = what
            view = node.view
            if view is None or nxt not in view.nodes:
                raise RequestError(Status.BAD_GATEWAY, "next hop unknown")
            try:
                resp = await node.pool.call(nxt, "onion", {"ephemeral_key": next_eph, "data": next_data},
                                            timeout=RELAY_TIMEOUT_S)
            except RpcTimeout:
                raise RequestError(Status.GATEWAY_TIMEOUT, "next hop timed out") from None
            except ConnectError:
                # Never reached the next hop: the request certainly went no further.
                await node.pool.drop(nxt)
                raise RequestError(Status.BAD_GATEWAY, "next hop unreachable") from None
            except RpcError:
                # Lost after sending: the request may have taken effect (found by the churn
                # scenario: a 502 here made clients report a delivered store as failed).
                await node.pool.drop(nxt)
                raise RequestError(Status.GATEWAY_TIMEOUT, "connection to next hop lost") from None
            # Relays pass the reply back unchanged.
            return resp.status, resp.body
        op, args = what
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

    node.onion_handler = handle_onion
