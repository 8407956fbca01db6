"""The ``liar`` attack family: a registered node (its key stolen from the
harness) acting for a swarm it is not in — deletes, expiries, listings and
fetches of that swarm's accounts, and pushes into a synthetic account of it."""

from __future__ import annotations

from .attacker import FAKE_HASH, Attacker
from .model import NetView


LIAR_OPS = ("replicate_delete", "replicate_expire", "ae_digest", "ae_hashes", "ae_fetch", "replicate")


def synthetic_account(a: Attacker, view: NetView, swarm_id: int, liar: str) -> tuple[str, bool]:
    """A made-up account of ``swarm_id``, preferably one the liar was never a member for
    (so the rehoming rule cannot let its push through); and whether it might."""
    fallback = None
    for _ in range(256):
        pk = "05" + a.rng.randbytes(32).hex()
        if view.swarm_of(pk) != swarm_id:
            continue
        if not view.may_rehome(liar, pk):
            return pk, False
        fallback = fallback or pk
    return fallback or "05" + "00" * 32, True


async def liar_round(a: Attacker, view: NetView, r: int) -> None:
    """A registered node (its key stolen from the harness) acting for a swarm it is not in: one op
    of ``LIAR_OPS`` in turn, at a member of that swarm."""
    if len(view.swarm_ids) < 2:
        a.note("liar", "one swarm only: no node is outside an account's swarm")
        return
    liars = [ed for ed in sorted(view.nodes) if a.node_identity(ed) is not None]
    if not liars:
        return
    liar = a.rng.choice(liars)
    theirs = a.rng.choice([s for s in view.swarm_ids if s != view.nodes[liar][2]])
    target = a.rng.choice(view.members(theirs))
    key = ("liar", liar, target)
    users = [pk for pk in a.accounts_in(view, theirs) if pk in a.know.names]
    known = [pk for pk in users if a.know.latest(pk)]
    pk = a.rng.choice(known or users) if users else synthetic_account(a, view, theirs, liar)[0]
    victim = a.know.name(pk) if pk in a.know.names else "synthetic"
    hs = a.know.latest(pk, 20) or [FAKE_HASH]
    op = LIAR_OPS[r % len(LIAR_OPS)]
    if op == "replicate_delete":
        await a.attempt(key, op, {"messages": [[pk, hs]]}, attack="liar", want=403, victim=victim)
    elif op == "replicate_expire":
        await a.attempt(key, op, {"messages": [[pk, hs, 1]]}, attack="liar", want=403, victim=victim)
    elif op == "ae_digest":
        await a.attempt(key, op, {"swarm_id": theirs, "digests": {}}, attack="liar", want=403,
                        victim=f"swarm {theirs}")
    elif op == "ae_hashes":
        await a.attempt(key, op, {"buckets": {pk: a.buckets(pk)}}, attack="liar", want=403, victim=victim)
    elif op == "ae_fetch":
        real = [h for h in hs if h != FAKE_HASH]
        if real:  # the reply must leave out every message of an account the liar may not hold
            await a.attempt(key, op, {"hashes": real}, attack="liar", expect="withhold", want=200,
                            victim=victim)
    else:
        synthetic, rehoming = synthetic_account(a, view, theirs, liar)
        msg, h = a.junk(synthetic)
        # When the rehoming rule may apply, either answer is the protocol's: no status is wanted.
        await a.attempt(key, op, {"messages": [msg]}, attack="liar", want=None if rehoming else 403,
                        victim="synthetic", expect="rehoming" if rehoming else "refuse", planted=[h])
