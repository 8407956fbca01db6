"""The service-node list on the wire: a node's record, and what a node signs to
join or leave the list (the registry serves it: :mod:`testnet.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .crypto import Identity


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One registered service node; keys are lowercase hex, ``swarm_id`` in [0, 2**64)."""

    ed25519_public: str
    x25519_public: str
    host: str
    port: int
    swarm_id: int

    def to_wire(self) -> dict[str, Any]:
        return {"ed25519_public": self.ed25519_public, "x25519_public": self.x25519_public, "host": self.host,
                "port": self.port, "swarm_id": self.swarm_id}


def register_message(ed_hex: str, x_hex: str, host: str, port: int, timestamp: int) -> bytes:
    """What a node signs to register: the fields joined by "|" after b"register".

    The separator keeps the fields apart: without it, port 8055 at time 5 and
    port 805 at time 55 would sign the same bytes.
    """
    return "|".join(["register", ed_hex, x_hex, host, str(port), str(timestamp)]).encode()


def deregister_message(ed_hex: str, timestamp: int) -> bytes:
    """What a node signs to deregister: b"deregister|" + ed_hex + "|" + str(timestamp)."""
    return "|".join(["deregister", ed_hex, str(timestamp)]).encode()


def register_args(identity: Identity, host: str, port: int, now_ms: int) -> dict[str, Any]:
    """Signed arguments of a ``register`` request for ``identity`` at (host, port), timestamp ``now_ms``."""
    ed_hex, x_hex = identity.ed25519_public.hex(), identity.x25519_public.hex()
    return {
        "ed25519_public": ed_hex, "x25519_public": x_hex, "host": host, "port": port,
        "timestamp": now_ms,
        "signature": identity.sign(register_message(ed_hex, x_hex, host, port, now_ms)),
    }


def deregister_args(identity: Identity, now_ms: int) -> dict[str, Any]:
    """Signed arguments of a ``deregister`` request for ``identity``, timestamp ``now_ms``."""
    ed_hex = identity.ed25519_public.hex()
    return {"ed25519_public": ed_hex, "timestamp": now_ms,
            "signature": identity.sign(deregister_message(ed_hex, now_ms))}
