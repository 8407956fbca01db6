"""The onion client against real nodes and real Toxiproxy links: outcomes stay honest
when an attempt is lost after it was sent."""

import random
import time

import pytest
import trio

from clients.client import Client, OutcomeUnknown
from testnet.base import crypto
from testnet.controller import open_testnet
from testnet.fixtures import requires_toxiproxy

pytestmark = [pytest.mark.network, requires_toxiproxy]


async def test_a_refusal_after_a_lost_attempt_is_unknown_not_failed(tmp_path):
    # Found by the mixed scenario (seed 52): a store whose reply was lost was retried on a node
    # with a skewed clock, came back 406 and was recorded as failed — but the first attempt had
    # stored it, and its recipient read it.
    async with open_testnet(nodes=5, users=1, min_swarm=5, seed=8, check=False, run_dir=tmp_path / "run") as net:
        alice = net.user_identity("alice")
        async with trio.open_nursery() as nursery:
            client = Client(alice, name="alice", host=net.user_host("alice"), nursery=nursery,
                            registry=net.registry_address, timeout_s=3.0, rng=random.Random(1),
                            link_opener=net.user_link_opener)
            client.directory.dial = dict(net.user_links("alice"))
            await client.refresh_nodes()
            # Every reply to alice is dropped: the first attempt stores the message, never hears back.
            toxics = [(l.name, await net.api.add_toxic(l.name, "timeout", {"timeout": 0}, stream="downstream"))
                      for l in net.plan.links if l.from_user]

            async def stored_somewhere() -> bool:
                return any([(await net.call(name, "info"))["messages"] for name in net.nodes])

            async def skew_every_clock_then_heal() -> None:
                # Only once the first attempt has stored it (well before its 3 s timeout), and clocks
                # first, links second: the retry, not the first attempt, must meet the skewed clocks
                # (the first attempt is lost: its reply is dropped, and its connection ends when the
                # toxic goes or times out).
                with trio.fail_after(2.5):
                    while not await stored_somewhere():
                        await trio.sleep(0.05)
                for name in net.nodes:
                    await net.admin(name, "admin_clock", offset_ms=60_000)
                for proxy, toxic in toxics:
                    await net.api.remove_toxic(proxy, toxic)

            nursery.start_soon(skew_every_clock_then_heal)
            data = crypto.seal_message(alice, alice.session_id, b"note to self")
            with pytest.raises(OutcomeUnknown, match="406"):
                await client.store(alice.session_id, data, ttl_ms=3_600_000, now_ms=int(time.time() * 1000))
            for name in net.nodes:
                await net.admin(name, "admin_clock", offset_ms=0)
            held = [(await net.call(name, "info"))["messages"] for name in net.nodes]
            assert max(held) == 1  # the lost attempt did store it
            await client.aclose()
            nursery.cancel_scope.cancel()
