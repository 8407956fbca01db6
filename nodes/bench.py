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

from testnet.base import crypto
from testnet.base.cputime import cpu_seconds
from testnet.base.rpc import open_rpc


async def bench_node(*, nodes: int = 5, seconds: float = 5.0, concurrency: int = 256, connections: int = 16,
                     accounts: int = 200, data_bytes: int = 100, runs_dir: str = "runs/bench",
                     disk: str = "model") -> dict[str, Any]:
    from pathlib import Path

    from testnet.controller import Options, open_testnet

    rng = random.Random(1)
    ids = [crypto.Identity.from_seed(rng.randbytes(32)).session_id for _ in range(accounts)]
    opts = Options(nodes=nodes, users=0, min_swarm=nodes, links="direct", check=False, runs_dir=Path(runs_dir),
                   disk=disk)
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
            signed0 = 0
            for n in names:
                signed0 += (await net.call(n, "info"))["stats"].get("results_signed", 0)
            cpu0, my0, t0 = cpu_seconds(pids), sum(me.cpu_times()[:2]), time.monotonic()
            stop_at[0] = trio.current_time() + seconds
            async with trio.open_nursery() as n:
                for k in range(concurrency):
                    n.start_soon(worker, k)
            elapsed = time.monotonic() - t0
            cpu1, my1 = cpu_seconds(pids), sum(me.cpu_times()[:2])
            handshakes = signed1 = 0
            for n in names:
                stats = (await net.call(n, "info"))["stats"]
                handshakes += stats.get("node_auth_ok", 0)
                signed1 += stats.get("results_signed", 0)
            outer.cancel_scope.cancel()
    latencies.sort()
    ok = counts["ok"]
    return {
        "nodes": nodes, "disk": disk, "swarm_sizes": sorted(set(swarm_sizes.values())), "seconds": round(elapsed, 3),
        "concurrency": concurrency, "connections": connections, "data_bytes": data_bytes,
        "stores_ok": ok, "stores_failed": counts["fail"],
        "failures": {k: v for k, v in counts.items() if k.startswith("status_")},
        "stores_per_s": round(ok / elapsed, 1),
        "replicas_per_store": round(counts["replicas_ok"] / ok, 2) if ok else 0,
        "network_cpu_us_per_store": round((cpu1 - cpu0) / ok * 1e6, 1) if ok else None,
        "client_cpu_us_per_store": round((my1 - my0) / ok * 1e6, 1) if ok else None,
        "latency_ms": {"p50": percentile_ms(latencies, 0.5), "p99": percentile_ms(latencies, 0.99)},
        "node_auth": auth_cost(nodes, ids, handshakes, counts["replicas_ok"] / ok - 1 if ok else 0,
                               (cpu1 - cpu0) / ok * 1e6 if ok else None),
        "signed_results": result_cost((signed1 - signed0) / ok if ok else None, nodes,
                                      (cpu1 - cpu0) / ok * 1e6 if ok else None),
        "target": ">= 2000 replicated stores/s on 2 cores",
    }


async def disk_cost(bench: Any, *, pairs: int, **kw: Any) -> dict[str, Any]:
    """The same load with SQLite on its own VFS ("os") and on the harness's disk model
    ("model", no fault armed), ``pairs`` times each, alternating (os, model, then model,
    os, ...: a machine whose load drifts favours neither), each run on a fresh network.
    ``ratio`` = the model's mean stores/s over the OS's: the disk layer's cost is 1 - ratio."""
    runs: list[dict[str, Any]] = []
    for i in range(pairs):
        for disk in (("os", "model") if i % 2 == 0 else ("model", "os")):
            runs.append(await bench(disk=disk, **kw))
    rate = {d: [r["stores_per_s"] for r in runs if r["disk"] == d] for d in ("os", "model")}
    cpu = {d: [r["network_cpu_us_per_store"] for r in runs if r["disk"] == d and r["network_cpu_us_per_store"]]
           for d in ("os", "model")}
    mean = {d: sum(v) / len(v) for d, v in rate.items()}
    cpu_mean = {d: sum(v) / len(v) if v else None for d, v in cpu.items()}
    return {"pairs": pairs, "stores_per_s": rate, "mean": {d: round(m, 1) for d, m in mean.items()},
            "ratio": round(mean["model"] / mean["os"], 4) if mean["os"] else None,
            "cpu_us_per_store": cpu, "cpu_mean": {d: round(m, 1) if m else None for d, m in cpu_mean.items()},
            "cpu_ratio": round(cpu_mean["model"] / cpu_mean["os"], 4) if cpu_mean["os"] and cpu_mean["model"]
            else None, "runs": runs}


def print_disk_cost(r: dict[str, Any], echo: Any) -> None:
    for d in ("os", "model"):
        echo(f"disk {d:<5}: " + ", ".join(f"{v:g}" for v in r["stores_per_s"][d]) + f" stores/s (mean {r['mean'][d]})")
    for d in ("os", "model"):
        echo(f"disk {d:<5}: network CPU " + ", ".join(f"{v:g}" for v in r["cpu_us_per_store"][d])
             + f" µs/store (mean {r['cpu_mean'][d]})")
    if r["ratio"] is not None:
        echo(f"model / os = {r['ratio']:.3f}: the disk layer costs {(1 - r['ratio']) * 100:.1f} % of stores/s "
             f"({r['pairs']} pair(s), alternating; target <= 5 %)")
    if r["cpu_ratio"] is not None:
        echo(f"network CPU per store, model / os = {r['cpu_ratio']:.3f}")


def auth_cost(nodes: int, accounts: list[str], handshakes: int, copies_per_store: float,
              network_us_per_store: float | None, rounds: int = 2000) -> dict[str, Any]:
    """What node-to-node authority costs, from its own code timed here on a view of this
    size: one handshake per connection (``check_auth``: one ed25519 verification); per
    replicated copy, the entitlement check (``require_accounts``) and the copy's store
    rules (``accept_copies``) — the hash = content check is older than both and not
    counted; per forwarded delete, the account's signature (``SignedDelete.verify``: one
    ed25519 verification and the key's conversion to its Session ID).  Handshakes are
    counted by the nodes themselves (``info`` stats); they happen when nodes first dial
    each other, before the measured window."""
    from nodes import auth, proofs
    from nodes.core import SwarmView
    from nodes.storage import StoredMessage

    ids = [crypto.Identity.from_seed(bytes([i + 1]) * 32) for i in range(nodes)]
    eds = [i.ed25519_public.hex() for i in ids]
    view = SwarmView.from_registry({"height": 1, "nodes": [
        {"ed25519_public": e, "x25519_public": "00" * 32, "host": "127.0.0.1", "port": 1, "swarm_id": 0}
        for e in eds]}, eds[0])
    ent = auth.Entitlements()
    ent.update(view)
    t = time.process_time()
    for k in range(rounds):
        ent.require_accounts(eds[1], (accounts[k % len(accounts)],), rehoming=True)
    check_us = (time.process_time() - t) / rounds * 1e6
    now = int(time.time() * 1000)
    copies = [StoredMessage(accounts[k % len(accounts)], 0, f"h{k}", b"x" * 100, now, now + 3_600_000)
              for k in range(rounds)]
    t = time.process_time()
    for m in copies:
        proofs.accept_copies((m,), now)
    copy_us = (time.process_time() - t) / rounds * 1e6
    account = crypto.Identity.from_seed(bytes([99]) * 32)
    hashes = [f"{k:043d}" for k in range(3)]
    delete = proofs.SignedDelete(account.session_id, tuple(hashes), account.ed25519_public.hex(),
                                 account.sign(crypto.delete_signature_message(hashes)))
    t = time.process_time()
    for _ in range(rounds // 10):
        delete.verify()
    delete_us = (time.process_time() - t) / (rounds // 10) * 1e6
    sessions = []
    for _ in range(rounds // 10):
        session: dict[str, Any] = {}
        challenge = auth.hello(session, eds[0], crypto.random_bytes)["challenge"]
        sessions.append((session, auth.auth_args(ids[1], eds[0], challenge)))
    t = time.process_time()
    for session, args in sessions:
        auth.check_auth(session, args, eds[0], ent.is_registered)
    handshake_us = (time.process_time() - t) / len(sessions) * 1e6
    per_store = copies_per_store * (check_us + copy_us)
    return {"handshakes": handshakes, "handshake_us": round(handshake_us, 1),
            "entitlement_check_us": round(check_us, 2), "copy_rules_us": round(copy_us, 2),
            "signed_delete_verify_us": round(delete_us, 1), "us_per_store": round(per_store, 2),
            "share_of_network_cpu": round(per_store / network_us_per_store, 4) if network_us_per_store else None}


def result_cost(signatures_per_store: float | None, members: int, network_us_per_store: float | None,
                rounds: int = 500) -> dict[str, Any]:
    """What signed store results cost (PROTOCOL.md, store): the signatures the nodes made per
    store (counted by the nodes: each target signs its own result, each peer one root per
    ``replicate`` request, however many copies it holds), one signature's cost timed here,
    and what a client pays to check a store's answer (a path of a 16-copy request and one
    verification per member)."""
    me = crypto.Identity.from_seed(bytes([42]) * 32)
    key = me.ed25519_public.hex()
    root, paths = crypto.results_root([f"{k:043d}" for k in range(16)])
    t = time.process_time()
    for _ in range(rounds):
        sig = crypto.sign_fast(me, crypto.store_result_message(key, root))
    sign_us = (time.process_time() - t) / rounds * 1e6
    t = time.process_time()
    for _ in range(rounds):
        crypto.verify_request(me.ed25519_public,
                              crypto.store_result_message(key, crypto.results_root_from(f"{3:043d}", paths[3])), sig)
    verify_us = (time.process_time() - t) / rounds * 1e6
    per_store = signatures_per_store * sign_us if signatures_per_store is not None else None
    return {"signatures_per_store": None if signatures_per_store is None else round(signatures_per_store, 2),
            "sign_us": round(sign_us, 1), "us_per_store": None if per_store is None else round(per_store, 1),
            "share_of_network_cpu": round(per_store / network_us_per_store, 4)
            if per_store is not None and network_us_per_store else None,
            "client_check_us_per_store": round(verify_us * members, 1)}


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
    @click.option("--disk", type=click.Choice(["model", "os"]), default="model", show_default=True,
                  help="under each node's SQLite: the harness's disk model, or SQLite's own VFS")
    @click.option("--compare-disk", "pairs", type=int, default=0,
                  help="run PAIRS times on each disk, alternating, and print the model's cost")
    @click.option("--json", "as_json", is_flag=True)
    def bench_command(nodes: int, seconds: float, concurrency: int, disk: str, pairs: int, as_json: bool) -> None:
        """Direct (non-onion) replicated stores/s into one swarm, and CPU µs per store over all processes."""
        if pairs > 0:
            c = trio.run(lambda: disk_cost(bench_node, pairs=pairs, nodes=nodes, seconds=seconds,
                                           concurrency=concurrency))
            if as_json:
                click.echo(_json.dumps(c))
            else:
                print_disk_cost(c, click.echo)
            return
        r = trio.run(lambda: bench_node(nodes=nodes, seconds=seconds, concurrency=concurrency, disk=disk))
        if as_json:
            click.echo(_json.dumps(r))
            return
        click.echo(f"{r['stores_per_s']} replicated stores/s into a swarm of {r['swarm_sizes']} "
                   f"({r['replicas_per_store']} copies each; target >= 2000)")
        click.echo(f"network CPU {r['network_cpu_us_per_store']} µs/store (nodes + registry), "
                   f"load generator {r['client_cpu_us_per_store']} µs/store")
        click.echo(f"latency p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms at "
                   f"{r['concurrency']} in flight; failures {r['failures'] or 'none'}")
        a = r["node_auth"]
        share = f"{a['share_of_network_cpu'] * 100:.1f} %" if a["share_of_network_cpu"] is not None else "n/a"
        click.echo(f"node authority: {a['us_per_store']} µs/store of checks on replicated copies "
                   f"({a['entitlement_check_us']} µs entitlement + {a['copy_rules_us']} µs store rules per copy; "
                   f"{share} of network CPU); {a['signed_delete_verify_us']} µs per forwarded delete "
                   f"(the account's signature); {a['handshakes']} handshakes in all, {a['handshake_us']} µs each, "
                   f"once per node connection")
        sr = r["signed_results"]
        share = f"{sr['share_of_network_cpu'] * 100:.1f} %" if sr["share_of_network_cpu"] is not None else "n/a"
        click.echo(f"signed store results: {sr['signatures_per_store']} signatures/store x {sr['sign_us']} µs "
                   f"= {sr['us_per_store']} µs/store ({share} of network CPU); a client checks a store's "
                   f"answer in {sr['client_check_us_per_store']} µs")

    return bench_command


bench_command = _command()
