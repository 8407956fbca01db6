"""The registry: swarmnet's stand-in for the Oxen blockchain.

It holds the one authoritative list of service nodes (keys, address, swarm)
and a height that goes up by one on every change.  Nodes join with a signed
``register`` and leave with a signed ``deregister``; after each change the
registry re-runs :func:`testnet.base.swarm.assign_swarms`, as oxen-core recomputes
swarms on every block that changes the service-node list.  Everyone else
follows the list with the ``get_service_nodes`` long-poll.

:class:`~testnet.registry_state.RegistryState` (in :mod:`testnet.registry_state`)
is the whole rule book, without I/O.  This module is its server: requests to
it, waking long-polls, saving the state, genesis; :func:`run_registry` is the
trio edge and ``python -m testnet.registry`` the process (see contracts:
readiness line on stdout, JSON-line logs in ``--log``, SIGTERM or the parent's
death means a clean exit with code 0).  The state's names are importable from
here too, as they always were.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import secrets
import signal
import sys
from typing import Any, Callable

import trio

from .base import logs
from .base.clock import wall_ms
from .base.protocol import Request, RequestError, Status
from .base.net import TCP, Network
from .base.rpc import Peer, serve
from .base.swarm import DEFAULT_MIN_SWARM_SIZE
from .base.records import NodeRecord, deregister_args, deregister_message, register_args, register_message
from .registry_state import (HISTORY_LENGTH, MAX_WAIT_MS, STATE_FORMAT, TIMESTAMP_WINDOW_MS, RegistryError,
                             RegistryState, StateFileError, _key_hex, _write_json_atomic, load_state,
                             parse_poll_args, save_state)

__all__ = [
    "RegistryError", "StateFileError", "NodeRecord", "RegistryState",
    "TIMESTAMP_WINDOW_MS", "MAX_WAIT_MS", "STATE_FORMAT", "HISTORY_LENGTH",
    "register_message", "deregister_message", "register_args", "deregister_args",
    "parse_poll_args", "load_state", "save_state", "run_registry", "main",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the trio edge


_now_ms = wall_ms  # real runs; the simulation passes virtual time


PUBLISH_EVERY_S = 0.25  # long-polls are woken at most this often: a boot of N nodes is N changes
GENESIS_STALL_S = 10.0  # genesis ends this long after the last registration even if staked nodes are missing


class _Server:
    """Requests to :class:`RegistryState`, plus waking long-polls and saving.

    Both are coalesced, because a network's boot (or churn) is a burst of
    changes: a save writes the newest state, so saves queued behind one that
    already wrote a change return at once; and long-polls are woken at once
    after a quiet spell, then at most every :data:`PUBLISH_EVERY_S` (a 500-node
    boot woke 500 long-polls 500 times, and its registry, one process among
    hundreds, answered registrations a minute late).

    With ``genesis`` (a testnet's boot) the list is published only once every
    staked node has registered, or :data:`GENESIS_STALL_S` after the last
    registration: until then ``get_service_nodes`` waits and answers
    "unchanged" at the asker's own height.  A network booted at once thus
    forms its swarms in one step, as at a chain's genesis, instead of showing
    each of its N nodes N intermediate assignments (a 500-node boot made
    11,000-17,000 view changes, each with anti-entropy with every swarm peer:
    most of the boot's CPU).  Registrations are assigned one by one all the
    same, so the swarms are those an incremental boot ends with.
    """

    def __init__(self, state: RegistryState, state_path: str | None, admin_token: str | None = None,
                 now_ms: Callable[[], int] = _now_ms, genesis: bool = False) -> None:
        self.state = state
        self.now_ms = now_ms
        self.state_path = state_path
        self.admin_token = admin_token
        self.nursery: trio.Nursery | None = None  # for a deferred wake; without one, every change wakes
        self._changed = trio.Event()  # replaced on every wake; long-polls wait on it
        self._published_at = -math.inf
        self._publish_pending = False
        self._save_lock = trio.Lock()
        self._changes = 0  # mutations so far
        self._saved = 0  # mutations the state file holds
        # Set when genesis ends (at once without genesis, or with nothing staked to wait for).
        self.genesis_done = trio.Event()
        self._genesis_stall = trio.CancelScope()  # each registration moves its deadline (run_genesis)
        if not genesis or not state.staked or len(state.nodes) >= len(state.staked):
            self.genesis_done.set()

    async def run_genesis(self) -> None:
        """End genesis once every staked node has registered, or when registrations stall."""
        with self._genesis_stall:
            await self.genesis_done.wait()
        self._end_genesis("stalled")  # nothing if every staked node registered

    def _end_genesis(self, why: str) -> None:
        if not self.genesis_done.is_set():
            logs.event(log, "genesis", why=why, height=self.state.height, nodes=len(self.state.nodes),
                       staked=len(self.state.staked or ()), swarms=len(self.state.swarms()))
            # The assignments genesis went through were never published: no node held an
            # account under them, so they are no history (nodes.auth: the rehoming allowance).
            self.state.forget_history()
            self.genesis_done.set()
            self._wake(trio.current_time())

    async def handle(self, req: Request, peer: Peer) -> tuple[int, Any]:
        op, args = req.op, req.args
        if op == "get_service_nodes":
            since, wait_ms = parse_poll_args(args)
            epoch = args.get("epoch")
            if not self.genesis_done.is_set():
                with trio.move_on_after(wait_ms / 1000):
                    await self.genesis_done.wait()
                if not self.genesis_done.is_set():  # nothing published yet: what the asker has stands
                    return Status.OK, {"height": -1 if since is None else since, "changed": False,
                                       "epoch": epoch, "nodes": []}
            if since is not None and since == self.state.height and wait_ms > 0 and epoch in (None, self.state.epoch):
                changed = self._changed
                with trio.move_on_after(wait_ms / 1000):
                    await changed.wait()
            return Status.OK, self.state.service_nodes(since, history=args.get("history") is True, epoch=epoch)
        if op == "info":
            return Status.OK, self.state.info()
        if op in ("register", "deregister"):
            return Status.OK, await self._change(op, args, peer)
        if op == "stake":
            token = args.get("token")
            if not self.admin_token or not isinstance(token, str) or \
                    not secrets.compare_digest(token.encode(), self.admin_token.encode()):
                raise RequestError(Status.UNAUTHORIZED, "admin token required")
            result = self.state.stake({k: v for k, v in args.items() if k != "token"})
            await self._persist()
            return Status.OK, result
        raise RequestError(Status.NOT_FOUND, f"unknown op {op!r:.70}")

    async def _change(self, op: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        before = self.state.height
        swarms_before = {k: r.swarm_id for k, r in self.state.nodes.items()}
        # Only a str names a node in the log: str() of anything else may be huge or nested a
        # thousand deep (RecursionError).
        key = args.get("ed25519_public")
        key = key[:16] if isinstance(key, str) else type(key).__name__
        try:
            if op == "register":
                result = self.state.register(args, self.now_ms())
            else:
                result = self.state.deregister(args, self.now_ms())
        except RequestError as exc:
            logs.event(log, f"{op} rejected", logging.WARNING, status=exc.status, reason=str(exc),
                       node=key, peer=peer.remote[0])
            raise
        if self.state.height != before:
            moved = sum(1 for k, r in self.state.nodes.items()
                        if k in swarms_before and swarms_before[k] != r.swarm_id)
            logs.event(log, f"{op}ed", node=key, height=self.state.height,
                       swarm_id=result.get("swarm_id"), moved=moved, nodes=len(self.state.nodes),
                       swarms=len(self.state.swarms()))
            try:
                await self._persist()
            finally:  # followers hear of the change even if saving it failed
                if self.genesis_done.is_set():
                    self._publish()
                elif len(self.state.nodes) >= len(self.state.staked or ()):
                    self._end_genesis("every staked node registered")
                else:
                    self._genesis_stall.deadline = trio.current_time() + GENESIS_STALL_S
        return result

    def _publish(self) -> None:
        """Wake the long-polls now, or once PUBLISH_EVERY_S has passed since the last wake."""
        now = trio.current_time()
        if self._publish_pending:
            return
        if self.nursery is None or now - self._published_at >= PUBLISH_EVERY_S:
            self._wake(now)
        else:
            self._publish_pending = True
            self.nursery.start_soon(self._publish_later, self._published_at + PUBLISH_EVERY_S)

    async def _publish_later(self, at: float) -> None:
        await trio.sleep_until(at)
        self._publish_pending = False
        self._wake(trio.current_time())

    def _wake(self, now: float) -> None:
        self._published_at = now
        self._changed.set()
        self._changed = trio.Event()

    async def _persist(self) -> None:
        self._changes += 1
        if self.state_path is None:
            return
        mine = self._changes
        async with self._save_lock:  # FIFO: a later save never lands before an earlier one
            if self._saved >= mine:
                return  # a save since our change wrote it (each save writes the newest state)
            data, upto = self.state.to_json(), self._changes  # under the lock: the newest state
            await trio.to_thread.run_sync(_write_json_atomic, self.state_path, data)
            self._saved = upto


async def _stop_on_signals(cancel_scope: trio.CancelScope, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()  # the receiver is in place before we announce readiness
        async for signum in signals:
            logs.event(log, "stopping", signal=signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def run_registry(
    host: str,
    port: int = 0,
    *,
    min_swarm: int = DEFAULT_MIN_SWARM_SIZE,
    seed: int = 0,
    state_path: str | None = None,
    admin_token: str | None = None,
    stakes: list[str] | None = None,
    log_path: str | None = None,
    parent_pid: int | None = None,
    network: Network = TCP,
    now_ms: Callable[[], int] = _now_ms,
    handle_signals: bool = False,
    announce: bool = False,
    genesis: bool = False,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the registry on (host, port) until cancelled, SIGTERM/SIGINT
    (with ``handle_signals``) or the death of ``parent_pid``; then return.

    Reports the bound addresses through ``task_status.started``; with
    ``announce`` also prints the readiness line on stdout.  ``log_path`` gets
    JSON-line logs for as long as this runs.  Raises StateFileError for an
    unreadable ``state_path``.
    """
    handler: logging.Handler | None = None
    if log_path is not None:
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logs.JsonFormatter("registry"))
        logging.getLogger().addHandler(handler)
        if logging.getLogger().getEffectiveLevel() > logging.INFO:
            logging.getLogger().setLevel(logging.INFO)
    try:
        state = (load_state(state_path, min_swarm=min_swarm, seed=seed) if state_path
                 else RegistryState(min_swarm=min_swarm, seed=seed))
        if stakes is not None:
            state.staked = (state.staked or set()) | {_key_hex(k, "stake") for k in stakes}
        state.epoch = now_ms()  # this run: followers' deltas never span a restart
        server = _Server(state, state_path, admin_token, now_ms, genesis=genesis)
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            nursery.start_soon(server.run_genesis)
            if handle_signals:
                await nursery.start(_stop_on_signals, nursery.cancel_scope)
            if parent_pid:
                if sys.platform.startswith("linux") and parent_pid == os.getppid():
                    logs.die_with_parent(signal.SIGTERM)
                nursery.start_soon(_watch_parent, parent_pid, nursery.cancel_scope)
            bound = await nursery.start(lambda task_status: serve(server.handle, [(host, port)], network=network,
                                                                  task_status=task_status))
            logs.event(log, "listening", addresses=bound, height=state.height, nodes=len(state.nodes),
                       min_swarm=min_swarm, seed=seed, state=state_path,
                       registration="open" if state.staked is None else f"{len(state.staked)} staked keys")
            if announce:
                logs.announce_listening(bound)
            task_status.started(bound)
    finally:
        if handler is not None:
            logs.event(log, "stopped")
            logging.getLogger().removeHandler(handler)
            handler.close()


async def _watch_parent(parent_pid: int, cancel_scope: trio.CancelScope) -> None:
    await logs.watch_parent(parent_pid, cancel_scope, interval_s=0.5)
    if cancel_scope.cancel_called:
        logs.event(log, "stopping", reason="parent gone", parent_pid=parent_pid)


def main(argv: list[str] | None = None) -> int:
    """``python -m testnet.registry``: 0 after a clean stop, 2 for bad arguments or state."""
    parser = argparse.ArgumentParser(prog="python -m testnet.registry",
                                     description="Run the swarmnet registry (the service-node list).")
    parser.add_argument("--host", required=True, help="address to listen on (127.0.0.0/8)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    parser.add_argument("--min-swarm", type=int, default=DEFAULT_MIN_SWARM_SIZE,
                        help=f"minimum swarm size (default {DEFAULT_MIN_SWARM_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the swarm assignment")
    parser.add_argument("--state", help="JSON file that keeps the list across restarts")
    parser.add_argument("--log", help="JSON-lines log file")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--admin-token-file", help="file holding the admin token that may 'stake' new keys")
    parser.add_argument("--stakes", help="JSON list of ed25519 keys (hex) allowed to register; "
                                         "without it (and a state that has stakes) registration is open")
    parser.add_argument("--genesis", action="store_true",
                        help="publish the list only once every staked node has registered (a network booted at "
                             f"once), or {GENESIS_STALL_S:g} s after the last registration")
    args = parser.parse_args(argv)
    if args.min_swarm < 1:
        parser.error("--min-swarm must be >= 1")
    try:
        token = open(args.admin_token_file, encoding="ascii").read().strip() if args.admin_token_file else None
        stakes = json.load(open(args.stakes, encoding="utf-8")) if args.stakes else None
        if stakes is not None and not isinstance(stakes, list):
            raise ValueError("--stakes must hold a JSON list of keys")
    except (OSError, ValueError) as exc:
        print(f"swarmnet registry: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(
            run_registry, args.host, args.port, min_swarm=args.min_swarm, seed=args.seed,
            state_path=args.state, admin_token=token, stakes=stakes, log_path=args.log, parent_pid=args.parent_pid,
            handle_signals=True, announce=True, genesis=args.genesis))
    except KeyboardInterrupt:  # a SIGINT before the signal receiver was in place
        pass
    except BaseException as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, (RegistryError, OSError, ValueError)) for e in leaves):
            raise
        print(f"swarmnet registry: {leaves[0]}", file=sys.stderr)
        return 2
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
