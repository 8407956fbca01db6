"""The host agent: a run's hands on one cluster host (a Ray actor pinned there).

The controller stays where ``swarmnet up --cluster`` runs; on each host an
agent starts that host's part of the run and does there what the controller
asks:

* its own zygote, which forks the host's nodes (:class:`testnet.procs.Zygote`),
  each with its seed and configuration written on this host;
* the Toxiproxy server carrying the host's nodes' outgoing links, whose API
  listens on the host's loopback only: the controller reaches it through
  :meth:`HostAgent.toxiproxy_call`, never over the network;
* signals to its processes (kill, pause, resume, stop) and their exits, as
  events the controller long-polls (:meth:`HostAgent.events`);
* the run's files of this host (databases, captures, logs) packed for the
  controller's run directory (:meth:`HostAgent.collect`): hosts share no disk.

Everything the host writes lives under a directory of its own; the paths the
controller plans (under its run directory) are mapped there.  Processes run
with the same supervision as on one machine (own process group, parent-death
signal, pidfds), supervised from one trio thread in the actor: Linux sends
the parent-death signal when the thread that forked exits.  Node processes
name the agent as their parent, so a lost agent takes its nodes with it.

Nothing here imports Ray: the controller makes the actor class
(:func:`testnet.cluster.run.agent_class`).  Errors come back as
``{"error": ...}`` records, never as exceptions (whose pickling would have
to survive Ray), and the controller turns them into its own errors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

from .. import links as L
from .. import procs, rundir

PATH_KEYS = ("seed_file", "db", "log", "capture")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}
NOT_SHIPPED = ("seed",)  # the controller has every seed already


def _error(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "type": type(exc).__name__}
    if isinstance(exc, procs.ChildFailed):
        out.update(name=exc.name, reason=exc.reason, exit_code=exc.exit_code, tail=exc.log_tail)
    return out


def _no_toxiproxy_here() -> str:
    """Why :func:`testnet.links.find_toxiproxy` found no binary on this host, naming where it looked."""
    def said(path: str | os.PathLike[str]) -> str:
        return f"{path} is not an executable file" if os.path.exists(path) else f"nothing at {path}"

    env = os.environ.get("SWARMNET_TOXIPROXY")
    looked = [f"$SWARMNET_TOXIPROXY: {said(env)}"] if env else []
    looked += [said(L.PROJECT_BIN), "no toxiproxy-server on PATH"]
    return (f"no Toxiproxy server binary on this host ({'; '.join(looked)}); every host needs one: "
            "`make toxiproxy` in its swarmnet, $SWARMNET_TOXIPROXY or PATH in the environment of its `ray start`")


class HostAgent:
    """One run's agent on one host (see the module docstring)."""

    def __init__(self, run_id: str, host: str, home_run_dir: str) -> None:
        self.run_id = run_id
        self.host = host
        self.home = Path(home_run_dir)  # the controller's run directory: the paths of the plan
        self.root = Path(tempfile.mkdtemp(prefix=f"swarmnet-{host}-{run_id}-"))  # this host's part of it
        self.children: dict[str, procs.Child] = {}
        self.zygote: procs.Zygote | None = None
        self.api: L.ToxiproxyApi | None = None
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._token: Any = None
        self._nursery: trio.Nursery | None = None
        self._done: trio.Event | None = None
        self._zygote_ready: trio.Event | None = None
        self._zygote_error: dict[str, Any] | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_trio, args=(ready,), name="swarmnet-agent", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError(f"host agent {host}: its trio thread did not start")

    # ------------------------------------------------------------------ the trio thread

    def _run_trio(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._done = trio.Event()
            self._zygote_ready = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._launch_zygote)
                ready.set()
                await self._done.wait()
                nursery.cancel_scope.cancel()

        trio.run(main)

    def _in_trio(self, afn: Any, *args: Any) -> Any:
        """Run ``afn(*args)`` on the trio thread; its result, or an error record."""
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except Exception as exc:
            return _error(exc)

    def _local(self, path: str | Path) -> Path:
        """Where a path of the controller's run directory lives on this host."""
        p = Path(path)
        try:
            return self.root / p.relative_to(self.home)
        except ValueError:
            return self.root / p.name

    # ------------------------------------------------------------------ identity

    def hello(self) -> dict[str, Any]:
        """Who this agent is: its host, process and directory (for the record and leak checks),
        and the swarmnet it runs."""
        from .driver import code_identity

        return {"host": self.host, "pid": os.getpid(), "create_time": procs.process_create_time(os.getpid()),
                "root": str(self.root), "swarmnet": code_identity()}

    # ------------------------------------------------------------------ starting

    async def _launch_zygote(self) -> None:
        assert self._zygote_ready is not None and self._nursery is not None
        try:
            self.zygote = procs.Zygote.launch("nodes.__main__:main", stderr=self.root / f"zygote-{self.host}.log",
                                               preload=("nodes.server", "nodes.onion"))
            await self.zygote.wait_ready(self._nursery)
        except procs.ProcError as exc:
            self._zygote_error = _error(exc)
        finally:
            self._zygote_ready.set()

    def start_zygote(self) -> dict[str, Any]:
        """The zygote's process once it is ready (it starts with the agent, while the controller
        starts the registry: its imports take a while)."""
        async def wait() -> dict[str, Any]:
            assert self._zygote_ready is not None
            await self._zygote_ready.wait()
            if self.zygote is None:
                return self._zygote_error or {"error": f"no zygote on host {self.host}"}
            return {"pid": self.zygote.child.pid, "create_time": self.zygote.child.create_time}

        return self._in_trio(wait)

    def start_toxiproxy(self, host: str, port: int, seed: int, log_name: str) -> dict[str, Any]:
        """This host's Toxiproxy server, its API at ``host:port`` on the host's loopback; an error
        record saying why it cannot start here (no binary, its address taken, it exits)."""
        async def start() -> dict[str, Any]:
            try:
                binary = L.find_toxiproxy()
            except L.ToxiproxyMissing:
                return {"error": _no_toxiproxy_here()}
            log = self.root / log_name
            try:
                child, api = L.spawn_toxiproxy(host, port, log=log, seed=seed, binary=binary)
            except (L.LinkError, procs.ProcError, OSError) as exc:
                return {"error": f"{binary} would not start: {exc}"}
            self.children["toxiproxy"] = child
            assert self._nursery is not None
            self._nursery.start_soon(self._watch, "toxiproxy", child)
            try:
                version = await L.wait_toxiproxy(child, api)
            except procs.ChildFailed as exc:
                return {"error": f"{binary} {exc.reason} (exit code {exc.exit_code}); its log ends:\n{exc.log_tail}"}
            self.api = api
            return {"pid": child.pid, "create_time": child.create_time, "version": version}

        return self._in_trio(start)

    def start_nodes(self, nodes: list[dict[str, Any]], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Start each ``{"name", "config", "seed_hex"}`` (a node's configuration as planned by the
        controller) from this host's zygote; per node its pid and port, or an error record."""
        async def start_all() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    nursery.start_soon(self._start_node, n, timeout_s, out)
            return out

        return self._in_trio(start_all)

    async def _start_node(self, n: dict[str, Any], timeout_s: float, out: dict[str, dict[str, Any]]) -> None:
        name = n["name"]
        try:
            if self.zygote is None:
                raise procs.SpawnError(f"{name}: no zygote on host {self.host}")
            cfg = dict(n["config"])
            for key in PATH_KEYS:
                if cfg.get(key):
                    cfg[key] = str(self._local(cfg[key]))
            cfg["parent_pid"] = os.getpid()  # the node goes when this agent goes
            d = self.root / "nodes" / name
            d.mkdir(parents=True, exist_ok=True)
            rundir.write_secret(Path(cfg["seed_file"]), n["seed_hex"] + "\n")
            config_file = d / "config.json"
            rundir.write_secret(config_file, json.dumps(cfg, indent=1))
            old = self.children.get(name)
            if old is not None and old.running:
                raise procs.SpawnError(f"{name} still runs on host {self.host}")
            child, rfd = await self.zygote.spawn(name, ["--config", str(config_file)], stderr=d / "stderr.log",
                                                 logs=(Path(cfg["log"]),))
            self.children[name] = child
            assert self._nursery is not None
            self._nursery.start_soon(self._watch, name, child)
            line = await procs.read_ready_line(child, rfd, timeout_s)
            out[name] = {"pid": child.pid, "create_time": child.create_time, "port": int(line["addresses"][0][1])}
        except (procs.ProcError, OSError) as exc:
            out[name] = _error(exc)

    async def _watch(self, name: str, child: procs.Child) -> None:
        await child.watch()
        with self._changed:
            self._events.append({"seq": len(self._events) + 1, "name": name, "pid": child.pid,
                                 "code": child.returncode})
            self._changed.notify_all()

    # ------------------------------------------------------------------ acting

    def signal(self, name: str, what: str) -> bool:
        """Send ``what`` (kill, term, stop, cont) to process ``name``; ``False`` if it is gone."""
        child = self.children.get(name)
        if child is None:
            return False
        return child.send_signal(SIGNALS[what])

    def events(self, since: int, wait_s: float) -> list[dict[str, Any]]:
        """Process exits after number ``since``, waiting up to ``wait_s`` for one."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while len(self._events) <= since:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._events[since:]

    def toxiproxy_call(self, method: str, path: str, body: Any, timeout_s: float) -> dict[str, Any]:
        """One call to this host's Toxiproxy API: ``{"ok": body}``, or an error record
        (``"gone"`` true when the proxy named does not exist)."""
        if self.api is None:
            return {"error": f"no Toxiproxy server on host {self.host}", "gone": False}
        try:
            return {"ok": self.api.call_sync(method, path, body, timeout_s)}
        except L.LinkError as exc:
            return {"error": str(exc), "gone": isinstance(exc, L.ProxyGone)}

    def toxiproxy_calls(self, calls: list[tuple], timeout_s: float) -> Any:
        """Many calls to this host's Toxiproxy, pipelined (:meth:`ToxiproxyApi.calls`): per call
        ``None`` (done) or its failure as JSON; an error record if there is no server."""
        if self.api is None:
            return {"error": f"no Toxiproxy server on host {self.host}"}
        api = self.api

        async def run() -> list[Any]:
            done = await api.calls([L.Call(*c) for c in calls], timeout_s=timeout_s)
            return [None if f is None else f.to_json() for f in done]

        return self._in_trio(run)

    def tail(self, name: str, n: int = 15) -> str:
        child = self.children.get(name)
        return child.tail(n) if child is not None else ""

    # ------------------------------------------------------------------ files

    def collect(self) -> bytes:
        """This host's files of the run as a gzipped tar, paths relative to the run directory.
        Databases are copied with SQLite's backup (consistent while their node writes)."""
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory(prefix="swarmnet-collect-") as tmp, \
                tarfile.open(fileobj=buf, mode="w:gz", compresslevel=3) as tar:
            for path in sorted(self.root.rglob("*")):
                rel = path.relative_to(self.root)
                if not path.is_file() or path.name in NOT_SHIPPED or path.name.endswith(("-wal", "-shm")):
                    continue
                if path.suffix == ".sqlite":
                    copy = Path(tmp) / f"{len(list(Path(tmp).iterdir()))}.sqlite"
                    try:
                        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
                        with sqlite3.connect(copy) as dst:
                            src.backup(dst)
                        src.close()
                        tar.add(copy, arcname=str(rel))
                        continue
                    except sqlite3.Error:
                        pass  # not a database after all (or unreadable): ship the bytes
                tar.add(path, arcname=str(rel))
        return buf.getvalue()

    # ------------------------------------------------------------------ stopping

    def stop(self, grace_s: float = procs.DEFAULT_GRACE_S) -> list[str]:
        """Stop every process of the run on this host (Toxiproxy at once, nodes with a grace
        period, then the zygote); the ones that would not go."""
        async def stop() -> list[str]:
            tp = [c for n, c in self.children.items() if n == "toxiproxy"]
            nodes = [c for n, c in self.children.items() if n != "toxiproxy"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: procs.stop_children(tp, grace_s=0.0))
                nursery.start_soon(lambda: procs.stop_children(nodes, grace_s=grace_s))
            if self.zygote is not None:
                await self.zygote.stop()
            left = [c for c in self.children.values() if c.running]
            if self.zygote is not None and self.zygote.child.running:
                left.append(self.zygote.child)
            return [f"{c.name} (pid {c.pid})" for c in left]

        out = self._in_trio(stop)
        return out if isinstance(out, list) else [out["error"]]

    def close(self) -> None:
        """Stop everything, end the trio thread and remove this host's directory."""
        self.stop()
        if self._token is not None and self._done is not None:
            try:
                trio.from_thread.run_sync(self._done.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
