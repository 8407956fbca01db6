"""Links through Toxiproxy: the server's lifecycle, the proxy table, and
per-link fault primitives that always heal.

We talk to Toxiproxy's HTTP API ourselves (:mod:`testnet.toxiproxy`: an
explicit timeout on every call; many calls pipelined), not through
toxiproxy-python: its ``Toxiproxy``/``Proxy`` objects take no timeout and
populate client-side with a full ``GET /proxies`` per proxy (quadratic at the
960 proxies of a 30-node network), and its ``APIConsumer`` keeps the server
address class-wide, so calls to several servers — a large network's — could
only take turns (a one-way partition of a 300-node network, 22,500 proxies,
took over 100 s that way).  Bulk creation uses the server's own ``/populate``;
a fault on many links records what it asks of links not made yet and sends
the calls for the made ones at once (:mod:`testnet.proxies`).

Every fault is an async context manager whose exit heals, shielded from
cancellation and bounded by a deadline (Jepsen: a nemesis always heals).
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import trio

from .procs import Child, ChildFailed, spawn, stop_children
from .proxies import LinkFault, ProxyTable, ToxicSpec, ToxiproxyServers
from .toxiproxy import (DEFAULT_TIMEOUT_S, POPULATE_BATCH, POPULATE_TIMEOUT_S, TOXIC_TYPES, BatchError, Call,
                        CallFailure, LinkError, ProxyGone, ToxiproxyApi)

__all__ = ["DEFAULT_TIMEOUT_S", "POPULATE_BATCH", "POPULATE_TIMEOUT_S", "TOXIC_TYPES", "BatchError", "Call",
           "CallFailure", "LinkError", "LinkFault", "ProxyGone", "ProxyTable", "ToxicSpec", "ToxiproxyApi",
           "ToxiproxyMissing", "ToxiproxyServers", "find_toxiproxy", "open_toxiproxy", "proxies_needed",
           "servers_needed", "spawn_toxiproxy", "wait_toxiproxy"]

Address = tuple[str, int]
HEAL_TIMEOUT_S = 5.0
PROJECT_BIN = Path(__file__).resolve().parent.parent / "bin" / "toxiproxy-server"


class ToxiproxyMissing(LinkError):
    """No Toxiproxy server binary on this machine."""


# Go's collector for each Toxiproxy server: a fault's calls are thousands of small requests,
# and at the default GOGC=100 its collections were a fifth to a quarter of their CPU (2,000
# proxies, 4,000 toxics added: 155-175 -> 115-152 us a call at 400).  The soft limit keeps a
# server that holds many proxies (all made at boot) from growing five times its live heap.
TOXIPROXY_GO_ENV = {"GOGC": "400", "GOMEMLIMIT": "512MiB"}

PROXY_FD_RESERVE = 1024  # descriptors a Toxiproxy server needs beyond its listeners: its API, logs


def proxies_needed(nodes: int, users: int) -> int:
    """Proxies of a run with these many nodes and users: one per directed node link and per user->node link."""
    return nodes * (nodes - 1) + users * nodes


MAX_SERVERS = 64  # Toxiproxy processes one run may start


def servers_needed(nodes: int, users: int, open_files: int) -> int:
    """Toxiproxy servers to share a run's proxies among: each may give at most half of the
    descriptors it may hold (``open_files``, after a reserve) to listening sockets, the other
    half to the connections it proxies (two descriptors each).  Raises :class:`LinkError`,
    saying why, when that would take more than :data:`MAX_SERVERS`."""
    per_server = (open_files - PROXY_FD_RESERVE) // 2
    proxies = proxies_needed(nodes, users)
    needed = -(-proxies // per_server) if per_server > 0 else MAX_SERVERS + 1
    if needed > MAX_SERVERS:
        raise LinkError(
            f"Toxiproxy links for {nodes} nodes and {users} users are {proxies:,} proxies, each a listening "
            f"socket; a process here may hold {open_files:,} open files (ulimit -n; raised to the hard limit), so "
            f"they would need more than {MAX_SERVERS} Toxiproxy servers. Use fewer nodes, --links direct (no link "
            f"faults), or raise the hard limit on open files.")
    return max(1, needed)


def find_toxiproxy(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Toxiproxy server binary: ``explicit``, ``$SWARMNET_TOXIPROXY``, ``bin/`` of the project, or PATH."""
    candidates = [explicit, os.environ.get("SWARMNET_TOXIPROXY"), PROJECT_BIN,
                  shutil.which("toxiproxy-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise ToxiproxyMissing(
        f"Toxiproxy server not found (looked in {PROJECT_BIN} and PATH). "
        "Install it with `make toxiproxy` (needs Go), or run with `--links direct` "
        "(no link faults, process faults only).")


# --------------------------------------------------------------------------- server lifecycle


def check_bindable(addresses: Iterable[Address]) -> None:
    """Raise :class:`LinkError` naming the first address we cannot bind (someone holds it)."""
    for host, port in addresses:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as exc:
            raise LinkError(f"cannot listen at {host}:{port}: {exc.strerror}") from None
        finally:
            s.close()


def spawn_toxiproxy(host: str, port: int, *, log: Path, seed: int | None = None,
                    binary: Path | None = None) -> tuple[Child, ToxiproxyApi]:
    """Start a Toxiproxy server at ``host:port`` (then :func:`wait_toxiproxy`).

    The caller owns the returned child: it must run ``child.watch()`` and stop it.
    """
    binary = binary or find_toxiproxy()
    check_bindable([(host, port)])
    argv = [str(binary), "-host", host, "-port", str(port)]
    if seed is not None:
        argv += ["-seed", str(seed % (1 << 63))]
    # Toxiproxy announces nothing on stdout; its API answering is the readiness.
    child, _ = spawn("toxiproxy", argv, stderr=log, env={**os.environ, "LOG_LEVEL": "info", **TOXIPROXY_GO_ENV},
                     ready_pipe=False)
    child.ready = {"event": "listening", "addresses": [[host, port]], "pid": child.pid}
    return child, ToxiproxyApi(host, port)


@asynccontextmanager
async def open_toxiproxy(host: str, port: int, *, log: Path, seed: int | None = None,
                         timeout_s: float = 10.0) -> AsyncIterator[ToxiproxyApi]:
    """A Toxiproxy server for the duration of the block, stopped (SIGTERM, then SIGKILL) on exit."""
    child, api = spawn_toxiproxy(host, port, log=log, seed=seed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.watch)
            try:
                await wait_toxiproxy(child, api, timeout_s)
                yield api
            finally:
                with trio.CancelScope(shield=True):
                    await stop_children([child])
    finally:
        child.kill()


async def wait_toxiproxy(child: Child, api: ToxiproxyApi, timeout_s: float = 10.0) -> str:
    """Poll the API until it answers (its version) or raise naming the failure."""
    last: Exception | None = None
    with trio.move_on_after(timeout_s):
        while child.running:
            try:
                with trio.fail_after(1.0):
                    return await api.version()
            except (LinkError, trio.TooSlowError) as exc:
                last = exc
            await trio.sleep(0.02)
    reason = "exited before its API answered" if not child.running else \
        f"API did not answer within {timeout_s:.3g} s ({last})"
    raise child.failure(reason, ChildFailed)


# --------------------------------------------------------------------------- fault primitives


async def _heal(action: Any, *args: Any) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(HEAL_TIMEOUT_S):
            try:
                await action(*args)
            except LinkError:
                pass  # the proxy or toxic is already gone: nothing left to heal


@asynccontextmanager
async def toxic(api: ToxiproxyApi, proxy: str, type: str, attributes: dict[str, Any], *,
                stream: str = "downstream", toxicity: float = 1.0) -> AsyncIterator[str]:
    """One toxic on one proxy for the duration of the block; yields its name."""
    name = await api.add_toxic(proxy, type, attributes, stream=stream, toxicity=toxicity)
    try:
        yield name
    finally:
        await _heal(api.remove_toxic, proxy, name)


@asynccontextmanager
async def latency(api: ToxiproxyApi, proxy: str, latency_ms: int, jitter_ms: int = 0,
                  stream: str = "downstream") -> AsyncIterator[str]:
    """Delay data on ``proxy`` by ``latency_ms`` (± ``jitter_ms``) in ``stream`` direction."""
    async with toxic(api, proxy, "latency", {"latency": latency_ms, "jitter": jitter_ms}, stream=stream) as name:
        yield name


@asynccontextmanager
async def links_down(api: ToxiproxyApi, proxies: Iterable[str]) -> AsyncIterator[list[str]]:
    """Disable every proxy given (live connections close, new ones are refused); re-enable on exit."""
    names = list(proxies)
    done: list[str] = []
    try:
        for name in names:
            await api.set_enabled(name, False)
            done.append(name)
        yield names
    finally:
        for name in done:
            await _heal(api.set_enabled, name, True)


@asynccontextmanager
async def link_down(api: ToxiproxyApi, proxy: str) -> AsyncIterator[str]:
    """One cut link (see :func:`links_down`)."""
    async with links_down(api, [proxy]):
        yield proxy
