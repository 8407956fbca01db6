"""The ``stranger`` attack family: node ops with no node authentication for
real users' accounts (list, read, delete, expire, plant — also under a hash that
is not the content's), handshakes that must fail, and registry writes without
authority.  Every answer wanted is a refusal (401/403)."""

from __future__ import annotations

from functools import partial

import trio

from nodes.auth import auth_args, auth_message
from testnet.base import crypto
from testnet.base.rpc import RpcError, open_rpc
from testnet.registry import deregister_message, register_args

from .attacker import CALL_TIMEOUT_S, Attacker
from .model import NetView


STRANGER_OPS = ("ae_digest", "ae_hashes", "ae_fetch", "replicate_expire", "replicate", "replicate-bad-hash")


async def stranger_round(a: Attacker, view: NetView, r: int) -> None:
    """Node ops for real users' accounts with no node authentication; every 10th round handshakes
    that must fail, every 20th registry writes without authority."""
    now = trio.current_time()
    async with trio.open_nursery() as n:
        for sid in view.swarm_ids:
            members = view.members(sid)
            items = [[pk, hs] for pk in a.accounts_in(view, sid) if (hs := a.know.recent(pk, now))]
            victims = ",".join(a.know.name(pk) for pk, _ in items)
            for m in members if items else ():
                n.start_soon(partial(a.attempt, ("stranger", m), "replicate_delete", {"messages": items},
                                     attack="stranger", want=401, victim=victims))
            op = STRANGER_OPS[(r + sid) % len(STRANGER_OPS)]
            n.start_soon(_other_op, a, view, sid, members[r % len(members)], op)
    if r % 10 == 0:
        await handshakes(a, view, r)
    if r % 20 == 5:
        await registry_writes(a, view)


async def _other_op(a: Attacker, view: NetView, sid: int, node: str, op: str) -> None:
    key = ("stranger", node)
    accounts = a.accounts_in(view, sid)
    users = [pk for pk in accounts if pk in a.know.names]
    if op == "ae_digest":
        resp = await a.attempt(key, op, {"swarm_id": sid, "digests": {}}, attack="stranger", want=401,
                               victim=f"swarm {sid}")
        if resp is not None and resp.ok:  # listed: remember accounts and buckets for ae_hashes
            for pk, pairs in (resp.body.get("buckets") or {}).items():
                a.know.buckets.setdefault(pk, set()).update(b for b, _ in pairs)
    elif op == "ae_hashes" and accounts:
        resp = await a.attempt(key, op, {"buckets": {pk: a.buckets(pk) for pk in accounts[:50]}},
                               attack="stranger", want=401, victim=",".join(map(a.know.name, accounts)))
        if resp is not None and resp.ok:
            now = trio.current_time()
            for pk, hs in (resp.body.get("hashes") or {}).items():
                a.know.learn(pk, hs, now, "listed")
    elif op == "ae_fetch":
        hs = [h for pk in accounts for h in a.know.latest(pk, 20)][:100]
        if hs:
            await a.attempt(key, op, {"hashes": hs}, attack="stranger", want=401,
                            victim=",".join(map(a.know.name, accounts)))
    elif op == "replicate_expire":
        items = [[pk, hs, 1] for pk in accounts if (hs := a.know.latest(pk, 20))]
        if items:
            await a.attempt(key, op, {"messages": items}, attack="stranger", want=401,
                            victim=",".join(a.know.name(pk) for pk, _, _ in items))
    elif op in ("replicate", "replicate-bad-hash") and users:
        pk = a.rng.choice(users)
        msg, h = a.junk(pk)
        planted = [h]
        if op == "replicate-bad-hash":
            msg[2] = crypto.message_hash(pk, 0, b"what the hash claims")
            planted.append(msg[2])
            a.know.mine.add(msg[2])
        await a.attempt(key, "replicate", {"messages": [msg]}, attack="stranger", want=401,
                        victim=a.know.name(pk), variant=op, planted=planted)


async def handshakes(a: Attacker, view: NetView, r: int) -> None:
    """node_auth attempts that must fail, each on a fresh connection; then a node op on it."""
    target = sorted(view.nodes)[r % len(view.nodes)]
    host, port, _ = view.nodes[target]
    other = next((ed for ed in sorted(view.nodes) if ed != target and a.node_identity(ed)), None)
    me = a.me.ed25519_public.hex()
    for variant in ("no-challenge", "unregistered-key", "claimed-key", "replayed-challenge"):
        if variant in ("claimed-key", "replayed-challenge") and other is None:
            continue
        resp, error, follow = None, None, None
        try:
            with trio.move_on_after(3 * CALL_TIMEOUT_S):
                async with open_rpc(host, port, local_host=a.host["stranger"], timeout=CALL_TIMEOUT_S,
                                    network=a.network) as c:
                    if variant == "no-challenge":
                        args = {"ed25519_public": me,
                                "signature": a.me.sign(auth_message(me, target, bytes(32)))}
                    else:
                        hi = await c.call("node_hello", {}, timeout=CALL_TIMEOUT_S)
                        challenge = hi.body.get("challenge") if hi.ok and isinstance(hi.body, dict) else bytes(32)
                        if variant == "unregistered-key":
                            args = auth_args(a.me, target, challenge)
                        elif variant == "claimed-key":
                            args = {"ed25519_public": other,
                                    "signature": a.me.sign(auth_message(other, target, challenge))}
                        else:  # a registered node's signature captured from another connection
                            args = auth_args(a.node_identity(other), target, bytes(32))
                    resp = await c.call("node_auth", args, timeout=CALL_TIMEOUT_S)
                    follow = await c.call("ae_digest", {"swarm_id": view.nodes[target][2], "digests": {}},
                                          timeout=CALL_TIMEOUT_S)
        except RpcError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        claims = a.node_name(other) if variant in ("claimed-key", "replayed-challenge") else "stranger"
        a.record("stranger", "node_auth", target, resp, error, expect="refuse", want=401, victim=None,
                 variant=variant, as_=claims)
        if follow is not None:
            a.record("stranger", "ae_digest", target, follow, None, expect="refuse", want=401,
                     victim=f"swarm {view.nodes[target][2]}", variant=f"after-{variant}")


async def registry_writes(a: Attacker, view: NetView) -> None:
    """Registry writes without authority: an unstaked key, a forged deregister, a stake without the token."""
    now = a.now_ms()
    real = sorted(view.nodes)[0]
    forged = {"ed25519_public": real, "timestamp": now, "signature": a.me.sign(deregister_message(real, now))}
    for op, args, want, variant in (
                                    ("register", register_args(a.me, a.host["stranger"], 9, now), 403, "unstaked-key"),
                                    ("deregister", forged, 401, "forged-signature"),
                                    ("stake", {"token": "0" * 32, "ed25519_public": a.me.ed25519_public.hex()}, 401, "no-token")):
        resp = await a.attempt(("registry",), op, args, attack="stranger", want=want, variant=variant,
                               victim=a.node_name(real) if op == "deregister" else None)
        if op == "register" and resp is not None and resp.ok:
            a.registered = True
