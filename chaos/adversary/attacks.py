"""The adversary: a byzantine nemesis that uses the network as an attacker would.

While its fault is active it runs attack loops in its own nursery and records
every attempt, with what the node answered, in ``adversary.jsonl`` (format:
CHECKERS.md); leaving the fault cancels them and closes every connection they
opened.  Like every nemesis it only injects: the authority checker judges the
record.  Attacks (``params.attacks``, chaos.scenario.ADVERSARY_ATTACKS):

* ``stranger`` — node ops with no node authentication, for real users'
  accounts: list (``ae_digest``, ``ae_hashes``), read (``ae_fetch``), delete
  (``replicate_delete``, every member of every swarm, every round, for each
  message it knows of), expire, and plant messages (``replicate``, also with a
  hash that is not the content's); handshakes that must fail (no challenge,
  an unregistered key, a registered node's key signed by another, a captured
  signature replayed on another connection); registry writes (register an
  unstaked key, deregister a real node, stake without the token);
* ``signatures`` — retrieve, delete and expire of users' accounts signed by
  the adversary's own key (claiming the victim's account, the victim's ed25519
  key or another user's), a stale retrieve, and valid signatures replayed
  with other arguments;
* ``abuse`` — stores outside the rules (TTL too long or short, timestamps an
  hour or a day off, data over 76,800 bytes);
* ``frames`` — announced lengths over 1 MiB, bodies that are not valid
  requests, a frame cut short;
* ``flood`` — waves of idle and mid-frame-stalled connections at one node at a
  time, while a probe checks the node still answers someone else;
* ``liar`` — a registered node (its key stolen from the harness) acting for a
  swarm it is not in: deletes, expiries, listings and fetches of that swarm's
  accounts, and pushes into a synthetic account of it.

Each family lives in its own module (``stranger``, ``signatures``, ``abuse``
for stores, frames and floods, ``liar``) as functions of the
:class:`~chaos.adversary.attacker.Attacker`, which holds what the attacker
knows, its connections and its record.  This module runs them: one loop per
attack in the fault's nursery, paced, each guarded so that a broken attack is
recorded and never ends the run.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from chaos.run.nemesis import HEAL_TIMEOUT_S, NemesisError, register
from chaos.scenario import ScenarioError, check_adversary_params
from chaos.schedule import Fault

from . import abuse, liar, signatures, stranger
from .attacker import Attacker
from .model import NetView

__all__ = ["adversary_fault"]

# attack -> (one round, pace: rounds are ``interval_s`` x pace apart); ``flood`` runs its own loop.
ROUNDS: dict[str, tuple[Callable[[Attacker, NetView, int], Awaitable[None]], float]] = {
    "stranger": (stranger.stranger_round, 1.0), "signatures": (signatures.signatures_round, 2.0),
    "abuse": (abuse.stores_round, 3.0), "frames": (abuse.frames_round, 3.0), "liar": (liar.liar_round, 1.5)}


def start(a: Attacker, nursery: trio.Nursery) -> None:
    """Open the attacker's connections and launch one loop per attack of its fault."""
    a.open_pool(nursery)
    for attack in a.p["attacks"]:
        if attack == "flood":
            nursery.start_soon(_guard, a, attack, partial(abuse.flood_loop, a))
        else:
            fn, pace = ROUNDS[attack]
            nursery.start_soon(_guard, a, attack, partial(_rounds, a, fn, pace))


async def _guard(a: Attacker, attack: str, fn: Callable[[], Awaitable[None]]) -> None:
    try:
        await fn()
    except Exception as exc:  # a broken attack is recorded; it must not end the run
        a.log.write({"attack": attack, "op": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})


async def _rounds(a: Attacker, fn: Callable[[Attacker, NetView, int], Awaitable[None]], pace: float) -> None:
    r = 0
    while not a.log.exhausted:
        view = await a.refresh()
        if view is not None and view.nodes:
            await fn(a, view, r)
            r += 1
        await trio.sleep(a.p["interval_s"] * pace)
    a.note("all", f"max_attempts ({a.p['max_attempts']}) reached: attacks stopped")


@asynccontextmanager
async def adversary_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    """The adversary nemesis: attacks while the block runs; leaving it stops every attack and closes
    every connection.  What it yields gains a summary of the attempts once it ends."""
    try:
        params = check_adversary_params(fault.params, f"fault {fault.id}")
    except ScenarioError as exc:
        raise NemesisError(str(exc)) from None
    adversary = Attacker(net, fault, params)
    desc = adversary.describe()
    try:
        async with trio.open_nursery() as nursery:
            start(adversary, nursery)
            try:
                yield desc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
            await adversary.close()
        desc.update(adversary.summary())


register("adversary", adversary_fault)
