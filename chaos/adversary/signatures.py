"""The ``signatures`` attack family: retrieve, delete and expire of users'
accounts signed by the adversary's own key (claiming the victim's account, the
victim's ed25519 key or another user's), a stale retrieve, and valid
signatures replayed with other arguments."""

from __future__ import annotations

from testnet.base import crypto

from .attacker import FAKE_HASH, Attacker

REPLAYED_HASH = "B" * 43  # what a replayed delete's signature covers: no hash anyone sends
from .model import NetView


SIGNED = ("retrieve/forged-key", "retrieve/victim-key", "retrieve/other-user-key", "retrieve/stale",
          "retrieve/replayed-namespace", "delete/forged-key", "delete/victim-key", "delete/replayed-hashes",
          "expire/forged-key", "expire/victim-key", "expire/replayed-expiry")


async def signatures_round(a: Attacker, view: NetView, r: int) -> None:
    """One client read, delete or expiry signed by the wrong key, stale, or replayed with other
    arguments (``SIGNED`` in turn), at a member of the account's swarm."""
    op, variant = SIGNED[r % len(SIGNED)].split("/")
    names = sorted(a.users)
    name = names[(r // len(SIGNED)) % len(names)]
    victim = a.users[name]
    other = a.users[names[(names.index(name) + 1) % len(names)]]
    own = variant in ("stale", "replayed-namespace", "replayed-hashes", "replayed-expiry")
    pubkey = a.me.session_id if own else victim.session_id
    sid = view.swarm_of(pubkey)
    members = view.members(sid) if sid is not None else []
    if not members:
        return
    node = a.rng.choice(members)
    me_ed = a.me.ed25519_public.hex()
    claimed = {"forged-key": me_ed, "victim-key": victim.ed25519_public.hex(),
               "other-user-key": other.ed25519_public.hex()}.get(variant, me_ed)
    now = a.now_ms()
    hs = a.know.latest(victim.session_id, 20) or [FAKE_HASH]
    want = 401
    if op == "retrieve":
        ts = now - 5 * 60_000 if variant == "stale" else now
        sig = a.me.sign(crypto.retrieve_signature_message(0, ts))  # a valid one only for our own account
        args = {"pubkey": pubkey, "namespace": 1 if variant == "replayed-namespace" else 0, "last_hash": "",
                "timestamp": ts, "pubkey_ed25519": claimed, "signature": sig}
        want = 406 if variant == "stale" else 401
    elif op == "delete":
        # A signature over other hashes than those sent (never over ``hs`` itself: with no hash
        # known, ``hs`` is [FAKE_HASH] and signing that would make a valid delete of our own account).
        signed = [REPLAYED_HASH] if variant == "replayed-hashes" else hs
        args = {"pubkey": pubkey, "hashes": hs, "pubkey_ed25519": claimed,
                "signature": a.me.sign(crypto.delete_signature_message(signed))}
    else:
        expiry = now + 11_000
        signed_expiry = expiry + 60_000 if variant == "replayed-expiry" else expiry
        args = {"pubkey": pubkey, "hashes": hs, "expiry": expiry, "pubkey_ed25519": claimed,
                "signature": a.me.sign(crypto.expire_signature_message(signed_expiry, hs))}
    await a.attempt(("stranger", node), op, args, attack="signatures", want=want, variant=variant,
                    victim="self" if own else name)
