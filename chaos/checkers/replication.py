"""The replication checker: once the network is quiet, every unexpired
acknowledged message is held by every live member of its recipient's current
swarm, and by no node outside that swarm.

It reads each node's SQLite file directly, read-only, and the history; the
current swarms and the live nodes are passed in by the caller (the CLI asks
the registry: :func:`current_swarms_from_registry`).  Swarm of an account:
``testnet.base.swarm.swarm_for`` (oxen-storage-server: nearest swarm id on the
ring, a tie goes left).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

from testnet.base.swarm import SwarmError, swarm_for
from testnet.rundir import RunDirError, load_run

from .delivery import HostilePeriod, capped, honestly_vouched

__all__ = ["ReplicationError", "GroundTruth", "DEFAULT_TTL_MS", "DEFAULT_GRACE_MS", "load_ground_truth",
           "live_nodes", "current_swarms_from_registry", "read_node_hashes", "check_replication"]

DEFAULT_TTL_MS = 14 * 24 * 3600 * 1000  # oxen-storage-server's longest TTL; used when the invoke has no ttl_ms
DEFAULT_GRACE_MS = 30_000  # how long a node outside the swarm may still hold a message
REGISTRY_TIMEOUT_S = 5.0


class ReplicationError(Exception):
    """The run directory or the arguments cannot be checked."""


@dataclass(frozen=True)
class GroundTruth:
    """What the harness knows of a run, from run.json: nodes and users by name."""

    run_dir: Path
    run: dict[str, Any]
    nodes: dict[str, dict[str, Any]]  # name -> run.json node entry
    users: dict[str, str]  # name -> Session ID
    user_entries: dict[str, dict[str, Any]]  # name -> run.json user entry
    ingress: dict[str, dict[str, int]]  # node name -> {user name: local port}

    def path(self, relative: str | None) -> Path | None:
        """A run.json path (relative to the run dir, or absolute) as a Path; None stays None."""
        if not relative:
            return None
        p = Path(relative)
        return p if p.is_absolute() else self.run_dir / p

    def node_file(self, name: str, key: str, default: str) -> Path:
        """The node's file named by run.json ``key``, else ``nodes/<name>/<default>``."""
        return self.path(self.nodes.get(name, {}).get(key)) or self.run_dir / "nodes" / name / default


def load_ground_truth(run_dir: str | Path) -> GroundTruth:
    """Read run.json of ``run_dir``; raises ReplicationError if it is missing or not a run."""
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir)  # with its link table
    except RunDirError as exc:
        raise ReplicationError(str(exc)) from None
    if not isinstance(run.get("nodes"), list):
        raise ReplicationError(f"{run_dir / 'run.json'} is not a swarmnet run record")
    nodes = {str(n["name"]): n for n in run["nodes"] if isinstance(n, dict) and "name" in n}
    user_entries = {str(u["name"]): u for u in run.get("users") or () if isinstance(u, dict) and "name" in u}
    users = {name: str(u["session_id"]) for name, u in user_entries.items() if u.get("session_id")}
    ingress = {str(node): {str(u): int(p) for u, p in (ports or {}).items()}
               for node, ports in (run.get("ingress") or {}).items()}
    return GroundTruth(run_dir, run, nodes, users, user_entries, ingress)


def live_nodes(truth: GroundTruth, registered: Iterable[str] | None = None) -> set[str]:
    """Nodes run.json says are running (state missing counts as running), among ``registered`` if given."""
    live = {name for name, n in truth.nodes.items() if n.get("state", "running") == "running"}
    return live if registered is None else live & set(registered)


def current_swarms_from_registry(run_dir: str | Path, *, timeout_s: float = REGISTRY_TIMEOUT_S) -> dict[str, int | None]:
    """Node name -> swarm id as the live registry says now (one ``get_service_nodes`` call).

    Nodes the registry lists but run.json does not name are keyed by their
    ed25519 hex.  Raises ReplicationError when the registry cannot be asked.
    """
    import trio  # the only I/O of this module; kept out of the pure checker

    from testnet.base.rpc import RpcError, call_once

    truth = load_ground_truth(run_dir)
    reg = truth.run.get("registry") or {}
    if not reg.get("host") or not reg.get("port"):
        raise ReplicationError("run.json names no registry address")

    async def ask() -> Any:
        return await call_once(str(reg["host"]), int(reg["port"]), "get_service_nodes", {}, timeout=timeout_s)

    try:
        resp = trio.run(ask)
    except (RpcError, OSError, RuntimeError) as exc:  # RuntimeError: called from inside a trio run
        raise ReplicationError(f"registry unreachable: {exc}") from None
    if not resp.ok or not isinstance(resp.body, dict):
        raise ReplicationError(f"registry answered {resp.status}")
    by_ed = {n.get("ed25519_public"): name for name, n in truth.nodes.items()}
    return {by_ed.get(n["ed25519_public"], n["ed25519_public"]): n.get("swarm_id") for n in resp.body["nodes"]}


def read_node_hashes(db_path: Path) -> dict[str, tuple[str, int]]:
    """hash -> (pubkey, expiry ms) of every row of one node's message table, opened read-only."""
    if not db_path.exists():
        raise ReplicationError(f"{db_path} does not exist")
    try:
        db = sqlite3.connect(f"file:{quote(str(db_path.absolute()))}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        raise ReplicationError(f"cannot open {db_path}: {exc}") from None
    try:
        return {h: (pk, exp) for h, pk, exp in db.execute("SELECT hash, pubkey, expiry FROM messages")}
    except sqlite3.Error as exc:
        raise ReplicationError(f"cannot read {db_path}: {exc}") from None
    finally:
        db.close()


@dataclass
class _Acked:
    msg_id: str
    hash: str
    recipient: str | None
    pubkey: str | None
    invoke_t: int | None
    ack_t: int | None
    ttl_ms: int
    vouched: list[str] | None = None  # members whose signed result vouched for the store


def _acked_messages(history: Sequence[Mapping[str, Any]], users: Mapping[str, str]) -> list[_Acked]:
    invokes: dict[str, Mapping[str, Any]] = {}
    acked: list[_Acked] = []
    for r in history:
        if r.get("op") != "send" or r.get("msg_id") is None:
            continue
        mid = str(r["msg_id"])
        if r.get("type") == "invoke":
            invokes[mid] = r
        elif r.get("type") == "ok":
            inv = invokes.get(mid, {})
            h = r.get("hash") or inv.get("hash")
            if not isinstance(h, str):
                continue
            to = inv.get("to")
            ttl = inv.get("ttl_ms")
            vouched = r.get("vouched")
            acked.append(_Acked(mid, h, to, users.get(to) if to else None, inv.get("t"), r.get("t"),
                                ttl if isinstance(ttl, int) and not isinstance(ttl, bool) else DEFAULT_TTL_MS,
                                [str(k) for k in vouched] if isinstance(vouched, list) else None))
    return acked


def _deleted_hashes(history: Sequence[Mapping[str, Any]],
                    recipient_of: Mapping[str, str | None]) -> tuple[set[str], set[str]]:
    """Hashes a delete may have removed (ok or info deletes) and those it surely removed
    (ok deletes); hashes from the invoke or the completion.  Only the recipient can
    delete a message: a delete by anyone else (a user handed another's message by a
    broken node) removes nothing."""
    asked: dict[tuple[Any, Any], list[str]] = {}
    maybe: set[str] = set()
    surely: set[str] = set()
    for r in history:
        if r.get("op") != "delete":
            continue
        hs = list(r.get("hashes") or ()) + ([r["hash"]] if isinstance(r.get("hash"), str) else [])
        key = (r.get("process"), r.get("msg_id", r.get("id")))
        if r.get("type") == "invoke":
            asked[key] = hs
        elif r.get("type") in ("ok", "info"):
            own = [h for h in (hs or asked.get(key, [])) if recipient_of.get(h, r.get("process")) == r.get("process")]
            maybe.update(own)
            if r.get("type") == "ok":
                surely.update(own)
    return maybe, surely


def check_replication(run_dir: str | Path, history: Sequence[Mapping[str, Any]], *, now_ms: int,
                      swarms: Mapping[str, int | None], live: Iterable[str],
                      grace_ms: int = DEFAULT_GRACE_MS, swarms_changed_ms: int | None = None,
                      expiry_margin_ms: int = 60_000, hostile: Sequence[HostilePeriod] = ()) -> dict[str, Any]:
    """Judge replication at ``now_ms`` (ms) against ``swarms`` (node name -> swarm id) and ``live`` nodes.

    A message expiring within ``expiry_margin_ms`` of ``now_ms`` (by invoke t
    + ttl) is not judged: nodes with skewed clocks may have dropped it.  A copy
    on a live node outside the swarm ("stray") fails only once ``grace_ms``
    have passed since the later of its ack and ``swarms_changed_ms``.  A message no
    honest member vouched for (``hostile``: the byzantine faults' members and when) was
    never stored by the swarm as far as anyone honest knows: not judged (``unvouched``).
    """
    truth = load_ground_truth(run_dir)
    live = set(live)
    swarm_ids = sorted({s for s in swarms.values() if isinstance(s, int)})
    acked = _acked_messages(history, truth.users)
    deleted, surely_deleted = _deleted_hashes(history, {m.hash: m.recipient for m in acked})

    # Every node run.json names whose database we can read; unreadable ones are reported.
    held: dict[str, dict[str, tuple[str, int]]] = {}
    unreadable: dict[str, str] = {}
    for name in truth.nodes:
        try:
            held[name] = read_node_hashes(truth.node_file(name, "db", "db.sqlite"))
        except ReplicationError as exc:
            unreadable[name] = str(exc)

    counts = {"acknowledged": len(acked), "checked": 0, "expired": 0, "deleted": 0, "no_recipient": 0,
              "missing": 0, "stray": 0, "stray_after_grace": 0, "unjudged_missing": 0, "resurrected": 0,
              "unvouched": 0}
    missing_msgs: list[dict[str, Any]] = []
    stray_msgs: list[dict[str, Any]] = []
    resurrected_msgs: list[dict[str, Any]] = []
    per_node = {name: {"missing": 0, "stray": 0, "held": len(held.get(name, {}))} for name in truth.nodes}
    seen: set[str] = set()
    for m in acked:
        if m.hash in seen:
            continue
        seen.add(m.hash)
        if m.hash in deleted:
            counts["deleted"] += 1
            # An acknowledged delete is for good: no live node may hold the message again.
            still_on = sorted(n for n, hs in held.items() if n in live and m.hash in hs)
            if m.hash in surely_deleted and still_on:
                counts["resurrected"] += 1
                resurrected_msgs.append({"msg_id": m.msg_id, "hash": m.hash, "to": m.recipient, "held_by": still_on})
            continue
        if not honestly_vouched(m.vouched, m.invoke_t, m.ack_t, hostile):
            counts["unvouched"] += 1
            continue
        start = m.invoke_t if m.invoke_t is not None else m.ack_t
        if start is not None and now_ms > start + m.ttl_ms - expiry_margin_ms:
            counts["expired"] += 1
            continue
        if m.pubkey is None or not swarm_ids:
            counts["no_recipient"] += 1
            continue
        try:
            sid = swarm_for(m.pubkey, swarm_ids)
        except SwarmError:
            counts["no_recipient"] += 1
            continue
        counts["checked"] += 1
        members = {n for n, s in swarms.items() if s == sid}
        required = sorted(members & live)
        missing_on = [n for n in required if n in held and m.hash not in held[n]]
        unjudged = [n for n in required if n not in held]
        stray_on = sorted(n for n, hs in held.items() if n not in members and m.hash in hs)
        stray_live = [n for n in stray_on if n in live]
        since = max(x for x in (m.ack_t, swarms_changed_ms, start, 0) if x is not None)
        late = bool(stray_live) and now_ms - since > grace_ms
        for n in missing_on:
            per_node[n]["missing"] += 1
        for n in stray_on:
            per_node.setdefault(n, {"missing": 0, "stray": 0, "held": 0})["stray"] += 1
        counts["unjudged_missing"] += bool(unjudged)
        record = {"msg_id": m.msg_id, "hash": m.hash, "to": m.recipient, "swarm_id": sid,
                  "members": sorted(members), "missing_on": missing_on, "stray_on": stray_on,
                  "unreadable": unjudged}
        if missing_on:
            counts["missing"] += 1
            missing_msgs.append(record)
        if stray_on:
            counts["stray"] += 1
            counts["stray_after_grace"] += late
            stray_msgs.append({**record, "after_grace": late, "stray_on_live": stray_live})

    if counts["missing"] or counts["stray_after_grace"] or counts["resurrected"]:
        valid: bool | str = False
    elif counts["checked"] == 0 or counts["unjudged_missing"]:
        valid = "unknown"  # nothing to judge, or a required member's database could not be read
    else:
        valid = True
    return {
        "checker": "replication", "valid": valid, "now_ms": now_ms, "grace_ms": grace_ms,
        "counts": counts, "missing": capped(missing_msgs), "stray": capped(stray_msgs),
        "resurrected": capped(resurrected_msgs),
        "per_node": per_node, "unreadable_nodes": unreadable,
        "live": sorted(live), "swarms": {n: s for n, s in sorted(swarms.items())},
    }
