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
from typing import Any, Mapping

import msgpack

from testnet import crypto
from testnet.protocol import Request, RequestError, Status
from testnet.rpc import ConnectError, Peer, RpcError, RpcTimeout

log = logging.getLogger("node.onion")

ONION_OPS = {"store", "retrieve", "delete", "expire", "get_swarm", "info"}
RELAY_TIMEOUT_S = 8.0


class LayerError(Exception):
    """A layer that does not open or does not parse."""


def parse_layer(plaintext: bytes) -> tuple[str, Any]:
    """``("relay", (next_ed_hex, ephemeral_key, data))`` or ``("request", (op, args))``."""
    try:
        obj = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise LayerError(f"layer is not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise LayerError("layer must be a map")
    if "next" in obj:
        nxt, eph, data = obj.get("next"), obj.get("ephemeral_key"), obj.get("data")
        if not (isinstance(nxt, str) and len(nxt) == 64 and isinstance(eph, bytes) and len(eph) == 32
                and isinstance(data, bytes)):
            raise LayerError("relay layer needs next (ed25519 hex), ephemeral_key (32 bytes) and data")
        return "relay", (nxt.lower(), eph, data)
    req = obj.get("request")
    if isinstance(req, dict) and isinstance(req.get("op"), str) and isinstance(req.get("args", {}), dict):
        return "request", (req["op"], req.get("args", {}))
    raise LayerError("layer is neither a relay instruction nor a request")


def encode_relay(next_ed_hex: str, ephemeral_key: bytes, data: bytes, extra: Mapping[str, Any] | None = None) -> bytes:
    layer = {"next": next_ed_hex, "ephemeral_key": ephemeral_key, "data": data}
    if extra:
        layer.update(extra)
    return msgpack.packb(layer, use_bin_type=True)


def encode_request(op: str, args: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> bytes:
    layer: dict[str, Any] = {"request": {"op": op, "args": dict(args)}}
    if extra:
        layer.update(extra)
    return msgpack.packb(layer, use_bin_type=True)


def encode_reply(key: bytes, status: int, body: Any, randbytes: crypto.RandBytes = crypto.random_bytes) -> bytes:
    return crypto.encrypt_with_key(key, msgpack.packb({"status": int(status), "body": body}, use_bin_type=True),
                                   randbytes)


def decode_reply(key: bytes, blob: bytes) -> tuple[int, Any]:
    obj = msgpack.unpackb(crypto.decrypt_with_key(key, blob), raw=False)
    return int(obj["status"]), obj.get("body")


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
        if op not in ONION_OPS:
            return Status.OK, {"data": encode_reply(key, Status.NOT_FOUND, {"error": f"op {op!r:.40} not allowed"},
                                                    node.randbytes)}
        # Only the refusals a handler means (RequestError) are sealed for the client; any
        # other exception is a bug, answered 500 in the clear and logged with its traceback
        # by the server, like the same op sent directly.
        try:
            body = await getattr(node, "op_" + op)(args)
            status = Status.OK
        except RequestError as exc:
            status, body = exc.status, exc.body
        return Status.OK, {"data": encode_reply(key, status, body, node.randbytes)}

    node.onion_handler = handle_onion
