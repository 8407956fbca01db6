"""``swarmnet logs`` and ``swarmnet id``: commands that read a run's files or make a key,
with no network to drive (registered lazily by :mod:`testnet.cli`)."""

from __future__ import annotations

import heapq
import json
import time
from pathlib import Path

import click

from . import rundir
from .cli import CommandError, _json_option, _print_json, _run_dir_option


# --------------------------------------------------------------------------- logs


def _read_entries(name: str, path: Path, offset: int) -> tuple[list[tuple[int, str, str]], int]:
    """New complete JSON lines of one log from byte ``offset``: ([(t, proc, line)], new offset)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for raw in data[:end].splitlines():
        line = raw.decode("utf-8", "replace")
        try:
            t = int(json.loads(line).get("t", 0))
        except (ValueError, AttributeError, TypeError):
            t = 0
        out.append((t, name, line))
    return out, offset + end


def _format_entry(t: int, name: str, line: str) -> str:
    try:
        e = json.loads(line)
    except ValueError:
        return f"{'':12} {name:<8} {line}"
    stamp = time.strftime("%H:%M:%S", time.localtime(t / 1000)) + f".{t % 1000:03d}"
    extra = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "level", "proc", "event"))
    return f"{stamp} {name:<8} {e.get('level', ''):<7} {e.get('event', '')} {extra}".rstrip()


@click.command()
@click.argument("node", required=False)
@click.option("--follow", "-f", is_flag=True, help="keep printing new lines until Ctrl-C")
@_run_dir_option
@_json_option
def logs(node: str | None, follow: bool, run_dir: Path | None, as_json: bool) -> None:
    """Merged, time-ordered node (and registry) logs of a run; NODE limits it to one."""
    path = rundir.resolve_run_dir(run_dir)
    run = rundir.load_run(path)
    files = dict(rundir.iter_log_files(path, run))
    if node is not None:
        if node not in files:
            raise CommandError(f"no log for {node!r} in run {run['run_id']} (have: {', '.join(files)})")
        files = {node: files[node]}
    offsets = {name: 0 for name in files}
    show = (lambda e: click.echo(e[2])) if as_json else (lambda e: click.echo(_format_entry(*e)))
    try:
        while True:
            batches = []
            for name, p in files.items():
                entries, offsets[name] = _read_entries(name, p, offsets[name])
                batches.append(entries)
            for entry in heapq.merge(*batches, key=lambda e: e[0]):
                show(entry)
            if not follow:
                return
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- id


@click.command("id")
@click.option("--seed", "seed_hex", default=None, metavar="HEX", help="32-byte (or 16-byte) ed25519 seed as hex")
@_json_option
def id_(seed_hex: str | None, as_json: bool) -> None:
    """Make a new identity, or show the one of a seed."""
    from .base.crypto import Identity

    if seed_hex is None:
        ident, made = Identity.generate(), True
    else:
        try:
            seed = bytes.fromhex(seed_hex)
        except ValueError:
            raise CommandError("--seed must be hex") from None
        ident, made = Identity.from_seed(seed), False
    out = {"session_id": ident.session_id, "ed25519_public": ident.ed25519_public.hex(),
           "x25519_public": ident.x25519_public.hex()}
    if made:
        out["seed"] = ident.seed.hex()  # a new identity is useless without it; shown once, never logged
    if as_json:
        _print_json(out)
    else:
        for k, v in out.items():
            click.echo(f"{k + (' (secret: keep it)' if k == 'seed' else ''):<28} {v}")
