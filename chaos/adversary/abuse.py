"""The transport and rule-abuse attack families: ``abuse`` — stores outside
the rules (TTL too long or short, timestamps an hour or a day off, data over
76,800 bytes); ``frames`` — announced lengths over 1 MiB, bodies that are not
valid requests, a frame cut short; ``flood`` — waves of idle and
mid-frame-stalled connections at one node at a time, while a probe checks the
node still answers someone else."""

from __future__ import annotations

import trio

from testnet.base import crypto

from .attacker import CALL_TIMEOUT_S, Attacker
from .model import FRAMES, NetView
from .raw import flood, send_frame


STORES = (("ttl-too-long", 15 * 24 * 3600 * 1000, 0, 64, 400), ("ttl-too-short", 5_000, 0, 64, 400),
          ("timestamp-hour-ago", 3600_000, -3600_000, 64, 406),
          ("timestamp-day-ahead", 3600_000, 24 * 3600_000, 64, 406),
          ("data-too-large", 3600_000, 0, 80_000, 413))


async def stores_round(a: Attacker, view: NetView, r: int) -> None:
    """One store outside the rules (``STORES`` in turn) for a real user's account."""
    variant, ttl, skew, size, want = STORES[r % len(STORES)]
    names = sorted(a.users)
    name = names[(r // len(STORES)) % len(names)]
    pubkey = a.users[name].session_id
    members = view.members(view.swarm_of(pubkey))
    data = a.rng.randbytes(size)
    a.know.mine.add(crypto.message_hash(pubkey, 0, data))
    await a.attempt(("stranger", a.rng.choice(members)), "store",
                    {"pubkey": pubkey, "namespace": 0, "data": data, "ttl": ttl,
                     "timestamp": a.now_ms() + skew},
                    attack="abuse", want=want, variant=variant, victim=name,
                    planted=[crypto.message_hash(pubkey, 0, data)])


async def frames_round(a: Attacker, view: NetView, r: int) -> None:
    """One malformed frame (``model.FRAMES`` in turn) at one node."""
    variant, data, eof, want = FRAMES[r % len(FRAMES)]
    nodes = sorted(view.nodes)
    target = nodes[(r // len(FRAMES)) % len(nodes)]
    host, port, _ = view.nodes[target]
    out = await send_frame(a.network, host, port, a.host["frames"], data, eof=eof, timeout_s=CALL_TIMEOUT_S)
    a.log.write({"attack": "frames", "op": "frame", "variant": variant, "node": a.node_name(target),
                 "as": "stranger", "victim": None, "expect": "refuse", "want": want, "exposed": 0, "effect": 0,
                 **out})


async def flood_loop(a: Attacker) -> None:
    r = 0
    while not a.log.exhausted:
        view = await a.refresh()
        if view is not None and view.nodes:
            await flood_wave(a, view, r)
            r += 1
        await trio.sleep(1.0)
    a.note("all", f"max_attempts ({a.p['max_attempts']}) reached: attacks stopped")


async def flood_wave(a: Attacker, view: NetView, r: int) -> None:
    """One wave at one node, from several addresses or (every other wave) from one, so that
    a per-address connection cap meets it."""
    target = sorted(view.nodes)[r % len(view.nodes)]
    host, port, _ = view.nodes[target]
    sources = a.flood_hosts if r % 2 == 0 else a.flood_hosts[:1]
    out = await flood(a.network, host, port, sources, a.host["probe"],
                      connections=int(a.p["flood_connections"]), hold_s=float(a.p["flood_hold_s"]),
                      timeout_s=CALL_TIMEOUT_S)
    a.log.write({"attack": "flood", "op": "flood", "node": a.node_name(target), "as": "stranger",
                 "expect": "serve", **out})
