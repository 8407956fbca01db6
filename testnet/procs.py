"""Process supervision for the testnet's children (after mirakuru and trio's
``run_process``).

Every child runs in its own process group, is told by Linux to die with its
parent (``PR_SET_PDEATHSIG``, SIGKILL so that even a paused child goes), and
announces readiness with one JSON line on stdout that we read with a
deadline — never a sleep.  Signals go through a pidfd, so a recycled pid can
never receive them; pids recorded by another process are only signalled when
psutil confirms the recorded start time.

Children must be spawned from the trio thread: Linux sends the parent-death
signal when the *thread* that forked exits, and trio's worker threads do.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import psutil
import trio

ProcState = Literal["alive", "paused", "dead"]
DEFAULT_GRACE_S = 1.0  # SIGTERM, then SIGKILL after this long
CREATE_TIME_TOLERANCE_S = 0.05
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # looked up before any fork: a forked child must not dlopen


class ProcError(Exception):
    """Base of process-supervision errors."""


class SpawnError(ProcError):
    """A child could not be started at all."""


class ChildFailed(ProcError):
    """A child exited or misbehaved; carries its name, exit code and log tail."""

    def __init__(self, name: str, reason: str, exit_code: int | None = None, log_tail: str = "") -> None:
        self.name = name
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = log_tail
        code = "" if exit_code is None else f" (exit code {exit_code})"
        tail = f"\n--- last log lines of {name} ---\n{log_tail}" if log_tail else ""
        super().__init__(f"{name}: {reason}{code}{tail}")


class NotReady(ChildFailed):
    """A child did not announce or confirm readiness in time."""


def _in_child(parent_pid: int | None, nice: int) -> None:
    """Runs in the child between fork and exec: its priority, its parent's death."""
    if nice:
        os.nice(nice)
    if parent_pid is not None:
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(70)  # the parent died before the signal was armed


def tail_lines(paths: Iterable[Path | None], n: int = 15) -> str:
    """The last ``n`` lines of each existing file, labelled."""
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                lines = deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=n)
        except OSError:
            continue
        if lines:
            out.append(f"[{path.name}]\n" + "\n".join(lines))
    return "\n".join(out)


class Signals:
    """What every process handle (a real child here, one on a cluster host, a simulated one)
    derives from its ``send_signal`` and ``exited``."""

    exited: trio.Event

    def send_signal(self, sig: int) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)

    def pause(self) -> bool:
        return self.send_signal(signal.SIGSTOP)

    def resume(self) -> bool:
        return self.send_signal(signal.SIGCONT)


@dataclass(eq=False)
class Child(Signals):
    """One running (or finished) child process we started."""

    name: str
    pid: int
    create_time: float
    logs: tuple[Path | None, ...]
    popen: subprocess.Popen | None = None
    pidfd: int | None = None
    returncode: int | None = None
    ready: dict[str, Any] | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    reaper: Zygote | None = None  # who reaps it when it is not our own child
    _watch_scope: trio.CancelScope | None = field(default=None, repr=False)

    def tail(self, n: int = 15) -> str:
        return tail_lines(self.logs, n)

    def failure(self, reason: str, cls: type[ChildFailed] = ChildFailed) -> ChildFailed:
        return cls(self.name, reason, self.returncode, self.tail())

    def send_signal(self, sig: int) -> bool:
        """Signal the child if it still runs; ``False`` if it is gone."""
        if self.exited.is_set():
            return False
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def state(self) -> ProcState:
        if self.exited.is_set():
            return "dead"
        return proc_state(self.pid, self.create_time)

    async def watch(self) -> None:
        """Wait for the child to exit, reap it and set :attr:`exited`.  Run exactly one per child.

        Shielded: cancelling the owner's nursery does not stop the watch, so a
        teardown that runs while everything is being cancelled can still see
        its children go.  :func:`stop_children` abandons a watch only after
        SIGKILL failed too.
        """
        with trio.CancelScope(shield=True) as self._watch_scope:
            if self.pidfd is not None:
                await trio.lowlevel.wait_readable(self.pidfd)
            else:
                while proc_state(self.pid, self.create_time) != "dead":
                    await trio.sleep(0.05)
            if self.popen is not None:
                self.returncode = self.popen.wait()
            elif self.reaper is not None:
                self.returncode = await self.reaper.exit_code(self.pid)
        self._close_pidfd()
        self.exited.set()

    def abandon_watch(self) -> None:
        """Stop watching a child that would not die (its pidfd is closed, :attr:`exited` stays unset)."""
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            fd, self.pidfd = self.pidfd, None
            try:
                os.close(fd)
            except OSError:
                pass

    async def wait_exit(self, timeout_s: float) -> bool:
        """``True`` once the child exited, ``False`` if still running after ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            await self.exited.wait()
        return self.exited.is_set()


def spawn(name: str, argv: list[str], *, stderr: Path, logs: tuple[Path | None, ...] = (),
          env: dict[str, str] | None = None, cwd: Path | None = None,
          parent_death: bool = True, ready_pipe: bool = True,
          pass_fds: tuple[int, ...] = (), nice: int = 0) -> tuple[Child, int | None]:
    """Start ``argv`` in its own process group; returns the child and the read end of its stdout.
    ``nice``: how much lower its CPU priority is than ours (nodes: ``launch.NODE_NICE``).

    stdout is a pipe for the readiness line (``ready_pipe``; else it joins
    stderr and no fd is returned); stderr is appended to ``stderr``.
    Must be called from the trio thread (see the module docstring).
    """
    rfd, wfd = os.pipe() if ready_pipe else (None, None)
    parent = os.getpid()
    try:
        stderr.parent.mkdir(parents=True, exist_ok=True)
        with open(stderr, "ab") as err:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err if wfd is None else wfd, stderr=err, cwd=cwd, env=env,
                close_fds=True, pass_fds=pass_fds, process_group=0,
                preexec_fn=(lambda: _in_child(parent if parent_death else None, nice)) if parent_death or nice else None,
            )
    except OSError as exc:
        if rfd is not None:
            os.close(rfd)
        raise SpawnError(f"{name}: cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        if wfd is not None:
            os.close(wfd)
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        create_time = 0.0
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        pidfd = None
    child = Child(name, popen.pid, create_time, logs + (stderr,), popen=popen, pidfd=pidfd)
    return child, rfd


async def read_ready_line(child: Child, rfd: int, timeout_s: float) -> dict[str, Any]:
    """The child's ``{"event": "listening", ...}`` line, within ``timeout_s``; closes ``rfd``.

    Raises :class:`NotReady` (with exit code and log tail) if the child exits,
    writes something else, or stays silent too long.
    """
    stream = trio.lowlevel.FdStream(rfd)
    buf = b""
    reason = f"no readiness line within {timeout_s:.3g} s"
    try:
        with trio.move_on_after(timeout_s):
            while b"\n" not in buf and len(buf) < 65536:
                data = await stream.receive_some(4096)
                if not data:
                    reason = "exited before it was ready"
                    break
                buf += data
    finally:
        await stream.aclose()
    if b"\n" in buf:
        line = buf.split(b"\n", 1)[0]
        try:
            ready = json.loads(line)
        except ValueError:
            ready = None
        if isinstance(ready, dict) and ready.get("event") == "listening" and ready.get("addresses"):
            child.ready = ready
            return ready
        reason = f"printed {line[:200]!r} instead of a readiness line"
    if reason.startswith("exited"):
        await child.wait_exit(1.0)  # so the error carries its exit code
    raise child.failure(reason, NotReady)


async def stop_children(children: Iterable[Child], grace_s: float = DEFAULT_GRACE_S) -> None:
    """SIGTERM every running child at once, SIGKILL whichever still runs after ``grace_s``.

    Paused children are continued after SIGTERM so they can act on it.
    Returns once every child is reaped (the watchers must be running).
    """
    alive = [c for c in children if c.running]
    for c in alive:
        c.send_signal(signal.SIGTERM)
        c.send_signal(signal.SIGCONT)
    with trio.move_on_after(grace_s):
        for c in alive:
            await c.exited.wait()
    stubborn = [c for c in alive if c.running]
    for c in stubborn:
        c.kill()
    with trio.move_on_after(5.0):
        for c in stubborn:
            await c.exited.wait()
    for c in stubborn:
        if c.running:  # not even SIGKILL (a process stuck in the kernel): let its owner's nursery close
            c.abandon_watch()


# --------------------------------------------------------------------------- limits


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit — every process it
    starts inherits it (nodes, the registry, Toxiproxy) — and return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard or hard == resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # e.g. an infinite hard limit the kernel caps (nr_open): keep the soft one
    return soft, hard


# --------------------------------------------------------------------------- recorded pids


def proc_state(pid: int, create_time: float | None = None) -> ProcState:
    """``alive``, ``paused`` (SIGSTOPped) or ``dead`` — ``dead`` also when ``pid`` now names
    another process (its start time differs from ``create_time``)."""
    try:
        p = psutil.Process(pid)
        if create_time and abs(p.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return "dead"
        status = p.status()
    except psutil.Error:
        return "dead"
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "dead"
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "paused"
    return "alive"


def signal_recorded(pid: int, create_time: float, sig: int) -> bool:
    """Signal a pid recorded in a run record, only if it is still that same process."""
    if not pid or proc_state(pid, create_time) == "dead":
        return False
    try:
        psutil.Process(pid).send_signal(sig)
    except psutil.Error:
        return False
    return True


def process_create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


# --------------------------------------------------------------------------- zygote

ZYGOTE_FORK_S = 0.1  # deadline allowance per spawn request queued ahead of ours (a fork takes ~5-30 ms)


PR_SET_NAME = 15


class Zygote:
    """A warm process that imported the node code once and forks each node from itself.

    Spawning a node is then a fork (milliseconds) instead of a fresh
    interpreter importing trio, PyNaCl, msgpack and sqlite3 (a CPU-bound
    fraction of a second each), and the children share the imported pages
    copy-on-write.  The zygote dies with us (parent-death signal), and its
    children with it; it reaps them and reports their exit codes to us.
    Its command line carries ``swarmnet-zygote`` so leaked forks can be found.
    """

    def __init__(self, child: Child, sock: Any) -> None:
        self.child = child
        self._sock = sock
        self._ids = iter(range(1, 1 << 62))
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: dict[int, trio.Event] = {}
        self._codes: dict[int, int] = {}
        self._exits: dict[int, trio.Event] = {}
        self._lock = trio.Lock()
        self._loop_scope: trio.CancelScope | None = None

    @classmethod
    def launch(cls, main: str, *, stderr: Path, preload: tuple[str, ...] = (), nice: int = 0) -> Zygote:
        """Start a zygote whose children run ``main`` (``"module:function"``, called with the args
        list); then :meth:`wait_ready`.  Its owner stops it (:meth:`stop`), whatever happens.
        ``nice``: it and so every child it forks run that much below our CPU priority."""
        import socket as _socket

        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        argv = python_argv("testnet.procs", "swarmnet-zygote", "--fd", str(theirs.fileno()), "--main", main,
                           *[f"--preload={m}" for m in preload])
        try:
            child, _ = spawn("zygote", argv, stderr=stderr, ready_pipe=False, pass_fds=(theirs.fileno(),), nice=nice)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(child, trio.socket.from_stdlib_socket(ours))

    async def wait_ready(self, nursery: trio.Nursery, timeout_s: float = 30.0) -> None:
        """Watch the zygote in ``nursery`` and wait for its hello."""
        nursery.start_soon(self.child.watch)
        with trio.move_on_after(timeout_s):
            first = json.loads(await self._sock.recv(65536) or b"null")
            if isinstance(first, dict) and first.get("event") == "ready":
                nursery.start_soon(self._read_loop)
                return
        raise self.child.failure("zygote did not become ready", NotReady)

    async def _read_loop(self) -> None:
        # Shielded like Child.watch: exit codes must keep coming during a teardown;
        # it ends when the zygote exits (end of stream) or stop() cancels it.
        with trio.CancelScope(shield=True) as self._loop_scope:
            await self._read_messages()
        for ev in list(self._waiting.values()) + list(self._exits.values()):
            ev.set()

    async def _read_messages(self) -> None:
        while True:
            try:
                data = await self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            msg = json.loads(data)
            if "exited" in msg:
                self._codes[msg["exited"]] = msg["code"]
                self._exits.setdefault(msg["exited"], trio.Event()).set()
            elif "req" in msg:
                self._replies[msg["req"]] = msg
                self._waiting.pop(msg["req"]).set()

    async def spawn(self, name: str, args: list[str], *, stderr: Path, logs: tuple[Path | None, ...] = (),
                    timeout_s: float = 10.0) -> tuple[Child, int]:
        """Fork a child running ``main(args)``; returns it and the read end of its stdout."""
        import array
        import socket as _socket

        if not self.child.running:
            raise SpawnError(f"{name}: the zygote is gone")
        stderr.parent.mkdir(parents=True, exist_ok=True)
        rfd, wfd = os.pipe()
        req = next(self._ids)
        # The zygote forks one request at a time: ours waits behind those sent before it
        # (a 500-node boot sends 500 at once, and the 231st timed out at a flat 10 s).
        timeout_s += ZYGOTE_FORK_S * len(self._waiting)
        done = self._waiting[req] = trio.Event()
        try:
            async with self._lock:
                await self._sock.sendmsg(
                    [json.dumps({"req": req, "name": name, "args": args, "stderr": str(stderr)}).encode()],
                    [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [wfd]))])
        finally:
            os.close(wfd)
        with trio.move_on_after(timeout_s):
            await done.wait()
        reply = self._replies.pop(req, None)
        if reply is None or "pid" not in reply:
            os.close(rfd)
            raise SpawnError(f"{name}: the zygote did not fork it ({reply and reply.get('error')})")
        pid = reply["pid"]
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            pidfd = None  # already gone: its readiness line will say so
        child = Child(name, pid, process_create_time(pid), logs + (stderr,), pidfd=pidfd, reaper=self)
        return child, rfd

    async def exit_code(self, pid: int, timeout_s: float = 2.0) -> int | None:
        """The exit code of a child the zygote reaped (``None`` if it does not say in time)."""
        ev = self._exits.setdefault(pid, trio.Event())
        with trio.move_on_after(timeout_s):
            await ev.wait()
        self._exits.pop(pid, None)
        return self._codes.pop(pid, None)

    async def stop(self) -> None:
        await stop_children([self.child])
        if self._loop_scope is not None:
            self._loop_scope.cancel()
        self._sock.close()


def _zygote_child(req: dict[str, Any], fds: list[int], sock: Any, target: Any, zygote_pid: int) -> None:
    """In a freshly forked child of the zygote: become the node; never returns."""
    import random
    import traceback

    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != zygote_pid:
            os._exit(70)
        _prctl(PR_SET_NAME, str(req["name"])[:15].encode(), 0, 0, 0)
        os.dup2(fds[0], 1)
        os.close(fds[0])
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(err, 2)
        os.close(err)
        random.seed()  # never share the zygote's random stream
        code = target(req["args"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _zygote_main(argv: list[str]) -> int:
    import argparse
    import importlib
    import socket as _socket

    parser = argparse.ArgumentParser(prog="python -m testnet.procs swarmnet-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--main", required=True)
    parser.add_argument("--preload", action="append", default=[])
    args = parser.parse_args(argv)
    for module in args.preload:
        importlib.import_module(module)
    module, _, func = args.main.partition(":")
    target = getattr(importlib.import_module(module), func or "main")
    sock = _socket.socket(fileno=args.fd)
    me = os.getpid()

    def reap(*_: Any) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass

    signal.signal(signal.SIGCHLD, reap)
    sock.send(json.dumps({"event": "ready", "pid": me}).encode())
    while True:
        msg, fds, _, _ = _socket.recv_fds(sock, 65536, 4)
        if not msg:
            return 0  # the controller closed its end
        req = json.loads(msg)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"req": req["req"], "error": str(exc)}).encode())
            continue
        if pid == 0:
            _zygote_child(req, fds, sock, target, me)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"req": req["req"], "pid": pid}).encode())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "swarmnet-zygote":
        sys.exit(_zygote_main(sys.argv[2:]))
    print("usage: python -m testnet.procs swarmnet-zygote --fd N --main MODULE:FUNC", file=sys.stderr)
    sys.exit(2)
