"""A Ray cluster on this machine's test hosts (:mod:`.hosts`), started and
stopped by swarmnet itself.

The head runs in the root namespace on the bridge's address with no CPUs
(nothing of a run executes where the controller's files are); each host
runs one Ray worker node (``ray start --block``) in its network namespace
and in a private mount namespace where the controller's runs directory,
and any other directory given, is covered by an empty tmpfs — the hosts
share this machine's disk, a real cluster does not, so nothing may reach
the controller except through Ray.  Every host offers the custom resource
``swarmnet_host`` (1) and ``swarmnet_host_<name>`` (1): one host agent per
host, pinned by name.

Token authentication throughout: ``RAY_AUTH_MODE=token`` and the token in
``RAY_AUTH_TOKEN`` for every ``ray start`` and every driver
(:meth:`LocalRayCluster.env`).

Ray's processes are stopped by pid, never ``ray stop`` (which kills every
Ray process on the machine by name, and the namespaces share one process
table): SIGTERM to each ``ray start --block`` (it stops its own children),
then SIGKILL to its process group and to any descendant still running.
Each ``ray start`` dies with its parent (SIGTERM at the parent's death).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from .hosts import Host, NamespaceHosts, netns_argv

READY_LINE = "Ray runtime started."
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 15.0
HEAD_ATTEMPTS = 3
OBJECT_STORE_BYTES = 128 * 1024 * 1024  # Ray's floor is 75 MiB; the default takes 30 % of memory per node
HOST_RESOURCE = "swarmnet_host"
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                 "RAY_health_check_timeout_ms": "1000"}
PR_SET_PDEATHSIG = 1

_prctl = ctypes.CDLL(None, use_errno=True).prctl


class ClusterStartError(Exception):
    """A Ray node of the local cluster did not start; carries its log tail."""


def host_resource(name: str) -> str:
    """The custom resource only host ``name`` offers."""
    return f"{HOST_RESOURCE}_{name}"


def ray_executable() -> str:
    """The ``ray`` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "ray"
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if found is None:
        raise ClusterStartError("ray is not installed: pip install 'swarmnet[cluster]'")
    return found


def token_env(token: str) -> dict[str, str]:
    """The environment a Ray process or driver of a token-authenticated cluster needs."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every address.  Ray's servers bind the wildcard address: a
    port is free only if no address holds it (this machine's other runs listen on loopback
    addresses of their own).  All are held until all are chosen, so none repeats."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # SIGTERM, not SIGKILL: `ray start --block` stops its own children on SIGTERM.
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass(eq=False)
class RayNode:
    """One ``ray start --block`` we started, and the reader copying its output to its log."""

    name: str
    popen: subprocess.Popen
    log: Path
    ready: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log, "ab") as out:
            for line in self.popen.stdout:
                out.write(line)
                out.flush()
                if READY_LINE.encode() in line:
                    self.ready.set()
        self.done.set()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


class LocalRayCluster:
    """A Ray head on ``hosts.gateway`` and one Ray worker per host; ``start()``, ``stop()``."""

    def __init__(self, hosts: NamespaceHosts, *, hide: tuple[Path, ...] = (), cpus_per_host: int = 1,
                 token: str | None = None, base_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.hosts = hosts
        self.hide = tuple(Path(p).resolve() for p in hide)
        self.cpus_per_host = cpus_per_host
        self.token = token or secrets.token_hex(32)
        # Short: Ray's unix sockets live under it (108 bytes at most per path).
        self.base_dir = Path(base_dir or f"/tmp/snc-{hosts.tag}")
        self.extra_env = dict(env or {})
        self.port = 0
        self.nodes: dict[str, RayNode] = {}
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-spawner")

    @property
    def address(self) -> str:
        return f"{self.hosts.gateway}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of a driver of this cluster (on top of ``os.environ``)."""
        return {**os.environ, **self.extra_env, **token_env(self.token)}

    def _ray_env(self) -> dict[str, str]:
        # A host lost on this machine is gone at once (its sockets reset): the head need not
        # wait Ray's default 15 s of missed health checks to say so.
        return {**self.env(), **HEALTH_CHECKS}

    # ------------------------------------------------------------------ start

    def _spawn(self, name: str, argv: list[str]) -> RayNode:
        log = self.base_dir / f"{name}.log"
        env = self._ray_env()
        if name != "head":
            # The host's own temporary directory (its agents' and seeds' scratch space), removed
            # with the cluster: a host lost mid-run cannot clean up after itself, and these hosts
            # share this machine's /tmp.
            tmp = self.base_dir / name / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(tmp)
        # Linux sends the parent-death signal when the *thread* that forked exits: fork from one
        # thread that lives as long as this cluster, whichever thread asks (trio's worker threads
        # end when idle).
        popen = self._spawner.submit(
            subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=_die_with_parent, cwd=self.base_dir).result()
        node = RayNode(name, popen, log)
        node.reader = threading.Thread(target=node._read, name=f"ray-{name}-log", daemon=True)
        node.reader.start()
        self.nodes[name] = node
        return node

    def _common(self, temp_dir: Path) -> list[str]:
        return ["--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                f"--object-store-memory={OBJECT_STORE_BYTES}"]

    def _head_argv(self) -> list[str]:
        gw = self.hosts.gateway
        # The head shares the root namespace with everything else on this machine: every
        # port it would take by default (the dashboard agent's 52365, ...) is
        # chosen free instead, so two clusters here never collide.
        flags = ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
        ports = dict(zip(flags, (p for p in _free_ports(len(flags) + 1) if p != self.port)))
        return [ray_executable(), "start", "--head", f"--node-ip-address={gw}", f"--port={self.port}",
                "--num-cpus=0", "--include-dashboard=false", *self._common(self.base_dir / "head"),
                *(f"{k}={v}" for k, v in ports.items())]

    def _worker_argv(self, host: Host) -> list[str]:
        resources = json.dumps({HOST_RESOURCE: 1, host_resource(host.name): 1})
        ray = [ray_executable(), "start", f"--address={self.address}", f"--node-ip-address={host.address}",
               f"--num-cpus={self.cpus_per_host}", f"--resources={resources}",
               *self._common(self.base_dir / host.name)]
        mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=0755 swarmnet-hidden {shlex.quote(str(d))}"
                             for d in self.hide)
        script = f"{mounts + ' && ' if mounts else ''}exec {shlex.join(ray)}"
        return netns_argv(host, ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script])

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the head, then every host's worker; return when all said they run.
        On failure everything started is stopped and :class:`ClusterStartError` raised."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for d in self.hide:
            d.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            for attempt in range(HEAD_ATTEMPTS):
                self.port = _free_ports(1)[0]
                try:
                    self._wait_ready([self._spawn("head", self._head_argv())], deadline)
                    break
                except ClusterStartError as exc:
                    # A port chosen free was taken before the head bound it: choose again.
                    if attempt + 1 == HEAD_ATTEMPTS or "already in use" not in str(exc).lower() \
                            and "failed to start" not in str(exc).lower():
                        raise
                    self.nodes.pop("head").popen.wait(timeout=STOP_GRACE_S)
            workers = [self._spawn(h.name, self._worker_argv(h)) for h in self.hosts.hosts]
            self._wait_ready(workers, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, nodes: list[RayNode], deadline: float) -> None:
        for node in nodes:
            while not node.ready.wait(timeout=0.2):
                if node.done.is_set() or node.popen.poll() is not None:
                    raise ClusterStartError(f"ray node {node.name} exited while starting "
                                            f"(code {node.popen.poll()}):\n{node.tail()}")
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"ray node {node.name} did not start in time:\n{node.tail()}")

    # ------------------------------------------------------------------ a host unlike the others

    @contextmanager
    def covered(self, name: str, paths: list[Path], content: bytes, *, mode: int = 0o644) -> Iterator[None]:
        """On host ``name`` only, each of ``paths`` shows ``content`` (a plain file of ``mode``)
        for the duration of the block: a host whose install differs from the others' (a missing
        binary, another swarmnet's source), as on a real cluster.  A bind mount in the host's
        own mount namespace; the other hosts and this machine still see the real files."""
        node = self.nodes[name]
        stand_in = self.base_dir / name / f"covered-{len(os.listdir(self.base_dir / name))}"
        stand_in.write_bytes(content)
        os.chmod(stand_in, mode)
        into = ["nsenter", f"--target={node.popen.pid}", "--mount", "--"]
        done: list[Path] = []
        try:
            for path in paths:
                subprocess.run([*into, "mount", "--bind", str(stand_in), str(path)], check=True,
                               capture_output=True, timeout=10)
                done.append(path)
            yield
        finally:
            for path in reversed(done):
                subprocess.run([*into, "umount", str(path)], check=True, capture_output=True, timeout=10)
            stand_in.unlink(missing_ok=True)

    # ------------------------------------------------------------------ stop

    def kill_host(self, name: str) -> list[int]:
        """Lose host ``name`` at once: SIGKILL its Ray node and everything under it, and wait
        for them; the pids that would not go (empty when all went)."""
        node = self.nodes[name]
        procs = [psutil.Process(node.popen.pid), *node.descendants()]
        self._kill_tree(node, signal.SIGKILL)
        node.popen.wait(timeout=STOP_GRACE_S)
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
        return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def restart_host(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start host ``name``'s Ray worker again (after :meth:`kill_host`)."""
        old = self.nodes.pop(name)
        if old.popen.poll() is None:
            self._kill_tree(old, signal.SIGKILL)
        old.popen.wait(timeout=STOP_GRACE_S)
        if old.reader is not None:
            old.reader.join(timeout=5)
        node = self._spawn(name, self._worker_argv(self.hosts.host(name)))
        self._wait_ready([node], time.monotonic() + timeout_s)

    @staticmethod
    def _kill_tree(node: RayNode, sig: int) -> None:
        procs = node.descendants()
        try:
            os.killpg(node.popen.pid, sig)  # the group we made for it (start_new_session)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.send_signal(sig)  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass

    def stop(self, *, keep_logs: bool = False) -> list[str]:
        """Stop every Ray node by pid (workers first), wait for all their processes;
        the names of processes that would not go (empty when all went)."""
        order = [n for n in self.nodes.values() if n.name != "head"] + [n for n in self.nodes.values()
                                                                          if n.name == "head"]
        left: list[str] = []
        for group in (order[:-1], order[-1:]) if "head" in self.nodes else (order,):
            tracked = {n.name: [psutil.Process(n.popen.pid), *n.descendants()] for n in group
                       if n.popen.poll() is None}
            for n in group:
                if n.popen.poll() is None:
                    n.popen.send_signal(signal.SIGTERM)
            for n in group:
                try:
                    n.popen.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._kill_tree(n, signal.SIGKILL)
                    n.popen.wait(timeout=STOP_GRACE_S)
            # What `ray start` left behind (it SIGKILLs nothing it cannot see): by pid, then wait.
            procs = [p for ps in tracked.values() for p in ps]
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
            left += [f"{p.pid} ({p.name()})" for p in alive if p.is_running()]
        for n in self.nodes.values():
            if n.reader is not None:
                n.reader.join(timeout=5)
        self.nodes.clear()
        self._spawner.shutdown(wait=False)
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-spawner")
        if not keep_logs:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        return left


def leftover_processes(base_dir: Path, token: str) -> list[str]:
    """Processes of a local cluster still running: those whose command line names its
    ``base_dir`` or whose environment holds its token (Ray's workers rename themselves)."""
    mark = str(base_dir)
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if any(mark in a for a in p.info["cmdline"] or ()) or (token and p.environ().get("RAY_AUTH_TOKEN") == token):
                out.append(f"{p.info['pid']} ({p.info['name']})")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out
