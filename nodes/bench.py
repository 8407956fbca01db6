"""``swarmnet bench node``: direct (non-onion) stores per second into one
swarm of 5 real node processes, with replication, and the CPU time per store
summed over every process of the network (nodes + registry) — read from the
kernel through psutil, not estimated.

The load comes from this process over a few persistent connections, many
stores in flight on each (as a busy entry node would see).  Its own CPU is
reported apart: it is the client, not the network.
"""

from __future__ import annotations

import random
import time
from typing import Any

import psutil
import trio

from testnet import crypto
from testnet.rpc import open_rpc


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def bench_node(*, nodes: int = 5, seconds: float = 5.0, concurrency: int = 256, connections: int = 16,
                     accounts: int = 200, data_bytes: int = 100, runs_dir: str = "runs/bench") -> dict[str, Any]:
    from pathlib import Path

    from testnet.controller import Options, open_testnet

    rng = random.Random(1)
    ids = [crypto.Identity.from_seed(rng.randbytes(32)).session_id for _ in range(accounts)]
    opts = Options(nodes=nodes, users=0, min_swarm=nodes, links="direct", check=False, runs_dir=Path(runs_dir))
    async with open_testnet(opts) as net:
        names = list(net.nodes)
        pids = [net.nodes[n].child.pid for n in names] + ([net.registry.pid] if net.registry else [])
        swarm_sizes = {}
        for n in names:
            info = await net.call(n, "info")
            swarm_sizes[n] = len(info["swarm"])
        counts = {"ok": 0, "fail": 0, "replicas_ok": 0}
        latencies: list[float] = []
        async with trio.open_nursery() as outer:
            conns = []
            for i in range(connections):
                host, port = net.nodes[names[i % len(names)]].address
                # Many clients, each its own source address: the per-source rate
                # limit (300/s) applies to each, as on a real network.
                cm = open_rpc(host, port, local_host=f"127.{net.plan.block[0]}.{net.plan.block[1] + 7}.{i + 1}")
                conns.append(await outer_enter(outer, cm))
            stop_at = [0.0]

            async def worker(k: int) -> None:
                conn = conns[k % len(conns)]
                seq = 0
                while trio.current_time() < stop_at[0]:
                    seq += 1
                    args = {"pubkey": ids[(k * 7919 + seq) % len(ids)], "namespace": 0,
                            "data": k.to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes(max(data_bytes - 8, 0)),
                            "ttl": 3_600_000, "timestamp": int(time.time() * 1000)}
                    t = trio.current_time()
                    resp = await conn.call("store", args, timeout=10.0)
                    latencies.append(trio.current_time() - t)
                    if resp.ok:
                        counts["ok"] += 1
                        counts["replicas_ok"] += sum(1 for v in resp.body["swarm"].values() if v.get("status") == 200)
                    else:
                        counts["fail"] += 1
                        counts.setdefault(f"status_{resp.status}", 0)
                        counts[f"status_{resp.status}"] += 1

            # Warm-up, then the measured window.
            stop_at[0] = trio.current_time() + 1.0
            async with trio.open_nursery() as n:
                for k in range(concurrency):
                    n.start_soon(worker, k)
            counts.update(ok=0, fail=0, replicas_ok=0)
            latencies.clear()
            me = psutil.Process()
            cpu0, my0, t0 = cpu_seconds(pids), sum(me.cpu_times()[:2]), time.monotonic()
            stop_at[0] = trio.current_time() + seconds
            async with trio.open_nursery() as n:
                for k in range(concurrency):
                    n.start_soon(worker, k)
            elapsed = time.monotonic() - t0
            cpu1, my1 = cpu_seconds(pids), sum(me.cpu_times()[:2])
            outer.cancel_scope.cancel()
    latencies.sort()
    ok = counts["ok"]
    return {
        "nodes": nodes, "swarm_sizes": sorted(set(swarm_sizes.values())), "seconds": round(elapsed, 3),
        "concurrency": concurrency, "connections": connections, "data_bytes": data_bytes,
        "stores_ok": ok, "stores_failed": counts["fail"],
        "failures": {k: v for k, v in counts.items() if k.startswith("status_")},
        "stores_per_s": round(ok / elapsed, 1),
        "replicas_per_store": round(counts["replicas_ok"] / ok, 2) if ok else 0,
        "network_cpu_us_per_store": round((cpu1 - cpu0) / ok * 1e6, 1) if ok else None,
        "client_cpu_us_per_store": round((my1 - my0) / ok * 1e6, 1) if ok else None,
        "latency_ms": {"p50": percentile_ms(latencies, 0.5), "p99": percentile_ms(latencies, 0.99)},
        "target": ">= 2000 replicated stores/s on 2 cores",
    }


def percentile_ms(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of durations in seconds, in ms."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


async def outer_enter(nursery: trio.Nursery, cm: Any) -> Any:
    """Enter an async context manager for the life of ``nursery`` (exited when it is cancelled)."""
    entered = trio.Event()
    box: list[Any] = []

    async def hold() -> None:
        async with cm as value:
            box.append(value)
            entered.set()
            await trio.sleep_forever()

    nursery.start_soon(hold)
    await entered.wait()
    return box[0]


def _command():
    import json as _json

    import click

    @click.command("node")
    @click.option("--nodes", type=int, default=5, show_default=True, help="swarm size (one swarm)")
    @click.option("--seconds", type=float, default=5.0, show_default=True)
    @click.option("--concurrency", type=int, default=256, show_default=True, help="stores in flight")
    @click.option("--json", "as_json", is_flag=True)
    def bench_command(nodes: int, seconds: float, concurrency: int, as_json: bool) -> None:
        """Direct (non-onion) replicated stores/s into one swarm, and CPU µs per store over all processes."""
        r = trio.run(lambda: bench_node(nodes=nodes, seconds=seconds, concurrency=concurrency))
        if as_json:
            click.echo(_json.dumps(r))
            return
        click.echo(f"{r['stores_per_s']} replicated stores/s into a swarm of {r['swarm_sizes']} "
                   f"({r['replicas_per_store']} copies each; target >= 2000)")
        click.echo(f"network CPU {r['network_cpu_us_per_store']} µs/store (nodes + registry), "
                   f"load generator {r['client_cpu_us_per_store']} µs/store")
        click.echo(f"latency p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms at "
                   f"{r['concurrency']} in flight; failures {r['failures'] or 'none'}")

    return bench_command


bench_command = _command()
