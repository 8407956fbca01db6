"""``swarmnet``: the command line in front of the testnet.

Only this module turns errors into messages and exit codes (honcho's single
``CommandError``): library code raises its own typed errors, :func:`main`
prints them and exits 1 (2 for usage errors).  Every command that prints
data takes ``--json``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from . import plan as P
from . import rundir

EXIT_ERROR = 1


class CommandError(Exception):
    """What a command reports to the user instead of a result; ``exit_code`` is the process status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _known_errors() -> tuple[type[BaseException], ...]:
    from .controller import ControllerError
    from .base.crypto import CryptoError
    from .links import LinkError
    from .procs import ProcError
    from .base.protocol import RequestError
    from .base.rpc import RpcError
    from .cluster.driver import ClusterError
    from .cluster.launch import HostLost

    return (CommandError, ControllerError, CryptoError, LinkError, ProcError, RequestError, RpcError,
            rundir.RunDirError, P.PlanError, ClusterError, HostLost)


def _run_dir_option(f: Any) -> Any:
    return click.option("--run-dir", type=click.Path(path_type=Path), default=None,
                        help="run directory (default: ./runs/latest)")(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")(f)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def _trio_run(fn: Any, *args: Any) -> Any:
    import trio

    return trio.run(fn, *args)


class LazyGroup(click.Group):
    """Subcommands imported only when used: ``name -> "module:attribute"`` (a click command)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            where = self.lazy[name]
            module, _, attr = where.partition(":")
            try:
                command = getattr(importlib.import_module(module), attr, None)
            except ModuleNotFoundError as exc:
                if not module.startswith(exc.name or "\0"):
                    raise  # the module is there but broken: say so, do not hide it
                command = None
            if command is None:
                return click.Command(name, help=f"(not available yet: {where})", callback=lambda: _not_yet(where))
            return command
        return super().get_command(ctx, name)


def _not_yet(where: str) -> None:
    raise CommandError(f"this command is not installed yet (expected at {where})")


# Commands that live with what they drive (users, chaos), imported on first use.
COMMANDS = {
    "send": "clients.cli:send",
    "inbox": "clients.cli:inbox",
    "workload": "clients.cli:workload",
    "chaos": "chaos.run.cli:chaos",
    "check": "chaos.run.cli:check",
    "bugs": "chaos.run.cli:bugs",
    "sim": "chaos.sim.cli:sim",
    "fuzz": "chaos.fuzz.run:fuzz",
    "trace": "chaos.trace.view:trace",
    "serve": "chaos.web.cli:serve",
    "logs": "testnet.cli_files:logs",
    "id": "testnet.cli_files:id_",
    "cluster": "testnet.cluster.cli:cluster",
    "collect": "testnet.cluster.cli:collect",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """swarmnet: a local testnet and chaos harness for a Session-style messaging network."""


# --------------------------------------------------------------------------- up


@cli.command()
@click.option("--nodes", default=P.DEFAULT_NODES, show_default=True, help="number of service nodes")
@click.option("--users", default=P.DEFAULT_USERS, show_default=True, help="number of scripted users")
@click.option("--min-swarm", default=P.DEFAULT_MIN_SWARM, show_default=True, help="minimum swarm size")
@_run_dir_option
@click.option("--links", type=click.Choice(P.LINKS_MODES), default="toxiproxy", show_default=True,
              help="toxiproxy: every link through a proxy (link faults possible); direct: no proxies")
@click.option("--seed", type=int, default=None, help="run seed (keys and swarm assignment); random if omitted")
@click.option("--detach", is_flag=True, help="return once the network is ready and leave it running")
@click.option("--inject-bug", "inject_bugs", multiple=True, metavar="NAME",
              help="switch on a deliberately broken node behaviour (repeatable)")
@click.option("--ready-timeout", default=60.0, show_default=True, help="seconds to wait for the network")
@click.option("--no-zygote", is_flag=True, help="start each node as a fresh interpreter (slower)")
@click.option("--cluster", metavar="HOST:PORT", envvar="SWARMNET_CLUSTER", default=None,
              help="spread the nodes over this Ray cluster's hosts (its head's address; see README, "
                   "'Running on a cluster')")
@click.option("--hosts", type=int, default=None, help="with --cluster: how many of its hosts (default: all)")
@_json_option
def up(nodes: int, users: int, min_swarm: int, run_dir: Path | None, links: str, seed: int | None, detach: bool,
       inject_bugs: tuple[str, ...], ready_timeout: float, no_zygote: bool, cluster: str | None, hosts: int | None,
       as_json: bool) -> None:
    """Start a network, check it, and keep it up until Ctrl-C (or `swarmnet down`)."""
    from .controller import Options

    from .base.bugs import UnknownBug, check_bugs

    try:
        check_bugs(inject_bugs)
    except UnknownBug as exc:
        raise CommandError(str(exc)) from None
    if hosts is not None and not cluster:
        raise CommandError("--hosts needs --cluster")
    opts = Options(nodes=nodes, users=users, min_swarm=min_swarm, links=links, seed=seed, run_dir=run_dir,
                   inject_bugs=inject_bugs, ready_timeout_s=ready_timeout, zygote=not no_zygote, cluster=cluster,
                   hosts=hosts)
    P.check_options(nodes=nodes, users=users, min_swarm=min_swarm, links=links, hosts=hosts if cluster else 0)
    if links == "toxiproxy":
        from .links import find_toxiproxy

        find_toxiproxy()
    else:
        click.echo("links: direct — Toxiproxy is not used, link faults are OFF (process faults only)", err=True)
    if detach:
        _up_detached(opts, as_json)
    else:
        _trio_run(_up_foreground, opts, as_json)


def _progress(start: float, as_json: bool) -> Any:
    def show(message: str) -> None:
        if not as_json:
            click.echo(f"[{time.monotonic() - start:6.2f} s] {message}", err=True)
    return show


def _command_name() -> str:
    """How to type this command in another shell: ``swarmnet`` if that is on PATH and is
    this one, else its path (``make testnet`` runs ``.venv/bin/swarmnet``)."""
    import shutil

    me = Path(sys.argv[0]).resolve()
    found = shutil.which("swarmnet")
    if found and Path(found).resolve() == me:
        return "swarmnet"
    try:
        return str(me.relative_to(Path.cwd()))
    except ValueError:
        return str(me)


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(c) for c, _ in rows) + 3
    return [f"  {c:<{width}}{d}" for c, d in rows]


def _summary(run: dict[str, Any], run_dir: Path, detached: bool) -> str:
    from .links import proxies_needed

    tp = run.get("toxiproxy")
    n = len(run["nodes"])
    a, b = (run["nodes"][min(i, n - 1)]["name"] for i in (2, 4))
    cmd = _command_name()
    lines = [
        f"swarmnet run {run['run_id']} is up: {n} nodes, {len(run['users'])} users, "
        f"{len({x['swarm_id'] for x in run['nodes']})} swarms",
        f"  run directory: {run_dir}",
        f"  registry:      {run['registry']['host']}:{run['registry']['port']}",
        "  links:         " + (f"Toxiproxy at {tp['api']} ({proxies_needed(n, len(run['users'])):,} links"
                                + (f" on {len(tp['servers'])} servers" if len(tp.get("servers") or ()) > 1 else "")
                                + "; a link's proxy is made when first used)" if tp
                                else "direct — link faults are OFF"),
        "",
        "Try next (in another shell):",
        *_aligned(
            [(f"{cmd} status", "every node: pid, swarm, height, messages")]
            + ([(f"{cmd} send --from {run['users'][0]['name']} --to {run['users'][1]['name']} 'hi'",
                 f"then: {cmd} inbox {run['users'][1]['name']}")] if len(run["users"]) > 1 else [])
            + [(f"{cmd} logs {a} --follow", "one node's log as it happens"),
               (f"{cmd} node kill {a}", f"then: {cmd} node restart {a}"),
               (f"{cmd} node pause {b}", f"then: {cmd} node resume {b}"),
               (f"{cmd} node add", "a new node joins (and `node remove NAME`)"),
               (f"{cmd} down", "stop this run" + ("" if detached else " (or Ctrl-C here)"))]),
    ]
    return "\n".join(lines)


async def _up_foreground(opts: Any, as_json: bool) -> None:
    start = time.monotonic()

    def ready(net: Any) -> None:
        run = net.record()
        if as_json:
            _print_json({"event": "ready", "run_dir": str(net.run_dir), "run_id": run["run_id"],
                         "ready_s": round(time.monotonic() - start, 3), "check": run["check"]})
        else:
            click.echo(_summary(run, net.run_dir, detached=False))

    if await run_until_stopped(opts, progress=_progress(start, as_json), on_ready=ready):
        click.echo("stopped: every process of the run is gone", err=True)
    else:
        raise CommandError("interrupted while starting; everything started was stopped", 130)


def _up_detached(opts: Any, as_json: bool) -> None:
    """Spawn a supervisor in its own session, relay its progress, return once it is ready."""
    import selectors

    run_id = rundir.new_run_id()
    run_dir = rundir.create_run_dir(run_id, opts.run_dir, opts.runs_dir)
    opts = dataclasses.replace(opts, run_id=run_id, run_dir=run_dir)
    argv = [sys.executable, "-m", "testnet.cli", "supervise", json.dumps(opts.to_json())]
    with open(run_dir / "controller.log", "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True, cwd=os.getcwd())
    assert proc.stdout is not None
    start = time.monotonic()
    show = _progress(start, as_json)
    deadline = start + opts.ready_timeout_s + 60
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "progress":
                    show(ev["message"])
                elif ev.get("event") == "error":
                    raise CommandError(f"the network did not come up:\n{ev['message']}")
                elif ev.get("event") == "ready":
                    if as_json:
                        _print_json({**ev, "controller_pid": proc.pid,
                                     "ready_s": round(time.monotonic() - start, 3)})
                    else:
                        click.echo(_summary(rundir.load_run(run_dir), run_dir, detached=True))
                    return
    except KeyboardInterrupt:
        proc.terminate()  # the supervisor tears down what it started
        proc.wait(timeout=30)
        raise CommandError("interrupted: the network being started was stopped", 130) from None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    from .procs import tail_lines

    raise CommandError(f"the supervisor did not report ready (exit code {proc.poll()})\n"
                       + tail_lines([run_dir / "controller.log"]))


# --------------------------------------------------------------------------- status / down


@cli.command()
@_run_dir_option
@_json_option
def status(run_dir: Path | None, as_json: bool) -> None:
    """Every node of a run: pid, address, swarm, height, messages, alive/paused/dead."""
    path = rundir.resolve_run_dir(run_dir)
    st = _trio_run(rundir.gather_status, rundir.load_run(path))
    if as_json:
        _print_json({**st, "run_dir": str(path)})
        return
    reg = st["registry"]
    click.echo(f"run {st['run_id']} ({st['state']}, links {st['links_mode']})  {path}")
    click.echo(f"controller pid {st['controller']['pid']} {st['controller']['process']};  registry "
               f"{reg['address']} pid {reg['pid']} {reg['process']}, height {reg['height']}, nodes {reg['nodes']}")
    click.echo(f"{'NODE':<6} {'PID':>7}  {'ADDRESS':<22} {'STATE':<8} {'PROCESS':<7} {'SWARM':<16} "
               f"{'HEIGHT':>6} {'MSGS':>6}")
    for r in st["nodes"]:
        swarm = "-" if r["swarm_id"] is None else f"{r['swarm_id']:016x}"
        click.echo(f"{r['name']:<6} {r['pid'] or '-':>7}  {r['address']:<22} {r['state'] or '-':<8} "
                   f"{r['process']:<7} {swarm:<16} {_dash(r['height']):>6} {_dash(r['messages']):>6}"
                   + (f"  on {r['place']}" if r.get("place") else ""))


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


@cli.command()
@_run_dir_option
@_json_option
def down(run_dir: Path | None, as_json: bool) -> None:
    """Stop every process of a run, and only of that run."""
    path = rundir.resolve_run_dir(run_dir)
    result = _trio_run(_down, path)
    if as_json:
        _print_json(result)
    else:
        how = "its controller stopped it" if result["asked_controller"] else "signalled its recorded processes"
        click.echo(f"run {result['run_id']} is down ({how}; {result['signalled']} processes signalled)")


async def _down(path: Path) -> dict[str, Any]:
    import trio

    from .procs import proc_state, signal_recorded

    run = rundir.load_run(path)
    ctl = run.get("controller") or {}
    asked = False
    try:
        await rundir.control_call(run, path, "down", timeout_s=5.0)
        asked = True
        with trio.move_on_after(15.0):
            while proc_state(ctl["pid"], ctl.get("create_time")) != "dead":
                await trio.sleep(0.05)
    except rundir.ControlError:
        pass
    # Whatever the controller could not stop (or everything, if it is gone): only the pids
    # recorded for this run, and only while psutil confirms each is still the same process.
    run = rundir.load_run(path)
    recs = [(pid, ct) for _, pid, ct in rundir.recorded_processes(run, controller=True)
            if proc_state(pid, ct) != "dead"]
    for pid, ct in recs:
        signal_recorded(pid, ct, signal.SIGTERM)
        signal_recorded(pid, ct, signal.SIGCONT)
    with trio.move_on_after(1.0):
        while any(proc_state(pid, ct) != "dead" for pid, ct in recs):
            await trio.sleep(0.02)
    for pid, ct in recs:
        signal_recorded(pid, ct, signal.SIGKILL)
    if run.get("state") not in ("stopped", "failed"):  # its controller is gone and cannot say so
        run["state"] = "stopped"
        rundir.write_json_atomic(path / rundir.RUN_JSON,
                                 {k: v for k, v in run.items() if k != "links" or not run.get("links_file")})
    return {"run_id": run["run_id"], "asked_controller": asked, "signalled": len(recs)}


# --------------------------------------------------------------------------- node


@cli.command()
@click.argument("action", type=click.Choice(["add", "remove", "kill", "pause", "resume", "restart"]))
@click.argument("name", required=False)
@_run_dir_option
@_json_option
def node(action: str, name: str | None, run_dir: Path | None, as_json: bool) -> None:
    """Act on one node of a running network: add [NAME] | remove | kill | pause | resume | restart NAME.

    kill = SIGKILL, pause = SIGSTOP, resume = SIGCONT; restart keeps the node's
    key, database and ports; add makes a new key and links; remove deregisters
    it (signed with its key) and stops it.
    """
    if action != "add" and not name:
        raise CommandError(f"`swarmnet node {action}` needs a node name, e.g. n03")
    path = rundir.resolve_run_dir(run_dir)
    run = rundir.load_run(path)
    result = _trio_run(lambda: rundir.control_call(run, path, "node", what=action, name=name, timeout_s=90.0))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['name']}: {action} done" + (f" (now {result['state']})" if "state" in result else ""))


# --------------------------------------------------------------------------- bench


# Benchmarks live with what they measure, on the floor whose code they need (the
# boot benchmark sends an onion message: clients/); each is a click command
# imported on first use.  Add one by naming its "module:command" here.
BENCHMARKS = {
    "boot": "clients.bench_boot:boot_command",
    "node": "nodes.bench:bench_command",
    "throughput": "clients.bench:bench_command",
    "sim": "chaos.sim.bench:bench_command",
    "faults": "chaos.run.bench:bench_command",
    "cluster": "clients.bench_cluster:bench_command",
}


@cli.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks (boot: network start-up time and memory)."""


# --------------------------------------------------------------------------- keeping a network up


def _emit(obj: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


async def run_until_stopped(options: Any, *, progress: Callable[[str], None] | None = None,
                            on_ready: Callable[[Any], None] = lambda net: None) -> bool:
    """Boot a network, call ``on_ready(net)``, keep it up until SIGINT/SIGTERM or a ``down``
    request, then tear it all down.  ``False`` if a signal came before it was ready."""
    import trio

    from .cluster.run import open_network

    running: list[Any] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                async for signum in signals:
                    if progress:
                        progress(f"{signal.Signals(signum).name}: stopping")
                    if running:
                        running[0].stop_requested.set()  # a clean stop, as `swarmnet down` asks
                    else:
                        nursery.cancel_scope.cancel()  # still booting: abandon the boot (it tears down)
                    return

            nursery.start_soon(on_signal)
            async with open_network(options, progress=progress) as net:
                running.append(net)
                on_ready(net)
                await net.stop_requested.wait()
            nursery.cancel_scope.cancel()
    return bool(running)


async def supervise(options: Any) -> int:
    """The detached controller of ``swarmnet up --detach`` (see :func:`run_until_stopped`).

    Reports on stdout as JSON lines: ``progress``, then ``ready`` (with the run
    directory) or ``error``; after ``ready`` stdout is closed.
    """
    from .controller import error_leaves

    def ready(net: Any) -> None:
        _emit({"event": "ready", "run_dir": str(net.run_dir), "run_id": net.plan.run_id, "check": net.check_result})
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # nobody reads any more: later writes must not fail
        os.close(devnull)

    try:
        if not await run_until_stopped(options, progress=lambda m: _emit({"event": "progress", "message": m}),
                                       on_ready=ready):
            _emit({"event": "error", "message": "interrupted while starting"})
            return 1
    except Exception as exc:  # reported to the waiting CLI, which turns it into an exit code
        _emit({"event": "error", "message": "\n".join(str(e) for e in error_leaves(exc))})
        return 1
    return 0


@cli.command("supervise", hidden=True)
@click.argument("options_json")
def supervise_command(options_json: str) -> None:
    """The detached controller of `up --detach` (progress, then ready or error, as JSON lines on stdout)."""
    from .controller import Options

    code = _trio_run(supervise, Options.from_json(json.loads(options_json)))
    if code:
        raise click.exceptions.Exit(code)


# --------------------------------------------------------------------------- entry point


# Commands whose process must start with a fixed string-hash seed (``module:function``
# deciding from the command line): a simulated run replays the order of sets and dicts
# exactly only then.  Asked before any command is imported, so that the process it
# replaces costs an interpreter start and not a command's imports.
HASH_SEEDED = "chaos.sim.hashseed:ensure_for"


def main(argv: list[str] | None = None) -> int:
    """The ``swarmnet`` console command: runs the CLI; errors become a message and an exit code."""
    if argv is None:  # the process's own command line (a caller's argv is never re-executed)
        module, _, attr = HASH_SEEDED.partition(":")
        getattr(importlib.import_module(module), attr)(sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="swarmnet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except SystemExit:
        raise  # a command's own exit status, not an error (and no error types to import for it)
    except BaseException as exc:
        from .controller import error_leaves

        leaves = error_leaves(exc)
        known = _known_errors()
        if all(isinstance(e, known) for e in leaves):
            for e in leaves:
                click.echo(f"swarmnet: error: {e}", err=True)
            codes = [getattr(e, "exit_code", EXIT_ERROR) for e in leaves]
            return max(codes)
        if all(isinstance(e, (KeyboardInterrupt, trio_cancelled())) for e in leaves):
            return 130
        raise
    return rv if isinstance(rv, int) else 0


def trio_cancelled() -> type[BaseException]:
    import trio

    return trio.Cancelled


if __name__ == "__main__":
    sys.exit(main())
