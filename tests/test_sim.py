"""The deterministic simulation (chaos/sim): a faulted scenario run twice in
separate processes gives byte-identical history and faults; an injected bug
fails its checker in simulation too; and the layers the simulation drives
read no clock, randomness or socket except through their seams."""

import ast
import json
import textwrap
from pathlib import Path


from chaos.sim.jobs import run_jobs
from chaos.sim.runner import first_difference

ROOT = Path(__file__).resolve().parents[1]

# Every fault family the simulated Toxiproxy and processes model, in 12 virtual seconds.
FAULTED = textwrap.dedent("""
    name = "sim-faults"
    description = "One of each fault the simulation models."

    [topology]
    nodes = 8
    min_swarm = 3
    users = 3

    [workload]
    rate = 10
    duration_s = 12
    delete_fraction = 0.3
    drain_s = 10

    [[faults.timeline]]
    at_s = 1
    duration_s = 3
    kind = "latency"
    target = { "node-links" = "n02" }
    params = { latency_ms = 80, jitter_ms = 40 }

    [[faults.timeline]]
    at_s = 2
    duration_s = 3
    kind = "kill"
    target = { "swarm-of-user" = "alice", count = 1 }

    [[faults.timeline]]
    at_s = 3
    duration_s = 4
    kind = "split-swarm"
    target = { "swarm-of-user" = "bob" }

    [[faults.timeline]]
    at_s = 5
    duration_s = 3
    kind = "blackhole"
    target = { "node-links" = "n05" }

    [[faults.timeline]]
    at_s = 6
    duration_s = 3
    kind = "pause"
    target = { node = "n07" }

    [[faults.timeline]]
    at_s = 7
    duration_s = 4
    kind = "clock-skew"
    target = { node = "n03" }
    params = { offset_ms = 5000 }

    [[faults.timeline]]
    at_s = 8
    duration_s = 3
    kind = "slicer"
    target = { "node-links" = "n01" }

    [check]
    quiet_s = 4
""")


def test_a_faulted_scenario_replays_byte_for_byte_in_another_process(tmp_path):
    scenario = tmp_path / "sim-faults.toml"
    scenario.write_text(FAULTED, encoding="utf-8")
    job = {"scenario": str(scenario), "seed": 11, "runs_dir": str(tmp_path / "runs")}
    other = {**job, "variant": 1}
    (first,) = run_jobs([job], 1)
    by_variant = {r["variant"]: r for r in run_jobs([job, other], 2)}  # in parallel, in 2 other processes
    second, third = by_variant[0], by_variant[1]
    for r in (first, second, third):
        assert r.get("valid") is True, r
    assert first_difference(Path(first["run_dir"]), Path(second["run_dir"])) is None
    assert second["sha256"] == first["sha256"] and first["sha256"]["faults.jsonl"]
    # Another interleaving of the same plan is another history: the seed is what fixes it.
    assert third["sha256"]["history.jsonl"] != first["sha256"]["history.jsonl"]
    faults = [json.loads(line) for line in (Path(first["run_dir"]) / "faults.jsonl").read_text().splitlines()]
    started = {f["kind"] for f in faults if f["phase"] == "start"}
    assert started == {"latency", "kill", "split-swarm", "blackhole", "pause", "clock-skew", "slicer"}, faults
    # On virtual time nothing waits for a CPU: every phase takes effect when planned, but for the
    # simulated wire's time on the calls a fault makes (the registry's swarms, a node's clock);
    # one applied to the links alone takes none (a killed node's heal then waits for it to be
    # ready: with its users' ingress opened again it is ready when first asked), and the run is
    # held to its schedule as a real one.
    timed = [f for f in faults if f["phase"] in ("start", "end")]
    assert len(timed) == 14 and all(f["late_ms"] <= 5 for f in timed), faults
    assert all(f["late_ms"] == 0 for f in timed if f["kind"] in ("latency", "blackhole", "slicer")), faults
    assert first["harness"] == [] and third["harness"] == []
    assert first["virtual_s"] > 12


def test_an_injected_bug_fails_its_checker_in_simulation(tmp_path):
    # ack-before-commit: a kill inside the write-behind window loses acknowledged stores.
    (r,) = run_jobs([{"scenario": "kill-restart", "seed": 1, "inject_bugs": ["ack-before-commit"],
                      "runs_dir": str(tmp_path / "runs")}], 1)
    assert r.get("valid") is False and "delivery" in r["failing"], r


# --------------------------------------------------------------------------- seams

# Reading these directly is what the seams are for (testnet.base.clock, testnet.base.net,
# crypto's randbytes); benchmarks (bench.py and a benchmark's own bench_*.py) and the
# person-facing commands are edges.
FORBIDDEN_CALLS = {
    ("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("time", "time_ns"),
    ("datetime", "now"), ("datetime", "utcnow"), ("os", "urandom"), ("utils", "random"),
    ("secrets", "token_hex"), ("secrets", "token_bytes"), ("secrets", "randbits"), ("secrets", "choice"),
    ("crypto", "random_bytes"), ("trio", "open_tcp_stream"), ("trio", "open_tcp_listeners"),
    ("socket", "socket"),
}
EDGES = {"bench.py", "cli.py", "__main__.py"}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def direct_reads(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            module_random = len(name) == 2 and name[0] == "random" and name[1] != "Random"
            if name[-2:] in FORBIDDEN_CALLS or module_random:
                found.append(f"{path.name}:{node.lineno} {'.'.join(name)}()")
    return found


def test_nodes_clients_and_registry_read_no_clock_randomness_or_socket_directly():
    files = [p for d in ("nodes", "clients") for p in sorted((ROOT / d).glob("*.py"))
             if p.name not in EDGES and not p.name.startswith("bench_")]
    files += [ROOT / "testnet" / "registry.py", ROOT / "testnet" / "registry_state.py"]
    assert len(files) >= 12
    assert [] == [hit for f in files for hit in direct_reads(f)]


def test_the_seam_scan_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time, random, os\nt = time.time()\nx = random.uniform(0, 1)\nb = os.urandom(4)\n"
                   "ok = random.Random(1).random()\n")
    assert direct_reads(bad) == ["bad.py:2 time.time()", "bad.py:3 random.uniform()", "bad.py:4 os.urandom()"]
