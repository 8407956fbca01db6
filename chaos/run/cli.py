"""``swarmnet chaos run|replay|shrink|nightly``, ``swarmnet check`` and
``swarmnet bugs``: the chaos front door.  Only this layer turns errors into
messages and exit codes (0 valid, 1 invalid, 2 unknown, as Jepsen)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from testnet import rundir
from testnet.base.bugs import BUGS

from chaos.scenario import CHECKERS, ScenarioError, library, load_scenario


def progress(quiet: bool):
    start = time.monotonic()

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    return say


def fail(msg: str, code: int = 2) -> None:
    click.echo(f"swarmnet: {msg}", err=True)
    sys.exit(code)


@click.group()
def chaos() -> None:
    """Chaos runs: seeded fault schedules under a workload, checked from ground truth."""


@chaos.command("run")
@click.argument("scenario")
@click.option("--seed", type=int, default=None, help="fault and workload seed (default: the scenario's, else random)")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="where the bundle goes")
@click.option("--inject-bug", "bugs", multiple=True, help="break the system on purpose (see `swarmnet bugs`)")
@click.option("--json", "as_json", is_flag=True, help="print the verdict as JSON")
@click.option("--quiet", is_flag=True, help="no progress lines")
@click.option("--cluster", metavar="HOST:PORT", envvar="SWARMNET_CLUSTER", default=None,
              help="run the nodes on this Ray cluster's hosts (see README, 'Running on a cluster')")
@click.option("--hosts", type=int, default=None, help="with --cluster: how many of its hosts (default: all)")
def run_cmd(scenario: str, seed: int | None, run_dir: Path | None, bugs: tuple[str, ...], as_json: bool,
            quiet: bool, cluster: str | None, hosts: int | None) -> None:
    """Run SCENARIO (a TOML file, or a name from the shipped library) once and check it."""
    from chaos.run.play import describe_error
    from chaos.run.runner import run_chaos

    world = None
    if cluster:
        from chaos.run.cluster import ClusterProcesses

        world = ClusterProcesses(cluster, hosts)
    try:
        sc = load_scenario(scenario)
        result = trio.run(lambda: run_chaos(sc, seed=seed, run_dir=run_dir, inject_bugs=bugs,
                                            progress=progress(quiet), world=world))
    except (ScenarioError, ValueError) as exc:
        fail(str(exc))
        return
    except Exception as exc:  # the run itself broke (a boot that timed out, ...): say what, not a traceback
        fail(f"the run broke: {describe_error(exc)['error']}")
        return
    if as_json:
        click.echo(json.dumps(result.verdict))
    else:
        click.echo(result.summary)
        click.echo(f"bundle: {result.run_dir}  (report: {result.run_dir / 'report.html'})")
        if result.exit_code:
            click.echo(f"reproduce: swarmnet chaos replay {result.run_dir}; "
                       f"shrink: swarmnet chaos shrink {result.run_dir}")
    sys.exit(result.exit_code)


@chaos.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def replay(run_dir: Path, as_json: bool, quiet: bool) -> None:
    """Run RUN_DIR's schedule, topology, keys and workload again and compare verdicts."""
    from chaos.run.runner import replay as do_replay

    try:
        result, compare = trio.run(lambda: do_replay(run_dir, progress=progress(quiet)))
    except (ScenarioError, OSError, ValueError, KeyError) as exc:
        fail(f"cannot replay {run_dir}: {exc}")
        return
    if as_json:
        click.echo(json.dumps(compare))
    else:
        click.echo(result.summary)
        for name, c in compare["checkers"].items():
            click.echo(f"  {name:14} before {c['before']!s:7} after {c['after']!s:7}")
        click.echo("same verdict" if compare["same"] else "verdict differs (timing is not deterministic)")
        for which, whys in compare["harness"].items():
            if whys:
                click.echo(f"the {'original' if which == 'before' else 'replay'} did not play its schedule as "
                           f"planned: " + "; ".join(whys[:3]))
        click.echo(f"replay bundle: {result.run_dir}")
    sys.exit(result.exit_code)


@chaos.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--attempts", type=int, default=2, show_default=True, help="runs per candidate schedule")
@click.option("--checker", default=None, help="the failing checker to keep failing (default: the first)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def shrink(run_dir: Path, attempts: int, checker: str | None, as_json: bool, quiet: bool) -> None:
    """Delta-debug RUN_DIR's fault list down to a minimal schedule that still fails."""
    from chaos.run.shrink import shrink_run

    try:
        out = trio.run(lambda: shrink_run(run_dir, attempts=attempts, checker=checker, progress=progress(quiet)))
    except (ScenarioError, OSError, ValueError, KeyError) as exc:
        fail(f"cannot shrink {run_dir}: {exc}")
        return
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"{out['checker']} still fails with faults {out['minimal']} of {out['original']} "
                   f"({out['candidates']} candidates tried)")
        click.echo(f"minimal scenario: {out['scenario']}\naccount: {out['account']}")


@chaos.command()
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs/nightly"), show_default=True)
@click.option("--keep-passing", is_flag=True, help="do not prune passing bundles")
@click.option("--seeds", type=click.IntRange(0, 100), default=1, show_default=True,
              help="runs per scenario, each with its own seed (0: canaries only)")
@click.option("--first-seed", type=int, default=None, help="use seeds N, N+1, ... instead of fresh random ones")
@click.option("--canaries/--no-canaries", default=True, show_default=True,
              help="also run each injected bug under its scenario; it must fail its checker")
@click.option("--replay-failures/--no-replay-failures", default=True, show_default=True,
              help="replay each failing run once: reproducible, or did it need its timing?")
@click.argument("scenarios", nargs=-1)
def nightly(runs_dir: Path, keep_passing: bool, seeds: int, first_seed: int | None, canaries: bool,
            replay_failures: bool, scenarios: tuple[str, ...]) -> None:
    """Run the scenario library (or SCENARIOS) with fresh seeds, then the canaries; list failing bundles.

    A canary is a run with one bug injected on purpose (`swarmnet bugs`): it
    passes when the checker meant to catch that bug fails the run.
    """
    from chaos.run.runner import CANARY_SCENARIOS, nightly as do_nightly

    try:
        paths = [Path(s) if Path(s).exists() else Path(load_scenario(s).source) for s in scenarios] or library()
    except ScenarioError as exc:
        fail(str(exc))
        return
    bug_list = sorted(CANARY_SCENARIOS) if canaries else []
    results = trio.run(lambda: do_nightly(paths, runs_dir=runs_dir, prune=not keep_passing, seeds=seeds,
                                          first_seed=first_seed, canaries=bug_list, progress=progress(False),
                                          replay_failures=replay_failures))
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "nightly.json").write_text(json.dumps(results, indent=2) + "\n")
    code = show_nightly(results)
    sys.exit(code)


def show_nightly(results: list[dict[str, Any]]) -> int:
    """Print the nightly's results, harness errors first (runs that did not do what they
    planned: neither pass nor fail), then failures, then passes; returns the exit code:
    1 if any run failed, else 2 if any was a harness error, else 0."""
    order = {"harness": 0, "fail": 1, "pass": 2}
    ranked = sorted(results, key=lambda r: order.get(r.get("status", "fail"), 1))
    for r in ranked:
        status = r.get("status", "pass" if r.get("passed") else "fail")
        mark = {"harness": "HARNESS", "fail": "FAIL", "pass": "PASS"}[status]
        what = r["scenario"] + (f" +{r['inject_bug']}" if r.get("inject_bug") else "")
        expect = f"(must fail {r['expect_failing']})" if r.get("inject_bug") else ""
        click.echo(f"{mark:7}  {what:34} seed {r.get('seed')!s:11} failing: "
                   f"{','.join(r.get('failing', [])) or '-':28} {expect}".rstrip())
        for why in (r.get("harness") or [])[:5]:
            click.echo(f"         {why[:240]}")
    counts = {k: sum(1 for r in results if r.get("status", "pass" if r.get("passed") else "fail") == k)
              for k in order}
    click.echo(f"{counts['pass']} passed, {counts['fail']} failed, {counts['harness']} harness error(s) "
               f"of {len(results)} runs" + (" (a harness error: the run did not do what it planned; "
                                            "neither a pass nor a failure)" if counts["harness"] else ""))
    for r in ranked:
        if r.get("status") not in ("harness", "fail"):
            continue
        rep = r.get("replay") or {}
        again = ("" if not rep else f"  (replay: {rep['error']})" if "error" in rep else
                 f"  (replay failed again: {','.join(rep['failing'])})" if rep["failing"] else
                 "  (replay passed: the failure needed its timing)")
        click.echo(f"  {r['status']:7} {r.get('run_dir', r['scenario'])}{again}")
    return 1 if counts["fail"] else 2 if counts["harness"] else 0


def current_membership(run_dir: Path, run: dict[str, Any]) -> tuple[dict[str, int] | None, set[str] | None]:
    """Swarms and live nodes from the running registry, or ``(None, None)`` if it is gone."""
    from testnet.rundir import gather_status
    from testnet.base.rpc import RpcError, call_once

    async def ask() -> tuple[dict[str, int], set[str]]:
        reg = run["registry"]
        resp = await call_once(reg["host"], reg["port"], "get_service_nodes", {}, timeout=3.0)
        by_key = {n["ed25519_public"]: n["name"] for n in run["nodes"]}
        swarms = {by_key[n["ed25519_public"]]: n["swarm_id"] for n in resp.body["nodes"]
                  if n["ed25519_public"] in by_key}
        status = await gather_status(run)
        live = {n["name"] for n in status["nodes"] if n.get("state") == "alive"}
        return swarms, live

    try:
        return trio.run(ask)
    except (RpcError, OSError, KeyError, TypeError):
        return None, None


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--checker", "checkers", multiple=True, type=click.Choice(list(CHECKERS)),
              help="run only these checkers (default: all)")
@click.option("--json", "as_json", is_flag=True, help="print the verdict JSON")
def check(run_dir: Path | None, checkers: tuple[str, ...], as_json: bool) -> None:
    """Judge a run from ground truth: delivery, replication, unlinkability. Exit 0 valid, 1 invalid, 2 unknown."""
    from chaos.checkers.verdict import exit_code, run_checks, summary

    try:
        path = rundir.resolve_run_dir(run_dir)
        run = rundir.load_run(path)
    except rundir.RunDirError as exc:
        fail(str(exc))
        return
    if not (path / "history.jsonl").exists():
        fail(f"{path} has no history.jsonl: run `swarmnet workload --run-dir {path}` first")
    if run.get("cluster") and run.get("state") == "ready":
        # A live cluster run: its hosts' databases and captures come home first (swarmnet collect).
        try:
            trio.run(lambda: rundir.control_call(run, path, "collect", timeout_s=300.0))
        except rundir.RunDirError as exc:
            click.echo(f"swarmnet: the hosts' files could not be brought home ({exc}); judging what is here",
                       err=True)
    swarms, live = current_membership(path, run)
    kwargs: dict[str, Any] = {"swarms": swarms, "live": live, "swarms_source": "registry"}
    if checkers:
        kwargs["checkers"] = checkers
    verdict = run_checks(path, **kwargs)
    click.echo(json.dumps(verdict) if as_json else summary(verdict))
    sys.exit(exit_code(verdict))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="names, where they live, what they break, who catches them")
def bugs(as_json: bool) -> None:
    """List the bugs `--inject-bug NAME` can switch on, one name per line."""
    if as_json:
        click.echo(json.dumps([{"name": n, "component": w, "breaks": d, "caught_by": c}
                               for n, (w, d, c) in BUGS.items()]))
        return
    for name in BUGS:
        click.echo(name)
