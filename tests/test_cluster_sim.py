"""``swarmnet sim explore --cluster``: seeds as Ray tasks on three namespace hosts
find the same failing seeds, with the same history and faults hashes, as local
workers; every run directory comes home through Ray (the hosts cannot see the
runs directory) and the checkers judge it there unchanged."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testnet.cluster.fixtures import requires_cluster

pytestmark = [requires_cluster, pytest.mark.xdist_group("cluster"), pytest.mark.network]

# Seconds of two users and one kill: with a store acknowledged before it is committed,
# seed 4 loses messages and seed 3 does not (the kill lands between stores).
TINY = textwrap.dedent("""
    name = "tiny"
    description = "A few seconds of two users and one kill."

    [topology]
    nodes = 5
    min_swarm = 3
    users = 2

    [workload]
    rate = 6
    duration_s = 4
    drain_s = 6

    [[faults.timeline]]
    at_s = 1
    duration_s = 2
    kind = "kill"
    target = { "swarm-of-user" = "alice", count = 1 }

    [check]
    quiet_s = 2
    checkers = ["delivery", "replication"]
""")
SEEDS = "3..4"
BUG = "ack-before-commit"


def explore(scenario: Path, runs: Path, env: dict | None, *where: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "testnet.cli", "sim", "explore", str(scenario), "--seeds", SEEDS,
                          "--inject-bug", BUG, "--keep-passing", "--runs-dir", str(runs), "--json", *where],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return json.loads(out.stdout)


def by_seed(runs: Path) -> dict[int, tuple[bool, dict]]:
    """seed -> (valid, sha256 of the exact files), read from the run directories on disk."""
    out = {}
    for v in runs.glob("*/verdict.json"):
        verdict = json.loads(v.read_text())
        out[verdict["sim"]["seed"]] = (verdict["valid"], verdict["sim"]["sha256"])
    return out


def test_explore_on_the_cluster_finds_what_local_workers_find(ray_cluster, tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    local = explore(scenario, tmp_path / "local", None, "--jobs", "2")
    remote = explore(scenario, tmp_path / "cluster", ray_cluster.env(), "--cluster", ray_cluster.address)

    assert remote["where"]["hosts"] == {h.name: 1 for h in ray_cluster.hosts.hosts}
    assert [(r["seed"], r["failing"], r["sha256"]) for r in remote["failing"]] == \
        [(r["seed"], r["failing"], r["sha256"]) for r in local["failing"]]
    assert [r["seed"] for r in local["failing"]] == [4]
    assert remote["seeds_per_hour"] > 0
    # Every run came home whole (--keep-passing), with the same exact files as the local run of its seed.
    home = by_seed(tmp_path / "cluster")
    assert home == by_seed(tmp_path / "local") and sorted(home) == [3, 4]
    failed = Path(remote["failing"][0]["run_dir"])
    assert failed.parent == tmp_path / "cluster" and remote["failing"][0]["host"] in remote["where"]["hosts"]
    assert sorted(p.name for p in (failed / "nodes").iterdir()) == ["n01", "n02", "n03", "n04", "n05"]
    # The checkers judge the run brought home as they judge a local one.
    check = subprocess.run([sys.executable, "-m", "testnet.cli", "check", str(failed), "--checker", "delivery"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "delivery: INVALID" in check.stdout


def test_explore_says_when_the_cluster_is_not_there(tmp_path):
    out = subprocess.run([sys.executable, "-m", "testnet.cli", "sim", "explore", "smoke", "--seeds", "1",
                          "--cluster", "127.0.0.1:1", "--runs-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 64})
    assert out.returncode == 2
    assert "cluster address 127.0.0.1:1 does not answer" in out.stderr
