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

from .controller import Options, open_testnet

BASELINE_IMPORTS = "import trio, nacl.bindings, msgpack, sqlite3"


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


async def bench_boot(n: int = 50, big: int = 100, *, links: str = "toxiproxy", zygote: bool = True) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="swarmnet-bench-"))
    try:
        baseline = await trio.to_thread.run_sync(baseline_s, n)
        first = await boot_once(n, links=links, zygote=zygote, base=base)
        second = await boot_once(big, links=links, zygote=zygote, base=base) if big else None
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return {"links": links, "zygote": zygote, "baseline_s": round(baseline, 3),
            "ratio": round(first["ready_s"] / baseline, 3), "runs": [r for r in (first, second) if r]}


@click.command("boot")
@click.option("--nodes", default=50, show_default=True, help="network size for the timings")
@click.option("--big", default=100, show_default=True, help="second size, for memory (0 to skip)")
@click.option("--links", type=click.Choice(["toxiproxy", "direct"]), default="toxiproxy", show_default=True)
@click.option("--no-zygote", is_flag=True, help="start nodes as fresh interpreters")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def boot_command(nodes: int, big: int, links: str, no_zygote: bool, as_json: bool) -> None:
    """Time to a ready network vs. cold interpreters, teardown time, and PSS memory."""
    result = trio.run(lambda: bench_boot(nodes, big, links=links, zygote=not no_zygote))
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
