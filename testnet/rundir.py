"""The run directory: where a run lives on disk, and ``run.json``, the record
every tool reads (schema in RUNDIR.md).

``./runs/<run-id>/`` unless told otherwise; ``./runs/latest`` points at the
newest.  Secrets (key seeds, tokens) go in files of mode 0600, never in
``run.json`` or logs.  ``run.json`` is replaced atomically whenever it
changes, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

SCHEMA_VERSION = 1
RUN_JSON = "run.json"
LINKS_JSON = "links.json"  # the link table, apart: rewritten only when links change (N² of them)
DEFAULT_RUNS_DIR = Path("runs")
LATEST = "latest"
CONTROL_TOKEN_FILE = "control_token"
ADMIN_TOKEN_FILE = "admin_token"


class RunDirError(Exception):
    """A run directory is missing, unreadable or not a run."""


def new_run_id(now_s: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS-xxxx``: sorts by start time, unique enough to run side by side."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now_s is None else now_s))
    return f"{stamp}-{secrets.token_hex(2)}"


def create_run_dir(run_id: str, run_dir: Path | None = None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    """Make the run's directory (``runs_dir/run_id`` unless ``run_dir`` is given).

    Without ``run_dir``, ``runs_dir/latest`` is re-pointed at the new run.
    A ``run_dir`` that already holds a run is refused: its record would be lost.
    """
    if run_dir is None:
        path = (runs_dir / run_id).absolute()
        path.mkdir(parents=True, exist_ok=False)
        _point_latest(runs_dir, run_id)
    else:
        path = Path(run_dir).absolute()
        if (path / RUN_JSON).exists():
            raise RunDirError(f"{path} already holds a run; choose another --run-dir or remove it")
        path.mkdir(parents=True, exist_ok=True)
    return path


def _point_latest(runs_dir: Path, run_id: str) -> None:
    link = runs_dir / LATEST
    tmp = runs_dir / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(run_id, tmp)
    os.replace(tmp, link)


def claim_block(run_id: str) -> tuple[tuple[int, int], socket.socket]:
    """The run's address block: the first candidate (``plan.candidate_blocks``) whose control
    address we can bind.  The bound, listening socket is the claim: keep it open for the run."""
    from .plan import CONTROL_PORT, candidate_blocks

    for a, b in candidate_blocks(run_id):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((f"127.{a}.{b}.1", CONTROL_PORT))
            s.listen(socket.SOMAXCONN)  # every node of a large network may ask for links at once
            return (a, b), s
        except OSError:
            s.close()
    raise RunDirError("no free loopback block in 127.0.0.0/8 for this run")


def resolve_run_dir(run_dir: Path | str | None = None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    """The run directory a command acts on: ``run_dir``, else ``runs_dir/latest``."""
    path = Path(run_dir) if run_dir is not None else runs_dir / LATEST
    if not (path / RUN_JSON).is_file():
        if run_dir is None:
            raise RunDirError(f"no run found at {path}: start one with `swarmnet up` or pass --run-dir")
        raise RunDirError(f"{path} is not a run directory (no {RUN_JSON})")
    return path.resolve()


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror}") from None


def write_json_atomic(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Replace ``path`` with ``obj`` as JSON in one step (tmp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_run(run_dir: Path | str) -> dict[str, Any]:
    """The parsed ``run.json`` of ``run_dir``."""
    path = Path(run_dir) / RUN_JSON
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except FileNotFoundError:
        raise RunDirError(f"{Path(run_dir)} is not a run directory (no {RUN_JSON})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(run, dict) or "run_id" not in run:
        raise RunDirError(f"{path} is not a swarmnet run record")
    if "links" not in run:
        run["links"] = read_links(run_dir, run)
    return run


def read_links(run_dir: Path | str, run: dict[str, Any]) -> Collection[dict[str, Any]]:
    """The link table a run record names (``links_file``; [] when it names none): every link's
    row, made when iterated (:class:`RunLinks`), or the rows listed by an older run."""
    name = run.get("links_file")
    if not name:
        return []
    path = Path(run_dir) / name
    try:
        with open(path, encoding="utf-8") as f:
            links = json.load(f)
    except FileNotFoundError:
        return []  # the run has not made its links yet
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if isinstance(links, list):  # a run directory written before the table was a rule
        return links
    if not isinstance(links, dict) or not isinstance(links.get("sources"), dict) \
            or not isinstance(links.get("destinations"), dict):
        raise RunDirError(f"{path} is not a link table")
    return RunLinks(links, run)


class RunLinks(Collection):
    """``run["links"]``: every link of a run as a row (``name``, ``src``, ``dst``, ``listen``,
    ``upstream``), made from ``links.json`` (where each source's proxies listen, the port that
    names each destination) and the record (where each destination listens) as it is
    iterated, in the plan's order.  ``len()``, :meth:`row` and :meth:`from_source` list
    nothing else."""

    def __init__(self, table: dict[str, Any], run: dict[str, Any]) -> None:
        self.sources: dict[str, str] = table["sources"]
        self.ports: dict[str, int] = table["destinations"]
        self._nodes = {n["name"]: n for n in run.get("nodes") or ()}
        self._ingress = run.get("ingress") or {}

    def _row(self, src: str, dst: str) -> dict[str, Any]:
        node = self._nodes.get(dst) or {}
        up = None
        if node.get("host") and node.get("port"):
            if src in self.ports:  # a node's link leads to the node
                up = [node["host"], node["port"]]
            elif self._ingress.get(dst, {}).get(src):  # a user's, to its ingress listener there
                up = [node["host"], self._ingress[dst][src]]
        return {"name": f"{src}->{dst}", "src": src, "dst": dst, "listen": [self.sources[src], self.ports[dst]],
                "upstream": up}

    def row(self, src: str, dst: str) -> dict[str, Any] | None:
        """The row of link ``src`` -> ``dst``, if the run has it."""
        if src == dst or src not in self.sources or dst not in self.ports:
            return None
        return self._row(src, dst)

    def from_source(self, src: str) -> list[dict[str, Any]]:
        """The rows of the links leaving ``src``."""
        return [self._row(src, d) for d in self.ports if d != src] if src in self.sources else []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for src in self.sources:
            for dst in self.ports:
                if dst != src:
                    yield self._row(src, dst)

    def __len__(self) -> int:
        n = len(self.ports)
        return sum(n - 1 if src in self.ports else n for src in self.sources)

    def __contains__(self, row: object) -> bool:
        return isinstance(row, dict) and row == self.row(row.get("src", ""), row.get("dst", ""))


def write_links(path: Path, table: dict[str, Any]) -> None:
    """``links.json`` (:func:`build_links`), replaced in one step."""
    write_json_atomic(path, table)


# --------------------------------------------------------------------------- the record


def build_record(net: Any) -> dict[str, Any]:
    """``run.json`` of a live :class:`testnet.controller.Testnet` (schema in RUNDIR.md)."""
    plan, rel = net.plan, (lambda p: os.path.relpath(p, net.run_dir))

    def proc(c: Any) -> dict[str, Any]:
        return {"pid": c.pid if c else None, "create_time": c.create_time if c else None}

    nodes = [{
        "name": n.name, **proc(rt.child), "state": rt.state, "exit_code": rt.exit_code,
        "host": n.host, "port": rt.port, "dial_host": n.host, "dial_port": rt.port,
        "ed25519_public": n.ed25519_public, "x25519_public": n.x25519_public, "swarm_id": rt.swarm_id,
        "db": rel(n.db), "log": rel(n.log), "stderr": rel(n.stderr), "seed_file": rel(n.seed_file),
        "config": rel(n.config_file), "capture": rel(n.capture) if plan.capture else None,
    } for rt in net.nodes.values() for n in [rt.plan]]
    ctl, tp, reg = plan.controller, plan.toxiproxy, net.registry_address
    return {
        "schema": SCHEMA_VERSION, "run_id": plan.run_id, "seed": plan.seed, "state": net.state,
        "started_ms": net.started_ms, "links_mode": plan.links_mode, "min_swarm": plan.min_swarm,
        "inject_bugs": list(plan.inject_bugs), "block": f"127.{plan.block[0]}.{plan.block[1]}.0/21",
        "controller": {"host": ctl[0], "port": ctl[1], "pid": os.getpid(), "create_time": net.create_time},
        "zygote": proc(net.zygote.child) if net.zygote else None,
        "registry": {"host": reg[0], "port": reg[1], **proc(net.registry), "log": "registry/registry.log",
                     "state_file": "registry/state.json"},
        # The first server at the top level (as with one server); all of them under "servers".
        "toxiproxy": None if tp is None else {
            "api": f"http://{tp[0]}:{tp[1]}", "host": tp[0], "port": tp[1],
            **proc(net.toxiproxies[0] if net.toxiproxies else None), "log": "toxiproxy.log",
            "servers": [{"api": f"http://{h}:{p}", "host": h, "port": p,
                         **proc(net.toxiproxies[i] if i < len(net.toxiproxies) else None),
                         "log": "toxiproxy.log" if i == 0 else f"toxiproxy-{i}.log"}
                        for i, (h, p) in enumerate(plan.toxiproxy_apis)]},
        "nodes": nodes,
        "removed_nodes": net.removed,
        "users": [{"name": u.name, "session_id": u.identity.session_id, "ed25519_public":
                   u.identity.ed25519_public.hex(), "host": u.host, "seed_file": rel(u.seed_file)}
                  for u in plan.users],
        "links_file": LINKS_JSON if plan.link_count else None,
        "ingress": {name: dict(rt.ingress) for name, rt in net.nodes.items() if rt.ingress},
        "secrets": {"admin_token": ADMIN_TOKEN_FILE, "control_token": CONTROL_TOKEN_FILE},
        "check": net.check_result,
    }


def build_links(net: Any) -> dict[str, Any]:
    """``links.json`` of a live :class:`testnet.controller.Testnet`: the link table as its rule
    (RUNDIR.md) — where each source's proxies listen and the port naming each destination —
    not as its N² rows: :class:`RunLinks` makes those when they are read."""
    plan = net.plan
    return {"sources": plan.proxy_sources(), "destinations": plan.proxy_ports()}


# --------------------------------------------------------------------------- readers for tools


def node_entry(run: dict[str, Any], name: str) -> dict[str, Any]:
    for node in run["nodes"]:
        if node["name"] == name:
            return node
    raise RunDirError(f"no node {name!r} in run {run['run_id']} (nodes: {', '.join(n['name'] for n in run['nodes'])})")


def proxy_of(run: dict[str, Any], src: str, dst: str) -> dict[str, Any] | None:
    """The Toxiproxy proxy carrying ``src`` -> ``dst`` (``None`` in direct mode)."""
    links = run.get("links") or ()
    if isinstance(links, RunLinks):
        return links.row(src, dst)
    for link in links:
        if link["src"] == src and link["dst"] == dst:
            return link
    return None


def link_opener(run: dict[str, Any]) -> tuple[str, int] | None:
    """Where a user of the run asks for a link's proxy not made yet (its controller's
    ``open_link``); ``None`` with direct links."""
    ctl = run.get("controller") or {}
    if run.get("links_mode") != "toxiproxy" or not ctl.get("host") or not ctl.get("port"):
        return None
    return ctl["host"], int(ctl["port"])


def dial_table(run: dict[str, Any], src: str) -> dict[str, tuple[str, int]]:
    """Where ``src`` (node or user) dials each node, keyed by node ed25519 hex.

    Through its proxies in toxiproxy mode; each node's own address in direct mode.
    """
    by_name = {n["name"]: n for n in run["nodes"]}
    table = {n["ed25519_public"]: (n["dial_host"], n["dial_port"]) for n in run["nodes"]}
    links = run.get("links") or ()
    for link in links.from_source(src) if isinstance(links, RunLinks) else links:
        if link["src"] == src and link["dst"] in by_name:
            host, port = link["listen"]
            table[by_name[link["dst"]]["ed25519_public"]] = (host, port)
    return table


def ingress_user_by_port(run: dict[str, Any], node: str) -> dict[int, str]:
    """For node ``node``: its local ingress port -> the user whose traffic arrives there."""
    return {port: user for user, port in (run.get("ingress") or {}).get(node, {}).items()}


def recorded_processes(run: dict[str, Any], *, controller: bool = False) -> list[tuple[str, int, float | None]]:
    """(name, pid, create_time) of every process a run record names (its controller too, if asked)."""
    recs = [(key, run.get(key)) for key in ("registry", "zygote")]
    tp = run.get("toxiproxy") or {}
    recs += [(f"toxiproxy-{i}" if i else "toxiproxy", s) for i, s in enumerate(tp.get("servers") or [tp])]
    recs += [(n["name"], n) for n in run["nodes"] + run.get("removed_nodes", [])]
    if controller:
        recs.append(("controller", run.get("controller")))
    return [(name, r["pid"], r.get("create_time")) for name, r in recs if r and r.get("pid")]


def iter_log_files(run_dir: Path, run: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    """(process name, JSON-line log path) for the registry and every node of the run."""
    reg = run.get("registry") or {}
    if reg.get("log"):
        yield "registry", Path(run_dir) / reg["log"]
    for node in run["nodes"]:
        yield node["name"], Path(run_dir) / node["log"]


# --------------------------------------------------------------------------- reaching a run from its record


class ControlError(RunDirError):
    """The run's controller is not running, cannot be reached, or refused the request."""


async def gather_status(run: dict[str, Any], timeout_s: float = 1.0) -> dict[str, Any]:
    """Per node: pid, address, state, process (alive/paused/dead), and from its ``info``:
    swarm, height and message count.  Works from ``run.json`` alone, controller or not."""
    import trio

    from .procs import proc_state
    from .base.rpc import RpcError, call_once

    rows: dict[str, dict[str, Any]] = {}

    async def info(host: str, port: int, row: dict[str, Any], keys: tuple[str, ...]) -> None:
        try:
            resp = await call_once(host, port, "info", {}, timeout=timeout_s)
        except RpcError:
            return
        if resp.ok and isinstance(resp.body, dict):
            row.update({k: resp.body.get(k) for k in keys})

    def process(rec: dict[str, Any] | None) -> str:
        if rec and rec.get("place"):  # on a cluster host: its pid is another machine's; the controller's word
            return {"running": "alive", "starting": "alive", "paused": "paused"}.get(rec.get("state"), "dead")
        return proc_state(rec["pid"], rec.get("create_time")) if rec and rec.get("pid") else "dead"

    reg = run["registry"]
    registry = {"pid": reg.get("pid"), "address": f"{reg['host']}:{reg['port']}", "process": process(reg),
                "height": None, "nodes": None}
    async with trio.open_nursery() as nursery:
        for node in run["nodes"]:
            row = rows[node["name"]] = {
                "name": node["name"], "pid": node.get("pid"), "address": f"{node['host']}:{node['port']}",
                "state": node.get("state"), "process": process(node), "swarm_id": node.get("swarm_id"),
                **({"place": node["place"]} if node.get("place") else {}),
                "height": None, "messages": None}
            if row["process"] == "alive" and node.get("port"):
                nursery.start_soon(info, node["host"], node["port"], row, ("swarm_id", "height", "messages"))
        if registry["process"] == "alive":
            nursery.start_soon(info, reg["host"], reg["port"], registry, ("height", "nodes"))
    return {"run_id": run["run_id"], "state": run.get("state"), "links_mode": run.get("links_mode"),
            "controller": {"pid": (run.get("controller") or {}).get("pid"),
                           "process": process(run.get("controller"))},
            "registry": registry, "nodes": list(rows.values())}


async def serve_control(sock: socket.socket, token: str,
                        handle: Callable[[str, dict[str, Any]], Awaitable[Any]],
                        refusals: tuple[type[BaseException], ...] = (), *,
                        open_link: Callable[[dict[str, Any]], Awaitable[Any]] | None = None) -> None:
    """Serve a run's control API on the claimed socket: ``control {token, action, ...}`` ->
    ``handle(action, args)``; errors of the ``refusals`` types answer 400 with their message.
    ``open_link {src, dst, signature}`` -> ``open_link(args)``, which checks the node's signature
    itself (nodes hold no control token)."""
    import secrets as _secrets

    import trio

    from .base.protocol import RequestError, Status
    from .base.rpc import serve_connection

    async def handler(req: Any, peer: Any) -> tuple[int, Any]:
        if req.op == "open_link" and open_link is not None:
            try:
                return Status.OK, await open_link(req.args)
            except RequestError:
                raise
            except refusals as exc:
                raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        if req.op != "control":
            raise RequestError(Status.NOT_FOUND, f"unknown op {req.op!r}")
        if not _secrets.compare_digest(str(req.args.get("token", "")), token):
            raise RequestError(Status.UNAUTHORIZED, "control token required")
        try:
            return Status.OK, await handle(str(req.args.get("action")), req.args)
        except refusals as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await trio.serve_listeners(lambda stream: serve_connection(stream, handler), [listener])


async def control_call(run: dict[str, Any], run_dir: Path, action: str, timeout_s: float = 60.0,
                       **args: Any) -> Any:
    """Ask the run's controller to do ``action`` (``ping``, ``status``, ``down``, ``node``)."""
    from .procs import proc_state
    from .base.rpc import RpcError, call_once

    ctl = run.get("controller") or {}
    if not ctl.get("pid") or proc_state(ctl["pid"], ctl.get("create_time")) == "dead":
        raise ControlError(f"the controller of run {run['run_id']} is not running")
    token = read_secret(Path(run_dir) / CONTROL_TOKEN_FILE)
    try:
        resp = await call_once(ctl["host"], ctl["port"], "control", {"token": token, "action": action, **args},
                               timeout=timeout_s)
    except RpcError as exc:
        raise ControlError(f"the controller of run {run['run_id']} is unreachable: {exc}") from None
    if not resp.ok:
        raise ControlError(resp.body.get("error") if isinstance(resp.body, dict) else str(resp.body))
    return resp.body
