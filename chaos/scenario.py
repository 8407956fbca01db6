"""Scenarios: a TOML file says the topology, the workload, the faults (an
explicit timeline or a seeded generator), the quiet period and the checkers.

Loading is pure and strict: unknown keys and out-of-range values are errors
that name the key, so a typo never silently runs a different experiment.
See ``chaos/scenarios/*.toml`` for examples and SCENARIOS.md for the schema.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

CHECKERS = ("delivery", "replication", "unlinkability", "authority")

# What the adversary nemesis (chaos/adversary/attacks.py) can do; a fault's ``attacks``
# picks some.  stranger: node ops, handshakes and registry writes without
# authority; signatures: client reads, deletes and expiries signed by the
# wrong key or replayed; abuse: stores outside the rules; frames: oversized
# and malformed frames; flood: idle and stalled connections; liar: a
# registered node acting for a swarm it is not in.
ADVERSARY_ATTACKS = ("stranger", "signatures", "abuse", "frames", "flood", "liar")
ADVERSARY_DEFAULTS: dict[str, Any] = {
    "attacks": list(ADVERSARY_ATTACKS),
    "interval_s": 0.3,  # pause between rounds of each attack
    "flood_connections": 300,  # per wave, at one node (past testnet/base/rpc.py's 256 per address)
    "flood_hold_s": 4.0,  # how long a wave holds its connections
    "max_attempts": 20_000,  # recorded attempts per fault, at most
}

# What a hostile member of a swarm does (chaos/adversary/byzantine.py): deletes
# and expiries of its swarm's messages without the account's signature, plants
# of messages the store rules refuse, and real hashes with altered content (sent
# with its key); and lies in its own work (nodes/hostile.py): lie-retrieve,
# drop-replication, lie-digest, misrelay.
BYZANTINE_BEHAVIOURS = ("delete", "expire", "plant", "alter", "lie-retrieve", "drop-replication", "lie-digest",
                        "misrelay")
BYZANTINE_DEFAULTS: dict[str, Any] = {
    "behaviours": list(BYZANTINE_BEHAVIOURS),
    "per_swarm": 1,  # hostile members per swarm, at most (always fewer than half of it)
    "interval_s": 0.3,  # pause between rounds
    "max_attempts": 20_000,  # recorded attempts per fault, at most
}

# kind -> (family, default params). Families: "link" (toxics on directed links),
# "partition" (links cut), "process" (signals / registry), "clock", "disk", "adversary"
# (an attacker using the network: chaos/adversary/attacks.py), "byzantine" (hostile
# members of swarms: chaos/adversary/byzantine.py).
NEMESES: dict[str, tuple[str, dict[str, Any]]] = {
    "latency": ("link", {"latency_ms": 50, "jitter_ms": 20}),
    "bandwidth": ("link", {"rate_kbps": 16}),
    "blackhole": ("link", {}),
    "reset-peer": ("link", {"timeout_ms": 0}),
    "slicer": ("link", {"average_size": 64, "size_variation": 32, "delay_us": 500}),
    "link-down": ("link", {}),
    "isolate": ("partition", {}),
    "split-swarm": ("partition", {}),
    "halves": ("partition", {}),
    "bridge": ("partition", {}),
    "one-way": ("partition", {}),
    "kill": ("process", {}),
    "pause": ("process", {}),
    "join": ("process", {}),
    "leave": ("process", {}),
    "clock-skew": ("clock", {"offset_ms": 30_000}),
    # The disk under a node's SQLite (nodes/disk.py, chaos/run/disk.py).
    "power-loss": ("disk", {"torn": False}),
    "disk-full": ("disk", {}),
    "disk-error": ("disk", {"ops": ["read", "write", "sync"]}),
    "disk-slow": ("disk", {"sync_ms": 200}),
    "corrupt": ("disk", {"rate": 0.01}),
    "adversary": ("adversary", ADVERSARY_DEFAULTS),
    "byzantine": ("byzantine", BYZANTINE_DEFAULTS),
}

# The time a simulated hop and sync take (chaos/sim/wire.py): measured loopback figures
# (the default), a wide-area network, or none at all.  Real runs take the machine's own.
WIRE_PROFILES = ("loopback", "wide-area", "instant")

# Target selectors a fault may name instead of concrete nodes, resolved when
# the schedule is expanded (names) or when the fault starts (swarms).
SELECTORS = ("node", "nodes", "swarm-of-user", "all-links", "node-links", "new")


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key."""


@dataclass(frozen=True)
class Topology:
    nodes: int = 8
    min_swarm: int = 3
    users: int = 4
    links: str = "toxiproxy"


@dataclass(frozen=True)
class WorkloadSpec:
    rate: float = 10.0
    duration_s: float | None = 15.0
    messages: int | None = None
    namespaces: tuple[int, ...] = (0,)
    body_bytes: int = 64
    drain_s: float = 20.0
    delete_fraction: float = 0.0  # of received messages, deleted by their recipient
    # How often each user checks its inbox: until then its messages wait in its swarm (what a
    # power loss of the swarm may take).
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class FaultSpec:
    """One fault of an explicit timeline (targets may be selectors)."""

    at_s: float
    duration_s: float
    kind: str
    target: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratorSpec:
    nemeses: tuple[str, ...]
    interval_s: float = 5.0
    duration_s: tuple[float, float] = (2.0, 5.0)
    start_s: float = 1.0
    count: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    topology: Topology
    workload: WorkloadSpec
    timeline: tuple[FaultSpec, ...]
    generator: GeneratorSpec | None
    quiet_s: float
    checkers: tuple[str, ...]
    seed: int | None = None
    source: str | None = None
    wire: str = "loopback"  # [sim] wire: the simulation's link and disk timing profile


def _section(raw: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    sec = raw.get(key, {})
    if not isinstance(sec, dict):
        raise ScenarioError(f"[{key}] must be a table")
    unknown = set(sec) - allowed
    if unknown:
        raise ScenarioError(f"unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
    return sec


def _num(sec: Mapping[str, Any], key: str, where: str, default: Any, lo: float, hi: float, kind: type = float) -> Any:
    v = sec.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ScenarioError(f"{where}.{key} must be {'an integer' if kind is int else 'a number'}")
    if not lo <= v <= hi:
        raise ScenarioError(f"{where}.{key} = {v} is outside [{lo}, {hi}]")
    return kind(v)


def _target(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"node": raw}
    if isinstance(raw, list):
        return {"nodes": [str(x) for x in raw]}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}.target must be a node name, a list of names or a table")
    unknown = set(raw) - set(SELECTORS) - {"count", "links"}
    if unknown:
        raise ScenarioError(f"{where}.target has unknown selector(s) {sorted(unknown)}; known: {SELECTORS}")
    return dict(raw)


def check_adversary_params(params: Mapping[str, Any], where: str = "adversary") -> dict[str, Any]:
    """An adversary fault's params with defaults filled in; ScenarioError names a wrong key."""
    unknown = set(params) - set(ADVERSARY_DEFAULTS)
    if unknown:
        raise ScenarioError(f"{where}.params: unknown key(s) {sorted(unknown)}; known: {sorted(ADVERSARY_DEFAULTS)}")
    out = {**ADVERSARY_DEFAULTS, **params}
    attacks = out["attacks"]
    if not isinstance(attacks, list) or not attacks or not all(a in ADVERSARY_ATTACKS for a in attacks):
        raise ScenarioError(f"{where}.params.attacks must be a non-empty list of {', '.join(ADVERSARY_ATTACKS)}")
    out["attacks"] = list(dict.fromkeys(attacks))
    _num(out, "interval_s", f"{where}.params", None, 0.01, 60)
    _num(out, "flood_connections", f"{where}.params", None, 1, 2000, int)
    _num(out, "flood_hold_s", f"{where}.params", None, 0.1, 600)
    _num(out, "max_attempts", f"{where}.params", None, 1, 1_000_000, int)
    return out


def check_byzantine_params(params: Mapping[str, Any], where: str = "byzantine") -> dict[str, Any]:
    """A byzantine fault's params with defaults filled in; ScenarioError names a wrong key."""
    unknown = set(params) - set(BYZANTINE_DEFAULTS)
    if unknown:
        raise ScenarioError(f"{where}.params: unknown key(s) {sorted(unknown)}; known: {sorted(BYZANTINE_DEFAULTS)}")
    out = {**BYZANTINE_DEFAULTS, **params}
    b = out["behaviours"]
    if not isinstance(b, list) or not b or not all(x in BYZANTINE_BEHAVIOURS for x in b):
        raise ScenarioError(f"{where}.params.behaviours must be a non-empty list of {', '.join(BYZANTINE_BEHAVIOURS)}")
    out["behaviours"] = list(dict.fromkeys(b))
    _num(out, "per_swarm", f"{where}.params", None, 1, 25, int)
    _num(out, "interval_s", f"{where}.params", None, 0.01, 60)
    _num(out, "max_attempts", f"{where}.params", None, 1, 1_000_000, int)
    return out


def _kind(kind: Any, where: str) -> str:
    if kind not in NEMESES:
        raise ScenarioError(f"{where}.kind {kind!r} is not a nemesis; known: {', '.join(NEMESES)}")
    return kind


def parse_scenario(raw: Mapping[str, Any], *, name: str = "scenario", source: str | None = None) -> Scenario:
    unknown = set(raw) - {"name", "description", "seed", "topology", "workload", "faults", "check", "sim"}
    if unknown:
        raise ScenarioError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    t = _section(raw, "topology", {"nodes", "min_swarm", "users", "links"})
    links = t.get("links", "toxiproxy")
    if links not in ("toxiproxy", "direct"):
        raise ScenarioError("topology.links must be 'toxiproxy' or 'direct'")
    topology = Topology(_num(t, "nodes", "topology", 8, 1, 1016, int), _num(t, "min_swarm", "topology", 3, 1, 50, int),
                        _num(t, "users", "topology", 4, 2, 100, int), links)
    w = _section(raw, "workload", {"rate", "duration_s", "messages", "namespaces", "body_bytes", "drain_s",
                                   "delete_fraction", "poll_interval_s"})
    messages = _num(w, "messages", "workload", None, 1, 10_000_000, int)
    duration = _num(w, "duration_s", "workload", None if messages else 15.0, 0.1, 86_400)
    namespaces = w.get("namespaces", [0])
    if not isinstance(namespaces, list) or not namespaces or not all(isinstance(n, int) for n in namespaces):
        raise ScenarioError("workload.namespaces must be a non-empty list of integers")
    workload = WorkloadSpec(_num(w, "rate", "workload", 10.0, 0.01, 100_000), duration, messages, tuple(namespaces),
                            _num(w, "body_bytes", "workload", 64, 0, 60_000, int),
                            _num(w, "drain_s", "workload", 20.0, 0, 3600),
                            _num(w, "delete_fraction", "workload", 0.0, 0, 1),
                            _num(w, "poll_interval_s", "workload", 0.5, 0.05, 600))
    f = _section(raw, "faults", {"timeline", "generator"})
    timeline = []
    for i, item in enumerate(f.get("timeline", [])):
        where = f"faults.timeline[{i}]"
        if not isinstance(item, dict):
            raise ScenarioError(f"{where} must be a table")
        extra = set(item) - {"at_s", "duration_s", "kind", "target", "params"}
        if extra:
            raise ScenarioError(f"unknown key(s) in {where}: {sorted(extra)}")
        kind = _kind(item.get("kind"), where)
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise ScenarioError(f"{where}.params must be a table")
        params = {**NEMESES[kind][1], **params}
        if NEMESES[kind][0] == "adversary":
            params = check_adversary_params(params, where)
        elif NEMESES[kind][0] == "byzantine":
            params = check_byzantine_params(params, where)
        timeline.append(FaultSpec(_num(item, "at_s", where, None, 0, 86_400) or 0.0,
                                  _num(item, "duration_s", where, 3.0, 0.01, 86_400), kind,
                                  _target(item.get("target"), where), params))
    generator = None
    if "generator" in f:
        g = f["generator"]
        where = "faults.generator"
        if not isinstance(g, dict):
            raise ScenarioError(f"{where} must be a table")
        extra = set(g) - {"nemeses", "interval_s", "duration_s", "start_s", "count"}
        if extra:
            raise ScenarioError(f"unknown key(s) in {where}: {sorted(extra)}")
        nemeses = g.get("nemeses")
        if not isinstance(nemeses, list) or not nemeses:
            raise ScenarioError(f"{where}.nemeses must be a non-empty list")
        dur = g.get("duration_s", [2.0, 5.0])
        if isinstance(dur, (int, float)):
            dur = [dur, dur]
        if not (isinstance(dur, list) and len(dur) == 2 and 0 < dur[0] <= dur[1]):
            raise ScenarioError(f"{where}.duration_s must be a number or [min, max] with 0 < min <= max")
        generator = GeneratorSpec(tuple(_kind(k, f"{where}.nemeses") for k in nemeses),
                                  _num(g, "interval_s", where, 5.0, 0.1, 86_400), (float(dur[0]), float(dur[1])),
                                  _num(g, "start_s", where, 1.0, 0, 86_400), _num(g, "count", where, None, 0, 10_000, int))
    c = _section(raw, "check", {"quiet_s", "checkers"})
    checkers = tuple(c.get("checkers", list(CHECKERS)))
    bad = [x for x in checkers if x not in CHECKERS]
    if bad:
        raise ScenarioError(f"check.checkers: unknown {bad}; known: {CHECKERS}")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ScenarioError("seed must be an integer")
    wire = _section(raw, "sim", {"wire"}).get("wire", "loopback")
    if wire not in WIRE_PROFILES:
        raise ScenarioError(f"sim.wire must be one of {', '.join(WIRE_PROFILES)}, got {wire!r:.40}")
    return Scenario(str(raw.get("name", name)), str(raw.get("description", "")), topology, workload,
                    tuple(timeline), generator, _num(c, "quiet_s", "check", 5.0, 0, 3600), checkers, seed, source,
                    wire)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; a name without a path looks in the shipped library."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        p = library_dir() / f"{path}.toml"
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        known = ", ".join(q.stem for q in library())
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror} (the library has: {known})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p.name} is not valid TOML: {exc}") from None
    return parse_scenario(raw, name=p.stem, source=str(p))


def library_dir() -> Path:
    return Path(__file__).parent / "scenarios"


def library() -> list[Path]:
    return sorted(library_dir().glob("*.toml"))
