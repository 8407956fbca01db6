"""Expanding a scenario and a seed into a concrete fault schedule, before
anything starts.  Pure: the same scenario, seed and node names always give
the same schedule (``schedule.json``), which is what replay and shrink run.

Targets are resolved here to node names wherever the names decide them;
targets that depend on the live swarm layout (``swarm-of-user``) keep their
selector plus a seeded ``pick`` and are resolved when the fault starts (the
concrete nodes then go to ``faults.jsonl``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .scenario import NEMESES, FaultSpec, Scenario, ScenarioError

SCHEDULE_FORMAT = 1


@dataclass(frozen=True)
class Fault:
    """One fault: starts at ``at_s`` after the workload starts, healed ``duration_s`` later."""

    id: int
    at_s: float
    duration_s: float
    kind: str
    target: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return NEMESES[self.kind][0]

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at_s": round(self.at_s, 3), "duration_s": round(self.duration_s, 3),
                "kind": self.kind, "family": self.family, "target": dict(self.target), "params": dict(self.params)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Fault:
        if d.get("kind") not in NEMESES:
            raise ScenarioError(f"schedule: unknown fault kind {d.get('kind')!r}")
        return cls(int(d["id"]), float(d["at_s"]), float(d["duration_s"]), str(d["kind"]),
                   dict(d.get("target") or {}), dict(d.get("params") or {}))


@dataclass(frozen=True)
class Schedule:
    scenario: str
    seed: int
    faults: tuple[Fault, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format": SCHEDULE_FORMAT, "scenario": self.scenario, "seed": self.seed,
                "faults": [f.to_json() for f in self.faults]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Schedule:
        return cls(str(d["scenario"]), int(d["seed"]), tuple(Fault.from_json(f) for f in d["faults"]))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> Schedule:
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ScenarioError(f"cannot read schedule {path}: {exc}") from None

    def subset(self, ids: Sequence[int]) -> Schedule:
        keep = set(ids)
        return Schedule(self.scenario, self.seed, tuple(f for f in self.faults if f.id in keep))

    @property
    def end_s(self) -> float:
        return max((f.end_s for f in self.faults), default=0.0)


def _rng(seed: int, scenario: str) -> random.Random:
    digest = hashlib.blake2b(f"{scenario}:{seed}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "big"))


PROCESS_KINDS = ("kill", "pause", "leave", "clock-skew", "isolate")  # faults that hold one node for their span


def resolve_target(spec: Mapping[str, Any], kind: str, nodes: Sequence[str], users: Sequence[str],
                   rng: random.Random, busy: Sequence[str] = ()) -> dict[str, Any]:
    """Concrete node names for name-decided selectors; swarm selectors keep a seeded pick.
    A random node is drawn among those no other process fault holds then (``busy``), when
    any is free: two overlapping leaves of "random" must not pick the same node."""
    t = dict(spec)
    names = list(nodes)

    def check(name: str) -> str:
        if name not in names:
            raise ScenarioError(f"fault {kind}: no node named {name!r} (have {names[0]}..{names[-1]})")
        return name

    if t.get("node") == "random" or (not t and kind in PROCESS_KINDS):
        free = [n for n in names if n not in busy]
        t["node"] = rng.choice(free or names)
    if "node" in t:
        t["node"] = check(t["node"])
    if "nodes" in t:
        t["nodes"] = [check(n) for n in t["nodes"]]
    if "node-links" in t:
        t["node-links"] = rng.choice(names) if t["node-links"] == "random" else check(t["node-links"])
    if "swarm-of-user" in t:
        if t["swarm-of-user"] == "random":
            t["swarm-of-user"] = rng.choice(list(users))
        if t["swarm-of-user"] not in users:
            raise ScenarioError(f"fault {kind}: no user named {t['swarm-of-user']!r}")
        t.setdefault("count", 1)
        t["pick"] = rng.randrange(1 << 30)
    if kind in ("halves", "bridge", "one-way") and "nodes" not in t:
        shuffled = names[:]
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        t["side_a"], t["side_b"] = sorted(shuffled[:half]), sorted(shuffled[half:])
        if kind == "bridge" and t["side_b"]:
            t["bridge"] = t["side_b"].pop(rng.randrange(len(t["side_b"])))
    if kind == "split-swarm" and "swarm-of-user" not in t:
        t["swarm-of-user"] = rng.choice(list(users))
        t["pick"] = rng.randrange(1 << 30)
    if kind == "join":
        t.setdefault("new", 1)
    if NEMESES[kind][0] == "link" and not (set(t) & {"all-links", "node-links", "links", "node", "nodes"}):
        t["all-links"] = True
    return t


def _generated(scenario: Scenario, rng: random.Random, nodes: Sequence[str], users: Sequence[str],
               horizon_s: float) -> list[FaultSpec]:
    g = scenario.generator
    assert g is not None
    out: list[FaultSpec] = []
    busy: dict[str, float] = {}  # node -> until when a process fault holds it
    t = g.start_s
    while (g.count is None and t < horizon_s) or (g.count is not None and len(out) < g.count):
        kind = rng.choice(g.nemeses)
        dur = rng.uniform(*g.duration_s)
        target: dict[str, Any] = {}
        if kind in PROCESS_KINDS or NEMESES[kind][0] == "disk":
            free = [n for n in nodes if busy.get(n, -1.0) < t]
            if not free:
                t += rng.expovariate(1.0 / g.interval_s)
                continue
            target = {"node": rng.choice(free)}
            busy[target["node"]] = t + dur
        elif NEMESES[kind][0] == "link":
            target = {"node-links": rng.choice(list(nodes))} if rng.random() < 0.5 else {"all-links": True}
        elif kind == "split-swarm":
            target = {"swarm-of-user": rng.choice(list(users))}
        out.append(FaultSpec(round(t, 3), round(dur, 3), kind, target, copy.deepcopy(NEMESES[kind][1])))
        t += rng.expovariate(1.0 / g.interval_s)
    return out


def workload_horizon_s(scenario: Scenario) -> float:
    w = scenario.workload
    if w.duration_s is not None:
        return w.duration_s
    return (w.messages or 0) / w.rate


def expand(scenario: Scenario, seed: int, nodes: Sequence[str], users: Sequence[str]) -> Schedule:
    """The scenario's faults with every name-decided target resolved."""
    if not nodes:
        raise ScenarioError("a schedule needs at least one node")
    rng = _rng(seed, scenario.name)
    specs = list(scenario.timeline)
    if scenario.generator is not None:
        specs += _generated(scenario, rng, nodes, users, workload_horizon_s(scenario))
    specs.sort(key=lambda f: (f.at_s, f.kind))
    faults = []
    held: dict[str, float] = {}  # node -> until when a process fault holds it
    for i, spec in enumerate(specs, start=1):
        busy = [n for n, until in held.items() if until > spec.at_s]
        target = resolve_target(spec.target, spec.kind, nodes, users, rng, busy)
        if spec.kind in PROCESS_KINDS and "node" in target:
            held[target["node"]] = spec.at_s + spec.duration_s
        faults.append(Fault(i, spec.at_s, spec.duration_s, spec.kind, target, dict(spec.params)))
    return Schedule(scenario.name, seed, tuple(faults))


def schedule_as_scenario(scenario: Scenario, schedule: Schedule) -> dict[str, Any]:
    """A runnable scenario (as a TOML-able dict) whose timeline is exactly ``schedule``."""
    t = scenario.topology
    w = scenario.workload
    workload: dict[str, Any] = {"rate": w.rate, "namespaces": list(w.namespaces), "body_bytes": w.body_bytes,
                                "drain_s": w.drain_s, "delete_fraction": w.delete_fraction,
                                "poll_interval_s": w.poll_interval_s}
    if w.messages is not None:
        workload["messages"] = w.messages
    else:
        workload["duration_s"] = w.duration_s
    timeline = [{"at_s": f.at_s, "duration_s": f.duration_s, "kind": f.kind,
                 "target": {k: v for k, v in f.target.items() if k != "pick"}, "params": dict(f.params)}
                for f in schedule.faults]
    return {"name": f"{scenario.name}-min", "description": f"shrunk from {scenario.name} seed {schedule.seed}",
            "seed": schedule.seed,
            "topology": {"nodes": t.nodes, "min_swarm": t.min_swarm, "users": t.users, "links": t.links},
            "workload": workload, "faults": {"timeline": timeline},
            "check": {"quiet_s": scenario.quiet_s, "checkers": list(scenario.checkers)},
            **({"sim": {"wire": scenario.wire}} if scenario.wire != "loopback" else {})}


def to_toml(d: Mapping[str, Any]) -> str:
    """A small TOML writer for scenario dicts (tomllib only reads)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    lines = []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {val(v)}")
    for k, v in d.items():
        if isinstance(v, dict) and k != "faults":
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    for item in d.get("faults", {}).get("timeline", []):
        lines.append("\n[[faults.timeline]]")
        lines += [f"{kk} = {val(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"
