"""A message's journey, rebuilt afterwards from the run directory alone.

Pure: a run directory in (run.json, the keys in the seed files, captures,
databases, node logs, history.jsonl, faults.jsonl), journey data out.  Nodes
carry no tracing ids: each node's capture is replayed with that node's own
key (:mod:`chaos.trace.captures`, on top of the unlinkability checker's replay) and
the hops are joined by the blobs that cross them, exactly as that checker
does; the databases say where the message is now; the history says what the
client was told; faults.jsonl says what was broken when.

    run = load_run(run_dir)                  # reads and replays everything once
    j = journey(run, "alice-7")              # a msg_id, a hash, or a unique hash prefix (>= 6 chars)
    js = all_journeys(run)                   # every message the history sent

Journey JSON (schema 1; times are int ms since the epoch, durations ms,
nodes and users by name; in a simulated run (``simulated``) the times are
virtual, from 2030-01-01, and a kill loses no capture bytes)::

    {"schema": 1, "run_id", "simulated": bool, "msg_id" | null, "hash", "from", "to", "namespace",
     "outcomes": ["delivered" | "lost" | "duplicated" | "corrupted" | "wrong_sender" | "recovered"
                  | "unknown" | "failed" | "fail-but-delivered" | "not in history"],
     "sent": {"invoke_t", "done": "ok"|"fail"|"info"|null, "done_t", "attempts", "latency_ms", "error",
              "path": [node], "target": node, "swarm": {node: status}} | null,
     "swarm": {"id", "members": [node], "source": "verdict" | "run.json"},
     "attempts": [{"n", "t", "end_t", "client", "op", "target", "status", "client_status",
                   "result", "in_history": bool, "direct": bool,
                   "hops": [{"node", "role": "guard"|"relay"|"target", "from", "next", "arrived_t",
                             "forwarded_t", "answer_t", "answer_status", "replied_t", "status", "error",
                             "spent_ms", "own_ms", "seen": "capture" | "no capture",
                             "names": [user], "links": bool | null}]}],
     "commits": [{"node", "t", "acked_t", "status", "swarm": {node: status}, "error", "committed_by_t",
                  "source": "capture" | "history"}],
     "copies": [{"node", "from", "via", "sent_t", "t", "status", "arrived": bool, "authenticated": bool | null}],
     "storage": [{"node", "row": bool, "row_id", "expiry", "deleted_t", "member": bool, "live", "error"}],
     "losses": [{"node", "t", "fault", "torn": bool}],
     "retrieves": [{"node", "user", "t", "replied_t", "path": [node], "first": bool, "foreign": bool}],
     "missed_retrieves": {node: {"since_t", "count", "more": n}},
     "receives": [{"user", "t", "error"}],
     "deletes": [{"id", "user", "t", "done", "done_t", "target", "answer": {node: status} | null,
                  "removed": [{"node", "t", "via", "by", "authenticated": bool | null, "status", "again"}]}],
     "faults": [{"fault", "kind", "family", "start_t", "end_t", "targets", "touches": [text]}],
     "findings": [{"kind", "node", "t", "text"}],
     "trail": {"ends_at": node | user | null, "t", "why"},
     "unknowns": [text],
     "events": [{"t", "end_t"?, "track": node | user | "fault <id>", "kind", "text", "attempt"?}]}

* ``attempts``: every onion request for this store that any capture saw, in
  time order (the client's retries take new paths).  Per hop, from that
  node's own capture: ``arrived_t``; ``forwarded_t``; ``answer_t`` /
  ``answer_status``, the next hop's reply as it came back; ``replied_t`` /
  ``status``, what this hop answered (relays pass the target's reply on
  unchanged; path errors 502/504 are in the clear, ``error``); ``own_ms`` =
  time spent minus time waiting for the next hop.  ``seen: "no capture"``: a
  hop the request was bound for that no capture shows (its layer was opened
  with that node's key).  ``status`` is the target's answer inside the
  encrypted reply (opened with its layer key), ``client_status`` what the
  guard answered the user, ``in_history`` marks the attempt the history's
  ``ok`` names (its 200 at the target the history names; the one on the
  path the history names if several).  ``names``: the users the layer this
  hop opened names (Session ID or key anywhere in it: a store's account is
  its recipient; no layer should name the sender); ``links``: this hop alone
  saw a sender end (the sender's address or ID) and a recipient end (the
  recipient's ID or address), the unlinkability checker's rule.
* ``commits``: each target's answer to a store, with its per-member results;
  ``committed_by_t`` bounds the commit (a node commits before it fans out);
  ``source: "history"`` when only the client's record shows the store.
* ``copies``: node-to-node copies; ``via`` is "fan-out" | "anti-entropy push"
  | "anti-entropy fetch" | "rehoming" | "replicate", inferred from who sent
  it and what that node did just before (a row never says how it came);
  ``arrived: false``: the sender's capture sent it, no receiver's shows it.
* ``copies[].authenticated``: for a copy a node received (or an ae_fetch it
  served), whether the caller had proved a node key on that connection;
  ``from`` names a caller no node key names by its address (``adversary``
  for the adversary nemesis' source, else ``stranger <host>``).
* ``storage``: every node's database at the end; ``row: null`` = unreadable;
  ``deleted_t`` = tombstone expiry - 14 days: the last delete that named it
  there, on the node's own (possibly skewed) clock.  ``missed_retrieves``:
  the recipient's retrieves at a node, after the node had the message and
  before anything removed it there, that did not return it.
* ``losses``: each power loss that took the message from a node that held it
  (committed there, and perhaps acknowledged, but not yet synced): the node's own
  record, written as it lost power (its log's ``power loss`` line lists what a
  restart on the files left would no longer hold); ``fault`` is the power-loss
  fault of faults.jsonl that hit it.
* ``retrieves[].foreign``: the retrieve was signed by another user than the
  recipient (its account's inbox), yet returned this message.
* ``deletes``: the history's deletes naming it (or one with ``id`` null when
  only the nodes show a removal); ``answer`` = the delete target's per-member
  results; ``removed``: per node, the first step that removed it there
  (``via`` "delete" | "replicate_delete" | "tombstone (node clock)"; ``by``
  the user, node, or unauthenticated caller; ``again`` = later steps that
  named it there).  A refused replicate_delete removes nothing and is left out.
* ``findings``: steps where the run broke a rule of the protocol, each with
  the node where it happened (see :func:`chaos.trace.trail.findings`).
* ``trail.ends_at``: the recipient (delivered), the node where the trail
  stops, the sender (no capture saw it), or null (held by several nodes, or
  deleted).

``events`` is the same journey as one flat timeline (what ``swarmnet trace``
prints and what the Trace Event Format writer draws).  What cannot be told
is said in ``unknowns``.
"""

from __future__ import annotations

from typing import Any, Mapping

from chaos.checkers.delivery import FAILURE_OUTCOMES, check_delivery
from testnet.base import crypto
from testnet.base.swarm import SwarmError, swarm_for

from chaos.trace.captures import Copy
from chaos.trace.run import Chain, FaultBand, Run, TraceError, find_message, load_faults, load_run
from chaos.trace.trail import faults_touching, findings, general_unknowns, trail

__all__ = ["SCHEMA", "TraceError", "Run", "FaultBand", "load_run", "load_faults", "find_message", "journey",
           "all_journeys", "timeline"]

SCHEMA = 1
MAX_TTL_MS = 14 * 24 * 3600 * 1000  # nodes.core.MAX_TTL_MS: a tombstone lives this long after its delete
FAN_OUT_WINDOW_MS = 15_000  # a store's own copies leave within the replication timeout (write-behind: +3 s)
AE_WINDOW_MS = 10_000  # a push that follows an ae_hashes round to the same peer is anti-entropy
OUTCOME_ORDER = (*FAILURE_OUTCOMES, "delivered", "recovered", "unknown", "failed")


# ---------------------------------------------------------------- one message


def _ms(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def _attempt(run: Run, chain: Chain, n: int) -> dict[str, Any]:
    """One onion request: each hop as its node's capture saw it, then the hops it never reached."""
    rp = run.replayed
    hops: list[dict[str, Any]] = []
    for i, o in enumerate(chain.hops):
        served = rp.served.get((o.node, o.received))
        called = rp.called.get((o.node, o.forwarded)) if o.forwarded else None
        role = "target" if o.kind == "request" else "guard" if i == 0 and o.client else "relay"
        prev = chain.hops[i - 1].node if i else (o.client or (served.peer if served else None))
        hop = {"node": o.node, "role": role, "from": prev, "arrived_t": o.t,
               "forwarded_t": called.t if called else None, "next": run.name(o.next_hop),
               "answer_t": called.reply_t if called else None, "answer_status": called.status if called else None,
               "replied_t": served.reply_t if served else None, "status": served.status if served else None,
               "error": (served.error if served else None) or (called.error if called else None),
               "seen": "capture", "names": sorted(o.ids), "links": None}
        hop["spent_ms"] = _ms(o.t, hop["replied_t"])
        inner = _ms(hop["forwarded_t"], hop["answer_t"])
        hop["own_ms"] = hop["spent_ms"] - inner if hop["spent_ms"] is not None and inner is not None else None
        if o.kind == "bad":
            hop["error"] = hop["error"] or "layer does not open"
        hops.append(hop)
    opened = chain.opened
    for k, name in enumerate(opened.unreached if opened else ()):
        last = k == len(opened.unreached) - 1
        hops.append({"node": name, "role": "target" if last else "relay", "from": hops[-1]["node"],
                     "arrived_t": None, "forwarded_t": None, "next": None, "answer_t": None, "answer_status": None,
                     "replied_t": None, "status": None, "error": None, "spent_ms": None, "own_ms": None,
                     "seen": "no capture", "names": [], "links": None})
    first, last = hops[0], hops[-1]
    target = last["node"] if last["role"] == "target" else None
    status = opened.status if opened and chain.complete else None
    if chain.complete and status is not None:
        result = f"{opened.op} answered {status}" + (f" ({opened.body['error']})" if opened.body.get("error") else "")
        if chain.direct:
            result += f" (sent straight to {target} by {first['from'] or '?'}, no onion path)"
    elif chain.complete:
        result = f"{target} got the {opened.op if opened else 'request'} but its answer is not in its capture"
    else:
        seen = [h for h in hops if h["seen"] == "capture"]
        end = seen[-1]
        nxt = end["next"] or "the next hop"
        if end["answer_status"] is not None:
            # An answer came back: the next hop had it; its capture lost it (a kill before the flush).
            result = (f"{end['node']} forwarded it to {nxt} and got an answer ({end['answer_status']}), but "
                      f"{nxt}'s capture has no record of it")
        elif end["forwarded_t"] is not None:
            result = f"{end['node']} forwarded it to {nxt}, which never received it"
        else:
            result = f"{end['node']}'s capture shows no forward to {nxt}"
        if end["status"] is not None:
            result += f"; {end['node']} answered {end['status']}" + (f" ({end['error']})" if end["error"] else "")
    ends = [t for h in hops for t in (h["replied_t"], h["answer_t"], h["arrived_t"]) if t is not None]
    return {"n": n, "t": first["arrived_t"], "end_t": max(ends, default=None),
            "client": chain.hops[0].client, "op": opened.op if opened else None, "target": target,
            "status": status, "client_status": first["status"], "result": result, "in_history": False,
            "direct": chain.direct, "hops": hops}


def _copies(run: Run, h: str, commits: list[dict[str, Any]], members: set[str]) -> list[dict[str, Any]]:
    """Each node-to-node copy of ``h``: the sender's and the receiver's records joined, labelled by what
    most likely sent it (a row never says)."""
    events = run.replayed.copies.get(h, [])
    sent = sorted((c for c in events if c.side == "sent"), key=lambda c: c.t)
    received = sorted((c for c in events if c.side == "received"), key=lambda c: c.t)
    commit_at = {c["node"]: c["t"] for c in commits if c["t"] is not None}
    fanned: set[tuple[str | None, str | None]] = set()

    def via(op: str, sender: str | None, receiver: str | None, t: int) -> str:
        if op == "ae_fetch":
            return "anti-entropy fetch"
        if sender in commit_at and 0 <= t - commit_at[sender] <= FAN_OUT_WINDOW_MS and (sender, receiver) not in fanned:
            fanned.add((sender, receiver))  # only a store's first copy to each peer is its fan-out
            return "fan-out"
        if any(peer == receiver and 0 <= t - at <= AE_WINDOW_MS for at, peer in run.replayed.ae_rounds.get(sender or "", ())):
            return "anti-entropy push"
        if members and sender not in members and receiver in members:
            return "rehoming"
        return "replicate"

    # Pair each receiver's record with the sender's (in time order; an ae_fetch is recorded by both at its reply).
    pairs: list[tuple[Any, Any]] = []
    used: set[int] = set()
    for r in received:
        s = next((s for s in sent if id(s) not in used and s.op == r.op and s.node == r.peer and s.peer == r.node
                  and (s.t <= r.t + 1 if r.op == "replicate" else abs(s.t - r.t) <= 5_000)), None)
        if s is not None:
            used.add(id(s))
        pairs.append((s, r))
    # An ae_fetch served is a copy only when no receiver recorded it because the caller was no node.
    pairs += [(s, None) for s in sent if id(s) not in used and (s.op != "ae_fetch" or s.authenticated is False)]
    pairs.sort(key=lambda p: (p[0] or p[1]).t)
    out = []
    for s, r in pairs:
        sender, receiver = (caller_name(r), r.node) if r is not None else (s.node, caller_name(s))
        # Who made the call: the receiver of a copy pushed to it, the server of an ae_fetch it was asked for.
        auth = (s.authenticated if s is not None else None) if (s or r).op == "ae_fetch" else \
            (r.authenticated if r is not None else None)
        out.append({"node": receiver, "from": sender, "via": via((s or r).op, sender, receiver, (s or r).t),
                    "sent_t": s.t if s else None, "t": r.t if r else None,
                    "status": (r or s).status, "arrived": r is not None, "authenticated": auth})
    return out


def caller_name(c: Copy) -> str | None:
    """The node (or adversary) a capture names for ``c``'s other end, else a caller that never proved a key
    by its address."""
    if c.peer is not None:
        return c.peer
    return f"stranger {c.remote}" if c.authenticated is False and c.remote else None


def _filtered_history(run: Run, msg_id: str | None, h: str) -> list[dict[str, Any]]:
    """The message's send records and every receive of its hash or id, in history order."""
    ix = run.index
    recs = (ix.sends.get(msg_id, []) if msg_id is not None else []) + ix.receives.get(h, []) + \
        (ix.receives.get(msg_id, []) if msg_id is not None else [])
    return sorted({id(r): r for r in recs}.values(), key=lambda r: r.get("t") or 0)


def _outcomes(run: Run, records: list[dict[str, Any]], msg_id: str | None) -> list[str]:
    if msg_id is None:
        return ["not in history"]
    v = check_delivery(records, run.users)
    return [k for k in OUTCOME_ORDER if msg_id in (v.get(k) or ())]


def _sent(run: Run, records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The send's invoke record and a summary of what the client was told (None when not in the history)."""
    invoke = next((r for r in records if r.get("op") == "send" and r.get("type") == "invoke"), None)
    done = [r for r in records if r.get("op") == "send" and r.get("type") in ("ok", "fail", "info")]
    final = next((r for r in done if r.get("type") == "ok"), done[-1] if done else None)
    if not (invoke or final):
        return None, None
    f = final or {}
    return invoke, {"invoke_t": (invoke or {}).get("t"), "done": f.get("type"), "done_t": f.get("t"),
                    "attempts": f.get("attempts"), "latency_ms": f.get("latency_ms"), "error": f.get("error"),
                    "path": [run.name(e) for e in f.get("path") or ()], "target": run.name(f.get("target")),
                    "swarm": {run.name(k): v for k, v in (f.get("swarm") or {}).items()}}


def _swarm(run: Run, session_id: str | None) -> tuple[int | None, list[str]]:
    """The recipient's swarm among the swarms the checkers judged by (or run.json's)."""
    if not session_id or not run.swarms:
        return None, []
    try:
        swarm_id = swarm_for(session_id, sorted(set(run.swarms.values())))
    except (SwarmError, ValueError, crypto.CryptoError):
        return None, []
    return swarm_id, sorted(n for n, s in run.swarms.items() if s == swarm_id)


def _commits(run: Run, attempts: list[dict[str, Any]], chains: list[Chain], sent: Mapping[str, Any] | None,
             unknowns: list[str]) -> list[dict[str, Any]]:
    """Each target's answer to a store, opened with its layer key; the history's ack if no capture shows it."""
    commits = []
    for a, c in zip(attempts, chains):
        if a["target"] and a["status"] is not None:
            tgt = a["hops"][-1]
            commits.append({"node": a["target"], "t": tgt["arrived_t"], "acked_t": tgt["replied_t"],
                            "status": a["status"], "error": c.opened.body.get("error"),
                            "swarm": {run.name(k): v for k, v in (c.opened.body.get("swarm") or {}).items()},
                            "committed_by_t": None, "source": "capture"})
    if sent and sent["done"] == "ok" and sent["target"] and not any(
            c["node"] == sent["target"] and c["status"] == 200 for c in commits):
        commits.append({"node": sent["target"], "t": sent["done_t"], "acked_t": sent["done_t"], "status": 200,
                        "error": None, "swarm": dict(sent["swarm"]), "committed_by_t": None, "source": "history"})
        why = "could not be read" if sent["target"] in run.replayed.missing else \
            "has no record of it (lost at a kill, before the capture was flushed)"
        unknowns.append(f"the client was told {sent['target']} stored it, but {sent['target']}'s capture {why}: "
                        f"the store's times are the client's")
    return commits


def _storage(run: Run, h: str, members: list[str]) -> list[dict[str, Any]]:
    """Every node's database now: a row, or a tombstone (deleted_t on the node's clock)."""
    out = []
    for name in sorted(run.nodes):
        row = run.rows.get(name, {}).get(h)
        until = run.tombstones.get(name, {}).get(h)
        unreadable = name in run.db_errors
        out.append({"node": name, "row": None if unreadable else row is not None, "row_id": row[0] if row else None,
                    "expiry": row[1] if row else None, "deleted_t": until - MAX_TTL_MS if until else None,
                    "member": name in members, "live": None if run.live is None else name in run.live,
                    "error": run.db_errors.get(name)})
    return out


LOSS_MATCH_MS = 10_000  # a node's power-loss record and its fault's start: the call's time apart


def _losses(run: Run, h: str) -> list[dict[str, Any]]:
    """Each power loss that took ``h`` from a node, from the node's own record of what it lost."""
    out = []
    for node, events in sorted(run.logs.items()):
        for e in events:
            if e.get("event") != "power loss" or h[:16] not in (e.get("lost_hashes") or ()):
                continue
            bands = [b for b in run.faults if b.kind == "power-loss" and node in b.targets.get("nodes", ())
                     and abs(b.start_t - e["t"]) <= LOSS_MATCH_MS]
            band = min(bands, key=lambda b: abs(b.start_t - e["t"]), default=None)
            out.append({"node": node, "t": e["t"], "fault": band.fault if band else None,
                        "torn": bool(e.get("torn"))})
    return sorted(out, key=lambda x: x["t"])


def _retrieves(run: Run, h: str, recipient: str | None) -> list[dict[str, Any]]:
    """Every retrieve whose answer (opened with its target's layer key) included ``h``."""
    out = []
    for c in sorted(run.returned.get(h, []), key=lambda c: c.hops[-1].t):
        tgt = c.hops[-1]
        served = run.replayed.served.get((tgt.node, tgt.received))
        user = run.user_by_session.get(c.opened.account or "")
        out.append({"node": tgt.node, "user": user, "t": tgt.t,
                    "replied_t": served.reply_t if served else None, "path": [o.node for o in c.hops[:-1]],
                    "first": False, "foreign": bool(recipient and user and user != recipient)})
    mine = [r for r in out if r["user"] == recipient]
    if mine:
        mine[0]["first"] = True
    return out


def _missed(run: Run, h: str, recipient: str, commits: list[dict[str, Any]], copies: list[dict[str, Any]],
            deletes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per node that had ``h``: the recipient's retrieves there afterwards, before anything removed it
    there, that did not return it."""
    since: dict[str, int] = {}
    for node, t in [(c["node"], c["t"]) for c in commits] + [(x["node"], x["t"]) for x in copies if x["arrived"]]:
        if t is not None:
            since[node] = min(since.get(node, t), t)
    gone: dict[str, int] = {}
    for x in (x for d in deletes[:1] for x in d["removed"] if x["t"] is not None):
        gone[x["node"]] = min(gone.get(x["node"], x["t"]), x["t"])
    missed: dict[str, dict[str, Any]] = {}
    for c in run.retrieves_by_account.get(recipient, []):
        tgt = c.hops[-1]
        if tgt.node in since and since[tgt.node] <= tgt.t < gone.get(tgt.node, tgt.t + 1) and \
                h not in (c.opened.body.get("hashes") or ()):
            m = missed.setdefault(tgt.node, {"since_t": since[tgt.node], "count": 0, "more": 0})
            m["count"] += 1
            m["more"] += bool(c.opened.body.get("more"))
    return missed


def journey(run: Run, key: str) -> dict[str, Any]:
    """The journey of one message (a msg_id, a hash, or a unique hash prefix): see the module docstring."""
    msg_id, h = find_message(run, key)
    records = _filtered_history(run, msg_id, h)
    invoke, sent = _sent(run, records)
    chains = [c for c in run.by_hash.get(h, []) if c.opened and c.opened.op == "store"]
    sender = (invoke or {}).get("from") or next((c.hops[0].client for c in chains if c.hops[0].client), None)
    account = next((c.opened.account for c in chains + run.returned.get(h, []) if c.opened.account), None)
    recipient = (invoke or {}).get("to") or run.user_by_session.get(account or "")
    swarm_id, members = _swarm(run, run.users.get(recipient or "") or account)
    unknowns: list[str] = []

    attempts = [_attempt(run, c, i + 1) for i, c in enumerate(chains)]
    told = [a for a in attempts if sent and sent["done"] == "ok" and a["target"] == sent["target"]
            and a["status"] == 200]
    on_path = [a for a in told if sent["path"] and a["hops"][0]["node"] == sent["path"][0]]
    if on_path or told:
        (on_path or told)[-1]["in_history"] = True
    for a in attempts:
        for hop in a["hops"]:
            if hop["seen"] == "capture":
                sender_end = hop["from"] == sender or sender in hop["names"]
                recipient_end = recipient in hop["names"] or hop["from"] == recipient
                hop["links"] = bool(sender and recipient and sender != recipient and sender_end and recipient_end)
        if a["client"] is None and not a["direct"]:
            unknowns.append(f"attempt {a['n']}: the hop before {a['hops'][0]['node']} is in no capture")
    if sent and isinstance(sent.get("attempts"), int) and sent["attempts"] > len(attempts) and \
            len(run.replayed.missing) < len(run.nodes):
        unknowns.append(f"the client made {sent['attempts']} attempt(s), the captures show {len(attempts)}: the "
                        f"rest never reached a guard (refused connection, cut user link) or were lost with a "
                        f"killed node's unflushed capture")
    if sent and sent["done"] in ("fail", "info", None) and not attempts:
        unknowns.append("no capture saw any attempt of this send; the history's error is all there is")

    commits = _commits(run, attempts, chains, sent, unknowns)
    ok_commits = [c for c in commits if c["status"] == 200]
    copies = _copies(run, h, ok_commits, set(members))
    for c in ok_commits:
        # A node commits before it fans out (nodes/client_ops.py ClientOps.store); an answer naming its peers bounds it too.
        own = [x["sent_t"] for x in copies if x["from"] == c["node"] and x["via"] == "fan-out" and x["sent_t"]]
        c["committed_by_t"] = min(own + ([c["acked_t"]] if c["acked_t"] and len(c["swarm"]) > 1 else []),
                                  default=None)
        if len(c["swarm"]) == 1 and len(members) > 1:
            unknowns.append(f"{c['node']} acknowledged with only its own result ({len(members)} members): "
                            f"when, or whether, it committed cannot be told from its capture")

    storage = _storage(run, h, members)
    losses = _losses(run, h)
    retrieves = _retrieves(run, h, recipient)
    receives = [{"user": r.get("process"), "t": r.get("t"), "error": r.get("error")}
                for r in records if r.get("op") == "receive"]
    deletes = _deletes(run, h, storage)
    missed = _missed(run, h, recipient, ok_commits, copies, deletes) \
        if recipient and not any(r["user"] == recipient for r in receives) else {}
    faults = faults_touching(run, sent, attempts, copies, commits, storage, retrieves, deletes, recipient, losses)
    j = {"schema": SCHEMA, "run_id": run.run.get("run_id"), "simulated": run.simulated, "msg_id": msg_id,
         "hash": h, "from": sender, "to": recipient, "namespace": (invoke or {}).get("namespace"),
         "outcomes": _outcomes(run, records, msg_id), "sent": sent,
         "swarm": {"id": swarm_id, "members": members, "source": run.swarms_source},
         "attempts": attempts, "commits": commits, "copies": copies, "storage": storage, "losses": losses,
         "retrieves": retrieves, "missed_retrieves": missed, "receives": receives, "deletes": deletes,
         "faults": faults, "unknowns": unknowns}
    j["findings"] = findings(run, j)
    j["trail"] = trail(run, j)
    general_unknowns(run, j)
    j["events"] = timeline(run, j)
    return j


def _deletes(run: Run, h: str, storage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deletes naming ``h``: the history's, the delete requests the captures opened, and where it went."""
    out: dict[str, dict[str, Any]] = {}
    for r in (r for did in run.index.deletes_naming.get(h, ()) for r in run.index.deletes[did]):
        d = out.get(r.get("id"))
        if r.get("type") == "invoke" and h in (r.get("hashes") or ()):
            d = out[r["id"]] = {"id": r["id"], "user": r.get("process"), "t": r.get("t"), "done": None,
                                "done_t": None, "target": None, "answer": None, "removed": []}
        elif d is not None and r.get("type") in ("ok", "fail", "info"):
            d.update(done=r["type"], done_t=r.get("t"), target=run.name(r.get("target")))
    steps = []
    for c in run.by_hash.get(h, []):
        if c.opened and c.opened.op == "delete" and c.complete and h in (c.opened.body.get("deleted") or ()):
            tgt = c.hops[-1]
            answer = {run.name(k): v for k, v in (c.opened.body.get("swarm") or {}).items()}
            steps.append({"node": tgt.node, "t": tgt.t, "via": "delete",
                          "by": run.user_by_session.get(c.opened.account or ""), "authenticated": None,
                          "status": c.opened.status, "again": 0, "answer": answer})
    for x in run.replayed.deletes.get(h, []):
        if x.side == "received" and x.status in (200, None):  # a refused one removed nothing
            steps.append({"node": x.node, "t": x.t, "via": "replicate_delete", "by": caller_name(x),
                          "authenticated": x.authenticated, "status": x.status, "again": 0})
    steps.sort(key=lambda r: r["t"] or 0)
    removed: dict[str, dict[str, Any]] = {}
    for x in steps:  # the first step at each node removed it; later ones found it gone (or it had come back)
        if x["node"] in removed:
            removed[x["node"]]["again"] += 1
        else:
            removed[x["node"]] = x
    for st in storage:
        if st["deleted_t"] and st["node"] not in removed:
            removed[st["node"]] = {"node": st["node"], "t": st["deleted_t"], "via": "tombstone (node clock)",
                                   "by": None, "authenticated": None, "status": None, "again": 0}
    gone = sorted(removed.values(), key=lambda r: r["t"] or 0)
    for d in out.values():
        # The user's delete reached its target as an onion 'delete': its answer lists what each member did.
        mine = next((x for x in gone if x["via"] == "delete" and x["by"] == d["user"]
                     and (d["target"] is None or x["node"] == d["target"])), None)
        d["answer"] = mine["answer"] if mine else None
    if gone and not out:
        out["?"] = {"id": None, "user": None, "t": gone[0]["t"], "done": None, "done_t": None, "target": None,
                    "answer": None, "removed": []}
    for x in gone:
        x.pop("answer", None)
    for d in out.values():
        d["removed"] = gone
    return list(out.values())


def timeline(run: Run, j: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The journey as one flat, time-ordered list of events (track = node, user or fault)."""
    ev: list[dict[str, Any]] = []

    def add(t: int | None, track: str | None, kind: str, text: str, end_t: int | None = None, **more: Any) -> None:
        if t is None or not track:
            return
        e = {"t": t, "track": track, "kind": kind, "text": text, **more}
        if end_t is not None and end_t >= t:
            e["end_t"] = end_t
        ev.append(e)

    for f in j["faults"]:  # first: at a tie, a fault's start comes before what it did
        add(f["start_t"], f"fault {f['fault']}", "fault", FaultBand(f["fault"], f["kind"], f["family"], f["start_t"],
                                                                    f["end_t"], f["targets"]).describe(),
            f["end_t"] if f["end_t"] is not None else run.end_t)
    s = j["sent"]
    sender = j["from"]
    if s:
        add(s["invoke_t"], sender, "send", f"send {j['msg_id']} to {j['to']}: {s['done'] or 'no completion'}"
            + (f" after {s['attempts']} attempt(s)" if s.get("attempts") else "")
            + (f" ({s['error']})" if s.get("error") else ""), s["done_t"])
    for a in j["attempts"]:
        route = " -> ".join(h["node"] + ("?" if h["seen"] != "capture" else "") for h in a["hops"])
        add(a["t"], a["client"] or sender, "attempt", f"attempt {a['n']}: {route}: {a['result']}", a["end_t"],
            attempt=a["n"])
        for h in a["hops"]:
            if h["seen"] != "capture":
                continue
            txt = f"attempt {a['n']} {h['role']}"
            if h["role"] != "target" and h["next"]:
                txt += f" -> {h['next']}"
            if h["status"] is not None:
                txt += f": answered {h['status']}" + (f" ({h['error']})" if h["error"] else "")
            elif h["error"]:
                txt += f": {h['error']}"
            add(h["arrived_t"], h["node"], "hop", txt, h["replied_t"], attempt=a["n"])
    for c in j["commits"]:
        sw = " ".join(f"{n}:{st}" for n, st in sorted(c["swarm"].items(), key=lambda kv: str(kv[0])))
        add(c["t"], c["node"], "commit", f"store answered {c['status']}" + (f" [{sw}]" if sw else ""), c["acked_t"])
    for x in j["copies"]:
        if x["arrived"]:
            add(x["t"], x["node"], "copy", f"copy from {x['from']} ({x['via']}): {x['status']}"
                + (" (caller never proved a node key)" if x["authenticated"] is False else ""))
        else:
            add(x["sent_t"], x["from"], "copy", f"copy to {x['node']} ({x['via']}) "
                + ("served, to a caller that never proved a node key" if x["authenticated"] is False
                   else "sent, never arrived") + f": {x['status']}")
    for x in j.get("losses", ()):
        add(x["t"], x["node"], "lost", "lost its copy at a power loss" + (f" (fault {x['fault']})" if x["fault"] else "")
            + ": committed, never synced" + (" (torn)" if x["torn"] else ""))
    for r in j["retrieves"]:
        add(r["t"], r["node"], "retrieve", f"retrieve by {r['user']} returned it" + (" (first)" if r["first"] else "")
            + (f" (not {j['to']}'s inbox)" if r["foreign"] else ""), r["replied_t"])
    for r in j["receives"]:
        add(r["t"], r["user"], "receive", "received" + (f" ({r['error']})" if r["error"] else ""))
    for d in j["deletes"]:
        answer = " ".join(f"{n}:{st}" for n, st in sorted((d["answer"] or {}).items(), key=lambda kv: str(kv[0])))
        add(d["t"], d["user"], "delete", f"delete {d['id']}" + (f" at {d['target']}" if d["target"] else "")
            + f": {d['done']}" + (f" [{answer}]" if answer else ""), d["done_t"])
    for x in (j["deletes"][0]["removed"] if j["deletes"] else ()):
        who = f" from {x['by']}" if x["by"] and x["via"] == "replicate_delete" else ""
        add(x["t"], x["node"], "removed", f"removed ({x['via']}{who})"
            + (" (caller never proved a node key)" if x["authenticated"] is False else "")
            + (f"; named again {x['again']} time(s)" if x["again"] else ""))
    ev.sort(key=lambda e: e["t"])  # stable: steps of one millisecond (virtual time) stay in causal order
    return ev


def all_journeys(run: Run) -> list[dict[str, Any]]:
    """The journey of every message the history sent, in send order."""
    return [journey(run, m) for m in run.index.sends]
