"""``swarmnet bench throughput``: onion-routed stores per second on a
30-node network (min swarm 5), users on this machine; latency at half that
load; CPU per message summed over every process; and, measured in the same
run, the crypto floor a node pays per onion store (4 x25519 + 1 ed25519
verify), so the CPU figure reads as a multiple of it.

Also measured in the same run: the transport floor of this stack — CPU for
one request/response round trip between two processes over loopback with
``testnet.base.rpc`` and a handler that does nothing.  An onion store makes at
least eight such round trips (four onion hops, four replications), so eight
times it bounds what any Python node built on this transport can reach.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import psutil
import trio

from nodes.bench import percentile_ms
from testnet.base import crypto
from testnet.base.cputime import cpu_seconds

from .bench_probe import StoreCrypto, one_message
from .client import Client, ClientError


def crypto_floor_us(rounds: int = 2000) -> float:
    """CPU µs for 4 × X25519 + 1 ed25519 verify, measured here and now."""
    unit = StoreCrypto()
    t0 = time.process_time()
    for _ in range(rounds):
        unit.run()
    return (time.process_time() - t0) / rounds * 1e6


def sqlite_floor_us(tmp: Path, rounds: int = 1000) -> float:
    """CPU µs for storing one message in its own transaction (what a node does per copy when
    writes do not coincide), on a fresh database in this process."""
    from nodes.storage import Storage

    tmp.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="sqlite-floor-", dir=tmp))
    rng = random.Random(11)
    try:
        db = Storage(str(d / "db.sqlite"))
        msgs = [one_message(rng, i) for i in range(rounds)]
        t0 = time.process_time()
        for m in msgs:
            db.store_many([m])
        us = (time.process_time() - t0) / rounds * 1e6
        db.close()
        return us
    finally:
        shutil.rmtree(d, ignore_errors=True)


_ECHO_SERVER = """
import json, os, trio
from testnet.base.rpc import serve

async def nothing(req, peer):
    return 200, {}

async def main():
    async with trio.open_nursery() as n:
        bound = await n.start(lambda task_status: serve(nothing, [("127.0.0.1", 0)], task_status=task_status))
        print(json.dumps({"event": "listening", "addresses": bound, "pid": os.getpid()}), flush=True)

trio.run(main)
"""
STORE_ROUND_TRIPS = 8  # 4 onion hops + 4 replications (batched under load, so fewer in truth)


@asynccontextmanager
async def echo_server(log_dir: Path) -> AsyncIterator[tuple[Any, tuple[str, int]]]:
    """An rpc server process whose one op does nothing: (its child, its address)."""
    from testnet import procs

    log_dir.mkdir(parents=True, exist_ok=True)
    child, rfd = procs.spawn("rpc-echo", [sys.executable, "-c", _ECHO_SERVER], stderr=log_dir / "rpc-echo.log")
    try:
        host, port = (await procs.read_ready_line(child, rfd, 10.0))["addresses"][0]
        yield child, (host, port)
    finally:
        await procs.stop_children([child])


async def rpc_floor_us(concurrencies: tuple[int, ...], echo: tuple[Any, tuple[str, int]],
                       calls: int = 4000) -> dict[int, float]:
    """CPU µs (both processes) per request/response round trip of ``testnet.base.rpc`` over loopback,
    for each number of calls in flight, against a handler that does nothing."""
    from testnet.base.rpc import open_rpc

    child, (host, port) = echo
    pids = [child.pid, os.getpid()]
    out = {}
    async with open_rpc(host, port) as rpc:
        payload = {"data": b"x" * 600}  # about an onion layer

        async def calls_of(n: int) -> None:
            for _ in range(n):
                await rpc.call("nothing", payload, timeout=5)

        await calls_of(200)  # warm-up
        for concurrency in concurrencies:
            per = max(calls // concurrency, 1)
            cpu0 = cpu_seconds(pids)
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(calls_of, per)
            out[concurrency] = (cpu_seconds(pids) - cpu0) / (per * concurrency) * 1e6
    return out


async def run_probe(echo: tuple[Any, tuple[str, int]], seconds: float, work_dir: Path) -> dict[str, Any]:
    """One run of :mod:`clients.bench_probe` (its own process) against the echo server; adds the
    server's CPU per round trip, measured over the run."""
    child, (host, port) = echo
    d = Path(tempfile.mkdtemp(prefix="probe-", dir=work_dir))
    try:
        cpu0 = cpu_seconds([child.pid])
        with trio.fail_after(seconds + 30):
            done = await trio.run_process(
                [sys.executable, "-m", "clients.bench_probe", "--echo", f"{host}:{port}", "--seconds", str(seconds),
                 "--dir", str(d)], capture_stdout=True, capture_stderr=True)
        server_s = cpu_seconds([child.pid]) - cpu0
        r = json.loads(done.stdout.decode().strip().splitlines()[-1])
        r["rpc_server_us"] = round(server_s / max(r["rounds"] + 1, 1) * 1e6, 1)
        r["rpc_round_trip_us"] = round(r["rpc_client_us"] + r["rpc_server_us"], 1)
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def bench_throughput(**kw: Any) -> dict[str, Any]:
    """Stores/s at full load, latency at half load, CPU per store and where it goes (see module doc)."""
    async with AsyncExitStack() as stack:
        return await _bench_throughput(stack, **kw)


async def _bench_throughput(stack: AsyncExitStack, *, nodes: int = 30, min_swarm: int = 5, users: int = 16,
                            seconds: float = 8.0, concurrency: int = 64, links: str = "direct",
                            runs_dir: str = "runs/bench", profile: Path | None = None, accounting_s: float = 5.0,
                            progress: Any = None, disk: str = "model") -> dict[str, Any]:
    from testnet.base import meter
    from testnet.controller import Options, open_testnet

    from .bench_ledger import Window, client_counts

    say = progress or (lambda m: None)
    floor = crypto_floor_us()
    say("floors: SQLite, rpc round trips between two processes")
    sqlite_us = sqlite_floor_us(Path(runs_dir))
    echo = await stack.enter_async_context(echo_server(Path(runs_dir)))
    rt = await rpc_floor_us((1, 64), echo)
    rt1, rt64 = rt[1], rt[64]
    say("probe: unit operations paced like a node's, on a quiet machine")
    probe_alone = await run_probe(echo, accounting_s, Path(runs_dir))
    keep_profile = profile is not None
    if profile is None:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="profile-", dir=runs_dir))
    profile.mkdir(parents=True, exist_ok=True)
    # Each node arms its CPU sampler (started and stopped by the window's signals).
    os.environ["SWARMNET_NODE_PROFILE"] = str(profile.resolve())
    meter.install()
    opts = Options(nodes=nodes, users=users, min_swarm=min_swarm, links=links, check=False, runs_dir=Path(runs_dir),
                   disk=disk)
    async with open_testnet(opts, progress=say) as net:
        names = [u.name for u in net.plan.users]
        pids = [rt.child.pid for rt in net.nodes.values() if rt.child] + ([net.registry.pid] if net.registry else [])
        pids += [c.pid for c in net.toxiproxies]
        rng = random.Random(7)
        async with trio.open_nursery() as nursery:
            clients = []
            for u in names:
                c = Client(net.user_identity(u), name=u, host=net.user_host(u), nursery=nursery,
                           registry=net.registry_address, rng=random.Random(rng.random()),
                           link_opener=net.user_link_opener)
                c.directory.dial = dict(net.user_links(u))
                await c.refresh_nodes()
                clients.append(c)
            recipients = [net.user_identity(u).session_id for u in names]
            counts = {"ok": 0, "fail": 0}
            lat: list[float] = []

            async def send(k: int, n: int) -> None:
                c = clients[k % len(clients)]
                to = recipients[(k + n + 1) % len(recipients)]
                data = crypto.seal_message(c.identity, to, b"bench %d %d" % (k, n))
                t = trio.current_time()
                try:
                    await c.store(to, data, ttl_ms=3_600_000, now_ms=int(time.time() * 1000))
                    counts["ok"] += 1
                    lat.append(trio.current_time() - t)
                except ClientError:
                    counts["fail"] += 1

            async def closed_loop(until: float) -> None:
                async def worker(k: int) -> None:
                    n = 0
                    while trio.current_time() < until:
                        n += 1
                        await send(k, n)

                async with trio.open_nursery() as n:
                    for k in range(concurrency):
                        n.start_soon(worker, k)

            async def open_loop(rate: float, until: float) -> None:
                async with trio.open_nursery() as n:
                    k = 0
                    while trio.current_time() < until:
                        k += 1
                        n.start_soon(send, k, k)
                        await trio.sleep(rng.expovariate(rate))

            await closed_loop(trio.current_time() + 1.5)  # warm-up: paths, connections
            counts.update(ok=0, fail=0)
            lat.clear()
            me = psutil.Process()
            cpu0, my0, t0 = cpu_seconds(pids), sum(me.cpu_times()[:2]), time.monotonic()
            say(f"full load: {concurrency} stores in flight for {seconds:g} s")
            await closed_loop(trio.current_time() + seconds)
            elapsed = time.monotonic() - t0
            cpu1, my1 = cpu_seconds(pids), sum(me.cpu_times()[:2])
            full = {"stores_ok": counts["ok"], "stores_failed": counts["fail"],
                    "stores_per_s": round(counts["ok"] / elapsed, 1),
                    "latency_ms": {"p50": percentile_ms(lat, 0.5), "p99": percentile_ms(lat, 0.99)}}
            ok = max(counts["ok"], 1)
            network_us = (cpu1 - cpu0) / ok * 1e6
            client_us = (my1 - my0) / ok * 1e6
            # The accounting (CPU samplers, loop meters) runs in a window of its own, so the
            # figures above are of the network alone; its own cost shows as the difference.
            counts.update(ok=0, fail=0)
            window = Window(net, profile)
            await window.open()
            counts0, my0 = meter.snapshot(), sum(me.cpu_times()[:2])
            say(f"breakdown: the same load for {accounting_s:g} s, accounting on, the probe beside it")
            probe_amid: dict[str, Any] = {}

            async def probe_beside() -> None:
                probe_amid.update(await run_probe(echo, accounting_s, Path(runs_dir)))

            async with trio.open_nursery() as beside:
                beside.start_soon(probe_beside)
                await closed_loop(trio.current_time() + accounting_s)
            counts1, my1 = meter.snapshot(), sum(me.cpu_times()[:2])
            await window.close()
            breakdown = window.per_store(counts["ok"], {"cpu_s": my1 - my0, **client_counts(counts0, counts1)})
            lat.clear()
            half_rate = max(full["stores_per_s"] / 2, 1.0)
            counts.update(ok=0, fail=0)
            lat.clear()
            say(f"half load: {half_rate:.0f} stores/s for {seconds:g} s")
            await open_loop(half_rate, trio.current_time() + seconds)
            half = {"rate_per_s": round(half_rate, 1), "stores_ok": counts["ok"], "stores_failed": counts["fail"],
                    "latency_ms": {"p50": percentile_ms(lat, 0.5), "p99": percentile_ms(lat, 0.99)}}
            for c in clients:
                await c.aclose()
            nursery.cancel_scope.cancel()
    if not keep_profile:
        shutil.rmtree(profile, ignore_errors=True)
    return {
        "nodes": nodes, "min_swarm": min_swarm, "users": users, "links": links, "concurrency": concurrency,
        "full_load": full, "half_load": half,
        "cpu_us_per_store": {"network": round(network_us, 1), "clients": round(client_us, 1),
                             "all_processes": round(network_us + client_us, 1)},
        "breakdown": breakdown,
        "profile_dir": str(profile) if keep_profile else None,
        "crypto_floor_us": round(floor, 1),
        "sqlite_transaction_us": round(sqlite_us, 1),
        "network_cpu_over_floor": round(network_us / floor, 2),
        "floors_per_store": _floors(floor, sqlite_us, rt1, breakdown),
        "probe": {"alone": probe_alone, "amid_network": probe_amid},
        "probe_floors_per_store": {"alone": _floors(probe_alone["crypto_us"], probe_alone["sqlite_us"],
                                                    probe_alone["rpc_round_trip_us"], breakdown),
                                   "amid_network": _floors(probe_amid["crypto_us"], probe_amid["sqlite_us"],
                                                           probe_amid["rpc_round_trip_us"], breakdown)},
        "transport_floor": {
            "rpc_round_trip_cpu_us": {"one_in_flight": round(rt1, 1), "64_in_flight": round(rt64, 1)},
            "round_trips_per_store": STORE_ROUND_TRIPS,
            # Stores/s if every core did nothing but these round trips at their cheapest.
            "ceiling_stores_per_s": round((psutil.cpu_count() or 1) * 1e6 / (STORE_ROUND_TRIPS * rt64), 0),
        },
        "targets": {"stores_per_s": ">= 1000", "cpu_over_floor": "<= 3", "half_load_p50_ms": "<= 5",
                    "half_load_p99_ms": "<= 25"},
    }


def _floors(crypto_us: float, sqlite_us: float, rt1_us: float, breakdown: dict[str, Any]) -> dict[str, float]:
    """What the network would spend per store if each piece cost what it costs alone: the
    crypto, one SQLite transaction per copy written, one rpc round trip (one call in flight,
    as on the network's many lightly loaded connections) per pair of frames read."""
    c = breakdown["counts_per_store"]
    round_trips = round(c["frames_in"] / 2, 2)
    txns = round(c["sqlite_transactions"], 2)
    out = {"round_trips": round_trips, "sqlite_transactions": txns, "crypto_us": round(crypto_us, 1),
           "sqlite_us": round(txns * sqlite_us, 1), "transport_us": round(round_trips * rt1_us, 1)}
    out["sum_us"] = round(out["crypto_us"] + out["sqlite_us"] + out["transport_us"], 1)
    return out


def _command():
    import json as _json

    import click

    from .bench_ledger import format_breakdown

    @click.command("throughput")
    @click.option("--nodes", type=int, default=30, show_default=True)
    @click.option("--users", type=int, default=16, show_default=True)
    @click.option("--seconds", type=float, default=8.0, show_default=True)
    @click.option("--concurrency", type=int, default=64, show_default=True)
    @click.option("--links", type=click.Choice(["direct", "toxiproxy"]), default="direct", show_default=True)
    @click.option("--profile", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="write a CPU profile of every node and of the clients over the full-load window here "
                       "(collapsed stacks, one file per process)")
    @click.option("--disk", type=click.Choice(["model", "os"]), default="model", show_default=True,
                  help="under each node's SQLite: the harness's disk model, or SQLite's own VFS")
    @click.option("--compare-disk", "pairs", type=int, default=0,
                  help="run PAIRS times on each disk, alternating, and print the model's cost")
    @click.option("--json", "as_json", is_flag=True)
    def bench_command(nodes: int, users: int, seconds: float, concurrency: int, links: str, profile: Path | None,
                      disk: str, pairs: int, as_json: bool) -> None:
        """Onion-routed stores/s, latency at half load, CPU per store against the crypto floor."""
        if pairs > 0:
            from nodes.bench import disk_cost, print_disk_cost

            async def one(disk: str) -> dict[str, Any]:
                r = await bench_throughput(nodes=nodes, users=users, seconds=seconds, concurrency=concurrency,
                                           links=links, disk=disk)
                return {"disk": disk, "stores_per_s": r["full_load"]["stores_per_s"],
                        "network_cpu_us_per_store": r["cpu_us_per_store"]["network"], "result": r}

            c = trio.run(lambda: disk_cost(one, pairs=pairs))
            if as_json:
                click.echo(_json.dumps(c))
            else:
                print_disk_cost(c, click.echo)
            return
        r = trio.run(lambda: bench_throughput(nodes=nodes, users=users, seconds=seconds, concurrency=concurrency,
                                              links=links, profile=profile, disk=disk))
        if as_json:
            click.echo(_json.dumps(r))
            return
        f, h, c = r["full_load"], r["half_load"], r["cpu_us_per_store"]
        click.echo(f"{f['stores_per_s']} onion stores/s on {nodes} nodes (target >= 1000)")
        click.echo(f"half load {h['rate_per_s']}/s: p50 {h['latency_ms']['p50']} ms, p99 {h['latency_ms']['p99']} ms "
                   f"(targets 5 / 25)")
        click.echo(f"CPU per store: network {c['network']} µs, clients {c['clients']} µs; crypto floor "
                   f"{r['crypto_floor_us']} µs -> network/floor {r['network_cpu_over_floor']} (target <= 3)")
        b = r["breakdown"]
        for line in format_breakdown(b):
            click.echo(line)
        click.echo(f"  (with the accounting on, the network used {b['network_cpu_us']:.0f} µs per store against "
                   f"{c['network']:.0f} µs without it)")
        t, fl = r["transport_floor"], r["floors_per_store"]
        click.echo(f"floors, measured alone in this process: crypto {r['crypto_floor_us']} µs per store; SQLite "
                   f"{r['sqlite_transaction_us']} µs per one-message transaction x {fl['sqlite_transactions']} = "
                   f"{fl['sqlite_us']:.0f} µs; rpc round trip {t['rpc_round_trip_cpu_us']['one_in_flight']} µs one "
                   f"at a time x {fl['round_trips']} round trips = {fl['transport_us']:.0f} µs "
                   f"({t['rpc_round_trip_cpu_us']['64_in_flight']} µs with 64 in flight on one connection)")
        click.echo(f"sum of floors {fl['sum_us']:.0f} µs per store = {fl['sum_us'] / max(c['network'], 1) * 100:.0f} % "
                   f"of the network's CPU")
        pa, pn = r["probe"]["alone"], r["probe"]["amid_network"]
        fa, fn = r["probe_floors_per_store"]["alone"], r["probe_floors_per_store"]["amid_network"]
        click.echo("the same unit operations paced like a node's (a sleep before each), alone -> amid the loaded "
                   "network:")
        click.echo(f"  SQLite transaction {pa['sqlite_us']} -> {pn['sqlite_us']} µs · crypto of a store "
                   f"{pa['crypto_us']} -> {pn['crypto_us']} µs · rpc round trip {pa['rpc_round_trip_us']} -> "
                   f"{pn['rpc_round_trip_us']} µs")
        click.echo(f"  floors per store at those costs: {fa['sum_us']:.0f} µs alone, {fn['sum_us']:.0f} µs amid the "
                   f"network = {fn['sum_us'] / max(b['network_cpu_us'], 1) * 100:.0f} % of the "
                   f"{b['network_cpu_us']:.0f} µs measured beside it")

    return bench_command


bench_command = _command()
