"""The authority checker: nothing was deleted, read, listed, altered or planted
by someone without the right to — the account's signature for client ops, a
registered service node of the account's swarm for node ops.

It reads what the adversary and byzantine nemeses (``chaos/adversary``) recorded of each
attempt in ``adversary.jsonl`` (what it sent, what the node answered) and,
as ground truth, the nodes' databases: a message the adversary tried to plant
must be held by no node, whatever the node answered.  It never talks to the
network.  Record format and verdict shape: CHECKERS.md.

Rules, per attempt (``expect``):

* ``refuse`` — the op must not be done: a 200 is a violation (*accepted*);
  any other status, or no answer, is a refusal;
* ``withhold`` — the op may succeed but must return nothing of the accounts
  the caller may not hold (a registered node's ``ae_fetch`` for another
  swarm's hashes): anything returned is a violation (*leaked*);
* ``rehoming`` — the protocol lets it through (a registered node that was a
  member of the account's swarm in a remembered assignment may push copies,
  PROTOCOL.md): reported, never a violation;
* ``serve`` — a connection flood: the flooded node must keep answering
  others (a failed probe is a finding; delivery judges the damage);
* ``lie`` — what a hostile member says it did in its own work (``acts``:
  answers it lied in, copies it dropped, requests it misrelayed): counted
  under ``lies``, never a violation (delivery and replication judge the damage).

A run without an adversary is skipped (valid, with a note); a run whose
adversary got no answer at all is unknown.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from testnet.base.jsonl import read_jsonl

from .delivery import capped
from .replication import ReplicationError, load_ground_truth, read_node_hashes

__all__ = ["ADVERSARY_FILE", "EXPECTS", "summarize_attempts", "adversary_scheduled", "check_authority"]

ADVERSARY_FILE = "adversary.jsonl"
EXPECTS = ("refuse", "withhold", "rehoming", "serve", "lie")
OK = 200


def _status(r: Mapping[str, Any]) -> int | None:
    s = r.get("status")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _count(r: Mapping[str, Any], key: str) -> int:
    v = r.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _brief(r: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("t", "fault", "attack", "op", "variant", "node", "as", "victim", "want", "status", "exposed", "effect")
    return {k: r[k] for k in keys if k in r}


def summarize_attempts(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Judge adversary records by the rules above (pure; no ground truth).

    Returns ``{"counts", "attacks", "floods", "accepted", "leaked", "rehomed",
    "planted_hashes", "errors"}``: ``attacks`` is attack -> op -> {attempts,
    statuses {status or "none": n}, as_wanted, accepted, leaked}; lists hold
    brief records (uncapped here; the checker caps them).
    """
    counts = Counter({k: 0 for k in ("attempts", "answered", "unanswered", "refused", "wanted", "as_wanted", "accepted",
                                     "leaked", "exposed", "rehomed", "skipped", "errors")})
    attacks: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    floods = Counter({k: 0 for k in ("waves", "connections", "opened", "closed_by_node", "probes",
                                     "probes_failed")})
    flood_statuses: Counter = Counter()
    lies: Counter = Counter()
    accepted: list[dict[str, Any]] = []
    leaked: list[dict[str, Any]] = []
    rehomed: list[dict[str, Any]] = []
    planted: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for r in records:
        if not isinstance(r, Mapping):
            continue
        expect, op, attack = r.get("expect"), str(r.get("op", "?")), str(r.get("attack", "?"))
        if op == "error":
            counts["errors"] += 1
            errors.append(f"{attack}: {str(r.get('error', ''))[:200]}")
            continue
        if op == "skipped" or expect not in EXPECTS:
            counts["skipped"] += 1
            continue
        if expect == "lie":
            acts = r.get("acts")
            if isinstance(acts, Mapping):
                lies.update({str(k): _count(acts, k) for k in acts})
            lies["armed_again"] += r.get("event") == "armed again after a restart"
            continue
        if expect == "serve":
            floods["waves"] += 1
            for k in ("connections", "opened", "closed_by_node"):
                floods[k] += _count(r, k)
            if "probe_status" in r:
                floods["probes"] += 1
                floods["probes_failed"] += r.get("probe_status") != OK
            if isinstance(r.get("statuses"), Mapping):
                flood_statuses.update({str(k): _count(r["statuses"], k) for k in r["statuses"]})
            continue
        status = _status(r)
        entry = attacks[attack].setdefault(op, {"attempts": 0, "statuses": {}, "as_wanted": 0, "accepted": 0,
                                                "leaked": 0})
        entry["attempts"] += 1
        key = "none" if status is None else str(status)
        entry["statuses"][key] = entry["statuses"].get(key, 0) + 1
        counts["attempts"] += 1
        counts["answered" if status is not None else "unanswered"] += 1
        exposed = _count(r, "exposed")
        counts["exposed"] += exposed
        if r.get("want") is not None:
            counts["wanted"] += 1
            if status == r["want"]:
                entry["as_wanted"] += 1
                counts["as_wanted"] += 1
        if expect == "refuse":
            if status == OK:
                entry["accepted"] += 1
                counts["accepted"] += 1
                accepted.append(_brief(r))
            else:
                counts["refused"] += 1
        elif expect == "withhold" and exposed:
            entry["leaked"] += 1
            counts["leaked"] += 1
            leaked.append(_brief(r))
        elif expect == "rehoming" and status == OK:
            counts["rehomed"] += 1
            rehomed.append(_brief(r))
        if expect != "rehoming":
            for h in r.get("planted") or ():
                if isinstance(h, str):
                    planted.setdefault(h, {"hash": h, "attack": attack, "op": op, "victim": r.get("victim"),
                                           "status": status})
    return {"counts": dict(counts), "attacks": {a: dict(sorted(ops.items())) for a, ops in sorted(attacks.items())},
            "floods": {**floods, "statuses": dict(flood_statuses)}, "lies": dict(lies), "accepted": accepted,
            "leaked": leaked, "rehomed": rehomed,
            "planted_hashes": planted, "errors": errors}


def adversary_scheduled(run_dir: Path) -> bool:
    """Whether the run's schedule (schedule.json) holds an adversary or byzantine fault (both record
    their attempts in adversary.jsonl)."""
    try:
        schedule = json.loads((run_dir / "schedule.json").read_text(encoding="utf-8"))
        return any(isinstance(f, dict) and ({"adversary", "byzantine"} & {f.get("family"), f.get("kind")})
                   for f in schedule.get("faults") or ())
    except (OSError, ValueError, AttributeError):
        return False


def check_authority(run_dir: str | Path, *, records: Sequence[Mapping[str, Any]] | None = None,
                    held: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """Judge ``run_dir``'s adversary records (``records`` overrides adversary.jsonl) and whether
    any node holds a message the adversary tried to plant (``held``: node -> hashes, overrides
    reading the nodes' databases).  Returns the verdict described in CHECKERS.md."""
    run_dir = Path(run_dir)
    if records is None:
        path = run_dir / ADVERSARY_FILE
        records = read_jsonl(path) if path.is_file() else None
    if records is None:
        if adversary_scheduled(run_dir):
            return {"checker": "authority", "valid": "unknown", "counts": {},
                    "note": f"the schedule has an adversary but it left no {ADVERSARY_FILE}"}
        return {"checker": "authority", "valid": True, "skipped": True, "counts": {},
                "note": "no adversary in this run: nothing to judge"}
    s = summarize_attempts(records)
    counts = s["counts"]

    # Ground truth: a planted message must be on no node, whatever the node answered.
    unreadable: dict[str, str] = {}
    planted_on: list[dict[str, Any]] = []
    if s["planted_hashes"]:
        if held is None:
            truth = load_ground_truth(run_dir)
            held = {}
            for name in truth.nodes:
                try:
                    held[name] = read_node_hashes(truth.node_file(name, "db", "db.sqlite")).keys()
                except ReplicationError as exc:
                    unreadable[name] = str(exc)
        holders: dict[str, list[str]] = defaultdict(list)
        for node, hashes in held.items():
            for h in set(hashes) & set(s["planted_hashes"]):
                holders[h].append(node)
        planted_on = [{**s["planted_hashes"][h], "held_by": sorted(nodes)} for h, nodes in sorted(holders.items())]
    counts["planted_tried"] = len(s["planted_hashes"])
    counts["planted"] = len(planted_on)

    if counts["accepted"] or counts["leaked"] or counts["planted"]:
        valid: bool | str = False
    elif counts["answered"] == 0 and s["floods"]["waves"] == 0:
        valid = "unknown"  # an adversary that nobody answered tested nothing
    else:
        valid = True
    return {"checker": "authority", "valid": valid, "counts": counts, "attacks": s["attacks"],
            "floods": s["floods"], "lies": s["lies"], "accepted": capped(s["accepted"]),
            "leaked": capped(s["leaked"]),
            "planted": capped(planted_on), "rehomed": capped(s["rehomed"]), "errors": capped(s["errors"]),
            "unreadable_nodes": unreadable}
