"""The controller with real processes: boot, record, node operations,
teardown, two networks side by side, and the CLI from separate processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from testnet.controller import Options, error_leaves, open_testnet
from testnet.links import check_bindable
from testnet.fixtures import assert_no_leaks, requires_toxiproxy
from testnet.procs import NotReady, proc_state
from testnet.base.crypto import Identity, link_open_message
from testnet.base.rpc import RpcError, call_once
from testnet.rundir import load_run, recorded_processes

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parents[1]
CONTRACT_NODE_KEYS = {"name", "pid", "host", "port", "ed25519_public", "x25519_public", "swarm_id", "db", "log"}


def run_addresses(run: dict) -> list[tuple[str, int]]:
    """Every fixed address a run listened at: control API, Toxiproxy, nodes, proxies."""
    out = [(run["controller"]["host"], run["controller"]["port"])]
    if run["toxiproxy"]:
        out.append((run["toxiproxy"]["host"], run["toxiproxy"]["port"]))
    out += [(n["host"], n["port"]) for n in run["nodes"]]
    out += [tuple(link["listen"]) for link in run["links"]]
    return out


@requires_toxiproxy
async def test_boot_record_secrets_and_clean_teardown(testnet_factory):
    async with testnet_factory(nodes=5, users=2, links="toxiproxy") as net:
        run = load_run(net.run_dir)
        assert run["state"] == "ready" and net.check_result["ok"]
        assert {"run_id", "seed", "registry", "toxiproxy", "nodes", "users", "links", "ingress"} <= set(run)
        assert {"host", "port", "pid"} <= set(run["registry"]) and run["toxiproxy"]["api"].startswith("http://127.")
        for node in run["nodes"]:
            assert CONTRACT_NODE_KEYS <= set(node) and node["state"] == "running" and node["swarm_id"] is not None
            assert (net.run_dir / node["db"]).exists() and (net.run_dir / node["log"]).exists()
            seed_file = net.run_dir / node["seed_file"]
            assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
            assert seed_file.read_text().strip() not in (net.run_dir / "run.json").read_text()
            assert set(run["ingress"][node["name"]]) == {"alice", "bob"}
        assert (net.run_dir / "admin_token").read_text().strip() not in (net.run_dir / "run.json").read_text()
        assert [u["name"] for u in run["users"]] == ["alice", "bob"]
        assert len({n["host"] for n in run["nodes"]} | {u["host"] for u in run["users"]}) == 7
        # One proxy per directed link, each leading to the node (or its ingress for that user),
        # made when first dialled.
        assert len(run["links"]) == 5 * 4 + 2 * 5
        # The link table lives apart (links.json), read back into the record by load_run.
        raw = json.loads((net.run_dir / "run.json").read_text())
        assert "links" not in raw and raw["links_file"] == "links.json"
        by_name = {n["name"]: n for n in run["nodes"]}
        for link in run["links"]:
            dst = by_name[link["dst"]]
            want = run["ingress"][dst["name"]][link["src"]] if link["src"] in ("alice", "bob") else dst["port"]
            assert link["upstream"] == [dst["host"], want]
        proxies = set(await net.api.proxies())
        users_links = {link["name"] for link in run["links"] if link["src"] in ("alice", "bob")}
        assert proxies <= {link["name"] for link in run["links"]}
        # The boot check stored through alice's link and read through bob's: those made, no others.
        assert 1 <= len(proxies & users_links) <= 2
        # The boot check's message went from one swarm member to the others: through node links
        # whose proxies the nodes asked for.
        assert proxies - users_links
        await _open_link_checks_the_asking_node(net)
        # What `swarmnet up` prints once ready, from the live record (no link table in it).
        from testnet.cli import _summary
        assert "30 links; a link's proxy is made when first used" in _summary(net.record(), net.run_dir, False)
        pids = [pid for _, pid, _ in recorded_processes(run)]
        assert all(proc_state(pid) == "alive" for pid in pids) and len(pids) == 5 + 3
    run = load_run(net.run_dir)
    assert run["state"] == "stopped"
    assert all(not psutil.pid_exists(pid) or proc_state(pid) == "dead" for pid in pids)
    check_bindable(run_addresses(run))  # raises if any is still held


async def _open_link_checks_the_asking_node(net) -> None:
    """open_link makes a proxy only for a node or user of the run, signing for its own link."""
    n1, n2, alice = net.plan.node("n01"), net.plan.node("n02"), net.plan.user("alice")

    async def ask(src: str, dst: str, signer) -> tuple[int, object]:
        sig = signer.sign(link_open_message(src, dst))
        resp = await call_once(*net.plan.controller, "open_link", {"src": src, "dst": dst, "signature": sig},
                               timeout=5.0)
        return resp.status, resp.body

    assert await ask(n1.ed25519_public, n2.ed25519_public, n1.identity) == (200, {"link": "n01->n02"})
    assert "n01->n02" in await net.api.proxies()
    status, body = await ask(n1.ed25519_public, n2.ed25519_public, n2.identity)  # n02 signing for n01
    assert status == 401 and "signature" in body["error"]
    alice_key, bob = alice.identity.ed25519_public.hex(), net.plan.user("bob")
    assert await ask(alice_key, n2.ed25519_public, alice.identity) == (200, {"link": "alice->n02"})
    assert "alice->n02" in await net.api.proxies()
    assert (await ask(alice_key, n2.ed25519_public, bob.identity))[0] == 401  # bob signing for alice
    assert (await ask(n1.ed25519_public, n2.ed25519_public, alice.identity))[0] == 401  # alice for n01
    stranger = Identity.from_seed(bytes(32))
    assert (await ask(stranger.ed25519_public.hex(), n2.ed25519_public, stranger))[0] == 403
    assert (await ask(n1.ed25519_public, stranger.ed25519_public.hex(), n1.identity))[0] == 404
    resp = await call_once(*net.plan.controller, "open_link", {"src": n1.ed25519_public}, timeout=5.0)
    assert resp.status == 400


@requires_toxiproxy
async def test_node_kill_pause_restart_add_remove(testnet_factory):
    async with testnet_factory(nodes=5, users=1, links="toxiproxy") as net:
        old = net.nodes["n02"]
        old_pid, old_port, old_ingress = old.child.pid, old.port, dict(old.ingress)
        await net.node_kill("n02")
        assert net.nodes["n02"].state == "killed" and proc_state(old_pid) == "dead"
        await net.node_restart("n02")
        rt = net.nodes["n02"]
        assert rt.child.pid != old_pid and rt.port == old_port and rt.ingress == old_ingress
        info = await net.call("n02", "info")
        assert info["ed25519_public"] == rt.plan.ed25519_public and info["messages"] >= 1  # same database

        await net.node_pause("n03")
        assert proc_state(net.nodes["n03"].child.pid) == "paused"
        with pytest.raises(RpcError):
            await net.call("n03", "info", timeout=0.5)
        await net.node_resume("n03")
        assert (await net.call("n03", "info"))["name"] == "n03"

        answers = (await net.call("registry", "info"))["answers"]
        name = await net.node_add()
        info = await net.call("registry", "info")
        assert name == "n06" and info["nodes"] == 6
        # The nodes already following the list heard of the new one by a delta, not the whole list.
        assert info["answers"]["delta"] >= answers["delta"] + 5
        assert "alice->n06" not in await net.api.proxies()  # made when alice first dials it
        await net.wiring.open_user_link("alice", "n06")
        assert "alice->n06" in await net.api.proxies()
        assert {"n06->n01", "n01->n06", "alice->n06"} <= {link["name"] for link in load_run(net.run_dir)["links"]}
        assert net.plan.link("n06", "n01") and net.plan.link("n01", "n06")
        # A new dial table redials only the routes that changed: the registry's long poll stays up.
        table = {k: list(v) for k, v in net.plan.dial_table("n04").items()}
        assert (await net.admin("n04", "admin_set_links", links=table))["redialled"] == 0
        assert "registry unreachable" not in net.nodes["n04"].plan.log.read_text()

        await net.node_remove("n01")
        assert (await net.call("registry", "info"))["nodes"] == 5
        assert not any("n01" in p for p in await net.api.proxies())
        run = load_run(net.run_dir)
        assert [n["name"] for n in run["removed_nodes"]] == ["n01"] and "n01" not in {n["name"] for n in run["nodes"]}
        await net.wait_ready(10)


@requires_toxiproxy
async def test_two_testnets_side_by_side(testnet_factory):
    async with testnet_factory(nodes=4, users=1, links="toxiproxy") as a, \
            testnet_factory(nodes=4, users=1, links="toxiproxy") as b:
        assert a.plan.block != b.plan.block
        assert a.check_result["ok"] and b.check_result["ok"]
        assert (await a.call("registry", "info"))["nodes"] == 4 == (await b.call("registry", "info"))["nodes"]


@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "exec"])
async def test_a_node_that_cannot_start_is_named_with_its_log_tail(tmp_path, zygote):
    with pytest.raises(BaseException) as info:
        async with open_testnet(Options(nodes=3, users=0, min_swarm=3, links="direct", run_dir=tmp_path / "r",
                                        inject_bugs=("no-such-bug",), ready_timeout_s=10, zygote=zygote)):
            pass
    leaves = error_leaves(info.value)
    assert all(isinstance(e, NotReady) for e in leaves), leaves
    assert leaves[0].name.startswith("n0") and leaves[0].exit_code == 2
    assert "no-such-bug" in str(leaves[0])  # the node's own words, from its stderr tail
    assert load_run(tmp_path / "r")["state"] == "failed"
    assert_no_leaks(tmp_path / "r")


async def test_nodes_started_as_fresh_interpreters(testnet_factory):
    async with testnet_factory(nodes=3, users=1, min_swarm=3, zygote=False) as net:
        assert net.zygote is None and net.check_result["ok"]
        assert all(rt.child.popen is not None for rt in net.nodes.values())
        await net.node_restart("n01")


# ---------------------------------------------------------------------------- the CLI, from other processes


def swarmnet(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "testnet.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=90)
    if check and proc.returncode != 0:
        raise AssertionError(f"swarmnet {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(cwd: Path) -> dict:
    st = json.loads(swarmnet(cwd, "status", "--json").stdout)
    return {n["name"]: n for n in st["nodes"]} | {"_": st}


@requires_toxiproxy
def test_cli_detach_status_node_ops_down(tmp_path):
    up = json.loads(swarmnet(tmp_path, "up", "--nodes", "5", "--users", "1", "--min-swarm", "3",
                             "--detach", "--json").stdout)
    run_dir = Path(up["run_dir"])
    assert (tmp_path / "runs" / "latest").resolve() == run_dir and up["check"]["ok"]
    try:
        st = status(tmp_path)
        assert st["_"]["controller"]["process"] == "alive"
        assert all(st[f"n0{i}"]["process"] == "alive" and st[f"n0{i}"]["height"] == 5 for i in range(1, 6))
        port = st["n02"]["address"]

        swarmnet(tmp_path, "node", "kill", "n02")
        assert status(tmp_path)["n02"]["process"] == "dead"
        swarmnet(tmp_path, "node", "pause", "n03")
        assert status(tmp_path)["n03"]["process"] == "paused"
        swarmnet(tmp_path, "node", "resume", "n03")
        swarmnet(tmp_path, "node", "restart", "n02")
        st = status(tmp_path)
        assert st["n02"]["process"] == "alive" and st["n02"]["address"] == port and st["n03"]["process"] == "alive"
        bad = swarmnet(tmp_path, "node", "kill", "n99", check=False)
        assert bad.returncode == 1 and "n99" in bad.stderr and "Traceback" not in bad.stderr
        assert "n0" in swarmnet(tmp_path, "logs", "n02").stdout
    finally:
        swarmnet(tmp_path, "down")
    run = load_run(run_dir)
    for name, pid, ct in recorded_processes(run, controller=True):
        assert proc_state(pid, ct) == "dead", name
    check_bindable(run_addresses(run))  # raises if any is still held


def test_every_child_dies_with_a_killed_controller(tmp_path):
    up = json.loads(swarmnet(tmp_path, "up", "--nodes", "4", "--users", "1", "--min-swarm", "3", "--links", "direct",
                             "--detach", "--json").stdout)
    run_dir = Path(up["run_dir"])
    swarmnet(tmp_path, "node", "pause", "n02")  # even a stopped node must go
    run = load_run(run_dir)
    procs = recorded_processes(run)
    assert len(procs) == 4 + 2
    os.kill(up["controller_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(proc_state(pid, ct) != "dead" for _, pid, ct in procs):
        time.sleep(0.05)
    assert [name for name, pid, ct in procs if proc_state(pid, ct) != "dead"] == []
    out = swarmnet(tmp_path, "down", "--json")  # nothing left to stop, and that is fine
    assert json.loads(out.stdout)["asked_controller"] is False


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    out = swarmnet(tmp_path, "status", check=False)
    assert out.returncode == 1 and "no run found" in out.stderr and "Traceback" not in out.stderr
    out = swarmnet(tmp_path, "up", "--nodes", "2", "--min-swarm", "3", "--links", "direct", check=False)
    assert out.returncode == 1 and "min-swarm" in out.stderr and not (tmp_path / "runs").exists()
    ident = json.loads(swarmnet(tmp_path, "id", "--seed", "0123456789abcdef0123456789abcdef", "--json").stdout)
    assert ident["session_id"] == "05d2ad010eeb72d72e561d9de7bd7b6989af77dcabffa03a5111a6c859ae5c3a72"
    assert "seed" not in ident


@requires_toxiproxy
async def test_proxies_shared_out_among_toxiproxy_servers_work_as_one_link_table(testnet_factory):
    from testnet import links as L

    async with testnet_factory(nodes=4, users=1, min_swarm=2, links="toxiproxy", toxiproxy_servers=3) as net:
        run = load_run(net.run_dir)
        servers = run["toxiproxy"]["servers"]
        assert len(servers) == 3 and len({(s["host"], s["port"]) for s in servers}) == 3
        # Each server holds exactly the proxies the plan gives it; together, the whole link table.
        await net.api.populate([{"name": link["name"]} for link in run["links"]])  # every node link made now
        held = {}
        for i, api in enumerate(net.api.apis):
            for name in await api.proxies():
                assert net.plan.server_of(name) == i
                held[name] = i
        assert set(held) == {link["name"] for link in run["links"]} and len(set(held.values())) == 3
        pids = [pid for _, pid, _ in recorded_processes(run)]
        assert len(pids) == 4 + 1 + 3 + 1  # nodes, registry, servers, zygote
        # A fault on a link of a server other than the first cuts that link only, and heals.
        link = next(l for l in net.plan.links if net.plan.server_of(l.name) == 2 and not l.from_user)
        host, port = link.listen
        async with L.link_down(net.api, link.name):
            with pytest.raises(RpcError):
                await call_once(host, port, "info", {}, timeout=1.0)
        assert (await call_once(host, port, "info", {}, timeout=5.0)).status == 200
    assert all(not psutil.pid_exists(pid) or proc_state(pid) == "dead" for pid in pids)
