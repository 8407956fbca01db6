"""``swarmnet fuzz``: adversarial frames (:mod:`chaos.fuzz.model`) against a real network,
every answer checked.

The driver opens, to every node, connections of three kinds, each from its own
loopback source address (client ops are rate limited per source): ``anon``
(nobody), ``member`` (authenticated as another node of the target's swarm)
and ``stranger`` (authenticated as a node of another swarm), plus one to the
registry.  On each, ``window`` requests are in flight at once.  Per answer:
never 500 (an onion target's encrypted status included), a status
PROTOCOL.md lists, the status the rules demand where they demand one (401,
404), exactly one response per request id within the deadline, and the
connection stays open.  Meanwhile ``info`` must answer 200 on every node;
afterwards every node still runs, its SQLite file passes ``PRAGMA
integrity_check``, and no log holds a traceback, an error-level event or
"internal error".  Every figure is counted here (ground truth), never taken
from the nodes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click
import msgpack
import trio

from nodes import auth
from testnet.base import crypto
from testnet.base.clock import wall_ms
from testnet.base.protocol import (DEFAULT_MAX_FRAME_SIZE, EOF, HEADER, NEED_DATA, Connection, RemoteProtocolError,
                              Response)

from chaos.fuzz.model import KNOWN_OPS, Draw, Frame, NodeInfo, RandomDraw, World, judge
from chaos.fuzz.frames import make_frame, make_registry_frame
from chaos.fuzz.peer import start_fake_peers

log = logging.getLogger("chaos.fuzz.model")

MAX_BODY = DEFAULT_MAX_FRAME_SIZE - 1024  # what we send stays a well-framed request
ANSWER_TIMEOUT_S = 40.0  # the registry may hold a long poll 30 s
HEALTH_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 5.0
MAX_RECORDED = 100  # failures kept with their frame (all are counted)
LOG_ALARMS = re.compile(r'Traceback|internal error|"level": "(error|critical)"')


class FuzzSetupError(Exception):
    """The fuzzer could not open or authenticate its connections."""


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    unanswered: int = 0  # no response within ANSWER_TIMEOUT_S
    lost: int = 0  # requests pending when their connection closed under us
    dropped: int = 0  # connections the other end closed
    unmatched: int = 0  # responses to no pending request (a second answer, or a stray id)
    oversize: int = 0  # frames the generator made too big to send (not sent)
    statuses: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    op_status: Counter = field(default_factory=Counter)
    kind_status: Counter = field(default_factory=Counter)
    inner_status: Counter = field(default_factory=Counter)  # onion targets' answers, opened
    failure_count: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    health_ok: int = 0
    health_failed: int = 0
    peer_replies: Counter = field(default_factory=Counter)  # what fake peers answered victims, per op

    def merge(self, other: Tally) -> None:
        """Add another tally's counts (and recorded failures) to this one."""
        for name in ("sent", "answered", "unanswered", "lost", "dropped", "unmatched", "oversize", "health_ok",
                     "health_failed", "failure_count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("statuses", "ops", "op_status", "kind_status", "inner_status", "peer_replies"):
            getattr(self, name).update(getattr(other, name))
        self.failures.extend(other.failures[:MAX_RECORDED - len(self.failures)])

    def fail(self, problem: str, frame: Frame | None, **extra: Any) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_RECORDED:
            entry = {"problem": problem, **extra}
            if frame is not None:
                entry.update(op=frame.op, target=frame.target, kind=frame.kind, frame=frame.describe())
            self.failures.append(entry)

    @property
    def problems(self) -> int:
        return self.failure_count

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "unanswered": self.unanswered, "lost": self.lost,
                "dropped_connections": self.dropped, "unmatched_responses": self.unmatched,
                "oversize_not_sent": self.oversize,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "ops": dict(self.ops.most_common()),
                "op_status": dict(sorted(self.op_status.items())),
                "kind_status": dict(sorted(self.kind_status.items())),
                "onion_inner_status": dict(sorted(self.inner_status.items())),
                "failure_count": self.failure_count, "failures": self.failures,
                "health": {"ok": self.health_ok, "failed": self.health_failed},
                "fake_peer_replies": dict(sorted(self.peer_replies.items()))}


# --------------------------------------------------------------------------- one connection


class _Slot:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None


class FuzzConn:
    """A raw pipelined connection: we pick the ids and see every frame that comes back."""

    def __init__(self, stream: trio.SocketStream, *, name: str, kind: str, target: NodeInfo | None,
                 tally: Tally) -> None:
        self.stream, self.name, self.kind, self.target, self.tally = stream, name, kind, target, tally
        self._proto = Connection()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._send_lock = trio.Lock()
        self.closed_by_peer = False
        self._closing = False
        self.last_used = trio.current_time()

    @classmethod
    async def open(cls, host: str, port: int, local_host: str | None, **kw: Any) -> FuzzConn:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port, local_address=local_host)
        return cls(stream, **kw)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                data = await self.stream.receive_some(65536)
                self._proto.receive_data(data)
                while True:
                    ev = self._proto.next_event()
                    if ev is NEED_DATA or ev is EOF:
                        break
                    slot = self._pending.pop(ev.id, None) if isinstance(ev, Response) else None
                    if slot is None:
                        self.tally.unmatched += 1
                        self.tally.fail(f"a frame that answers no pending request: {ev!r:.200}", None, conn=self.name)
                    else:
                        slot.response = ev
                        slot.event.set()
                if not data:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
            pass
        if not self._closing:
            self.closed_by_peer = True
            self.tally.dropped += 1
            self.tally.fail("connection closed by the other end", None, conn=self.name, pending=len(self._pending))
        for slot in self._pending.values():
            slot.event.set()  # no response: the caller counts it lost
        self._pending.clear()

    async def request(self, body: Callable[[int], bytes], timeout: float) -> tuple[Response | None, str]:
        """Send the frame ``body(id)`` and wait for its answer: (response, "") or (None, why)."""
        if self.closed_by_peer:
            return None, "lost: connection already closed"
        msg_id = next(self._ids)
        self.last_used = trio.current_time()
        slot = _Slot()
        self._pending[msg_id] = slot
        data = body(msg_id)
        try:
            async with self._send_lock:
                await self.stream.send_all(HEADER.pack(len(data)) + data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(msg_id, None)
            return None, "lost: connection broke while sending"
        with trio.move_on_after(timeout):
            await slot.event.wait()
        if slot.response is not None:
            return slot.response, ""
        self._pending.pop(msg_id, None)
        return None, "lost: connection closed" if self.closed_by_peer else f"unanswered after {timeout:.0f} s"

    async def call(self, op: str, args: dict[str, Any], timeout: float = 5.0) -> Response:
        """A setup call that must be answered."""
        resp, why = await self.request(lambda i: msgpack.packb({"id": i, "op": op, "args": args}, use_bin_type=True),
                                       timeout)
        if resp is None:
            raise FuzzSetupError(f"{self.name}: {op}: {why}")
        return resp

    async def aclose(self) -> None:
        self._closing = True
        await trio.aclose_forcefully(self.stream)


async def authenticate(conn: FuzzConn, identity: crypto.Identity, receiver_ed_hex: str) -> None:
    """The node-to-node handshake of nodes/auth.py, as the node ``identity``."""
    hi = await conn.call("node_hello", {})
    challenge = hi.body.get("challenge") if isinstance(hi.body, dict) else None
    if not hi.ok or not isinstance(challenge, bytes):
        raise FuzzSetupError(f"{conn.name}: node_hello answered {hi.status}")
    resp = await conn.call("node_auth", auth.auth_args(identity, receiver_ed_hex, challenge))
    if not resp.ok:
        raise FuzzSetupError(f"{conn.name}: node_auth answered {resp.status}: {resp.body!r:.100}")


# --------------------------------------------------------------------------- sending and judging


class Fuzzer:
    """Sends frames, judges answers, keeps the tally and feeds stored hashes back to the world."""

    def __init__(self, world: World, tally: Tally | None = None, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        self.world = world
        self.tally = tally or Tally()
        self.timeout_s = timeout_s

    async def send(self, conn: FuzzConn, frame: Frame) -> None:
        t = self.tally
        try:
            packed = msgpack.packb({"op": frame.op, "args": frame.args}, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise AssertionError(f"the generator made an unencodable frame: {exc}: {frame.describe()}") from None
        if len(packed) > MAX_BODY:
            t.oversize += 1
            return
        t.sent += 1
        op = frame.op if frame.op in KNOWN_OPS else "(unknown op)"
        t.ops[op] += 1
        # The envelope with our id in front of the packed op and args: one map of three keys.
        head = b"\x83\xa2id"
        resp, why = await conn.request(lambda i: head + msgpack.packb(i) + packed[1:], self.timeout_s)
        if resp is None:
            if why.startswith("lost"):
                t.lost += 1
            else:
                t.unanswered += 1
            t.fail(why, frame, conn=conn.name)
            return
        t.answered += 1
        t.statuses[resp.status] += 1
        t.op_status[f"{op} {resp.status}"] += 1
        t.kind_status[f"{frame.kind} {resp.status}"] += 1
        verdict = judge(frame, resp.status, resp.body)
        if verdict.inner_status is not None:
            inner = frame.inner_op if frame.inner_op in KNOWN_OPS else "(unknown op)"
            t.inner_status[f"{inner} {verdict.inner_status}"] += 1
        if verdict.stored is not None:
            self.world.note_stored(*verdict.stored)
        if verdict.problem is not None:
            t.fail(verdict.problem, frame, conn=conn.name, status=resp.status)


async def keep_alive(conns: list[FuzzConn], interval_s: float = 20.0) -> None:
    """``info`` on each connection idle for ``interval_s``: servers close a connection after
    60 s without a request, and Hypothesis may leave one unused that long while it shrinks."""
    while True:
        await trio.sleep(interval_s / 2)
        for conn in conns:
            if not conn.closed_by_peer and trio.current_time() - conn.last_used > interval_s:
                await conn.request(lambda i: msgpack.packb({"id": i, "op": "info", "args": {}}), HEALTH_TIMEOUT_S)


class Budget:
    def __init__(self, frames: int) -> None:
        self.left = frames

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def pump(fuzzer: Fuzzer, conn: FuzzConn, draw: Draw, budget: Budget,
               now_ms: Callable[[], int] = wall_ms) -> None:
    """Frames for ``conn`` until the budget is spent (one request in flight per pump)."""
    while not conn.closed_by_peer and budget.take():
        if conn.kind == "registry":
            frame = make_registry_frame(draw, fuzzer.world, now_ms())
        else:
            frame = make_frame(draw, fuzzer.world, conn.target, conn.kind, now_ms())
        await fuzzer.send(conn, frame)


async def send_all(fuzzer: Fuzzer, pairs: Iterable[tuple[FuzzConn, Frame]], window: int = 64) -> None:
    """Send these frames, up to ``window`` in flight (the property test's batches)."""
    limit = trio.CapacityLimiter(window)

    async def one(conn: FuzzConn, frame: Frame) -> None:
        async with limit:
            await fuzzer.send(conn, frame)

    async with trio.open_nursery() as nursery:
        for conn, frame in pairs:
            nursery.start_soon(one, conn, frame)


# --------------------------------------------------------------------------- the connections


def source_hosts(block: tuple[int, int], first: int = 200) -> Iterator[str]:
    """Source addresses for the fuzzer's connections: the run's users' /24, past its users."""
    a, b = block
    for host in range(first, 255):
        yield f"127.{a}.{b + 2}.{host}"


async def open_connections(world: World, nursery: trio.Nursery, tally: Tally, sources: Iterator[str], *,
                           anon_per_node: int = 2, registry: tuple[str, int] | None = None) -> list[FuzzConn]:
    """Per node: ``anon_per_node`` anonymous connections, one authenticated as a member of its
    swarm and one as a node of another swarm (when the network has them); one to the registry."""
    conns: list[FuzzConn] = []

    async def open_one(host: str, port: int, name: str, kind: str, target: NodeInfo | None) -> FuzzConn:
        try:
            conn = await FuzzConn.open(host, port, next(sources), name=name, kind=kind, target=target, tally=tally)
        except (OSError, trio.TooSlowError) as exc:
            raise FuzzSetupError(f"cannot connect {name}: {exc}") from None
        await nursery.start(conn.run)
        conns.append(conn)
        return conn

    for n in world.nodes:
        for i in range(anon_per_node):
            await open_one(n.host, n.port, f"{n.name}/anon{i}", "anon", n)
        for kind, pool in (("member", [m for m in world.nodes if m.swarm_id == n.swarm_id and m is not n]),
                           ("stranger", [m for m in world.nodes if m.swarm_id != n.swarm_id])):
            if pool:
                who = pool[0]
                conn = await open_one(n.host, n.port, f"{n.name}/{kind}:{who.name}", kind, n)
                await authenticate(conn, who.identity, n.ed25519_public)
    if registry is not None:
        await open_one(registry[0], registry[1], "registry", "registry", None)
    return conns


async def watch_health(world: World, tally: Tally, sources: Iterator[str], done: trio.Event,
                       interval_s: float = HEALTH_INTERVAL_S) -> None:
    """``info`` on every node every ``interval_s``, on connections of its own: 200 within 5 s."""
    async with trio.open_nursery() as nursery:
        conns = {}
        for n in world.nodes:
            conns[n.name] = await FuzzConn.open(n.host, n.port, next(sources), name=f"{n.name}/health",
                                                kind="health", target=n, tally=tally)
            await nursery.start(conns[n.name].run)
        while not done.is_set():
            for name, conn in conns.items():
                resp, why = await conn.request(lambda i: msgpack.packb({"id": i, "op": "info", "args": {}}),
                                               HEALTH_TIMEOUT_S)
                if resp is not None and resp.ok:
                    tally.health_ok += 1
                else:
                    tally.health_failed += 1
                    tally.fail(f"health: info on {name}: {why or resp.status}", None)
            with trio.move_on_after(interval_s):
                await done.wait()
        for conn in conns.values():
            await conn.aclose()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- after the run


def integrity_check(db_path: str | Path) -> str:
    """``PRAGMA integrity_check`` on a SQLite file, read-only: "ok" or what it found."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))[:500]
    except sqlite3.Error as exc:
        return f"cannot check: {exc}"


def scan_logs(paths: Iterable[Path], limit: int = 50) -> list[dict[str, Any]]:
    """Log lines that show an unexpected exception or an error: tracebacks, error-level
    events, "internal error"."""
    hits: list[dict[str, Any]] = []
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for no, line in enumerate(f, 1):
                    if LOG_ALARMS.search(line) and len(hits) < limit:
                        hits.append({"file": str(path), "line": no, "text": line.strip()[:600]})
        except OSError as exc:
            hits.append({"file": str(path), "line": 0, "text": f"cannot read: {exc}"})
    return hits


# --------------------------------------------------------------------------- a whole run


@dataclass
class FuzzReport:
    seed: int
    nodes: int
    swarms: int
    connections: dict[str, int]
    wall_s: float
    tally: Tally
    exits: list[str]
    integrity: dict[str, str]
    log_hits: list[dict[str, Any]]
    run_dir: str

    @property
    def frames_per_s(self) -> float:
        return self.tally.sent / self.wall_s if self.wall_s else 0.0

    @property
    def ok(self) -> bool:
        t = self.tally
        return (t.failure_count == 0 and not self.exits and not self.log_hits
                and all(v == "ok" for v in self.integrity.values()))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seed": self.seed, "nodes": self.nodes, "swarms": self.swarms,
                "connections": self.connections, "wall_s": round(self.wall_s, 2),
                "frames_per_s": round(self.frames_per_s, 1), **self.tally.to_json(), "node_exits": self.exits,
                "integrity": self.integrity, "log_hits": self.log_hits, "run_dir": self.run_dir}

    def summary(self) -> str:
        t = self.tally
        lines = [
            f"fuzz {'PASSED' if self.ok else 'FAILED'}: seed {self.seed}, {self.nodes} nodes in {self.swarms} swarms, "
            f"connections {self.connections}",
            f"  frames sent {t.sent} (answered {t.answered}) in {self.wall_s:.1f} s: {self.frames_per_s:.0f} frames/s"
            f"; generator frames too big to send: {t.oversize}",
            "  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(t.statuses.items())),
            f"  500s: {t.statuses.get(500, 0)} (onion inner: "
            f"{sum(v for k, v in t.inner_status.items() if k.endswith(' 500'))}); unanswered {t.unanswered}; "
            f"lost {t.lost}; dropped connections {t.dropped}; unmatched responses {t.unmatched}",
            f"  health: info answered {t.health_ok}, failed {t.health_failed}; node exits: {self.exits or 0}",
            "  fake peers answered victims: " + (", ".join(f"{k} {v}" for k, v in sorted(t.peer_replies.items()))
                                                 or "none"),
            "  integrity_check: " + ", ".join(f"{k} {v}" for k, v in sorted(self.integrity.items())),
            f"  log alarms: {len(self.log_hits)}; findings: {t.failure_count}",
            "  per op: " + ", ".join(f"{k} {v}" for k, v in t.ops.most_common() if v >= t.sent // 200),
        ]
        for f in t.failures[:20]:
            lines.append(f"  ! {f['problem']}: {f.get('frame') or f.get('conn', '')}")
        for h in self.log_hits[:10]:
            lines.append(f"  ! log {h['file']}:{h['line']}: {h['text'][:300]}")
        return "\n".join(lines)


def account_identities(seed: int, count: int) -> list[crypto.Identity]:
    return [crypto.Identity.from_seed(hashlib.blake2b(f"swarmnet/fuzz/account/{seed}/{i}".encode(),
                                                      digest_size=32).digest()) for i in range(count)]


async def world_of(net: Any, seed: int, accounts: int = 24) -> World:
    """What the harness knows of a running :class:`testnet.controller.Testnet`."""
    body = await net.call("registry", "get_service_nodes", {})
    swarm_of = {n["ed25519_public"]: int(n["swarm_id"]) for n in body["nodes"]}
    nodes = [NodeInfo(name, rt.plan.identity, rt.plan.host, rt.port, swarm_of[rt.plan.ed25519_public])
             for name, rt in sorted(net.nodes.items()) if rt.plan.ed25519_public in swarm_of]
    ids = [u.identity for u in net.plan.users] + account_identities(seed, accounts)
    return World.build(nodes, ids, net.plan.admin_token)


async def restore(net: Any, tally: Tally) -> None:
    """Undo what admin ops with the right token may have changed (dial tables, clocks); then
    every node must answer ``info`` with its clock back."""
    from testnet.base.protocol import RequestError
    from testnet.base.rpc import RpcError

    for name in sorted(net.nodes):
        try:
            await net.admin(name, "admin_set_links", links={k: list(v) for k, v in net.plan.dial_table(name).items()})
            await net.admin(name, "admin_clock", offset_ms=0)
            if (await net.call(name, "info"))["clock_offset_ms"] != 0:
                tally.fail(f"{name}: clock offset not restored", None)
        except (RpcError, RequestError) as exc:
            tally.fail(f"{name}: does not answer after the run: {exc}", None)


def exited_nodes(net: Any) -> list[str]:
    return [f"{name} ({rt.state}, exit code {rt.exit_code})" for name, rt in sorted(net.nodes.items())
            if rt.state != "running" or rt.child is None or not rt.child.running]


async def fuzz_network(net: Any, frames: int, seed: int, *, window: int = 8, anon_per_node: int = 2,
                       fake_peers: bool = True, progress: Callable[[str], None] = lambda m: None) -> FuzzReport:
    """Send ``frames`` frames into the running network ``net``, then check it."""
    world = await world_of(net, seed)
    tally = Tally()
    fuzzer = Fuzzer(world, tally)
    sources = source_hosts(net.plan.block)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        conns = await open_connections(world, nursery, tally, sources, anon_per_node=anon_per_node,
                                       registry=net.registry_address)
        kinds = Counter(c.kind for c in conns)
        progress(f"{len(conns)} connections {dict(kinds)}; {frames} frames, {window} in flight on each")
        fakes = await start_fake_peers(net, world, nursery, tally.peer_replies, sources, seed) if fake_peers else []
        progress(f"fake peers: {', '.join(fakes) or 'none'}")
        done = trio.Event()
        nursery.start_soon(watch_health, world, tally, sources, done)
        budget = Budget(frames)
        ticker = trio.CancelScope()

        async def tick() -> None:
            with ticker:
                while True:
                    await trio.sleep(10)
                    progress(f"{tally.sent} sent, {tally.failure_count} findings, "
                             f"{tally.sent / (time.monotonic() - start):.0f} frames/s")

        nursery.start_soon(tick)
        start = time.monotonic()
        async with trio.open_nursery() as pumps:
            for ci, conn in enumerate(conns):
                for w in range(window):
                    pumps.start_soon(pump, fuzzer, conn, RandomDraw(f"{seed}/{ci}/{w}"), budget)
        wall = time.monotonic() - start
        ticker.cancel()
        done.set()
        for conn in conns:
            await conn.aclose()
        nursery.cancel_scope.cancel()  # fake peers and their routes
    await restore(net, tally)
    exits = exited_nodes(net)
    integrity = {name: integrity_check(rt.plan.db) for name, rt in sorted(net.nodes.items())}
    hits = scan_logs(Path(net.run_dir).rglob("*.log"))
    return FuzzReport(seed, len(world.nodes), len({n.swarm_id for n in world.nodes}), dict(kinds), wall, tally,
                      exits, integrity, hits, str(net.run_dir))


async def run_fuzz(frames: int, seed: int, *, nodes: int = 6, min_swarm: int = 1, window: int = 8,
                   run_dir: Path | None = None, progress: Callable[[str], None] = lambda m: None) -> FuzzReport:
    """Boot a network (direct links, no traffic capture), fuzz it, check it, tear it down."""
    from testnet.controller import Options, open_testnet

    opts = Options(nodes=nodes, users=2, min_swarm=min_swarm, links="direct", seed=seed, run_dir=run_dir,
                   capture=False, ready_timeout_s=60.0)
    async with open_testnet(opts, progress=progress) as net:
        report = await fuzz_network(net, frames, seed, window=window, progress=progress)
    (Path(report.run_dir) / "fuzz.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


@click.command("fuzz")
@click.option("--frames", default=100_000, show_default=True, help="frames to send")
@click.option("--seed", type=int, default=None, help="network keys and frame stream (random if omitted)")
@click.option("--nodes", default=6, show_default=True, help="service nodes")
@click.option("--min-swarm", default=1, show_default=True, help="minimum swarm size (6 nodes, 1: two swarms)")
@click.option("--window", default=8, show_default=True, help="requests in flight per connection")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="run directory (kept)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def fuzz(frames: int, seed: int | None, nodes: int, min_swarm: int, window: int, run_dir: Path | None,
         as_json: bool) -> None:
    """Adversarial frames for every op against a real network: exits 1 on any 500, dropped or
    unanswered request, node exit, failed integrity check or alarming log line."""
    import secrets

    from testnet.cli import CommandError

    seed = secrets.randbits(31) if seed is None else seed
    start = time.monotonic()

    def say(msg: str) -> None:
        if not as_json:
            click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    report = trio.run(lambda: run_fuzz(frames, seed, nodes=nodes, min_swarm=min_swarm, window=window,
                                       run_dir=run_dir, progress=say))
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())
    if not as_json:
        click.echo(f"run directory: {report.run_dir} (fuzz.json)")
    if not report.ok:
        raise CommandError(f"fuzz found problems (reproduce: swarmnet fuzz --frames {frames} --seed {seed})")
