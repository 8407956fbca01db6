"""Onion layers on the wire (Session's onion requests, simplified framing):
what a relay and a target find inside their layer, and the target's sealed
reply.  Pure: no sockets, no trio (the node's handler is nodes/onion.py)."""

from __future__ import annotations

from typing import Any, Mapping

import msgpack

from . import crypto


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
