"""``python -m clients.bench_probe``: what the unit operations of an onion store
cost in CPU, in whatever surroundings this process runs.

``swarmnet bench throughput`` runs it twice with the same pacing — once
before the network starts and once while the network is under full load — so
the difference is what sharing two cores and their caches with 30 busy node
processes does to the very same work (a node's data and the interpreter's
state are evicted between its turns).  Each round sleeps ``--gap`` seconds, as
a node does between frames, then times with the thread's CPU clock:

* one message stored in its own SQLite transaction (``nodes.storage``);
* the crypto of one onion store (4 x25519 + 1 ed25519 verify);
* the client side of one ``testnet.base.rpc`` round trip to an echo server
  (``--echo``); the bench measures the server's side from its process CPU.

Prints one JSON line of means (µs) and the number of rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import trio
from nacl import bindings as sodium

from nodes.storage import Storage, StoredMessage
from testnet.base import crypto
from testnet.base.rpc import open_rpc


def one_message(rng: random.Random, i: int) -> StoredMessage:
    """A message as a node stores one: 400 bytes, a fresh account and hash."""
    return StoredMessage(pubkey="05" + rng.randbytes(32).hex(), namespace=0, hash=rng.randbytes(32).hex(),
                         data=rng.randbytes(400), timestamp=1_900_000_000_000 + i,
                         expiry=1_900_000_000_000 + i + 14 * 86_400_000)


class StoreCrypto:
    """The crypto a node pays per onion store: 4 x25519 (one per layer) + 1 ed25519 verify."""

    def __init__(self) -> None:
        self.secret, self.public = sodium.crypto_box_keypair()
        self.ident = crypto.Identity.from_seed(bytes(32))
        self.signed = b"x" * 64
        self.sig = self.ident.sign(self.signed)

    def run(self) -> None:
        for _ in range(4):
            sodium.crypto_scalarmult(self.secret, self.public)
        crypto.verify_request(self.ident.ed25519_public, self.signed, self.sig)


async def probe(echo: tuple[str, int], seconds: float, gap: float, db_dir: Path) -> dict[str, float]:
    rng = random.Random(5)
    db = Storage(str(db_dir / "probe.sqlite"))
    store_crypto = StoreCrypto()
    sums = {"sqlite_us": 0.0, "crypto_us": 0.0, "rpc_client_us": 0.0}
    rounds = 0
    try:
        async with open_rpc(*echo) as rpc:
            payload = {"data": b"x" * 600}
            await rpc.call("nothing", payload, timeout=5)
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                await trio.sleep(gap)
                m = one_message(rng, rounds)
                t0 = time.thread_time()
                db.store_many([m])
                t1 = time.thread_time()
                store_crypto.run()
                t2 = time.thread_time()
                await trio.sleep(gap)
                t3 = time.thread_time()
                await rpc.call("nothing", payload, timeout=5)
                t4 = time.thread_time()
                sums["sqlite_us"] += t1 - t0
                sums["crypto_us"] += t2 - t1
                sums["rpc_client_us"] += t4 - t3
                rounds += 1
    finally:
        db.close()
    n = max(rounds, 1)
    return {**{k: round(v / n * 1e6, 1) for k, v in sums.items()}, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.bench_probe")
    p.add_argument("--echo", required=True, help="HOST:PORT of an rpc echo server")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--gap", type=float, default=0.004)
    p.add_argument("--dir", required=True, help="a directory for the probe's database")
    a = p.parse_args(argv)
    host, _, port = a.echo.rpartition(":")
    r = trio.run(probe, (host, int(port)), a.seconds, a.gap, Path(a.dir))
    sys.stdout.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
