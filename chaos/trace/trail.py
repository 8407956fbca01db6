"""What a message's journey means: which faults touched which of its steps,
which steps broke a rule of the protocol (findings), where its trail ends,
and what the run directory cannot tell.  Pure: the facts gathered by
:mod:`chaos.trace.journey` in, judgements out.
"""

from __future__ import annotations

from typing import Any, Mapping

from clients.client import PATH_HOPS

from chaos.trace.run import FaultBand, Run

__all__ = ["faults_touching", "findings", "trail", "general_unknowns"]

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
            deletes: list[dict[str, Any]], recipient: str | None,
            losses: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Faults active during the journey, each with the steps of this message it touched."""
    times = [t for a in attempts for t in (a["t"], a["end_t"]) if t] + [x["t"] or x["sent_t"] for x in copies] + \
        [r["t"] for r in retrieves] + [d["t"] for d in deletes if d["t"]] + \
        [(sent or {}).get("invoke_t"), (sent or {}).get("done_t")]
    times = [t for t in times if isinstance(t, int)] + [x["t"] for x in losses]
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
        for x in losses:
            if x["fault"] == band.fault:
                touches.append(f"{x['node']} lost its copy: committed, not synced")
        for node, got in sorted(holders.items()):
            if node not in rows and band is _first_loss(run, node, got):
                touches.append(f"{node} held a copy and has no row now")
        if band.family == "adversary":
            # The attacker is no node: what it did shows as callers that never proved a node key.
            for x in (deletes[0]["removed"] if deletes else ()):
                if x["authenticated"] is False and x["t"] is not None and band.active(x["t"]):
                    touches.append(f"{x['node']}: removed by a replicate_delete from {x['by'] or 'a stranger'}")
            for x in copies:
                when = x["t"] or x["sent_t"]
                if x["authenticated"] is False and when is not None and band.active(when):
                    touches.append(f"copy {x['from']}->{x['node']} ({x['via']}) for a caller that never proved "
                                   f"a node key")
        fan_out = min((c["t"] for c in commits if c["status"] == 200 and c["t"]), default=None)
        for s in storage:
            if s["member"] and not s["row"] and not s["deleted_t"] and s["node"] not in holders and fan_out and \
                    band.touches_node(s["node"]) and band.active(fan_out, fan_out + MISSED_WINDOW_MS):
                touches.append(f"{s['node']}: swarm member that never got it")
        out.append({"fault": band.fault, "kind": band.kind, "family": band.family, "start_t": band.start_t,
                    "end_t": band.end_t, "targets": band.targets, "touches": list(dict.fromkeys(touches))})
    return out


def _names(nodes: list[str]) -> str:
    return ", ".join(dict.fromkeys(nodes))


def findings(run: Run, j: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Steps of this journey that broke a rule of the protocol, each at the node where it happened.

    Kinds: ``short-path`` (a client's request reached its target through
    fewer than PATH_HOPS relays), ``names-sender`` (an onion layer names the
    sender), ``linked`` (one hop alone saw both ends), ``acked-alone`` (a
    target acknowledged a store with only its own result), ``no-copies`` (no
    copy ever left the node(s) that stored it), ``foreign-retrieve`` (another
    user's retrieve returned it), ``delete-alone`` (a delete's target removed
    it and told no other member), ``resurrected`` (rows after an ok delete),
    ``stranger-delete`` / ``stranger-copy`` / ``stranger-fetch`` (a node op by a
    caller that never proved a node key removed, stored or fetched it).
    """
    out: list[dict[str, Any]] = []

    def add(kind: str, node: str | None, t: int | None, text: str) -> None:
        out.append({"kind": kind, "node": node, "t": t, "text": text})

    sender, to, members = j["from"], j["to"], j["swarm"]["members"]
    told_path = (j["sent"] or {}).get("path") or []
    for a in j["attempts"]:
        seen = [h for h in a["hops"] if h["seen"] == "capture"]
        first = a["hops"][0]
        if a["target"] and not a["direct"] and first["seen"] == "capture" and first["from"] in run.users \
                and len(a["hops"]) - 1 < PATH_HOPS:
            relays = len(a["hops"]) - 1
            add("short-path", a["target"], first["arrived_t"],
                f"attempt {a['n']} went from {first['from']} to its target {a['target']} through {relays} relay(s), "
                f"not {PATH_HOPS}" + (f" (the client's record names path {' '.join(told_path)})"
                                      if a["in_history"] and told_path else ""))
        naming = [h for h in seen if sender and sender != to and sender in h["names"]]
        if naming:
            add("names-sender", naming[0]["node"], naming[0]["arrived_t"],
                f"attempt {a['n']}: the layer(s) opened at {_names([h['node'] for h in naming])} name the sender "
                f"{sender}")
        for h in (h for h in seen if h["links"]):
            s_end = ([f"{sender}'s address"] if h["from"] == sender else []) + \
                ([f"{sender}'s ID"] if sender in h["names"] else [])
            r_end = ([f"{to}'s ID"] if to in h["names"] else []) + ([f"{to}'s address"] if h["from"] == to else [])
            add("linked", h["node"], h["arrived_t"], f"attempt {a['n']}: {h['node']} ({h['role']}) alone saw "
                                                     f"{' and '.join(s_end)} and {' and '.join(r_end)}")

    ok = [c for c in j["commits"] if c["status"] == 200]
    for c in ok:
        if len(members) > 1 and set(c["swarm"]) <= {c["node"]}:
            add("acked-alone", c["node"], c["acked_t"],
                f"{c['node']} acknowledged the store with only its own result ({len(members)} members)")
    stored = [c for c in ok if c["source"] == "capture"]
    # A target whose answer names its peers' failures (timeouts, refused links) explains why nothing left it.
    explained = all(len(c["swarm"]) > 1 and all(st != 200 for m, st in c["swarm"].items() if m != c["node"])
                    for c in stored)
    if stored and len(members) > 1 and not j["copies"] and not explained:
        holders = {c["node"] for c in stored}
        lacking = [x["node"] for x in j["storage"] if x["member"] and x["row"] is False and not x["deleted_t"]
                   and x["node"] not in holders]
        add("no-copies", stored[0]["node"], stored[0]["t"],
            f"no copy of it ever left {_names([c['node'] for c in stored])}: no capture shows a replicate or "
            f"ae_fetch naming it"
            + (f"; members without it at the end: {' '.join(lacking)}" if lacking else ""))

    foreign: dict[str, list[dict[str, Any]]] = {}
    for r in j["retrieves"]:
        if r["foreign"]:
            foreign.setdefault(r["user"], []).append(r)
    for user, rs in foreign.items():
        add("foreign-retrieve", rs[0]["node"], rs[0]["t"],
            f"{rs[0]['node']} returned it to {user}'s retrieve ({user}'s inbox; the message is {to}'s)"
            + (f"; {len(rs)} such retrieves, at {_names([r['node'] for r in rs])}" if len(rs) > 1 else ""))

    gone = j["deletes"][0]["removed"] if j["deletes"] else []
    for d in j["deletes"]:
        if d["done"] != "ok" or not d["answer"] or len(members) <= 1:
            continue
        node = d["target"] or next(iter(d["answer"]))
        told = [x["node"] for x in gone if x["via"] == "replicate_delete" and x["by"] == node]
        if set(d["answer"]) <= {node} and not told:
            add("delete-alone", node, d["t"],
                f"{node} answered {d['user']}'s delete {d['id']} with only its own result and sent no "
                f"replicate_delete: it was removed at {node} only")
        rows = [x["node"] for x in j["storage"] if x["row"]]
        if rows:
            back = [x for x in j["copies"] if x["arrived"] and x["t"] is not None and
                    any(g["node"] == x["node"] and g["t"] is not None and x["t"] > g["t"] for g in gone)]
            add("resurrected", rows[0], d["done_t"],
                f"after {d['user']}'s delete {d['id']} (ok) rows remain on {' '.join(rows)}"
                + (f"; {back[0]['node']} got it back from {back[0]['from']} ({back[0]['via']})" if back else ""))
    strangers = [x for x in gone if x["via"] == "replicate_delete" and x["authenticated"] is False]
    if strangers:
        asked = [d for d in j["deletes"] if d["id"] is not None]
        add("stranger-delete", strangers[0]["node"], strangers[0]["t"],
            f"replicate_delete from {_names([x['by'] or 'a stranger' for x in strangers])}, a caller that never "
            f"proved a node key, removed it at {_names([x['node'] for x in strangers])}"
            + ("" if asked else "; no user's delete named it"))
    for x in j["copies"]:
        if x["authenticated"] is False and x["status"] == 200:
            if x["arrived"]:
                add("stranger-copy", x["node"], x["t"], f"{x['node']} took a copy from {x['from']} ({x['via']}), a "
                                                        f"caller that never proved a node key")
            else:
                add("stranger-fetch", x["from"], x["sent_t"], f"{x['from']} handed it to {x['node']} ({x['via']}), "
                                                               f"a caller that never proved a node key")
    out.sort(key=lambda f: f["t"] if f["t"] is not None else 0)
    return out


def _first_loss(run: Run, node: str, got: int) -> FaultBand | None:
    """The first process fault (or power loss) on ``node`` active at or after ``got``: what could have
    taken its copy."""
    return next((b for b in run.faults if (b.family == "process" or b.kind == "power-loss") and b.touches_node(node)
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
        why += "".join(f"; {f['text']}" for f in j["findings"]
                       if f["kind"] in ("delete-alone", "resurrected", "foreign-retrieve", "stranger-delete"))
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
        why = f"held by {', '.join(rows)} at the end, never received by {to}: {detail}"
        why += "".join(f"; {f['text']}" for f in j["findings"] if f["kind"] in ("acked-alone", "no-copies"))
        return {"ends_at": rows[0] if len(rows) == 1 else None, "t": None, "why": why}
    gone = [s for s in j["storage"] if s["deleted_t"]]
    if gone:
        who = next((d["user"] for d in j["deletes"] if d["user"]), None)
        removed = [x for d in j["deletes"][:1] for x in d["removed"] if x["t"] is not None]
        why = f"deleted{' by ' + who if who else ''}: tombstones on {', '.join(s['node'] for s in gone)}"
        why += "".join(f"; {f['text']}" for f in j["findings"] if f["kind"] == "stranger-delete")
        return {"ends_at": None, "t": min((x["t"] for x in removed), default=min(s["deleted_t"] for s in gone)),
                "why": why}
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
    parts += [f["text"] for f in j["findings"] if f["kind"] == "stranger-delete"]
    unreadable = [s["node"] for s in j["storage"] if s["row"] is None and s["member"]]
    parts.append(f"no readable database has a row or a tombstone for it (unreadable: {', '.join(unreadable)})"
                 if unreadable else "no node has a row or a tombstone for it now")
    lost_at = j.get("losses") or []
    if lost_at:
        parts.append(f"lost at a power loss, committed but never synced, on {_names([x['node'] for x in lost_at])}")
    cause = [f for f in j["faults"] if any("has no row now" in t or "not synced" in t for t in f["touches"])]
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
    if killed and not run.simulated:
        u.append(f"{', '.join(killed)} killed -9 during the journey: a capture loses its last ~200 ms "
                 f"(unflushed) at a kill")
