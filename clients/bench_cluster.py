"""``swarmnet bench cluster``: what spreading a run over a Ray cluster costs, on this machine.

Figures, all measured in one run (nothing here is asserted by a test), on a
cluster of namespace hosts this command makes itself (``--hosts``, needs
root) or on the one at ``--cluster``:

* ``up_message_down`` — per round, N nodes booted, one onion message stored
  by one user and read back by another, torn down: on one host (this
  machine, as ``swarmnet up``) and spread over the cluster's hosts,
  alternately; ``ratio`` = cluster / one host (target <= 2);
* ``explore`` — ``swarmnet sim explore SCENARIO`` over the same seeds with
  ``--jobs J`` here and with ``--cluster``: seeds per hour each, ``share`` =
  cluster / local (target >= 0.8 with the same cores: the engine's overhead);
* ``ray_pss_mib`` — the proportional memory of each host's Ray processes
  (raylet, agents and helpers) when idle, and of the head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import psutil
import trio

from clients.bench_boot import _one_onion_message, pss_mb
from testnet.controller import Options, open_testnet


async def up_message_down(opts: Options) -> dict[str, float]:
    """Seconds to a ready network, for one onion message, and to tear it down (and the load
    average as it began: the machine is shared)."""
    from testnet.cluster.run import open_network

    load = psutil.getloadavg()[0]
    t0 = time.monotonic()
    async with (open_network(opts) if opts.cluster else open_testnet(opts)) as net:
        ready = time.monotonic() - t0
        message = await _one_onion_message(net)
        t1 = time.monotonic()
    down = time.monotonic() - t1
    return {"ready_s": round(ready, 2), "message_s": round(message, 2), "down_s": round(down, 2),
            "total_s": round(ready + message + down, 2), "load_1m": round(load, 1)}


def explore(scenario: str, seeds: int, env: dict[str, str], *where: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="swarmnet-bench-explore-") as runs:
        out = subprocess.run([sys.executable, "-m", "testnet.cli", "sim", "explore", scenario, "--seeds",
                              f"1..{seeds}", "--runs-dir", runs, "--json", *where],
                             capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode not in (0, 1):
        raise click.ClickException(f"sim explore {' '.join(where)} failed:\n{out.stderr[-2000:]}")
    s = json.loads(out.stdout)
    return {"ran": s["ran"], "wall_s": s["wall_s"], "seeds_per_hour": s["seeds_per_hour"], "where": s["where"]}


def ray_pss(cluster: Any) -> dict[str, float]:
    """PSS (MiB) of each local cluster node's Ray processes."""
    out = {}
    for name, node in cluster.nodes.items():
        pids = [node.popen.pid] + [p.pid for p in node.descendants()]
        out[name] = pss_mb(pids)
    return out


async def bench(address: str | None, local: Any, nodes: int, rounds: int, scenario: str, seeds: int,
                jobs: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="swarmnet-bench-cluster-"))
    runs: dict[str, list[dict[str, float]]] = {"one_host": [], "cluster": []}
    common = dict(nodes=nodes, users=2, min_swarm=5, ready_timeout_s=180, check=False)
    for r in range(rounds):
        runs["one_host"].append(await up_message_down(Options(**common, run_dir=base / f"one-{r}")))
        runs["cluster"].append(await up_message_down(Options(**common, run_dir=base / f"cl-{r}", cluster=address)))
    mean = {k: round(sum(x["total_s"] for x in v) / len(v), 2) for k, v in runs.items()}
    result: dict[str, Any] = {"nodes": nodes, "up_message_down": runs, "mean_total_s": mean,
                              "ratio": round(mean["cluster"] / mean["one_host"], 2)}
    if seeds:
        env = dict(os.environ)
        here = await trio.to_thread.run_sync(explore, scenario, seeds, env, "--jobs", str(jobs))
        there = await trio.to_thread.run_sync(explore, scenario, seeds, env, "--cluster", address)
        result["explore"] = {"scenario": scenario, "local": here, "cluster": there,
                             "share": round(there["seeds_per_hour"] / here["seeds_per_hour"], 2)}
    if local is not None:
        result["ray_pss_mib"] = ray_pss(local)
    return result


@click.command("cluster")
@click.option("--cluster", "address", metavar="HOST:PORT", default=None,
              help="an existing cluster (RAY_AUTH_TOKEN set); default: make HOSTS namespace hosts here (root)")
@click.option("--hosts", default=3, show_default=True, help="namespace hosts to make (without --cluster)")
@click.option("--nodes", default=30, show_default=True, help="network size of the up/message/down rounds")
@click.option("--rounds", default=2, show_default=True, help="rounds, one host and cluster alternately")
@click.option("--scenario", default="smoke", show_default=True, help="the explore comparison's scenario")
@click.option("--seeds", default=40, show_default=True, help="seeds each explore runs (0 to skip)")
@click.option("--jobs", default=2, show_default=True, help="local explore's worker processes")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def bench_command(address: str | None, hosts: int, nodes: int, rounds: int, scenario: str, seeds: int, jobs: int,
                  as_json: bool) -> None:
    """A run on one host vs. spread over a cluster; sim explore here vs. on the cluster."""
    local = None
    if address is None:
        from testnet.cluster.fixtures import local_cluster

        with local_cluster(hosts, hide=(Path("runs").absolute(),)) as local:
            os.environ.update({k: v for k, v in local.env().items() if k.startswith("RAY_")})
            result = trio.run(bench, local.address, local, nodes, rounds, scenario, seeds, jobs)
    else:
        result = trio.run(bench, address, None, nodes, rounds, scenario, seeds, jobs)
    result["load_avg_1m"] = round(psutil.getloadavg()[0], 1)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"cluster bench ({hosts if address is None else 'given'} hosts; load average "
               f"{result['load_avg_1m']} at the end)")
    for where, rs in result["up_message_down"].items():
        click.echo(f"  {where:>8}: " + "; ".join(
            f"up {x['ready_s']} s + message {x['message_s']} s + down {x['down_s']} s = {x['total_s']} s "
            f"(load {x['load_1m']})" for x in rs))
    click.echo(f"  {nodes} nodes up + one onion message + down: cluster / one host = {result['ratio']} (target <= 2)")
    ex = result.get("explore")
    if ex:
        click.echo(f"  sim explore {ex['scenario']} ({ex['local']['ran']} seeds): {ex['local']['seeds_per_hour']}/h "
                   f"with --jobs {jobs}, {ex['cluster']['seeds_per_hour']}/h on the cluster "
                   f"({ex['cluster']['where'].get('cores')} cores); share {ex['share']} (target >= 0.8)")
    if result.get("ray_pss_mib"):
        click.echo("  Ray's own PSS per node (MiB): " + ", ".join(f"{k} {v}" for k, v in result["ray_pss_mib"].items()))
