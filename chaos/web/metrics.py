"""``/metrics``: the watched networks in Prometheus' text format (prometheus-client).

Per node (labels ``run``, ``node``, ``swarm``): stores taken and every other
counter of its ``info`` stats, messages held, open connections, CPU seconds,
clock offset, and its state (one series per state, 1 for the current one).
Per run: faults on by family, the users' stores and receives (from the
history: ``outcome`` ok/failed/unknown), the adversary's attempts, the
registry's height.  Values come from the watchers' last round; a scrape
never makes its own calls.  Nodes count no retrieves of their own today:
the per-run ``swarmnet_run_receives_total`` is the users' view.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .live import Watcher

NODE_STATES = ("up", "skewed", "partitioned", "paused", "killed", "down", "starting")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NetworkCollector(Collector):
    """Metrics of every watcher ``watchers()`` gives, from its last snapshot."""

    def __init__(self, watchers: Callable[[], Iterable[Watcher]]) -> None:
        self._watchers = watchers

    def collect(self) -> Iterable[Metric]:
        labels = ["run", "node", "swarm"]
        stores = CounterMetricFamily("swarmnet_node_stores", "Client stores this node took (its info stats)",
                                     labels=labels)
        stat = CounterMetricFamily("swarmnet_node_stat", "Every counter of the node's info stats",
                                   labels=labels + ["stat"])
        messages = GaugeMetricFamily("swarmnet_node_messages", "Messages the node holds", labels=labels)
        conns = GaugeMetricFamily("swarmnet_node_connections", "Connections open at the node", labels=labels)
        cpu = CounterMetricFamily("swarmnet_node_cpu_seconds", "CPU time of the node's process (user + system)",
                                  labels=labels)
        clock = GaugeMetricFamily("swarmnet_node_clock_offset_ms", "The node's clock offset (clock-skew fault)",
                                  labels=labels)
        state = GaugeMetricFamily("swarmnet_node_state", "1 for the node's state as the page shows it",
                                  labels=labels + ["state"])
        faults = GaugeMetricFamily("swarmnet_run_faults_active", "Faults on now, by family", labels=["run", "family"])
        sends = CounterMetricFamily("swarmnet_run_stores", "Users' stores by outcome (history.jsonl)",
                                    labels=["run", "outcome"])
        receives = CounterMetricFamily("swarmnet_run_receives", "Messages users retrieved (history.jsonl)",
                                       labels=["run"])
        attempts = CounterMetricFamily("swarmnet_run_adversary_attempts", "The adversary's attempts (adversary.jsonl)",
                                       labels=["run"])
        height = GaugeMetricFamily("swarmnet_registry_height", "The registry's height", labels=["run"])
        for w in self._watchers():
            snap = w.snapshot
            run = str(snap.get("run_id") or w.key)
            if not snap.get("nodes"):
                continue
            for n in snap["nodes"]:
                lv = [run, n["name"], n["swarm"] or ""]
                if isinstance(n.get("stores"), int):
                    stores.add_metric(lv, n["stores"])
                for k, v in sorted((n.get("stats") or {}).items()):
                    stat.add_metric(lv + [k], v)
                if isinstance(n.get("messages"), int):
                    messages.add_metric(lv, n["messages"])
                if isinstance(n.get("connections"), int):
                    conns.add_metric(lv, n["connections"])
                if isinstance(n.get("cpu_s"), (int, float)):
                    cpu.add_metric(lv, n["cpu_s"])
                clock.add_metric(lv, n.get("clock_offset_ms") or 0)
                for s in NODE_STATES:
                    state.add_metric(lv + [s], 1.0 if n["state"] == s else 0.0)
            by_family: dict[str, int] = {}
            for f in snap.get("faults") or ():
                by_family[f["family"]] = by_family.get(f["family"], 0) + 1
            for fam in sorted(set(by_family) | {"link", "partition", "process", "clock", "adversary"}):
                faults.add_metric([run, fam], by_family.get(fam, 0))
            totals = snap.get("totals") or {}
            for outcome, key in (("ok", "stores_ok"), ("failed", "stores_failed"), ("unknown", "stores_unknown")):
                sends.add_metric([run, outcome], totals.get(key, 0))
            receives.add_metric([run], totals.get("receives", 0))
            attempts.add_metric([run], totals.get("adversary_attempts", 0))
            if isinstance((snap.get("registry") or {}).get("height"), int):
                height.add_metric([run], snap["registry"]["height"])
        yield from (stores, stat, messages, conns, cpu, clock, state, faults, sends, receives, attempts, height)


def render(watchers: Callable[[], Iterable[Watcher]]) -> bytes:
    """The text a scrape gets."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NetworkCollector(watchers))
    return generate_latest(registry)
