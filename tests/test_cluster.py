"""swarmnet on a Ray cluster of network-namespace hosts (testnet/cluster), in one file so
that ``make test``'s workers share the session's one test cluster (pytest-xdist keeps a
file on one worker).

* Hosts and Ray: hosts reach each other over the bridge and nothing else; Ray runs
  pinned work on each host, which cannot see the controller's files; a refused token,
  an address that does not answer and a host running another swarmnet are clear errors;
  test hosts leave no namespace or link behind (the session's cluster checks its own
  teardown, and the lost-host test a host lost with everything on it).
* A network over three hosts: a partition between two hosts' nodes, a node killed on
  the third and churn leave a valid verdict, judged from every host's databases and
  captures brought home through Ray; a canary still fails its checker when a host is
  lost mid-run, the verdict names the lost host, the run ends without a hang, and no
  process of it is left on any host.
* ``swarmnet sim explore --cluster``: seeds as Ray tasks on three namespace hosts find
  the same failing seeds, with the same history and faults hashes, as local workers;
  every run directory comes home through Ray and the checkers judge it there unchanged.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import trio

from chaos.checkers.verdict import harness_errors
from chaos.run.cluster import ClusterProcesses
from chaos.run.runner import run_chaos
from chaos.scenario import load_scenario
from testnet.base.net import may_listen_on
from testnet.cluster.driver import ClusterError, connect
from testnet.cluster.fixtures import requires_cluster
from testnet.cluster.hosts import create_hosts, free_subnet, leftovers, netns_argv, remove_hosts
from testnet.fixtures import requires_toxiproxy
from testnet.links import PROJECT_BIN
from testnet.procs import proc_state
from testnet.rundir import load_run, recorded_processes

pytestmark = [requires_cluster, pytest.mark.network]

# --------------------------------------------------------------------------- hosts and Ray

SERVE = ("import socket,sys; s=socket.create_server((sys.argv[1], 7000)); print('up', flush=True); "
         "c,_=s.accept(); c.sendall(b'hi from ' + sys.argv[1].encode()); c.close()")
DIAL = ("import socket,sys; c=socket.create_connection((sys.argv[1], 7000), timeout=5); "
        "print(c.recv(100).decode())")


def test_the_subnet_is_one_nothing_else_uses():
    import ipaddress

    used = [ipaddress.ip_network("10.213.47.0/24"), ipaddress.ip_network("10.213.0.0/20"),
            ipaddress.ip_network("10.213.49.128/25")]
    assert str(free_subnet(used)) == "10.213.48.0/24"
    assert str(free_subnet([ipaddress.ip_network("192.0.2.0/24")])) == "10.213.47.0/24"


def test_hosts_reach_each_other_and_the_bridge_but_not_beyond():
    hosts = create_hosts(2)
    server = None
    try:
        h1, h2 = hosts.hosts
        assert hosts.gateway.endswith(".1") and h1.address != h2.address
        server = subprocess.Popen(netns_argv(h1, [sys.executable, "-c", SERVE, h1.address]), stdout=subprocess.PIPE,
                                  text=True)
        assert server.stdout.readline().strip() == "up"
        out = subprocess.run(netns_argv(h2, [sys.executable, "-c", DIAL, h1.address]), capture_output=True,
                             text=True, timeout=10)
        assert out.stdout.strip() == f"hi from {h1.address}"
        server.wait(timeout=5)
        routes = subprocess.run(netns_argv(h1, ["ip", "route"]), capture_output=True, text=True).stdout
        assert "default" not in routes and hosts.subnet.rsplit(".", 1)[0] in routes
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        assert remove_hosts(hosts) == []
    assert leftovers(hosts.tag) == []


def test_connect_says_what_is_wrong_before_ray_would(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(ClusterError, match="token authentication"):
        connect("127.0.0.1:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="does not answer"):
        connect(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    with pytest.raises(ClusterError, match="HOST:PORT"):
        connect("nowhere")


def test_ray_runs_pinned_work_on_each_host_which_cannot_see_the_runs_dir(ray_cluster, tmp_path):
    (tmp_path / "secret").write_text("controller only")
    code = f"""
import os, json, sys
from testnet.cluster.driver import connect, check_hosts, on_host, ClusterError
ray = connect({ray_cluster.address!r})
hosts = check_hosts(ray)
look = ray.remote(num_cpus=1)(lambda p: (ray.util.get_node_ip_address(), os.path.exists(p)))
seen = {{h.name: ray.get(look.options(scheduling_strategy=on_host(ray, h)).remote({str(tmp_path)!r}))
        for h in hosts}}
try:
    check_hosts(ray, mine={{"version": "0.0.1", "code": "0123456789abcdef"}})
    other = None
except ClusterError as exc:
    other = str(exc)
print(json.dumps({{"hosts": [[h.name, h.address, h.cpus] for h in hosts], "seen": seen, "other": other}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=ray_cluster.env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    got = json.loads(out.stdout.splitlines()[-1])
    expected = [[h.name, h.address, 1] for h in ray_cluster.hosts.hosts]
    assert got["hosts"] == expected
    # Each host ran the work itself, and the controller's directory was not there.
    assert got["seen"] == {h.name: [h.address, False] for h in ray_cluster.hosts.hosts}
    assert (tmp_path / "secret").exists()
    # Another swarmnet on the controller's side: every host named, both versions said.
    assert "this controller runs swarmnet 0.0.1 (code 0123456789abcdef)" in got["other"]
    for h in ray_cluster.hosts.hosts:
        assert f"{h.name} runs swarmnet " in got["other"]


def test_a_refused_token_is_said_so(ray_cluster):
    env = {**ray_cluster.env(), "RAY_AUTH_TOKEN": "0" * 64}
    code = f"from testnet.cluster.driver import connect; connect({ray_cluster.address!r})"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refused this driver's token" in out.stderr
    assert time.monotonic() - t0 < 30


def test_another_swarmnet_on_a_host_is_named_with_both_versions():
    from testnet.cluster.driver import code_identity, same_swarmnet

    mine = code_identity()
    same_swarmnet({"h1": mine, "h2": dict(mine)})
    with pytest.raises(ClusterError) as info:
        same_swarmnet({"h1": mine, "h2": {"version": "0.0.9", "code": "feedface00000000"},
                       "h3": "cannot run swarmnet (ModuleNotFoundError: testnet)"})
    msg = str(info.value)
    assert f"this controller runs swarmnet {mine['version']} (code {mine['code']})" in msg
    assert "h2 runs swarmnet 0.0.9 (code feedface00000000)" in msg and "h3: cannot run swarmnet" in msg
    assert "h1" not in msg


# --------------------------------------------------------------------------- a network over three hosts

HOSTS = ("h1", "h2", "h3")


def on_host(host: str, nodes: int) -> list[str]:
    """The nodes the plan places on ``host`` (round-robin)."""
    return [f"n{i:02d}" for i in range(1, nodes + 1) if HOSTS[(i - 1) % len(HOSTS)] == host]


def scenario(tmp_path, name: str, nodes: int, faults: str, checkers: str, duration_s: int = 6):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "{name}"
        description = "on three hosts"

        [topology]
        nodes = {nodes}
        min_swarm = 3
        users = 2

        [workload]
        rate = 6
        duration_s = {duration_s}
        drain_s = 8
    """) + faults + textwrap.dedent(f"""
        [check]
        quiet_s = 3
        checkers = {checkers}
    """))
    return load_scenario(path)


def driver(monkeypatch, ray_cluster) -> None:
    """This test process joins the cluster as a driver (the controller runs here)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)


def assert_nothing_left(run: dict) -> None:
    procs = recorded_processes(run) + [(f"agent {h['name']}", h["agent"]["pid"], h["agent"]["create_time"])
                                       for h in run["cluster"]["hosts"]]
    left = [name for name, pid, ct in procs if proc_state(pid, ct) != "dead"]
    assert left == []


def test_servers_listen_on_loopback_or_one_private_address_only():
    assert may_listen_on("127.3.4.5") and may_listen_on("10.213.47.11") and may_listen_on("192.168.1.20")
    assert not any(may_listen_on(h) for h in ("0.0.0.0", "8.8.8.8", "169.254.1.1", "::", "localhost", ""))


@requires_toxiproxy
async def test_a_partition_between_two_hosts_and_a_kill_on_the_third(ray_cluster, tmp_path, monkeypatch):
    driver(monkeypatch, ray_cluster)
    a, b = on_host("h1", 12), on_host("h2", 12)
    cut = [[x, y] for x in a for y in b] + [[y, x] for x in a for y in b]
    sc = scenario(tmp_path, "hosts-apart", 12, textwrap.dedent(f"""
        [[faults.timeline]]
        at_s = 1
        duration_s = 3
        kind = "link-down"
        target = {{ links = {json.dumps(cut)} }}

        [[faults.timeline]]
        at_s = 2
        duration_s = 2
        kind = "kill"
        target = {{ node = "n03" }}

        [[faults.timeline]]
        at_s = 1
        duration_s = 4
        kind = "join"
        target = {{ new = 1 }}

        [[faults.timeline]]
        at_s = 2.5
        duration_s = 2
        kind = "leave"
        target = {{ node = "n08" }}
    """), '["delivery", "replication", "unlinkability"]')
    with trio.fail_after(300):
        result = await run_chaos(sc, seed=11, runs_dir=tmp_path / "runs", world=ClusterProcesses(ray_cluster.address),
                                 progress=lambda m: None)
    v = result.verdict
    # Every checker holds. The schedule must have played, faults late past the 1 s tolerance
    # aside: a join or leave goes through a host's agent, and on a machine shared with other
    # runs that alone can be late (lateness at scale has its own tests and bench).
    assert all(c["valid"] is True for c in v["checkers"].values()), result.summary
    why = harness_errors(v)
    assert v["valid"] is True or why and all(" late (tolerance" in w for w in why), result.summary
    assert v["faults"]["errors"] == [] and v["faults"]["skipped"] == [] and v["faults"]["healed"] == 4 and v["faults"]["unplayed"] == []
    run = load_run(result.run_dir)
    # Round-robin over the hosts, churn included: n13 joined (on h1) and left when its fault
    # ended; n08 left and a new node, n14, took its place (on h2).
    placed = {n: h for h in HOSTS for n in on_host(h, 14) if n not in ("n08", "n13")}
    assert {n["name"]: n["place"] for n in run["nodes"]} == placed and placed["n14"] == "h2"
    assert [h["state"] for h in run["cluster"]["hosts"]] == ["up"] * 3 and run["cluster"]["lost_hosts"] == {}
    # Every host's ground truth came home: each node's database and capture, in the local layout.
    for n in run["nodes"]:
        for f in ("db.sqlite", "capture.bin", "node.log"):
            assert (result.run_dir / "nodes" / n["name"] / f).stat().st_size > 0, (n["name"], f)
    for gone in ("n08", "n13"):  # what nodes that left held and saw came home too
        assert all((result.run_dir / "nodes" / gone / f).exists() for f in ("db.sqlite", "capture.bin")), gone
    u = v["checkers"]["unlinkability"]["counts"]
    assert u["nodes_analyzed"] == 12 and u["nodes_missing_capture"] == 0 and u["traced"] > 0
    faults = [json.loads(line) for line in (result.run_dir / "faults.jsonl").read_text().splitlines()]
    phases = {(f["kind"], f["phase"]) for f in faults}
    assert phases == {(k, p) for k in ("link-down", "kill", "join", "leave") for p in ("start", "end")}, faults
    assert_nothing_left(run)


@requires_toxiproxy
async def test_a_canary_fails_its_checker_though_a_host_is_lost_mid_run(ray_cluster, tmp_path, monkeypatch):
    driver(monkeypatch, ray_cluster)
    sc = scenario(tmp_path, "canary", 6, "", '["delivery", "unlinkability"]', duration_s=8)
    lost = trio.Event()

    def progress(msg: str) -> None:
        if msg.startswith("check passed"):
            lost.set()

    left_on_h3: list[int] = [-1]

    async def lose_h3() -> None:
        await lost.wait()
        await trio.sleep(2)  # users are sending
        left_on_h3[:] = await trio.to_thread.run_sync(ray_cluster.kill_host, "h3")

    try:
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lose_h3)
                result = await run_chaos(sc, seed=3, runs_dir=tmp_path / "runs", inject_bugs=("client-id-in-layers",),
                                         world=ClusterProcesses(ray_cluster.address), progress=progress)
    finally:
        await trio.to_thread.run_sync(ray_cluster.restart_host, "h3")  # the next tests have three hosts again
    assert left_on_h3 == []  # every process of the lost host went with it (its Ray worker, agent, nodes)
    v = result.verdict
    # The bug is seen in what came home from h1 and h2: the canary is not blind.
    assert v["checkers"]["unlinkability"]["valid"] is False and v["valid"] is False, result.summary
    assert set(v["lost_hosts"]) == {"h3"} and v["lost_hosts"]["h3"]["nodes"] == on_host("h3", 6)
    assert "host h3 lost mid-run" in result.summary
    run = load_run(result.run_dir)
    assert {n["name"]: n["state"] for n in run["nodes"] if n["place"] == "h3"} == {"n03": "lost", "n06": "lost"}
    assert [h["state"] for h in run["cluster"]["hosts"]] == ["up", "up", "lost"]
    assert (result.run_dir / "nodes" / "n01" / "capture.bin").exists()
    assert not (result.run_dir / "nodes" / "n03" / "capture.bin").exists()  # went with h3
    assert_nothing_left(run)


def toxiproxy_binaries() -> list[Path]:
    """Every Toxiproxy server binary a host agent could find (testnet.links.find_toxiproxy)."""
    found = {os.environ.get("SWARMNET_TOXIPROXY"), str(PROJECT_BIN), shutil.which("toxiproxy-server")}
    return sorted(Path(p).resolve() for p in found if p and Path(p).is_file())


def run_processes(token: str) -> list[str]:
    """A run's processes still here, on any host or on this machine: Toxiproxy servers, zygotes
    (and the nodes they fork), registries, started with this cluster's token in their
    environment (everything a driver or a host agent starts inherits it)."""
    marks = ("toxiproxy", "swarmnet-zygote", "testnet.registry", "nodes.__main__")
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or ())
            if any(m in cmd for m in marks) and p.environ().get("RAY_AUTH_TOKEN") == token:
                out.append(f"{p.pid} ({cmd[:80]})")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


ANOTHER = Path(__file__).resolve().parents[1] / "chaos" / "__init__.py"  # any source file of swarmnet's


def broken_h2(case: str) -> tuple[list[Path], bytes, int]:
    """What h2 alone shows in place of which files (paths, content, mode) for ``case``."""
    if case == "toxiproxy-missing":  # as on a host without `make toxiproxy`
        return toxiproxy_binaries(), b"not a program\n", 0o644
    if case == "toxiproxy-exits":  # it runs, and exits saying why
        return toxiproxy_binaries(), b"#!/bin/sh\necho 'listen tcp: address already in use' >&2\nexit 3\n", 0o755
    assert case == "another-swarmnet"  # one source file differs: the same version number, other code
    return [ANOTHER], ANOTHER.read_bytes() + b"\n# changed on this host only\n", 0o644


@requires_toxiproxy
@pytest.mark.parametrize("case", ["toxiproxy-missing", "toxiproxy-exits", "another-swarmnet"])
def test_a_broken_host_is_named_with_why_and_nothing_is_left(ray_cluster, tmp_path, case):
    # h2 alone is broken, for real: its files differ from the other hosts' and this machine's.
    from testnet.cluster.driver import code_identity

    assert run_processes(ray_cluster.token) == []
    with ray_cluster.covered("h2", *broken_h2(case)[:2], mode=broken_h2(case)[2]):
        out = subprocess.run([sys.executable, "-m", "testnet.cli", "up", "--cluster", ray_cluster.address,
                              "--hosts", "2", "--nodes", "4", "--min-swarm", "3", "--run-dir", str(tmp_path / "run")],
                             env=ray_cluster.env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("swarmnet: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    if case == "another-swarmnet":  # both versions said, only h2 named
        mine = code_identity()
        assert f"this controller runs swarmnet {mine['version']} (code {mine['code']}); h2 runs swarmnet " \
               f"{mine['version']} (code " in errors[0] and "h1" not in errors[0], errors
    else:
        assert errors[0].startswith("swarmnet: error: Toxiproxy cannot start on host h2: "), errors
    if case == "toxiproxy-missing":
        assert "no Toxiproxy server binary on this host" in errors[0]
        explicit = os.environ.get("SWARMNET_TOXIPROXY") or None  # CI has none: the project's bin/ is covered then
        assert explicit is None or f"$SWARMNET_TOXIPROXY: {explicit} is not an executable file" in errors[0], errors
    if case == "toxiproxy-exits":  # what it said on its way out comes with the error
        assert "exited before its API answered (exit code 3)" in errors[0]
        assert "listen tcp: address already in use" in out.stderr
    run = load_run(tmp_path / "run")
    assert run["state"] == "failed" and [h["name"] for h in run["cluster"]["hosts"]] == ["h1", "h2"]
    # Nothing of the run is left on any host or here: the agents, the hosts' Toxiproxy servers
    # and zygotes, the registry and the users' Toxiproxy server.
    assert_nothing_left(run)
    assert run_processes(ray_cluster.token) == []


# --------------------------------------------------------------------------- sim explore --cluster

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
