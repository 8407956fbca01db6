"""Test hosts as network namespaces and a Ray cluster on them (testnet/cluster):
hosts reach each other over the bridge and nothing else; Ray runs pinned work on
each host, which cannot see the controller's files; a refused token, an address
that does not answer and a host running another swarmnet are clear errors; test hosts
leave no namespace or link behind (the session's cluster checks its own teardown, and
tests/test_cluster_run.py a host lost with everything on it)."""

import socket
import subprocess
import sys
import time

import pytest

from testnet.cluster.driver import ClusterError, connect
from testnet.cluster.fixtures import requires_cluster
from testnet.cluster.hosts import create_hosts, free_subnet, leftovers, netns_argv, remove_hosts

pytestmark = [requires_cluster, pytest.mark.xdist_group("cluster"), pytest.mark.network]

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
