"""``swarmnet serve [--runs DIR] [--port P]``: the page, until Ctrl-C."""

from __future__ import annotations

import functools
import ipaddress
import signal
from pathlib import Path
from typing import Any

import click
import trio

DEFAULT_PORT = 8750


async def serve_forever(runs_dir: Path, *, named_run: Path | None = None, host: str = "127.0.0.1",
                        port: int = DEFAULT_PORT, allow_hosts: tuple[str, ...] = (),
                        shutdown: trio.Event | None = None,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the page over ``runs_dir`` at ``host:port`` (0: any free port) until ``shutdown`` is set
    (or forever); ``task_status.started`` gets the URL it listens at."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from .app import Serving, make_app

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the page polls nothing; its streams would fill a log
    config.graceful_timeout = 1.0
    stop = shutdown if shutdown is not None else trio.Event()
    async with trio.open_nursery() as nursery:
        serving = Serving(Path(runs_dir), nursery, named_run)
        hosts = ["127.0.0.1", "localhost", host, *allow_hosts]
        app = make_app(serving, hosts)
        binds = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=stop.wait))
        url = binds[0]
        port_of = url.rsplit(":", 1)[1]
        serving.origins = {f"http://{h}:{port_of}" for h in hosts}
        task_status.started(url)
        await stop.wait()
        # Hypercorn stops on the trigger; the watchers go with the nursery.
        nursery.cancel_scope.deadline = trio.current_time() + 2.0


@click.command("serve")
@click.option("--runs", "runs_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              show_default=True, help="the runs directory to browse")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="the live network to watch (default: RUNS/latest while it runs, else the newest running one)")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen at; anything but loopback lets others on the network act on your testnet")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="another host name the page may be reached by (requests naming others are refused)")
def serve(runs_dir: Path, run_dir: Path | None, port: int, host: str, allow_hosts: tuple[str, ...]) -> None:
    """A web page: the live network (nodes by swarm, faults, rates, events; kill, pause, restart,
    partition, heal), every run and night of the runs directory, and /metrics for Prometheus."""
    from testnet import rundir

    if not runs_dir.is_dir():
        raise click.ClickException(f"no runs directory at {runs_dir}: start a network with `swarmnet up`, "
                                   "or name one with --runs")
    named = None
    if run_dir is not None:
        try:
            named = rundir.resolve_run_dir(run_dir)
        except rundir.RunDirError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        click.echo(f"warning: listening at {host}: whoever reaches it can watch, and with the page, act", err=True)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:  # stop cleanly
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                url = await nursery.start(functools.partial(serve_forever, runs_dir, named_run=named, host=host,
                                                            port=port, allow_hosts=allow_hosts, shutdown=stop))
                click.echo(f"swarmnet serve: {url}/  (runs: {runs_dir.resolve()}; Ctrl-C stops)", err=True)
                async for _ in signals:
                    stop.set()
                    break

    failed: OSError | None = None
    try:
        trio.run(main)
    except* OSError as group:  # the address is taken, or not ours
        failed = group.exceptions[0]  # type: ignore[assignment]
        while isinstance(failed, BaseExceptionGroup):  # nurseries nest their groups
            failed = failed.exceptions[0]
    if failed is not None:
        raise click.ClickException(f"cannot listen at {host}:{port}: {failed.strerror or failed}")
