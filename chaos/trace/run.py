"""A run directory read once for ``swarmnet trace``: ground truth (run.json,
removed nodes included), every node's capture replayed with its own key
(:mod:`chaos.trace.captures`) and joined into onion requests, the node databases'
rows and tombstones, node log events, the history and faults.jsonl.

Pure: files in, data out; nothing here talks to the network.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chaos.checkers.replication import load_ground_truth
from chaos.checkers.unlinkability import Observation, UserKeys
from testnet.base import crypto
from testnet.base.jsonl import read_jsonl

from chaos.trace.captures import NodeKeys, Opened, Replayed, replay_captures

__all__ = ["TraceError", "FaultBand", "Chain", "HistoryIndex", "Run", "load_faults", "load_run", "find_message"]

LOG_EVENTS = {"listening", "clock offset", "rehomed", "expired", "swarm view", "power loss"}


class TraceError(Exception):
    """The run directory cannot be traced, or the message is not in it."""


# ---------------------------------------------------------------- faults


@dataclass
class FaultBand:
    """One fault from faults.jsonl: when it was active and what it touched."""

    fault: int
    kind: str
    family: str
    start_t: int
    end_t: int | None
    targets: dict[str, Any]

    def active(self, t0: int, t1: int | None = None) -> bool:
        t1 = t0 if t1 is None else t1
        return self.start_t <= t1 and (self.end_t is None or self.end_t >= t0)

    def _nodes(self) -> set[str]:
        t = self.targets
        return {str(n) for n in t.get("nodes") or ()} | ({str(t["node"])} if t.get("node") else set())

    def touches_node(self, node: str) -> bool:
        """A process or clock fault on ``node`` (a node inside a partition is not itself broken)."""
        return self.family not in ("link", "partition") and node in self._nodes()

    def touches_link(self, src: str, dst: str, *, src_is_user: bool = False) -> bool:
        """Whether this fault broke or slowed the directed link ``src`` -> ``dst``."""
        t = self.targets
        if self.family not in ("link", "partition"):
            return False  # a broken node is touches_node's: its links are not themselves faulted
        if t.get("all_links"):
            return True
        if "side_a" in t and "side_b" in t:
            if src_is_user:
                return False  # cuts are between nodes (chaos.run.nemesis._cut)
            a, b = set(t["side_a"]), set(t["side_b"])
            return (src in a and dst in b) or (not t.get("one_way") and src in b and dst in a)
        if "links" in t:
            return [src, dst] in [list(x) for x in t["links"]]
        return bool({src, dst} & self._nodes())

    def describe(self) -> str:
        t = self.targets
        if "side_a" in t:
            what = f"{','.join(t['side_a'])} | {','.join(t['side_b'])}"
        elif "links" in t:
            what = " ".join(f"{s}->{d}" for s, d in t["links"])
        elif t.get("all_links"):
            what = "all links"
        elif self.family == "adversary" and isinstance(t.get("attacks"), list):
            what = f"{','.join(map(str, t['attacks']))}" + (f" from {t['source']}" if t.get("source") else "")
        else:
            what = ",".join(sorted(self._nodes())) or json.dumps(t)[:60]
        extra = f" {t['offset_ms']:+d} ms" if isinstance(t.get("offset_ms"), int) else ""
        return f"{self.kind} {what}{extra}"


def _family(kind: str) -> str:
    try:
        from chaos.scenario import NEMESES

        return NEMESES[kind][0]
    except (ImportError, KeyError, IndexError):
        return "unknown"


def load_faults(path: Path) -> list[FaultBand]:
    """Start/end records of faults.jsonl as bands; a fault never healed lasts to the end of the run."""
    bands: dict[Any, FaultBand] = {}
    for r in read_jsonl(path):
        fid, phase, t = r.get("fault"), r.get("phase"), r.get("t")
        if not isinstance(t, int):
            continue
        if phase == "start":
            kind = str(r.get("kind"))
            bands[fid] = FaultBand(int(fid) if isinstance(fid, int) else 0, kind, _family(kind), t, None,
                                   dict(r.get("targets") or {}))
        elif phase == "end" and fid in bands:
            bands[fid].end_t = t
    return sorted(bands.values(), key=lambda b: (b.start_t, b.fault))


# ---------------------------------------------------------------- the run


@dataclass
class Chain:
    """One onion request as the captures saw it: its hops in order, and its request."""

    hops: list[Observation]
    opened: Opened | None  # the final request (opened at the target, or beyond a dead end)
    complete: bool  # the last hop is the target that ran it
    direct: bool = False  # a client op sent straight to the node, no onion


@dataclass
class HistoryIndex:
    """history.jsonl indexed once, so that every message's records are found without a scan."""

    sends: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # msg_id -> records
    hash_of: dict[str, str] = field(default_factory=dict)  # msg_id -> hash
    msg_of: dict[str, str] = field(default_factory=dict)  # hash -> msg_id
    receives: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # hash or msg_id
    deletes: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # delete id -> records
    deletes_naming: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # hash -> delete ids

    @classmethod
    def of(cls, history: list[dict[str, Any]]) -> HistoryIndex:
        ix = cls()
        for r in history:
            op = r.get("op")
            if op == "send" and r.get("msg_id") is not None:
                mid = str(r["msg_id"])
                ix.sends[mid].append(r)
                if isinstance(r.get("hash"), str):
                    ix.hash_of.setdefault(mid, r["hash"])
                    ix.msg_of.setdefault(r["hash"], mid)
            elif op == "receive":
                for key in {r.get("hash"), r.get("msg_id")} - {None}:
                    ix.receives[str(key)].append(r)
            elif op == "delete" and r.get("id") is not None:
                ix.deletes[str(r["id"])].append(r)
                for h in r.get("hashes") or ():
                    if isinstance(h, str) and str(r["id"]) not in ix.deletes_naming[h]:
                        ix.deletes_naming[h].append(str(r["id"]))
        return ix


@dataclass
class Run:
    """A run directory read once: ground truth, replayed captures, databases, logs, history, faults."""

    run_dir: Path
    run: dict[str, Any]
    nodes: dict[str, dict[str, Any]]  # name -> run.json entry (removed nodes too)
    users: dict[str, str]  # name -> Session ID
    by_ed: dict[str, str]  # node ed25519 hex -> name
    user_by_session: dict[str, str]
    history: list[dict[str, Any]]
    faults: list[FaultBand]
    logs: dict[str, list[dict[str, Any]]]
    swarms: dict[str, int]
    swarms_source: str
    live: set[str] | None
    rows: dict[str, dict[str, tuple[int, int]]]  # node -> hash -> (row id, expiry)
    tombstones: dict[str, dict[str, int]]  # node -> hash -> until
    db_errors: dict[str, str]
    replayed: Replayed
    chains: list[Chain] = field(default_factory=list)
    by_hash: dict[str, list[Chain]] = field(default_factory=lambda: defaultdict(list))  # store/delete chains
    returned: dict[str, list[Chain]] = field(default_factory=lambda: defaultdict(list))  # retrieves returning it
    retrieves_by_account: dict[str, list[Chain]] = field(default_factory=lambda: defaultdict(list))
    end_t: int = 0
    index: HistoryIndex = field(default_factory=HistoryIndex)
    simulated: bool = False  # chaos/sim: virtual ms (from 2030-01-01), simulated network and processes

    def name(self, ed_hex: str | None) -> str | None:
        if not isinstance(ed_hex, str):
            return None
        return self.by_ed.get(ed_hex.lower()) or self.by_ed.get(ed_hex.lower()[:16]) or ed_hex[:12]


def _read_db(path: Path) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    if not path.exists():
        raise TraceError(f"{path.name} does not exist")
    # A private copy (with its write-ahead log): even a read-only opening of a WAL database
    # makes and removes its shared-memory index beside it, and reading a run never writes
    # into it (a finished run is evidence; the web page traces runs it only serves).
    with tempfile.TemporaryDirectory(prefix="swarmnet-trace-") as tmp:
        copy = Path(tmp) / "db.sqlite"
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, Path(tmp) / "db.sqlite-wal")
        return _read_copy(copy)


def _read_copy(path: Path) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    db = sqlite3.connect(path, timeout=2.0)
    try:
        rows = {h: (i, e) for h, i, e in db.execute("SELECT hash, id, expiry FROM messages")}
        try:
            tombs = {h: u for h, u in db.execute("SELECT hash, until FROM tombstones")}
        except sqlite3.OperationalError:
            tombs = {}  # schema 1: no tombstones
        return rows, tombs
    finally:
        db.close()


def _node_keys(run_dir: Path, name: str, entry: Mapping[str, Any]) -> NodeKeys | None:
    def path(key: str, default: str) -> Path:
        p = Path(entry.get(key) or f"nodes/{name}/{default}")
        return p if p.is_absolute() else run_dir / p

    try:
        seed = bytes.fromhex(path("seed_file", "seed").read_text().strip())
        ident = crypto.Identity.from_seed(seed)
    except (OSError, ValueError, crypto.CryptoError):
        return None
    return NodeKeys(name, ident.ed25519_public.hex(), ident.x25519_secret, path("capture", "capture.bin"))


def load_run(run_dir: str | Path) -> Run:
    """Read everything a journey needs from ``run_dir`` and replay every capture once."""
    run_dir = Path(run_dir)
    try:
        truth = load_ground_truth(run_dir)
    except Exception as exc:  # ReplicationError: not a run directory
        raise TraceError(str(exc)) from None
    run = truth.run
    nodes: dict[str, dict[str, Any]] = {}
    for n in list(run.get("removed_nodes") or ()) + list(run.get("nodes") or ()):
        if isinstance(n, dict) and "name" in n:
            nodes[str(n["name"])] = n
    by_ed = {str(n.get("ed25519_public", "")).lower(): name for name, n in nodes.items()}
    by_ed.update({ed[:16]: name for ed, name in list(by_ed.items())})  # the history's swarm map uses 16-char keys
    keys = {name: k for name, n in nodes.items() if (k := _node_keys(run_dir, name, n)) is not None}
    missing_keys = {name: "cannot read its seed" for name in nodes if name not in keys}

    addr: dict[tuple[str, int], str] = {}
    node_hosts: dict[str, str] = {}
    for name, n in nodes.items():
        for h, p in ((n.get("host"), n.get("port")), (n.get("dial_host"), n.get("dial_port"))):
            if h and p:
                addr[(str(h), int(p))] = name
        if n.get("host"):
            node_hosts[str(n["host"])] = name
    for link in run.get("links") or ():
        if link.get("listen"):
            addr[(str(link["listen"][0]), int(link["listen"][1]))] = str(link["dst"])
    reg = run.get("registry") or {}
    if reg.get("host") and reg.get("port"):
        addr[(str(reg["host"]), int(reg["port"]))] = "registry"
    user_hosts = {str(u["host"]): name for name, u in truth.user_entries.items() if u.get("host")}
    if (run.get("controller") or {}).get("host"):
        node_hosts[str(run["controller"]["host"])] = "controller"
    faults = load_faults(run_dir / "faults.jsonl")
    for band in faults:
        # The adversary nemesis says where its connections come from (faults.jsonl targets.source).
        if band.family == "adversary" and isinstance(band.targets.get("source"), str):
            node_hosts.setdefault(band.targets["source"], "adversary")
    users = [UserKeys(n, sid, truth.user_entries[n].get("ed25519_public")) for n, sid in truth.users.items()]
    replayed = replay_captures(keys, users, user_hosts=user_hosts, ingress=truth.ingress,
                               peer_of_remote=lambda r: addr.get(r), hosts=node_hosts)
    replayed.missing.update(missing_keys)

    rows: dict[str, dict[str, tuple[int, int]]] = {}
    tombs: dict[str, dict[str, int]] = {}
    db_errors: dict[str, str] = {}
    for name, n in nodes.items():
        p = Path(n.get("db") or f"nodes/{name}/db.sqlite")
        try:
            rows[name], tombs[name] = _read_db(p if p.is_absolute() else run_dir / p)
        except (TraceError, sqlite3.Error, OSError) as exc:
            db_errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    logs = {}
    for name, n in nodes.items():
        p = Path(n.get("log") or f"nodes/{name}/node.log")
        logs[name] = [e for e in read_jsonl(p if p.is_absolute() else run_dir / p)
                      if e.get("event") in LOG_EVENTS and isinstance(e.get("t"), int)]

    swarms, source, live = {}, "run.json", None
    # A simulated run (chaos/sim) has virtual times and no processes: its verdict says so, and no pid is recorded.
    simulated = (run.get("registry") or {}).get("pid", 0) is None and all(n.get("pid") is None for n in nodes.values())
    try:
        verdict = json.loads((run_dir / "verdict.json").read_text(encoding="utf-8"))
        simulated = simulated or isinstance(verdict.get("sim"), dict)
        rep = verdict.get("checkers", {}).get("replication", {})
        if isinstance(rep.get("swarms"), dict) and rep["swarms"]:
            swarms, source = {k: v for k, v in rep["swarms"].items() if isinstance(v, int)}, "verdict"
        if isinstance(rep.get("live"), list):
            live = set(rep["live"])
    except (OSError, ValueError, AttributeError):
        pass
    if not swarms:
        swarms = {name: n["swarm_id"] for name, n in (truth.nodes or {}).items() if isinstance(n.get("swarm_id"), int)}

    history = read_jsonl(run_dir / "history.jsonl")
    r = Run(run_dir, run, nodes, dict(truth.users), by_ed, {sid: n for n, sid in truth.users.items()}, history,
            faults, logs, swarms, source, live, rows, tombs, db_errors, replayed)
    r.index = HistoryIndex.of(history)
    r.simulated = simulated
    _index_chains(r)
    ts = [x["t"] for x in history if isinstance(x.get("t"), int)] + [s[1] for s in replayed.span.values()]
    r.end_t = max(ts, default=0)
    return r


def _index_chains(run: Run) -> None:
    """Every onion request as a chain of hops, joined by the blobs that cross them (as the checker does)."""
    rp = run.replayed
    by_received: dict[bytes, Observation] = {}
    forwarded = set()
    for o in rp.observations:
        by_received.setdefault(o.received, o)
        if o.forwarded:
            forwarded.add(o.forwarded)
    run.chains += [Chain([o], rp.opened.get((o.node, o.received)), True, direct=True) for o in rp.direct]
    for root in rp.observations:
        if root.received in forwarded:
            continue  # not a first hop: some node forwarded this blob to it
        hops, o = [root], root
        while o.kind == "relay" and o.forwarded in by_received and len(hops) < 8:
            o = by_received[o.forwarded]
            hops.append(o)
        last = hops[-1]
        run.chains.append(Chain(hops, rp.opened.get((last.node, last.received)), last.kind == "request"))
    run.chains.sort(key=lambda c: c.hops[0].t)  # indexes below keep time order: attempt 1 is the first
    for chain in run.chains:
        opened = chain.opened
        if opened is None:
            continue
        if opened.op in ("store", "delete"):
            for h in opened.hashes:
                run.by_hash[h].append(chain)
        elif opened.op == "retrieve" and chain.complete:
            user = run.user_by_session.get(opened.account or "")
            if user:
                run.retrieves_by_account[user].append(chain)
            for h in opened.body.get("hashes") or ():
                run.returned[h].append(chain)


# ---------------------------------------------------------------- finding a message


def find_message(run: Run, key: str) -> tuple[str | None, str]:
    """(msg_id, hash) for a msg_id, a hash, or a unique hash prefix of at least 6 characters."""
    ids, by_hash = run.index.hash_of, run.index.msg_of
    if key in ids:
        return key, ids[key]
    if key in by_hash:
        return by_hash[key], key
    known = set(by_hash) | set(run.by_hash) | set(run.returned)
    if key in known:
        return None, key
    matches = sorted(h for h in known if len(key) >= 6 and h.startswith(key))
    if len(matches) == 1:
        return by_hash.get(matches[0]), matches[0]
    if matches:
        raise TraceError(f"{key!r} is the start of {len(matches)} hashes: {', '.join(matches[:5])}")
    raise TraceError(f"no message {key!r} in {run.run_dir} (neither a msg_id of history.jsonl nor a hash any node saw)")
