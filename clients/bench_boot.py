"""``swarmnet bench boot``: how fast a network starts and stops, and what it costs in memory.

Figures, all measured in one run (nothing here is asserted by a test):

* ``ready_s`` — from nothing to a ready network of N nodes (every node
  answers ``info`` with a swarm and the registry's height);
* ``baseline_s`` — N plain ``python -c "import trio, nacl.bindings, msgpack,
  sqlite3"`` processes started at once, until the last has exited: what N
  cold interpreters cost before doing any work; ``ratio`` = ready / baseline
  (target <= 0.5, which needs the zygote);
* ``teardown_s`` — from asking the network to stop until every process is
  reaped (target <= 1 s);
* ``pss_mb`` — the summed proportional set size of the node processes (and,
  apart, of the registry, Toxiproxy and zygote) at N and at a second size.

The scale section (``--scale N``) boots one large network and measures what
issue "500 real nodes" asks of it: ready = swarms formed and one onion
message stored by one user and read back by another (target <= 30 s at 500
nodes with Toxiproxy links); PSS of every process of the run (target <= 6
GiB); the CPU of the whole idle network over 10 s, once boot's traffic has
settled (target <= 25 % of one core); teardown (target <= 3 s) and that no
process is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import psutil
import trio

from testnet.base.cputime import cpu_seconds
from testnet.controller import Options, open_testnet
from testnet.procs import proc_state

BASELINE_IMPORTS = "import trio, nacl.bindings, msgpack, sqlite3"
SCALE_SETTLE_S = 20.0


def baseline_s(n: int) -> float:
    """Seconds for ``n`` concurrent cold interpreters importing what a node imports."""
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", BASELINE_IMPORTS]) for _ in range(n)]
    codes = [p.wait() for p in procs]
    elapsed = time.monotonic() - start
    if any(codes):
        raise RuntimeError(f"baseline interpreters failed: exit codes {sorted(set(codes))}")
    return elapsed


def pss_mb(pids: list[int]) -> float:
    """Summed PSS of ``pids`` in MiB (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return round(total / (1 << 20), 1)


async def boot_once(n: int, *, links: str, zygote: bool, base: Path) -> dict[str, Any]:
    """Boot ``n`` nodes, measure, tear down; returns the figures of this size."""
    opts = Options(nodes=n, users=3, min_swarm=5, links=links, run_dir=base / f"boot-{n}", check=False,
                   zygote=zygote, ready_timeout_s=120)
    start = time.monotonic()
    async with open_testnet(opts) as net:
        ready = time.monotonic() - start
        rec = net.record()
        node_pids = [x["pid"] for x in rec["nodes"]]
        others = [c.pid for c in (net.registry, *net.toxiproxies) if c is not None]
        if rec.get("zygote"):
            others.append(rec["zygote"]["pid"])
        await trio.sleep(1.0)  # let start-up garbage settle before reading memory
        pss_nodes, pss_other = pss_mb(node_pids), pss_mb(others)
        stop = time.monotonic()
    teardown = time.monotonic() - stop
    return {"nodes": n, "ready_s": round(ready, 3), "teardown_s": round(teardown, 3),
            "pss_nodes_mb": pss_nodes, "pss_per_node_mb": round(pss_nodes / n, 2), "pss_other_mb": pss_other}


async def _one_onion_message(net: Any) -> float:
    """Store one message from the first user to the second through an onion path and read it back;
    seconds it took."""
    import random

    from testnet.base import crypto

    from .client import Client

    t0 = time.monotonic()
    a, b = (u.name for u in net.plan.users[:2])
    async with trio.open_nursery() as nursery:
        clients = []
        for name in (a, b):
            c = Client(net.user_identity(name), name=name, host=net.user_host(name), nursery=nursery,
                       registry=net.registry_address, rng=random.Random(name), link_opener=net.user_link_opener)
            c.directory.dial = dict(net.user_links(name))
            await c.refresh_nodes()
            clients.append(c)
        sender, reader = clients
        text = b"swarmnet scale check"
        with trio.fail_after(30):
            await sender.store(reader.session_id, crypto.seal_message(sender.identity, reader.session_id, text),
                               now_ms=int(time.time() * 1000))
            while True:
                got = await reader.retrieve(now_ms=int(time.time() * 1000))
                msgs = (got.body or {}).get("messages") or []
                if any(crypto.open_message(reader.identity, m["data"])[0] == text for m in msgs):
                    break
                await trio.sleep(0.2)
        for c in clients:
            await c.aclose()
        nursery.cancel_scope.cancel()
    return time.monotonic() - t0


async def scale_once(n: int, *, links: str, base: Path, idle_s: float = 10.0) -> dict[str, Any]:
    """Boot ``n`` nodes with ``links``, then the figures of the scale section (see module doc)."""
    opts = Options(nodes=n, users=3, min_swarm=5, links=links, run_dir=base / f"scale-{n}", check=False,
                   ready_timeout_s=max(120.0, n * 0.5))
    start = time.monotonic()
    async with open_testnet(opts) as net:
        swarms_s = time.monotonic() - start
        onion_s = await _one_onion_message(net)
        ready = time.monotonic() - start
        pids = [c.pid for c in net.children()] + ([net.zygote.child.pid] if net.zygote else [])
        # Boot's anti-entropy (every pair of swarm members once), registry long-polls and garbage
        # settle: at 300 nodes the network used 40 % of a core 3 s after the message, 24 % after 20 s.
        await trio.sleep(SCALE_SETTLE_S)
        pss = pss_mb(pids)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        await trio.sleep(idle_s)
        idle = (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
        servers = len(net.toxiproxies)
        proxies = len(net.plan.links)
        made = len(net.api.made) if net.api is not None else 0
        stop = time.monotonic()
    teardown = time.monotonic() - stop
    left = [pid for pid in pids if psutil.pid_exists(pid) and proc_state(pid) != "dead"]
    return {"nodes": n, "links": links, "toxiproxy_servers": servers, "proxies": proxies, "proxies_made": made,
            "swarms_formed_s": round(swarms_s, 1), "onion_message_s": round(onion_s, 2), "ready_s": round(ready, 1),
            "pss_all_mib": pss, "idle_cpu_share_of_one_core": round(idle, 3), "teardown_s": round(teardown, 2),
            "processes_left": len(left)}


async def bench_boot(n: int = 50, big: int = 100, *, links: str = "toxiproxy", zygote: bool = True,
                     scale: int = 0) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="swarmnet-bench-"))
    try:
        baseline = await trio.to_thread.run_sync(baseline_s, n)
        first = await boot_once(n, links=links, zygote=zygote, base=base)
        second = await boot_once(big, links=links, zygote=zygote, base=base) if big else None
        scaled = await scale_once(scale, links=links, base=base) if scale else None
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return {"links": links, "zygote": zygote, "baseline_s": round(baseline, 3),
            "ratio": round(first["ready_s"] / baseline, 3), "runs": [r for r in (first, second) if r],
            "scale": scaled}


@click.command("boot")
@click.option("--nodes", default=50, show_default=True, help="network size for the timings")
@click.option("--big", default=100, show_default=True, help="second size, for memory (0 to skip)")
@click.option("--links", type=click.Choice(["toxiproxy", "direct"]), default="toxiproxy", show_default=True)
@click.option("--no-zygote", is_flag=True, help="start nodes as fresh interpreters")
@click.option("--scale", default=500, show_default=True,
              help="the scale section's network size (0 to skip; the targets are for 500 with Toxiproxy links)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def boot_command(nodes: int, big: int, links: str, no_zygote: bool, scale: int, as_json: bool) -> None:
    """Time to a ready network vs. cold interpreters, teardown time, PSS memory; one large network."""
    result = trio.run(lambda: bench_boot(nodes, big, links=links, zygote=not no_zygote, scale=scale))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    first = result["runs"][0]
    click.echo(f"boot bench ({links} links, {'zygote' if result['zygote'] else 'fresh interpreters'})")
    click.echo(f"  ready, {nodes} nodes:             {first['ready_s']:.2f} s")
    click.echo(f"  baseline, {nodes} cold pythons:   {result['baseline_s']:.2f} s   ({BASELINE_IMPORTS})")
    click.echo(f"  ratio ready/baseline:        {result['ratio']:.2f}   (target <= 0.5)")
    for r in result["runs"]:
        click.echo(f"  {r['nodes']:>3} nodes: teardown {r['teardown_s']:.2f} s (target <= 1), PSS nodes "
                   f"{r['pss_nodes_mb']:.0f} MiB ({r['pss_per_node_mb']:.1f}/node), registry+toxiproxy+zygote "
                   f"{r['pss_other_mb']:.0f} MiB")
    sc = result.get("scale")
    if sc:
        click.echo(f"  scale: {sc['nodes']} nodes, {sc['links']} links"
                   + (f" ({sc['proxies']:,} links on {sc['toxiproxy_servers']} Toxiproxy servers; "
                      f"{sc['proxies_made']:,} proxies made by the end, each on first use)"
                      if sc["toxiproxy_servers"] else ""))
        click.echo(f"    ready {sc['ready_s']} s: swarms formed at {sc['swarms_formed_s']} s, one onion message stored "
                   f"and read back in {sc['onion_message_s']} s (target <= 30 s at 500 nodes, Toxiproxy links)")
        click.echo(f"    PSS of every process {sc['pss_all_mib'] / 1024:.2f} GiB (target <= 6) · idle network "
                   f"{sc['idle_cpu_share_of_one_core'] * 100:.1f} % of one core (target <= 25) · teardown "
                   f"{sc['teardown_s']} s (target <= 3), {sc['processes_left']} processes left")
