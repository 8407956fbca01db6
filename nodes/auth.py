"""Who may call a node's node-to-node ops, and for which accounts.

oxen-storage-server accepts node-to-node requests only from a node on the
service-node list (it signs them with the sending node's ed25519 key; over
OxenMQ the connection itself is authenticated by that key).  swarmnet
authenticates each connection once, by challenge and response:

1. the caller sends ``node_hello {}``; the receiver draws a fresh 32-byte
   challenge for this connection and answers
   ``{"challenge": bytes, "ed25519_public": <receiver hex>}``;
2. the caller sends ``node_auth {"ed25519_public": <caller hex>, "signature"}``,
   the ed25519 signature by the caller over
   ``node_auth|<caller hex>|<receiver hex>|<challenge hex>``.

The receiver checks the signature against *its own* key and the challenge it
issued on this connection, and that the caller is on its current service-node
list.  Strategy: no clock is involved, so clock-skew faults cannot break it;
a challenge serves one attempt on one connection, so nothing can be replayed;
and the caller signs the key of the node it *dialled* (from its own node
list), never the key the other end claims, so a lying node cannot relay a
handshake it receives to a third node and pass as its caller.

After that, each node op names accounts (or a swarm), and the caller must be
*entitled* to them: a member of the account's swarm in the receiver's current
view.  ``replicate`` alone also accepts a member of the account's swarm in a
recent assignment: a node pushing the messages of a swarm it has left
("rehoming").  Reading (``ae_*``), deleting and changing expiries need
membership now — and membership is not enough to delete or change an expiry:
those carry the account's signature (:mod:`nodes.proofs`).

Which assignments are "recent" is the registry's history, the same for every
node: the last :data:`RECENT_ASSIGNMENTS` assignments the registry replaced
(as many as it keeps), learnt from the registry at start and from the views a
node replaces as it runs.  A registry's genesis publishes one list, and the
assignments it went through before are no history (no node ever held an
account under them): before genesis lists published at once, every node had
passed through a first swarm holding every account, which let any registered
node push into any account until that assignment was forgotten.

Everything here but :func:`authenticate` is pure: no sockets, clock or trio.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping

from testnet.base import crypto
from testnet.base.protocol import RequestError, Status
from testnet.base.rpc import ConnectError, RpcConnection
from testnet.base.swarm import swarm_for

from .core import SwarmView

CHALLENGE_BYTES = 32
# Past swarm assignments a node keeps, to recognise a peer rehoming the messages of
# a swarm it has left: as many as the registry's history holds (testnet.registry's
# HISTORY_LENGTH), so that a node started late and one that ran since boot judge a
# push alike.
RECENT_ASSIGNMENTS = 16

SESSION_NODE = "node"  # Peer.session key: the authenticated caller's ed25519 hex
SESSION_CHALLENGE = "challenge"


class NodeAuthError(ConnectError):
    """The other end refused our handshake, or is not the node we dialled: no request
    went through this connection (so, like a failed connect, a certain failure)."""


def auth_message(caller_ed_hex: str, receiver_ed_hex: str, challenge: bytes) -> bytes:
    return f"node_auth|{caller_ed_hex}|{receiver_ed_hex}|{challenge.hex()}".encode()


def auth_args(identity: crypto.Identity, receiver_ed_hex: str, challenge: bytes) -> dict[str, Any]:
    me = identity.ed25519_public.hex()
    return {"ed25519_public": me, "signature": identity.sign(auth_message(me, receiver_ed_hex, challenge))}


# --------------------------------------------------------------------------- receiver


def hello(session: dict[str, Any], me_ed_hex: str, randbytes: Callable[[int], bytes]) -> dict[str, Any]:
    """Issue this connection's challenge (a new one each time: the old one is void)."""
    challenge = randbytes(CHALLENGE_BYTES)
    session[SESSION_CHALLENGE] = challenge
    return {"challenge": challenge, "ed25519_public": me_ed_hex}


def check_auth(session: dict[str, Any], args: Mapping[str, Any], me_ed_hex: str,
               is_registered: Callable[[str], bool]) -> str:
    """Verify a ``node_auth``; on success the connection belongs to the returned node."""
    challenge = session.pop(SESSION_CHALLENGE, None)  # one attempt per challenge
    if challenge is None:
        raise RequestError(Status.UNAUTHORIZED, "node_hello first: no challenge issued on this connection")
    caller, sig = args.get("ed25519_public"), args.get("signature")
    if not (isinstance(caller, str) and len(caller) == 64 and isinstance(sig, bytes)):
        raise RequestError(Status.BAD_REQUEST, "'ed25519_public' (64 hex) and 'signature' (bytes) are required")
    caller = caller.lower()
    try:
        crypto.verify_request(bytes.fromhex(caller), auth_message(caller, me_ed_hex, challenge), sig)
    except (ValueError, crypto.CryptoError):
        raise RequestError(Status.UNAUTHORIZED, "node_auth signature does not verify") from None
    if not is_registered(caller):
        raise RequestError(Status.UNAUTHORIZED, "not a registered service node")
    session[SESSION_NODE] = caller
    return caller


def authenticated_node(session: Mapping[str, Any], is_registered: Callable[[str], bool]) -> str:
    """The caller of a node op: authenticated on this connection and still registered (401)."""
    caller = session.get(SESSION_NODE)
    if caller is None:
        raise RequestError(Status.UNAUTHORIZED, "node ops need an authenticated service node (node_hello, node_auth)")
    if not is_registered(caller):
        raise RequestError(Status.UNAUTHORIZED, "not a registered service node any more")
    return caller


@dataclass(frozen=True)
class Assignment:
    """Which swarm each node was in at one registry height."""

    height: int
    swarms: Mapping[str, int]  # ed25519 hex -> swarm id

    @cached_property
    def swarm_ids(self) -> list[int]:
        return sorted(set(self.swarms.values()))

    def may_hold(self, node: str, pubkey: str) -> bool:
        sid = self.swarms.get(node)
        return sid is not None and swarm_for(pubkey, self.swarm_ids) == sid


# Assignments are immutable, and the nodes of one process (the simulation runs a
# thousand) remember the same ones: each node keeps up to RECENT_ASSIGNMENTS of
# them, so per-node copies would cost nodes x 32 x nodes entries.  Equal
# assignments at one height are kept once, for as long as any node remembers them.
_shared_assignments: weakref.WeakValueDictionary[tuple[int, int], Assignment] = weakref.WeakValueDictionary()


def shared_assignment(height: int, swarms: Mapping[str, int]) -> Assignment:
    """An :class:`Assignment` equal to ``Assignment(height, swarms)``: the one already
    held in this process when there is one (``swarms`` must not change afterwards)."""
    key = (height, len(swarms))
    known = _shared_assignments.get(key)
    if known is not None and known.swarms == swarms:
        return known
    a = Assignment(height, swarms)
    if known is None:
        _shared_assignments[key] = a
    return a


class Entitlements:
    """Which accounts and swarms a node may act for: those of its swarm in the
    current view, and for pushes also those of a recent past one (a node
    rehoming the messages of a swarm it has left).  Past assignments come from the views this
    node replaced and, for what happened before it started, from the registry's
    history (``get_service_nodes {history: true}``)."""

    def __init__(self, max_past: int = RECENT_ASSIGNMENTS) -> None:
        self.max_past = max_past
        self.current: SwarmView | None = None
        self._past: dict[int, Assignment] = {}  # by height

    def update(self, view: SwarmView) -> None:
        old = self.current
        self.current = view
        if old is not None:
            # Only a replaced *assignment* is history (as the registry counts it): a view
            # that changed addresses alone must not push older assignments out.
            before = {k: r.swarm_id for k, r in old.nodes.items()}
            if before != {k: r.swarm_id for k, r in view.nodes.items()}:
                self._remember(shared_assignment(old.height, before))

    def add_history(self, history: Any) -> None:
        """The registry's past assignments, from the list it came with (the current view):
        ``[{"height", "differ": {ed25519 hex: swarm id, or None when not on the list then}}]``
        (or a whole ``"swarms"`` map).  Malformed entries are ignored."""
        for entry in history if isinstance(history, list) else ():
            try:
                height = int(entry["height"])
                if "differ" in entry:
                    if self.current is None:
                        continue
                    swarms = {k: r.swarm_id for k, r in self.current.nodes.items()}
                    for k, v in entry["differ"].items():
                        if v is None:
                            swarms.pop(str(k), None)
                        else:
                            swarms[sys.intern(str(k))] = int(v)
                else:
                    swarms = {sys.intern(str(k)): int(v) for k, v in entry["swarms"].items()}
                self._remember(shared_assignment(height, swarms))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue

    def _remember(self, a: Assignment) -> None:
        self._past[a.height] = a
        while len(self._past) > self.max_past:
            del self._past[min(self._past)]

    def is_registered(self, node: str) -> bool:
        return self.current is not None and node in self.current.nodes

    def may_hold(self, node: str, pubkey: str, *, rehoming: bool = False) -> bool:
        """Whether ``node`` is in ``pubkey``'s swarm now, or (``rehoming``) was in a recent view."""
        view = self.current
        if view is not None:
            rec = view.nodes.get(node)
            if rec is not None and view.swarm_of(pubkey) == rec.swarm_id:
                return True
        return rehoming and any(a.may_hold(node, pubkey) for a in self._past.values())

    def member_of(self, node: str, swarm_id: int) -> bool:
        view = self.current
        rec = view.nodes.get(node) if view is not None else None
        return rec is not None and rec.swarm_id == swarm_id

    def require_accounts(self, node: str, pubkeys: Iterable[str], *, rehoming: bool = False) -> None:
        """403 unless ``node`` may hold every one of ``pubkeys``."""
        for pk in set(pubkeys):
            if not self.may_hold(node, pk, rehoming=rehoming):
                raise RequestError(Status.FORBIDDEN, "not entitled: caller is not a member of this account's swarm",
                                   {"error": "not entitled: caller is not a member of this account's swarm",
                                    "pubkey": pk})

    def require_swarm(self, node: str, swarm_id: int) -> None:
        if not self.member_of(node, swarm_id):
            raise RequestError(Status.FORBIDDEN, "not entitled: caller is not a member of this swarm")


# --------------------------------------------------------------------------- caller


async def authenticate(conn: RpcConnection, identity: crypto.Identity, receiver_ed_hex: str, *,
                       timeout: float) -> None:
    """Run the handshake on a fresh connection to the node ``receiver_ed_hex`` (the key
    we dialled).  Raises :class:`NodeAuthError` when refused or when the other end
    is not that node."""
    hi = await conn.call("node_hello", {}, timeout=timeout)
    body = hi.body if isinstance(hi.body, dict) else {}
    challenge, claimed = body.get("challenge"), body.get("ed25519_public")
    if not hi.ok or not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_BYTES:
        raise NodeAuthError(f"node_hello refused: status {hi.status}")
    if not isinstance(claimed, str) or claimed != receiver_ed_hex:
        raise NodeAuthError("the node at this address is not the node dialled")
    resp = await conn.call("node_auth", auth_args(identity, receiver_ed_hex, challenge), timeout=timeout)
    if not resp.ok:
        reason = resp.body.get("error") if isinstance(resp.body, dict) else None
        raise NodeAuthError(f"node_auth refused: status {resp.status}: {reason}")
