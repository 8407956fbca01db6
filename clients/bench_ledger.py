"""Where the CPU of an onion store goes: the breakdown ``swarmnet bench
throughput`` prints for its full-load window.

Measured over the window, summed over every process of the network, per
successful store:

* CPU by **role** — each node samples its own CPU time (SIGPROF on CPU time,
  :mod:`testnet.base.cpuprofile`) and charges every sample to the role of the
  task that was running (:data:`testnet.base.meter.ROLE`): guard, relay,
  target, replica, replication-out, storage, transport (reading and framing),
  loop (trio's scheduler and epoll), anti-entropy, …; the registry and the
  clients as whole processes (psutil).  ``unsampled`` is the node CPU the
  samples did not cover (the tail after each process's last sample).
* **counts** — frames in/out, socket reads/writes made, file read/write
  syscalls (``/proc/PID/io`` syscr/syscw: SQLite, logs, captures — socket
  calls do not go through them), context switches, event-loop wake-ups, tasks started,
  SQLite transactions, log lines, capture bytes (the node processes'
  :data:`testnet.base.meter.COUNTS` and psutil).
"""

from __future__ import annotations

import collections
import signal
from pathlib import Path
from typing import Any

import psutil
import trio

from testnet.base.rpc import RpcError

COUNTED = ("frames_in", "frames_out", "recv_calls", "send_calls", "loop_wakeups", "tasks_started",
           "sqlite_transactions", "log_lines", "capture_bytes")


def _proc_counts(pids: list[int]) -> dict[str, float]:
    out: collections.Counter[str] = collections.Counter()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                io = p.io_counters()
                ctx = p.num_ctx_switches()
        except psutil.Error:
            continue
        out["cpu_s"] += t.user + t.system
        out["read_syscalls"] += io.read_count
        out["write_syscalls"] += io.write_count
        out["voluntary_switches"] += ctx.voluntary
        out["involuntary_switches"] += ctx.involuntary
    return dict(out)


async def _node_meters(net: Any) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for name, rt in net.nodes.items():
        if rt.child is None:
            continue
        try:
            info = await net.call(name, "info", {}, timeout=5)
        except RpcError:
            continue
        out.update(info.get("process_meter", {}))
        out.update({f"stats.{k}": v for k, v in info.get("stats", {}).items() if isinstance(v, int)})
    return dict(out)


def read_roles(profile_dir: Path, names: list[str]) -> dict[str, float]:
    """CPU seconds per role, summed over the nodes' collapsed-stack files."""
    roles: collections.Counter[str] = collections.Counter()
    for name in names:
        path = profile_dir / f"{name}.collapsed"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            stack, _, weight = line.rpartition(" ")
            if not stack:
                continue
            first = stack.split(";", 1)[0]
            role = first[5:] if first.startswith("role:") else "unknown"
            roles[role] += int(weight) / 1e6
    return dict(roles)


class Window:
    """Open before the measured load, close after it; then :meth:`per_store`."""

    def __init__(self, net: Any, profile_dir: Path) -> None:
        self.net = net
        self.profile_dir = profile_dir
        self.node_names = [n for n, rt in net.nodes.items() if rt.child is not None]
        self.node_pids = [net.nodes[n].child.pid for n in self.node_names]
        self.registry_pids = [net.registry.pid] if net.registry else []
        self.toxiproxy_pids = [c.pid for c in net.toxiproxies]

    def _signal_nodes(self, sig: int) -> None:
        for n in self.node_names:
            child = self.net.nodes[n].child
            if child is not None:
                child.send_signal(sig)

    async def open(self) -> None:
        self.meters0 = await _node_meters(self.net)
        self.procs0 = {k: _proc_counts(p) for k, p in self._groups().items()}
        self._signal_nodes(signal.SIGUSR1)  # start each node's sampler

    async def close(self) -> None:
        self.procs1 = {k: _proc_counts(p) for k, p in self._groups().items()}
        self._signal_nodes(signal.SIGUSR2)  # stop it and write the profile
        self.meters1 = await _node_meters(self.net)
        with trio.move_on_after(5):  # the files appear as each node handles its signal
            while not all((self.profile_dir / f"{n}.collapsed").exists() for n in self.node_names):
                await trio.sleep(0.05)

    def _groups(self) -> dict[str, list[int]]:
        return {"nodes": self.node_pids, "registry": self.registry_pids, "toxiproxy": self.toxiproxy_pids}

    def per_store(self, stores: int, client: dict[str, float]) -> dict[str, Any]:
        """The window's figures per store; ``client`` is the clients' own (cpu_s and counts)."""
        n = max(stores, 1)
        d = {g: {k: self.procs1[g].get(k, 0) - self.procs0[g].get(k, 0) for k in self.procs1[g]}
             for g in self.procs1}
        roles = read_roles(self.profile_dir, self.node_names)
        node_cpu = d["nodes"].get("cpu_s", 0.0)
        cpu_us = {r: s / n * 1e6 for r, s in sorted(roles.items(), key=lambda kv: -kv[1])}
        cpu_us["unsampled"] = (node_cpu - sum(roles.values())) / n * 1e6
        cpu_us["registry"] = d["registry"].get("cpu_s", 0.0) / n * 1e6
        if self.toxiproxy_pids:
            cpu_us["toxiproxy"] = d["toxiproxy"].get("cpu_s", 0.0) / n * 1e6
        network_us = sum(cpu_us.values())
        counts = {k: (self.meters1.get(k, 0) - self.meters0.get(k, 0)) / n for k in COUNTED}
        for k in ("replicated_in", "ae_fetched", "ae_pushed"):
            counts[k] = (self.meters1.get("stats." + k, 0) - self.meters0.get("stats." + k, 0)) / n
        for k in ("read_syscalls", "write_syscalls", "voluntary_switches", "involuntary_switches"):
            counts[k] = (d["nodes"].get(k, 0) + d["registry"].get(k, 0)) / n
        return {
            "stores": stores,
            "network_cpu_us": round(network_us, 1),
            "cpu_us_by_role": {k: round(v, 1) for k, v in cpu_us.items()},
            "counts_per_store": {k: round(v, 2) for k, v in counts.items()},
            "client": {k: round(v / n * (1e6 if k == "cpu_s" else 1), 2) for k, v in client.items()},
        }


def client_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COUNTED}


def format_breakdown(b: dict[str, Any]) -> list[str]:
    """The breakdown as printed lines."""
    lines = [f"where the network's {b['network_cpu_us']:.0f} µs of CPU per store go (full load, "
             f"{b['stores']} stores, all processes):"]
    for role, us in b["cpu_us_by_role"].items():
        share = us / b["network_cpu_us"] * 100 if b["network_cpu_us"] else 0.0
        lines.append(f"  {role:<18} {us:>8.0f} µs  {share:5.1f} %")
    c = b["counts_per_store"]
    lines.append("per store, summed over the node processes:")
    lines.append(f"  frames in/out {c['frames_in']:.1f}/{c['frames_out']:.1f} · socket reads/writes "
                 f"{c['recv_calls']:.1f}/{c['send_calls']:.1f} · file reads/writes (SQLite, captures, logs) "
                 f"{c['read_syscalls']:.1f}/{c['write_syscalls']:.1f}")
    lines.append(f"  loop wake-ups {c['loop_wakeups']:.1f} · context switches {c['voluntary_switches']:.1f} "
                 f"voluntary + {c['involuntary_switches']:.1f} involuntary · tasks started "
                 f"{c['tasks_started']:.1f}")
    lines.append(f"  SQLite transactions {c['sqlite_transactions']:.2f} · log lines {c['log_lines']:.2f} · "
                 f"capture bytes {c['capture_bytes']:.0f}")
    lines.append(f"  copies stored by replication {c['replicated_in']:.2f}, by anti-entropy fetch "
                 f"{c['ae_fetched']:.2f} and push {c['ae_pushed']:.2f}")
    cl = b["client"]
    lines.append(f"clients: {cl.get('cpu_s', 0):.0f} µs CPU, frames in/out {cl.get('frames_in', 0):.1f}/"
                 f"{cl.get('frames_out', 0):.1f}, loop wake-ups {cl.get('loop_wakeups', 0):.1f}, tasks "
                 f"{cl.get('tasks_started', 0):.1f} per store")
    return lines
