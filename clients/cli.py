"""``swarmnet send``, ``swarmnet inbox`` and ``swarmnet workload``: users of a
running network, through onion paths, from another shell.

Everything a user needs comes from the run directory: the registry's address
(run.json), the user's key (users/<name>/seed) and the user's links (the
Toxiproxy proxies it dials, or the nodes themselves in direct mode).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import click
import msgpack
import trio

from testnet import rundir
from testnet.base import crypto
from testnet.base.bugs import CLIENT_BUGS

from .client import Client, ClientError
from .workload import UserSpec, run_workload


class UserError(click.ClickException):
    pass


def load_user(run_dir: Path, run: dict[str, Any], name: str) -> UserSpec:
    entry = next((u for u in run.get("users", []) if u["name"] == name), None)
    if entry is None:
        known = ", ".join(u["name"] for u in run.get("users", [])) or "none"
        raise UserError(f"no user {name!r} in run {run.get('run_id')} (users: {known})")
    try:
        seed = bytes.fromhex(rundir.read_secret(run_dir / "users" / name / "seed"))
    except (OSError, ValueError, rundir.RunDirError) as exc:
        raise UserError(f"cannot read {name}'s key: {exc}") from None
    identity = crypto.Identity.from_seed(seed)
    return UserSpec(name, identity, entry.get("host"), rundir.dial_table(run, name), rundir.link_opener(run))


def client_bugs(run: dict[str, Any]) -> list[str]:
    return [b for b in run.get("inject_bugs") or [] if b in CLIENT_BUGS]


async def _with_client(run: dict[str, Any], spec: UserSpec, fn: Any) -> Any:
    reg = run["registry"]
    async with trio.open_nursery() as nursery:
        client = Client(spec.identity, name=spec.name, host=spec.host, nursery=nursery,
                        registry=(reg["host"], reg["port"]), bugs=client_bugs(run), link_opener=spec.link_opener)
        client.directory.dial = dict(spec.dial)
        try:
            return await fn(client)
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


def _run_dir(run_dir: str | None) -> tuple[Path, dict[str, Any]]:
    try:
        path = rundir.resolve_run_dir(run_dir)
        return path, rundir.load_run(path)
    except rundir.RunDirError as exc:
        raise UserError(str(exc)) from None


def _session_id_of(run: dict[str, Any], who: str) -> str:
    for u in run.get("users", []):
        if u["name"] == who:
            return u["session_id"]
    try:
        crypto.session_id_to_x25519(who)
        return who
    except crypto.CryptoError:
        raise UserError(f"{who!r} is neither a user of this run nor a Session ID") from None


@click.command()
@click.option("--from", "sender", required=True, help="sending user (a name in run.json)")
@click.option("--to", "recipient", required=True, help="receiving user name, or any Session ID")
@click.option("--run-dir", default=None, help="run directory (default: runs/latest)")
@click.option("--namespace", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.argument("text")
def send(sender: str, recipient: str, run_dir: str | None, namespace: int, as_json: bool, text: str) -> None:
    """Send TEXT from one user to another through an onion path."""
    path, run = _run_dir(run_dir)
    spec = load_user(path, run, sender)
    to_id = _session_id_of(run, recipient)
    blob = crypto.seal_message(spec.identity, to_id, text.encode("utf-8"))

    async def go(client: Client) -> Any:
        return await client.store(to_id, blob, namespace=namespace, now_ms=int(time.time() * 1000))

    try:
        res = trio.run(_with_client, run, spec, go)
    except ClientError as exc:
        raise UserError(f"send failed: {exc}") from None
    out = {"hash": res.body.get("hash"), "to": to_id, "path": res.path, "target": res.target,
           "attempts": res.attempts,
           "swarm": {k: v.get("status") for k, v in (res.body.get("swarm") or {}).items()}}
    if as_json:
        click.echo(json.dumps(out))
    else:
        ok = sum(1 for s in out["swarm"].values() if s == 200)
        click.echo(f"stored {out['hash']} on {ok}/{len(out['swarm'])} members of the recipient's swarm "
                   f"(path {' -> '.join(h[:8] for h in res.path)} -> {res.target[:8]})")


def describe(plaintext: bytes) -> str:
    """Text of a message sent with `swarmnet send`, or a workload message's id."""
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        body = msgpack.unpackb(plaintext, raw=False)
        if isinstance(body, dict) and "id" in body:
            return f"<workload message {body['id']}>"
    except (ValueError, msgpack.UnpackException):
        pass
    return f"<{len(plaintext)} bytes>"


@click.command()
@click.argument("user")
@click.option("--run-dir", default=None, help="run directory (default: runs/latest)")
@click.option("--namespace", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print messages as JSON lines")
def inbox(user: str, run_dir: str | None, namespace: int, as_json: bool) -> None:
    """Show USER's messages: text, sender Session ID and hash (fetched through an onion path)."""
    path, run = _run_dir(run_dir)
    spec = load_user(path, run, user)
    names = {u["session_id"]: u["name"] for u in run.get("users", [])}

    async def go(client: Client) -> list[dict[str, Any]]:
        # Pages come from whichever swarm member each onion path ends at, and storage order
        # differs between members: keep a last hash per member, and each message once.
        out: dict[str, dict[str, Any]] = {}
        last: dict[str, str] = {}
        while True:
            res = await client.retrieve(namespace=namespace, now_ms=int(time.time() * 1000),
                                        last_hash_for=last.get)
            msgs = res.body.get("messages") or []
            for m in msgs:
                out.setdefault(m["hash"], m)
            if not res.body.get("more") or not msgs:
                return list(out.values())
            last[res.target] = msgs[-1]["hash"]

    try:
        msgs = trio.run(_with_client, run, spec, go)
    except ClientError as exc:
        raise UserError(f"inbox failed: {exc}") from None
    rows = []
    for m in msgs:
        try:
            plaintext, sender = crypto.open_message(spec.identity, m["data"])
            rows.append({"hash": m["hash"], "sender": sender, "sender_name": names.get(sender),
                         "text": describe(plaintext), "timestamp": m["timestamp"]})
        except crypto.CryptoError as exc:
            rows.append({"hash": m["hash"], "sender": None, "error": type(exc).__name__, "timestamp": m["timestamp"]})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"{user}'s inbox (namespace {namespace}) is empty")
    for r in rows:
        who = r["sender"] or "?"
        if r.get("sender_name"):
            who += f" ({r['sender_name']})"
        click.echo(f"{r['hash']}  from {who}: {r.get('text') or '<' + r.get('error', '') + '>'}")


@click.command()
@click.option("--users", "n_users", type=int, default=None, help="how many of the run's users take part (default all)")
@click.option("--messages", type=int, default=None, help="stop after this many sends")
@click.option("--duration", type=float, default=None, help="or send for this many seconds")
@click.option("--rate", type=float, default=10.0, show_default=True, help="sends per second, all users together")
@click.option("--seed", type=int, default=None)
@click.option("--delete-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="of received messages, deleted by their recipient")
@click.option("--run-dir", default=None, help="run directory (default: runs/latest)")
@click.option("--json", "as_json", is_flag=True)
def workload(n_users: int | None, messages: int | None, duration: float | None, rate: float, seed: int | None,
             delete_fraction: float, run_dir: str | None, as_json: bool) -> None:
    """Scripted users send to random others through onion paths; the history goes to the run directory."""
    if messages is None and duration is None:
        messages = 100
    path, run = _run_dir(run_dir)
    users = [u["name"] for u in run.get("users", [])][: n_users or None]
    if len(users) < 2:
        raise UserError("a workload needs at least 2 users in the run (swarmnet up --users M)")
    specs = [load_user(path, run, u) for u in users]
    reg = run["registry"]
    history = path / "history.jsonl"
    if history.exists():
        history.rename(path / f"history.{int(time.time())}.jsonl")
    stats = trio.run(lambda: run_workload(specs, (reg["host"], reg["port"]), history, messages=messages,
                                          duration_s=duration, rate=rate, seed=seed or random.randrange(1 << 30),
                                          client_bugs=client_bugs(run), delete_fraction=delete_fraction))
    if as_json:
        click.echo(json.dumps({**stats.__dict__, "history": str(history)}))
    else:
        click.echo(f"{stats.sent} sent ({stats.ok} ok, {stats.failed} failed, {stats.unknown} unknown), "
                   f"{stats.received} received in {stats.duration_s:.1f} s; history in {history}")
        click.echo(f"next: swarmnet check {path}")
