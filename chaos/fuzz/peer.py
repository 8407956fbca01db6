"""A swarm peer that answers garbage, for ``swarmnet fuzz``: a node's own outgoing
calls (anti-entropy, replication, onion relays) read the answers of peers, and
those answers are input as much as requests are.

The fuzzer serves :class:`chaos.fuzz.frames.PeerScript` on an address of its
own and, with the admin token, points one node (the victim) at it for one of
its swarm peers (``admin_set_links``, as the controller does for Toxiproxy;
the run puts the planned table back afterwards).  The victim authenticates
the fake as that peer (the fake answers the handshake as it), then runs its
anti-entropy rounds and fan-outs against it.  The victim must keep running
and its logs stay clean.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

import trio

from testnet.base.clock import wall_ms
from testnet.base.protocol import RequestError
from testnet.base.rpc import RpcError, serve

from chaos.fuzz.model import KNOWN_OPS, RandomDraw, World
from chaos.fuzz.frames import PeerScript


async def fake_peer(script: PeerScript, host: str, replies: Counter, now_ms: Callable[[], int] = wall_ms, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``script``'s answers on ``host`` (a free port) until cancelled."""
    async def handler(req: Any, peer: Any) -> tuple[int, Any]:
        replies[req.op if req.op in KNOWN_OPS else "(unknown op)"] += 1
        return script.reply(req.op, req.args, now_ms())

    async with trio.open_nursery() as nursery:
        (addr,) = await nursery.start(lambda task_status: serve(handler, [(host, 0)], task_status=task_status))
        task_status.started(addr)


async def keep_route(net: Any, victim: str, posing_key: str, addr: tuple[str, int], interval_s: float = 1.0) -> None:
    """Keep ``victim`` dialling ``addr`` for the node ``posing_key`` (fuzzed admin_set_links may
    replace its table at any time); :func:`chaos.fuzz.run.restore` puts the planned table back."""
    while True:
        table = {k: list(v) for k, v in net.plan.dial_table(victim).items()}
        table[posing_key] = list(addr)
        try:
            await net.admin(victim, "admin_set_links", links=table)
        except (RpcError, RequestError):
            pass  # a node that no longer answers is reported by the checks after the run
        await trio.sleep(interval_s)


async def start_fake_peers(net: Any, world: World, nursery: trio.Nursery, replies: Counter, sources: Iterator[str],
                           seed: Any) -> list[str]:
    """In every swarm of two or more, its first node dials a fake for its second: "victim <- fake"."""
    out = []
    for sid in sorted({n.swarm_id for n in world.nodes}):
        members = world.members(sid)
        if len(members) < 2:
            continue
        victim, posing = members[0], members[1]
        script = PeerScript(RandomDraw(f"{seed}/peer/{sid}"), world, victim, posing)
        addr = await nursery.start(fake_peer, script, next(sources), replies)
        nursery.start_soon(keep_route, net, victim.name, posing.ed25519_public, addr)
        out.append(f"{victim.name} <- fake {posing.name}")
    return out
