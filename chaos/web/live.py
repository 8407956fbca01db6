"""One live network, watched: what its page and ``/metrics`` show, every
:data:`POLL_S`.

Each round reads, along the paths ``swarmnet status`` uses: ``run.json``
(when it changed), each recorded process's state by pid and start time and
its CPU (psutil), every live node's and the registry's ``info``, and the new
lines of ``faults.jsonl``, ``history.jsonl`` and ``adversary.jsonl``.  From
them a :class:`Watcher` keeps a snapshot (nodes by swarm and their state,
faults on, links faulted), a running series (stores and receives per
second, store latency, delivery latency) and an event feed (faults started
and healed, nodes killed, paused, restarted, added or removed, swarm
changes, the adversary's attempts, actions taken from the page), and hands
each round to its subscribers.

A node's state as shown: ``killed``, ``paused``, ``down`` (stopped or
exited), ``starting``, else ``partitioned`` (inside a partition fault that is
on), ``skewed`` (its clock offset is not 0) or ``up``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import psutil
import trio

from testnet import rundir
from testnet.base.rpc import RpcError, call_once
from testnet.procs import proc_state

from . import harness
from .runs import js_int
from .traffic import Traffic

log = logging.getLogger("chaos.web.live")

POLL_S = 0.5
INFO_TIMEOUT_S = 0.4
INFO_AT_ONCE = 64  # info calls in flight in one round
WINDOW_MS = 2000  # node store rates are over the last 2 s
SERIES_LEN = 600  # points kept (5 min)
EVENTS_LEN = 500
IDLE_S = 60.0  # a watcher nobody asked for this long stops


class Tail:
    """New complete lines of a growing file (a replaced or shorter file is read again from the start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.ino = None

    def read(self) -> list[dict[str, Any]]:
        from testnet.base.jsonl import parse_lines

        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.ino or st.st_size < self.offset:
                    self.ino, self.offset = st.st_ino, 0
                f.seek(self.offset)
                data = f.read(8 << 20)  # a huge backlog is read over several rounds
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return parse_lines(data[:end].splitlines())


def _short(targets: dict[str, Any]) -> str:
    parts = []
    for k, v in targets.items():
        if k == "by":
            continue
        if isinstance(v, list):
            v = ",".join(map(str, v[:8])) + ("…" if len(v) > 8 else "")
        parts.append(f"{k}={v}")
    return " ".join(parts)


def link_faults(spans: list[Any]) -> list[dict[str, Any]]:
    """The link and partition faults on, as the page's link matrix reads them: between ``side_a``
    and ``side_b`` (``one_way``: a to b only), every link of ``nodes``, the ``links`` named, or all."""
    out = []
    for s in spans:
        fam = harness.family_of(s.kind)
        if fam not in ("link", "partition"):
            continue
        t = s.targets
        f: dict[str, Any] = {"fault": s.fault, "kind": s.kind, "family": fam}
        if isinstance(t.get("side_a"), list) and isinstance(t.get("side_b"), list):
            f.update(side_a=t["side_a"], side_b=t["side_b"], one_way=bool(t.get("one_way")))
        elif t.get("all_links"):
            f["all"] = True
        elif isinstance(t.get("links"), list):
            f["links"] = [list(p) for p in t["links"] if isinstance(p, (list, tuple)) and len(p) == 2]
        elif isinstance(t.get("nodes"), list):
            f["nodes"] = t["nodes"]
        else:
            continue
        out.append(f)
    return out


def _partitioned(faults: list[dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for f in faults:
        if f["family"] == "partition":
            out.update(f.get("side_a", ()), f.get("side_b", ()), f.get("nodes", ()))
    return out


class Watcher:
    """The watched state of the run in ``run_dir``; :meth:`run` polls it until idle."""

    def __init__(self, run_dir: Path, key: str, *, clock: Callable[[], float] = time.time) -> None:
        self.run_dir = Path(run_dir)
        self.key = key
        self._clock = clock
        self.run: dict[str, Any] | None = None
        self._run_stamp: Any = None
        self.error: str | None = None
        self.seq = 0
        self.snapshot: dict[str, Any] = {}
        self.series: deque[dict[str, Any]] = deque(maxlen=SERIES_LEN)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_LEN)
        self._event_seq = 0
        self._published = 0  # the last event id handed to subscribers (actions add events between rounds)
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._wake = trio.Event()
        self.ready = trio.Event()  # set after the first round
        self.last_used = trio.current_time()
        self._procs: dict[tuple[int, Any], psutil.Process] = {}
        self._tails = {name: Tail(self.run_dir / name) for name in ("faults.jsonl", "history.jsonl", "adversary.jsonl")}
        self.fault_records: list[dict[str, Any]] = []
        self.traffic = Traffic()
        self.adversary_attempts = 0
        self._prev: dict[str, dict[str, Any]] = {}
        self._prev_height: int | None = None
        self._stores_seen: dict[str, deque[tuple[float, int]]] = {}  # per node: (time, stores) over the window
        self.node_info: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ subscribers

    def subscribe(self) -> tuple[trio.MemorySendChannel[dict[str, Any]], trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A channel of every round from now on (the first item is the whole state); give its
        send end back to :meth:`unsubscribe` when done."""
        send, recv = trio.open_memory_channel[dict[str, Any]](8)
        send.send_nowait(self.full())
        self._subscribers.add(send)
        self.touch()
        return send, recv

    def unsubscribe(self, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        self._subscribers.discard(send)
        send.close()
        self.touch()

    def touch(self) -> None:
        self.last_used = trio.current_time()

    def wake(self) -> None:
        """Poll now (after an action), not at the next tick."""
        self._wake.set()

    def full(self) -> dict[str, Any]:
        return {"type": "full", "seq": self.seq, "snapshot": self.snapshot, "series": list(self.series),
                "events": list(self.events)[-150:]}

    def _publish(self, msg: dict[str, Any]) -> None:
        for s in list(self._subscribers):
            try:
                s.send_nowait(msg)
            except trio.WouldBlock:  # a page that stopped reading gets the whole state when it catches up
                self._subscribers.discard(s)
                s.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(s)

    def add_event(self, kind: str, text: str, level: str = "info", t: int | None = None) -> dict[str, Any]:
        self._event_seq += 1
        ev = {"id": self._event_seq, "t": t if t is not None else int(self._clock() * 1000), "kind": kind,
              "text": text, "level": level}
        self.events.append(ev)
        return ev

    # ------------------------------------------------------------------ the loop

    async def run_until_idle(self) -> None:
        """Poll every :data:`POLL_S` until nobody has asked for this run for :data:`IDLE_S`."""
        while self._subscribers or trio.current_time() - self.last_used < IDLE_S:
            await self.poll()
            with trio.move_on_after(POLL_S):
                await self._wake.wait()
            self._wake = trio.Event()
        for s in list(self._subscribers):
            s.close()

    async def poll(self) -> None:
        """One round: read everything, derive the snapshot, publish it."""
        try:
            await self._poll()
            self.error = None
        except Exception as exc:  # a watcher is a view: what broke is shown, and the next round tries again
            why = str(exc) if isinstance(exc, rundir.RunDirError) else f"watching failed: {type(exc).__name__}: {exc}"
            if not isinstance(exc, rundir.RunDirError):
                log.exception("watching %s", self.run_dir)
            if self.error != why:
                self.add_event("run", why, "error")
            self.error = why
            self.snapshot = {**self.snapshot, "error": self.error}
        self.seq += 1
        new = [e for e in self.events if e["id"] > self._published]
        self._published = self._event_seq
        self._publish({"type": "tick", "seq": self.seq, "snapshot": self.snapshot,
                       "point": self.series[-1] if self.series else None, "events": new})
        self.ready.set()

    def _load_run(self) -> dict[str, Any]:
        path = self.run_dir / rundir.RUN_JSON
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if self.run is None or stamp != self._run_stamp:
            self.run = rundir.load_run(self.run_dir)
            self._run_stamp = stamp
        return self.run

    async def _poll(self) -> None:
        run = self._load_run()
        if not self.events:
            self.add_event("run", f"watching run {run.get('run_id')} ({run.get('state')}, "
                                  f"{len(run.get('nodes') or [])} nodes)")
        now = self._clock()
        nodes = run.get("nodes") or []
        process = {n["name"]: (proc_state(n["pid"], n.get("create_time")) if n.get("pid") else "dead") for n in nodes}
        infos: dict[str, dict[str, Any]] = {}
        registry: dict[str, Any] = {}
        sem = trio.Semaphore(INFO_AT_ONCE)

        async def info(host: str, port: int, into: dict[str, Any]) -> None:
            async with sem:
                resp = None
                try:
                    resp = await call_once(host, port, "info", {}, timeout=INFO_TIMEOUT_S)
                except* (RpcError, OSError, trio.BrokenResourceError):
                    pass  # a node killed, paused or gone since its state was read: no answer this round
                if resp is not None and resp.ok and isinstance(resp.body, dict):
                    into.update(resp.body)

        async with trio.open_nursery() as nursery:
            for n in nodes:
                if process[n["name"]] == "alive" and n.get("port"):
                    infos[n["name"]] = {}
                    nursery.start_soon(info, n["host"], n["port"], infos[n["name"]])
            reg = run.get("registry") or {}
            if reg.get("pid") and proc_state(reg["pid"], reg.get("create_time")) == "alive":
                nursery.start_soon(info, reg["host"], reg["port"], registry)
        for name, body in infos.items():
            if body:
                self.node_info[name] = body
        self._read_faults()
        self.traffic.read(self._tails["history.jsonl"].read())
        self._read_adversary()
        spans = [s for s in harness.fault_spans(self.fault_records) if s.start_ms is not None
                 and s.end_ms is None and s.status == "not healed"]
        faults_on = link_faults(spans)
        partitioned = _partitioned(faults_on)
        rows = []
        stores_rate = 0.0
        for n in nodes:
            name = n["name"]
            body = infos.get(name) or {}
            proc = process[name]
            state = n.get("state")
            if state == "killed" or (state == "running" and proc == "dead"):
                shown = "killed"
            elif state == "paused" or proc == "paused":
                shown = "paused"
            elif state in ("stopped", "exited", "removed"):
                shown = "down"
            elif state == "starting":
                shown = "starting"
            elif name in partitioned:
                shown = "partitioned"
            elif body.get("clock_offset_ms"):
                shown = "skewed"
            else:
                shown = "up"
            stats = body.get("stats") if isinstance(body.get("stats"), dict) else {}
            stores = stats.get("stores")
            rate = None
            if isinstance(stores, int):
                seen = self._stores_seen.setdefault(name, deque())
                if seen and stores < seen[-1][1]:
                    seen.clear()  # restarted: its count starts again at 0
                seen.append((now, stores))
                while len(seen) > 1 and seen[0][0] < now - WINDOW_MS / 1000:
                    seen.popleft()
                if len(seen) > 1:
                    rate = (stores - seen[0][1]) / (now - seen[0][0])
                    stores_rate += rate
            conns = body.get("connections") if isinstance(body.get("connections"), dict) else {}
            swarm = body.get("swarm_id", n.get("swarm_id")) if body else n.get("swarm_id")
            rows.append({
                "name": name, "state": shown, "recorded_state": state, "process": proc, "pid": n.get("pid"),
                "address": f"{n.get('host')}:{n.get('port')}",
                "swarm": None if swarm is None else f"{int(swarm):016x}",
                "messages": body.get("messages"), "connections": conns.get("open"),
                "clock_offset_ms": body.get("clock_offset_ms") or 0,
                "height": body.get("height"), "stores": stores, "stores_per_s": rate,
                "stats": {k: v for k, v in stats.items() if isinstance(v, int)},
                "cpu": self._cpu(n, proc), "cpu_s": self._cpu_s(n, proc),
                "skewed": bool(body.get("clock_offset_ms")), "partitioned": name in partitioned,
                "answered": bool(body),
            })
        self._diff(run, rows, registry)
        swarms: dict[str, list[str]] = {}
        for r in rows:
            if r["swarm"] is not None and r["state"] not in ("down",):
                swarms.setdefault(r["swarm"], []).append(r["name"])
        if not self.series:
            self.series.extend(self.traffic.backfill(now))
        self.series.append(self.traffic.point(now, stores_rate))
        ctl = run.get("controller") or {}
        ctl_alive = bool(ctl.get("pid")) and proc_state(ctl["pid"], ctl.get("create_time")) != "dead"
        self.snapshot = {
            "key": self.key, "run_id": run.get("run_id"), "state": run.get("state"), "seed": js_int(run.get("seed")),
            "links_mode": run.get("links_mode"), "started_ms": run.get("started_ms"), "t": int(now * 1000),
            "controller": "alive" if ctl_alive else "gone",
            "can_act": ctl_alive and run.get("state") == "ready",
            "registry": {"height": registry.get("height"), "nodes": registry.get("nodes"),
                         "swarms": registry.get("swarms")},
            "nodes": rows,
            "swarms": [{"id": sid, "position": int(sid, 16) / 2**64, "members": sorted(m)}
                       for sid, m in sorted(swarms.items())],
            "faults": [{"fault": s.fault, "kind": s.kind, "family": harness.family_of(s.kind),
                        "since_ms": s.start_ms, "targets": _short(s.targets),
                        "by": s.targets.get("by") or "schedule"} for s in spans],
            "link_faults": faults_on,
            "totals": {**self.traffic.totals, "adversary_attempts": self.adversary_attempts},
            "error": None,
        }

    # ------------------------------------------------------------------ cpu

    def _proc(self, n: dict[str, Any]) -> psutil.Process | None:
        key = (n.get("pid"), n.get("create_time"))
        p = self._procs.get(key)
        if p is None and n.get("pid"):
            try:
                p = self._procs[key] = psutil.Process(n["pid"])
                p.cpu_percent(None)  # the first call only starts the measure
            except psutil.Error:
                return None
        return p

    def _cpu(self, n: dict[str, Any], proc: str) -> float | None:
        if proc != "alive":
            return 0.0 if proc == "paused" else None
        p = self._proc(n)
        try:
            return round(p.cpu_percent(None), 1) if p else None
        except psutil.Error:
            return None

    def _cpu_s(self, n: dict[str, Any], proc: str) -> float | None:
        p = self._proc(n) if proc != "dead" else None
        try:
            t = p.cpu_times() if p else None
        except psutil.Error:
            return None
        return round(t.user + t.system, 3) if t else None

    # ------------------------------------------------------------------ files

    def _read_faults(self) -> None:
        for r in self._tails["faults.jsonl"].read():
            self.fault_records.append(r)
            fid, kind, phase = r.get("fault"), r.get("kind"), r.get("phase")
            targets = r.get("targets") if isinstance(r.get("targets"), dict) else {}
            by = " (control API)" if targets.get("by") == "control" else ""
            t = r.get("t") if isinstance(r.get("t"), int) else None
            if phase == "start":
                self.add_event("fault", f"fault {fid} {kind} started{by}: {_short(targets)}", "warn", t)
            elif phase == "end":
                what = "stopped" if harness.family_of(str(kind)) == "adversary" else "healed"
                self.add_event("fault", f"fault {fid} {kind} {what}{by}", "ok", t)
            elif phase in ("skipped", "error"):
                self.add_event("fault", f"fault {fid} {kind} {phase}: {r.get('error', '')}"[:300], "error", t)

    def _read_adversary(self) -> None:
        recs = [r for r in self._tails["adversary.jsonl"].read() if r.get("op") not in ("skipped", "error")]
        if not recs:
            return
        self.adversary_attempts += len(recs)
        by_attack: dict[str, int] = {}
        as_ruled = 0
        for r in recs:
            by_attack[str(r.get("attack"))] = by_attack.get(str(r.get("attack")), 0) + 1
            want = r.get("want")
            as_ruled += (want is None and not r.get("effect") and not r.get("exposed")) or r.get("status") == want
        kinds = ", ".join(f"{a} {n}" for a, n in sorted(by_attack.items()))
        level = "warn" if as_ruled == len(recs) else "error"
        self.add_event("adversary",
                       f"adversary: {len(recs)} attempt(s) ({kinds}); {as_ruled} answered as the rules say",
                       level)

    # ------------------------------------------------------------------ events from changes

    def _diff(self, run: dict[str, Any], rows: list[dict[str, Any]], registry: dict[str, Any]) -> None:
        cur = {r["name"]: r for r in rows}
        first = not self._prev
        if not first:
            changed: dict[tuple[str, str], list[str]] = {}  # (now, was) -> nodes: one line for a partition's
            for name, r in cur.items():
                p = self._prev.get(name)
                if p is None:
                    self.add_event("node", f"{name} joined the network", "ok")
                    continue
                if r["pid"] != p["pid"] and r["pid"] and p["pid"]:
                    self.add_event("node", f"{name} restarted (pid {p['pid']} -> {r['pid']})", "ok")
                elif r["state"] != p["state"]:
                    changed.setdefault((r["state"], p["state"]), []).append(name)
                if r["swarm"] != p["swarm"] and r["swarm"] is not None and p["swarm"] is not None:
                    self.add_event("swarm", f"{name} moved from swarm {p['swarm'][:6]}… to {r['swarm'][:6]}…",
                                   "warn")
            for (now_state, was), names in changed.items():
                verb = "is" if len(names) == 1 else "are"
                self.add_event("node", f"{', '.join(names)} {verb} {now_state} (was {was})",
                               "ok" if now_state == "up" else "warn")
            for name in set(self._prev) - set(cur):
                self.add_event("node", f"{name} left the network", "warn")
        height = registry.get("height")
        if isinstance(height, int):
            if self._prev_height is not None and height != self._prev_height:
                self.add_event("swarm", f"registry height {self._prev_height} -> {height} "
                                        f"({registry.get('nodes')} nodes, {registry.get('swarms')} swarms)")
            self._prev_height = height
        self._prev = cur
