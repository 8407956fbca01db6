"""``swarmnet cluster local`` (a Ray cluster of namespace hosts on this machine, to try
cluster runs without a cluster) and ``swarmnet collect`` (a live cluster run's files
brought home)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click

from .. import rundir


@click.group("cluster")
def cluster() -> None:
    """Ray clusters for swarmnet (see README, "Running on a cluster")."""


@cluster.command("local")
@click.option("--hosts", default=3, show_default=True, help="namespace hosts, each a Ray worker node")
@click.option("--cpus-per-host", default=1, show_default=True, help="CPUs each host offers Ray")
@click.option("--token-file", type=click.Path(path_type=Path), default=Path("runs/cluster-token"),
              show_default=True, help="where the cluster's token is written (mode 0600)")
@click.option("--hide", "hidden", multiple=True, type=click.Path(path_type=Path),
              help="a directory the hosts must not see (default: ./runs), repeatable")
def local(hosts: int, cpus_per_host: int, token_file: Path, hidden: tuple[Path, ...]) -> None:
    """Start HOSTS network namespaces on a bridge, a Ray head and one Ray worker per host (token
    authentication), print the address, and keep them until Ctrl-C or SIGTERM; then remove it all.
    Needs root and iproute2."""
    from ..cli import CommandError
    from .hosts import HostsError, create_hosts, leftovers, remove_hosts
    from .local import ClusterStartError, LocalRayCluster

    hidden = hidden or (Path("runs"),)
    blocked = (signal.SIGINT, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # received below, never mid-setup
    try:
        made = create_hosts(hosts)
    except HostsError as exc:
        raise CommandError(str(exc)) from None
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                    os.environ.get("PYTHONPATH")) if p)}
    ray_cluster = LocalRayCluster(made, hide=tuple(hidden), cpus_per_host=cpus_per_host, env=env)
    try:
        ray_cluster.start()
        rundir.write_secret(token_file, ray_cluster.token + "\n")
        click.echo(json.dumps({"event": "ready", "address": ray_cluster.address, "token_file": str(token_file),
                               "hosts": {h.name: h.address for h in made.hosts}}), nl=True)
        click.echo(f"cluster at {ray_cluster.address}; a driver needs RAY_AUTH_MODE=token and "
                   f"RAY_AUTH_TOKEN=$(cat {token_file}); Ctrl-C removes it", err=True)
        signal.sigwait(blocked)
    except ClusterStartError as exc:
        raise CommandError(str(exc)) from None
    finally:
        left = ray_cluster.stop() + remove_hosts(made) + leftovers(made.tag)
        try:
            token_file.unlink()
        except FileNotFoundError:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        if left:
            click.echo(f"left behind: {', '.join(left)}", err=True)
        click.echo("cluster removed", err=True)


@click.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="run directory (default: ./runs/latest)")
def collect(run_dir: Path | None) -> None:
    """Bring a live cluster run's databases, captures and logs from every host into its run
    directory (teardown does it anyway), so that check and trace read them."""
    import trio

    from ..cli import CommandError

    path = rundir.resolve_run_dir(run_dir)
    run = rundir.load_run(path)
    if not run.get("cluster"):
        raise CommandError(f"run {run['run_id']} runs on one machine: its files are in {path} already")
    got = trio.run(lambda: rundir.control_call(run, path, "collect", timeout_s=300.0))
    for host, size in sorted(got["collected"].items()):
        click.echo(f"{host}: {size:,} bytes")
    lost = run["cluster"].get("lost_hosts") or {}
    for host, info in lost.items():
        click.echo(f"{host}: lost ({info.get('reason')}); its files cannot come home", err=True)
