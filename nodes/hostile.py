"""A hostile member, for the byzantine nemesis: what a staked node that lies
does to its own answers.  Off unless the controller arms it with the admin op
``admin_byzantine {behaviours}`` (PROTOCOL.md); an empty list makes the node
honest again, and a restarted node is honest.

* ``lie-retrieve`` — a retrieve's answer leaves out some messages (a stale or
  partial view), repeats some, and alters the content of some under their
  true hash.  The client model copes: each poll goes to a random member of
  the swarm, every message is verified against its hash and the sender's
  signature inside the sealed box, and a hash already received is dropped.

Pure: the node's parts ask it what to change; its randomness is the node's
own seeded ``random.Random`` (exact in the simulation).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterable

from testnet.base.protocol import RequestError, Status

from .storage import StoredMessage

BEHAVIOURS = ("lie-retrieve",)
# Of the messages a lying retrieve would return: left out, altered, repeated (the rest as they are).
MISSING, ALTERED, REPEATED = 0.25, 0.15, 0.15


class Hostility:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.active: frozenset[str] = frozenset()

    def __contains__(self, behaviour: str) -> bool:
        return behaviour in self.active

    def arm(self, behaviours: object) -> list[str]:
        """Set the behaviours (400 names an unknown one); the list armed."""
        if not isinstance(behaviours, list) or not all(isinstance(b, str) for b in behaviours):
            raise RequestError(Status.BAD_REQUEST, "'behaviours' must be a list of strings")
        unknown = sorted(set(behaviours) - set(BEHAVIOURS))
        if unknown:
            raise RequestError(Status.BAD_REQUEST, f"unknown behaviour(s) {unknown}; known: {list(BEHAVIOURS)}")
        self.active = frozenset(behaviours)
        return sorted(self.active)

    def tamper(self, msgs: Iterable[StoredMessage]) -> list[StoredMessage]:
        """A lying retrieve's answer for ``msgs``."""
        out = []
        for m in msgs:
            r = self.rng.random()
            if r < MISSING:
                continue
            if r < MISSING + ALTERED:
                out.append(replace(m, data=b"altered by a hostile member " + self.rng.randbytes(16)))
            elif r < MISSING + ALTERED + REPEATED:
                out += [m, m]
            else:
                out.append(m)
        return out
