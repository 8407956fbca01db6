"""The ``byzantine`` nemesis: registered members of swarms turned hostile for a
period.

Anyone who stakes runs a service node in the network modelled, so a swarm may
hold a hostile member.  It passes node authentication (its key is registered)
and is entitled to its own swarm's accounts; what it must not be able to do is
change an account's messages on the other members without the account's
proof.  While the fault is active each hostile member works against its own
swarm's other members with what a member can send, every attempt and answer
recorded in ``adversary.jsonl`` (attack ``byzantine``, ``as`` the hostile
node) and judged by the authority checker:

* ``delete`` — ``replicate_delete`` of real messages of its swarm's accounts,
  with no account signature (the account's own signed request is what a
  forwarded delete must carry: PROTOCOL.md);
* ``expire`` — ``replicate_expire`` of them likewise, to expire at once;
* ``plant`` — ``replicate`` of messages the store rules refuse: a hash that is
  not the content's, a TTL past 14 days, a timestamp a day ahead;
* ``alter`` — ``replicate`` of a real message's hash with other content;

and, armed in the node itself (admin op ``admin_byzantine``, :mod:`nodes.hostile`):

* ``lie-retrieve`` — its retrieve answers leave out, repeat and alter messages;
* ``drop-replication`` — as a store's target it forwards nothing (and may keep
  nothing), reporting its peers failed or forging their signed results; it
  acknowledges copies its peers send and drops them, and heals nobody;
* ``lie-digest`` — its anti-entropy digests and hash lists lie (equal, made
  up, empty, or claiming what it dropped and hashes that exist nowhere);
* ``misrelay`` — as an onion relay it drops, delays and replays requests.

Every sent attempt must be refused; a planted hash must be held by no node; an
altered message must reach its recipient intact and a hidden one through
another member (delivery, for every message an honest member's signed result
vouches for).  A hostile member killed and restarted comes back honest; while
the fault lasts the nemesis arms it again as soon as it runs (each round looks),
and records what each node says it did (``op`` ``in-node``, ``expect`` ``lie``,
``acts``) when it is disarmed.  At most ``per_swarm``
members of a swarm turn hostile, and always fewer than half of it, so that
every swarm keeps an honest majority.  The hostile members are drawn from the
fault's seed (``target.pick``) among the swarms the registry lists when the
fault starts, or named (``target.nodes``).
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import trio

from testnet.base import crypto

from chaos.run.nemesis import HEAL_TIMEOUT_S, NemesisError, live_swarms, register
from chaos.scenario import ScenarioError, check_byzantine_params
from chaos.schedule import Fault

from .attacker import Attacker
from .model import NetView

__all__ = ["byzantine_fault", "hostile_members", "BEHAVIOURS", "SENT", "IN_NODE"]

SENT = ("delete", "expire", "plant", "alter")  # sent with the member's key
IN_NODE = ("lie-retrieve", "drop-replication", "lie-digest", "misrelay")  # armed in the node (nodes/hostile.py)
BEHAVIOURS = SENT + IN_NODE
DAY_MS = 24 * 3600 * 1000
# Store rules a planted copy breaks (variant, ttl ms, timestamp offset ms).
RULE_BREAKS = (("bad-hash", 3600_000, 0), ("ttl-too-long", 15 * DAY_MS, 0), ("timestamp-day-ahead", 3600_000, DAY_MS))


def hostile_members(swarms: Mapping[str, int], per_swarm: int, rng: random.Random) -> list[str]:
    """Up to ``per_swarm`` node names of each swarm (``swarms``: name -> swarm id), fewer than
    half of each swarm; a swarm of one or two keeps no hostile member."""
    by_swarm: dict[int, list[str]] = {}
    for name, sid in sorted(swarms.items()):
        by_swarm.setdefault(sid, []).append(name)
    out = []
    for sid in sorted(by_swarm):
        members = by_swarm[sid]
        out += rng.sample(members, min(per_swarm, (len(members) - 1) // 2))
    return sorted(out)


class Byzantine:
    """The hostile members of one fault, acting through one :class:`Attacker` (its pool
    authenticates each connection with the hostile member's own key)."""

    def __init__(self, attacker: Attacker, hostile: list[str], in_node: list[str]) -> None:
        self.a = attacker
        self.hostile_eds = [attacker.net.nodes[n].plan.ed25519_public for n in hostile]
        self.in_node = in_node
        self.armed: dict[str, Any] = {}  # name -> the process (its child) armed: a restart is a new one

    async def arm(self, name: str) -> None:
        """Arm ``name``'s in-node behaviours (raises what the admin op raised)."""
        rt = self.a.net.nodes[name]
        child = rt.child
        await self.a.net.admin(name, "admin_byzantine", behaviours=self.in_node)
        again = name in self.armed
        self.armed[name] = child
        if again:
            self.a.log.write({"attack": "byzantine", "op": "in-node", "node": name, "as": name, "expect": "lie",
                              "event": "armed again after a restart", "behaviours": self.in_node})

    async def rearm(self) -> None:
        """Arm again each hostile member that runs as a new process (it restarted honest)."""
        for name in self.armed:
            rt = self.a.net.nodes[name]
            if rt.state == "running" and rt.child is not self.armed[name]:
                try:
                    await self.arm(name)
                except Exception as exc:  # not answering yet: the next round tries again
                    self.a.note("byzantine", f"{name} not armed again yet: {type(exc).__name__}")

    async def disarm(self, name: str) -> str | None:
        """Make ``name`` honest and record what it says it did; an error's text, or None."""
        rt = self.a.net.nodes[name]
        if rt.state != "running" or rt.child is not self.armed[name]:
            return None  # a restarted node is honest already (its count died with the process)
        try:
            body = await self.a.net.admin(name, "admin_byzantine", behaviours=[])
        except Exception as exc:  # named in faults.jsonl; the other members still heal
            return f"{name}: {type(exc).__name__}: {exc}"[:200]
        acts = body.get("acts") if isinstance(body, dict) else None
        self.a.log.write({"attack": "byzantine", "op": "in-node", "node": name, "as": name, "expect": "lie",
                          "behaviours": self.in_node, "acts": acts if isinstance(acts, dict) else {}})
        return None

    async def round(self, view: NetView, r: int) -> None:
        """Each hostile member tries one behaviour (in turn) at each other member of its swarm."""
        behaviours = [b for b in self.a.p["behaviours"] if b in SENT]
        if not behaviours:
            return
        async with trio.open_nursery() as n:
            for i, ed in enumerate(self.hostile_eds):
                if ed not in view.nodes:
                    continue  # not listed now (killed nodes stay listed; a removed one is not)
                sid = view.nodes[ed][2]
                behaviour = behaviours[(r + i) % len(behaviours)]
                for peer in view.members(sid):
                    if peer != ed:
                        n.start_soon(self.act, view, sid, ed, peer, behaviour)

    async def act(self, view: NetView, sid: int, ed: str, peer: str, behaviour: str) -> None:
        a = self.a
        key = ("liar", ed, peer)  # the attacker's pool authenticates "liar" keys with the node's own key
        users = [pk for pk in a.accounts_in(view, sid) if pk in a.know.names]
        known = [pk for pk in users if a.know.latest(pk)]
        if not users:
            a.note("byzantine", f"swarm {sid} holds no user's account")
            return
        pk = a.rng.choice(known or users)
        victim = a.know.name(pk)
        hs = a.know.latest(pk, 20)
        if behaviour == "delete" and hs:
            await a.attempt(key, "replicate_delete", {"messages": [[pk, hs]]}, attack="byzantine", want=401,
                            victim=victim)
        elif behaviour == "expire" and hs:
            await a.attempt(key, "replicate_expire", {"messages": [[pk, hs, 1]]}, attack="byzantine", want=401,
                            victim=victim)
        elif behaviour == "plant":
            variant, ttl, skew = RULE_BREAKS[a.rng.randrange(len(RULE_BREAKS))]
            msg, h = a.junk(pk)
            now = a.now_ms() + skew
            msg[4], msg[5] = now, now + ttl
            planted = [h]
            if variant == "bad-hash":
                msg[2] = crypto.message_hash(pk, 0, b"what the hash claims")
                a.know.mine.add(msg[2])
                planted.append(msg[2])
            await a.attempt(key, "replicate", {"messages": [msg]}, attack="byzantine", want=400, victim=victim,
                            variant=variant, planted=planted)
        elif behaviour == "alter" and hs:
            h = a.rng.choice(hs)
            now = a.now_ms()
            msg = [pk, 0, h, b"altered by a hostile member " + a.rng.randbytes(16), now, now + 3600_000]
            await a.attempt(key, "replicate", {"messages": [msg]}, attack="byzantine", want=400, victim=victim,
                            variant="altered")


@asynccontextmanager
async def byzantine_fault(net: Any, fault: Fault) -> AsyncIterator[dict[str, Any]]:
    """Hostile members while the block runs; leaving it stops them and closes every connection.
    What it yields names the hostile members and gains a summary of their attempts once it ends."""
    try:
        params = check_byzantine_params(fault.params, f"fault {fault.id}")
    except ScenarioError as exc:
        raise NemesisError(str(exc)) from None
    t = fault.target
    if "nodes" in t or "node" in t:
        hostile = sorted(t["nodes"] if "nodes" in t else [t["node"]])
        unknown = [n for n in hostile if n not in net.nodes]
        if unknown:
            raise NemesisError(f"fault {fault.id} (byzantine) names no node {unknown}")
    else:
        hostile = hostile_members(await live_swarms(net), int(params["per_swarm"]), random.Random(t.get("pick", 0)))
    if not hostile:
        raise NemesisError(f"fault {fault.id} (byzantine): no swarm has three members or more to hold a hostile one")
    attacker = Attacker(net, fault, {**params, "attacks": ["byzantine"]})
    in_node = [b for b in params["behaviours"] if b in IN_NODE]
    byz = Byzantine(attacker, hostile, in_node)
    desc = {"nodes": hostile, "behaviours": list(params["behaviours"]), "log": attacker.describe()["log"]}
    try:
        for name in hostile if in_node else ():
            await byz.arm(name)
        async with trio.open_nursery() as nursery:
            attacker.open_pool(nursery)
            nursery.start_soon(_rounds, attacker, byz)
            try:
                yield desc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(HEAL_TIMEOUT_S):
            for name in list(byz.armed):
                error = await byz.disarm(name)
                if error:
                    desc.setdefault("heal_errors", []).append(error)
            await attacker.close()
        desc.update(attacker.summary())


async def _rounds(a: Attacker, byz: Byzantine) -> None:
    r = 0
    try:
        while not a.log.exhausted:
            await byz.rearm()
            view = await a.refresh()
            if view is not None and view.nodes:
                await byz.round(view, r)
                r += 1
            await trio.sleep(a.p["interval_s"])
        a.note("byzantine", f"max_attempts ({a.p['max_attempts']}) reached: hostile members stopped")
    except Exception as exc:  # a broken behaviour is recorded; it must not end the run
        a.log.write({"attack": "byzantine", "op": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})


register("byzantine", byzantine_fault)
