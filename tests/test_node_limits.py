"""Connection hygiene on a real node: one source address holding every
connection it can does not stop the node serving its swarm peers and
clients from other addresses."""

import sqlite3
import time
from pathlib import Path

import msgpack
import pytest
import trio

from testnet.base.protocol import HEADER, Status
from testnet.base.rpc import open_rpc
from testnet.base.swarm import swarm_for

pytestmark = pytest.mark.network

FLOODER = "127.0.0.222"


def db_hashes(net, name: str) -> set[str]:
    with sqlite3.connect(f"file:{Path(net.nodes[name].plan.db)}?mode=ro", uri=True) as db:
        return {h for (h,) in db.execute("SELECT hash FROM messages")}


async def read_refusal(stream) -> dict | None:
    """The one frame a refused connection gets before its end, or None if it stays open."""
    data = b""
    with trio.move_on_after(0.5):
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    if len(data) < HEADER.size:
        return None
    (n,) = HEADER.unpack_from(data)
    return msgpack.unpackb(data[HEADER.size:HEADER.size + n], raw=False)


async def test_a_flooding_source_is_capped_and_everyone_else_is_served(testnet_factory):
    async with testnet_factory(nodes=6, users=2, min_swarm=2, links="direct") as net:
        body = await net.call("registry", "get_service_nodes", {})
        by_key = {rt.plan.ed25519_public: n for n, rt in net.nodes.items()}
        swarms = {by_key[n["ed25519_public"]]: n["swarm_id"] for n in body["nodes"]}
        bob = net.user_identity("bob").session_id
        members = sorted(n for n, s in swarms.items() if s == swarm_for(bob, sorted(set(swarms.values()))))
        target, peer = members[0], members[1]
        host, port = net.nodes[target].address
        limit = (await net.call(target, "info"))["connections"]
        held = []
        try:
            # Take every connection one address may hold, then a few more.
            refused = 0
            with trio.fail_after(20):
                for _ in range(256 + 4):
                    s = await trio.open_tcp_stream(host, port, local_address=FLOODER)
                    held.append(s)
                for s in held[-4:]:
                    reply = await read_refusal(s)
                    assert reply is not None and reply["status"] == Status.RATE_LIMITED, reply
                    assert "too many connections" in reply["body"]["error"]
                    refused += 1
                # The ones within the cap stay open (no frame, no end).
                assert await read_refusal(held[0]) is None
            assert refused == 4
            stats = (await net.call(target, "info"))["connections"]
            assert stats["refused_per_source"] - limit["refused_per_source"] == 4, stats

            # A client from another address stores; the target replicates to its swarm peers.
            async with open_rpc(host, port, local_host="127.0.0.223") as rpc:
                resp = await rpc.call("store", {"pubkey": bob, "namespace": 0, "data": b"still served",
                                                "ttl": 3_600_000, "timestamp": int(time.time() * 1000)}, timeout=5)
            assert resp.status == 200 and all(v["status"] == 200 for v in resp.body["swarm"].values()), resp.body
            first = resp.body["hash"]
            # A peer's store reaches the target too: its peers' connections are not capped with strangers.
            peer_host, peer_port = net.nodes[peer].address
            async with open_rpc(peer_host, peer_port, local_host="127.0.0.224") as rpc:
                resp = await rpc.call("store", {"pubkey": bob, "namespace": 0, "data": b"from a peer",
                                                "ttl": 3_600_000, "timestamp": int(time.time() * 1000)}, timeout=5)
            assert resp.status == 200 and resp.body["swarm"][net.nodes[target].plan.ed25519_public]["status"] == 200
            assert {first, resp.body["hash"]} <= db_hashes(net, target)
        finally:
            for s in held:
                await s.aclose()
