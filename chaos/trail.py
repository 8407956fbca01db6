"""What a message's journey means: which faults touched which of its steps,
where its trail ends, and what the run directory cannot tell.  Pure: the
facts gathered by :mod:`chaos.journey` in, judgements out.
"""

from __future__ import annotations

from typing import Any, Mapping

from .trace_run import FaultBand, Run

__all__ = ["faults_touching", "trail", "general_unknowns"]

MISSED_WINDOW_MS = 6_000  # when a member should have had its copy: write-behind 3 s + replication timeout 2 s


def _holders(j: Mapping[str, Any]) -> dict[str, int]:
    """Node -> when it first had the message (a 200 store, or a copy that arrived)."""
    got: dict[str, int] = {}
    for c in j["commits"]:
        if c["status"] == 200 and c["t"] is not None:
            got[c["node"]] = min(got.get(c["node"], c["t"]), c["t"])
    for x in j["copies"]:
        if x["arrived"] and x["t"] is not None and x["status"] in (200, None):
            got[x["node"]] = min(got.get(x["node"], x["t"]), x["t"])
    return got


def faults_touching(run: Run, sent: Mapping[str, Any] | None, attempts: list[dict[str, Any]], copies: list[dict[str, Any]],
            commits: list[dict[str, Any]], storage: list[dict[str, Any]], retrieves: list[dict[str, Any]],
            deletes: list[dict[str, Any]], recipient: str | None) -> list[dict[str, Any]]:
    """Faults active during the journey, each with the steps of this message it touched."""
    times = [t for a in attempts for t in (a["t"], a["end_t"]) if t] + [x["t"] or x["sent_t"] for x in copies] + \
        [r["t"] for r in retrieves] + [d["t"] for d in deletes if d["t"]] + \
        [(sent or {}).get("invoke_t"), (sent or {}).get("done_t")]
    times = [t for t in times if isinstance(t, int)]
    if not times:
        return []
    # A message stored but never delivered may yet be lost by a later fault: watch it to the end of the run.
    pending = any(c["status"] == 200 for c in commits) and not any(r["user"] == recipient for r in retrieves)
    t0, t1 = min(times), (max(run.end_t, max(times)) if pending else max(times))
    users = set(run.users)
    j = {"commits": commits, "copies": copies}
    holders = _holders(j)
    rows = {s["node"] for s in storage if s["row"] or s["deleted_t"]}
    out = []
    for band in run.faults:
        if not band.active(t0, t1):
            continue
        touches: list[str] = []
        for a in attempts:
            for hop in a["hops"]:
                n, at = hop["node"], hop["arrived_t"]
                if at is not None:
                    if band.touches_node(n) and band.active(at, hop["replied_t"] or at):
                        touches.append(f"attempt {a['n']}: {hop['role']} {n}")
                    prev = hop["from"]
                    if prev and band.active(at) and band.touches_link(prev, n, src_is_user=prev in users):
                        touches.append(f"attempt {a['n']}: link {prev}->{n}")
                elif hop["from"]:
                    prev = next((x for x in a["hops"] if x["node"] == hop["from"]), None)
                    when = prev and (prev["forwarded_t"] or prev["arrived_t"])
                    if when and band.active(when) and band.touches_link(hop["from"], n):
                        touches.append(f"attempt {a['n']}: link {hop['from']}->{n} (never arrived)")
                    if when and band.active(when) and band.touches_node(n):
                        touches.append(f"attempt {a['n']}: {n} (never received it)")
        for c in commits:
            for m, st in c["swarm"].items():
                if st != 200 and m and c["t"] and band.active(c["t"], c["acked_t"]) and \
                        (band.touches_node(m) or band.touches_link(c["node"], m)):
                    touches.append(f"fan-out {c['node']}->{m}: {st}")
        for x in copies:
            a, b = x["sent_t"] or x["t"], x["t"] or x["sent_t"]
            # A link is the connection's direction: an anti-entropy fetch is the receiver calling the sender.
            src, dst = (x["node"], x["from"]) if x["via"] == "anti-entropy fetch" else (x["from"], x["node"])
            if x["from"] and x["node"] and band.active(a, b) and \
                    (band.touches_link(src, dst) or band.touches_node(x["node"])):
                touches.append(f"copy {x['from']}->{x['node']}" + ("" if x["arrived"] else " (never arrived)"))
        for node, got in sorted(holders.items()):
            if node not in rows and band is _first_loss(run, node, got):
                touches.append(f"{node} held a copy and has no row now")
        fan_out = min((c["t"] for c in commits if c["status"] == 200 and c["t"]), default=None)
        for s in storage:
            if s["member"] and not s["row"] and not s["deleted_t"] and s["node"] not in holders and fan_out and \
                    band.touches_node(s["node"]) and band.active(fan_out, fan_out + MISSED_WINDOW_MS):
                touches.append(f"{s['node']}: swarm member that never got it")
        out.append({"fault": band.fault, "kind": band.kind, "family": band.family, "start_t": band.start_t,
                    "end_t": band.end_t, "targets": band.targets, "touches": list(dict.fromkeys(touches))})
    return out


def _first_loss(run: Run, node: str, got: int) -> FaultBand | None:
    """The first process fault on ``node`` active at or after ``got``: what could have taken its copy."""
    return next((b for b in run.faults if b.family == "process" and b.touches_node(node)
                 and (b.end_t is None or b.end_t >= got)), None)


def _fmt_dt(t: int | None, t0: int | None) -> str:
    if t is None or t0 is None:
        return "?"
    return f"{(t - t0) / 1000:+.3f}s"


def trail(run: Run, j: Mapping[str, Any]) -> dict[str, Any]:
    """Where the message's trail ends, and why, from the facts gathered."""
    t0 = (j["sent"] or {}).get("invoke_t") or (j["attempts"][0]["t"] if j["attempts"] else None)
    to = j["to"]
    got = [r for r in j["receives"] if r["user"] == to]
    if got:
        first = min(got, key=lambda r: r["t"] or 0)
        ret = next((r for r in j["retrieves"] if r["first"]), None)
        why = f"received by {to} at {_fmt_dt(first['t'], t0)}" + \
            (f" (returned by {ret['node']} at {_fmt_dt(ret['t'], t0)})" if ret else "")
        if len(got) > 1:
            why += f"; received {len(got)} times"
        done = [d for d in j["deletes"] if d["done"] == "ok"]
        if done:
            why += f"; then deleted by {done[0]['user']} ({done[0]['id']}) at {_fmt_dt(done[0]['t'], t0)}"
        return {"ends_at": to, "t": first["t"], "why": why}
    ok = [c for c in j["commits"] if c["status"] == 200]
    if not j["attempts"] and not ok:
        err = (j["sent"] or {}).get("error")
        return {"ends_at": j["from"], "t": (j["sent"] or {}).get("done_t"),
                "why": "no node's capture saw any attempt" + (f"; the client reported: {err}" if err else "")}
    if not ok:
        a = j["attempts"][-1]
        seen = [h for h in a["hops"] if h["seen"] == "capture"]
        return {"ends_at": seen[-1]["node"] if seen else None, "t": a["end_t"],
                "why": f"no attempt stored it; last attempt ({a['n']}): {a['result']}"}
    holders = _holders(j)
    rows = [s["node"] for s in j["storage"] if s["row"]]
    if rows:
        missed = j["missed_retrieves"]
        detail = "; ".join(f"{n}: {m['count']} retrieve(s) by {to} since {_fmt_dt(m['since_t'], t0)}, none returned it"
                           for n, m in sorted(missed.items()) if n in rows) or f"no retrieve by {to} reached them"
        return {"ends_at": rows[0] if len(rows) == 1 else None, "t": None,
                "why": f"held by {', '.join(rows)} at the end, never received by {to}: {detail}"}
    gone = [s for s in j["storage"] if s["deleted_t"]]
    if gone:
        who = next((d["user"] for d in j["deletes"] if d["user"]), None)
        return {"ends_at": None, "t": min(s["deleted_t"] for s in gone),
                "why": f"deleted{' by ' + who if who else ''}: tombstones on {', '.join(s['node'] for s in gone)}"}
    last_node, last_t = max(holders.items(), key=lambda kv: kv[1]) if holders else (ok[0]["node"], ok[0]["t"])
    lost = [x for x in j["copies"] if not x["arrived"]]
    parts = [f"held by {', '.join(f'{n} (from {_fmt_dt(t, t0)})' for n, t in sorted(holders.items(), key=lambda kv: kv[1]))}"]
    only_self = [c for c in ok if len(c["swarm"]) <= 1]
    if only_self:
        parts.append(f"{only_self[0]['node']} acknowledged before any other member had it "
                     f"(its answer listed only itself)")
    if not j["copies"]:
        parts.append("no copy ever left a node")
    elif lost:
        parts.append("copies sent but never arrived: " + ", ".join(f"{x['from']}->{x['node']}" for x in lost))
    unreadable = [s["node"] for s in j["storage"] if s["row"] is None and s["member"]]
    parts.append(f"no readable database has a row or a tombstone for it (unreadable: {', '.join(unreadable)})"
                 if unreadable else "no node has a row or a tombstone for it now")
    cause = [f for f in j["faults"] if any("has no row now" in t for t in f["touches"])]
    if cause:
        f = cause[0]
        parts.append(f"fault {f['fault']} {f['kind']} hit {', '.join(f['targets'].get('nodes') or [])} at "
                     f"{_fmt_dt(f['start_t'], t0)}")
    return {"ends_at": last_node, "t": last_t, "why": "; ".join(parts)}


def general_unknowns(run: Run, j: dict[str, Any]) -> None:
    u = j["unknowns"]
    involved = {h["node"] for a in j["attempts"] for h in a["hops"]} | {c["node"] for c in j["commits"]} | \
        {x["node"] for x in j["copies"] if x["node"]} | set(j["swarm"]["members"])
    for what, errors in (("capture", run.replayed.missing), ("database", run.db_errors)):
        if run.nodes and set(errors) >= set(run.nodes):
            u.append(f"no node's {what} could be read (is nodes/ pruned? e.g. {min(errors)}: {errors[min(errors)]})")
            continue
        for n in sorted(involved & set(errors)):
            u.append(f"{n}'s {what} could not be read ({errors[n]})"
                     + (": what passed through it is unseen" if what == "capture" else ""))
    if j["copies"]:
        u.append("a row does not say how it arrived (a store, fan-out, anti-entropy and rehoming all land as "
                 "rows); each copy's 'via' is inferred from who sent it and what that node did just before")
    if any(s["row"] for s in j["storage"]):
        u.append("rows carry no store time: a target committed between its arrival and its first fan-out copy "
                 "(committed_by_t); a copy's time is when the receiver's capture read it")
    killed = sorted({n for f in j["faults"] if f["kind"] == "kill" for n in f["targets"].get("nodes") or ()} & involved)
    if killed:
        u.append(f"{', '.join(killed)} killed -9 during the journey: a capture loses its last ~200 ms "
                 f"(unflushed) at a kill")
