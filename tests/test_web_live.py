"""``swarmnet serve`` against real networks: the live view pushed as server-sent events,
/metrics, acting through the controller's control API (recorded in faults.jsonl), and
the page refusing what would get around the run's authority."""

from __future__ import annotations

import json

import pytest
import trio

from testnet import rundir
from testnet.fixtures import requires_toxiproxy, running_testnet

from web_helpers import act, first_sse_event, get, page_token, post, served

pytestmark = pytest.mark.network


def faults(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]


async def snapshot_until(url: str, key: str, check, timeout_s: float = 10.0) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            snap = (await get(f"{url}/api/live/snapshot?run={key}")).json()
            if check(snap):
                return snap
            await trio.sleep(0.1)


async def refusals(url: str, token: str, net) -> None:
    """Acting needs the page's token, its origin and good input; whatever is refused is not done."""
    kill = {"run": "net", "action": "kill", "node": "n01"}
    plain = {"Content-Type": "application/json", "Origin": url}
    # no token, a wrong token, another origin, a form post: refused before anything is done
    for headers, body in [(plain, json.dumps(kill)), ({**plain, "X-Swarmnet-Token": "x" * 32}, json.dumps(kill)),
                          ({**plain, "X-Swarmnet-Token": token, "Origin": "http://evil.example"}, json.dumps(kill)),
                          ({"X-Swarmnet-Token": token, "Content-Type": "application/x-www-form-urlencoded"},
                           "run=net&action=kill&node=n01")]:
        r = await post(url + "/api/act", data=body, headers=headers)
        assert r.status_code in (403, 415), (headers, r.text)
    # a page reached through another host name (DNS rebinding) is not served at all
    r = await get(url + "/api/runs", headers={"Host": "evil.example"})
    assert r.status_code == 400
    for body, status, words in [
        ({"run": "net", "action": "explode"}, 400, "action must be one of"),
        ({"run": "net", "action": "kill"}, 400, "needs 'node'"),
        ({"run": "net", "action": "kill", "node": "../n01"}, 400, "needs 'node'"),
        ({"run": "net", "action": "kill", "node": "n09"}, 404, "no node n09"),
        ({"run": "nope", "action": "heal"}, 404, "no run 'nope'"),
        ({"run": "net", "action": "partition", "swarms": ["zz", 3]}, 400, "16 hex digits"),
        ({"run": "net", "action": "partition", "swarms": ["00" * 8, "00" * 8]}, 400, "two different"),
    ]:
        r = await act(url, token, body)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)
    r = await post(url + "/api/act", data="{not json", headers={**plain, "X-Swarmnet-Token": token})
    assert r.status_code == 400
    assert all(rt.state == "running" for rt in net.nodes.values())
    assert not (net.run_dir / "faults.jsonl").exists()  # nothing refused was done
    for path in ("/api/live/snapshot?run=nope", "/api/run?run=../../etc", "/api/run", "/api/run/report?run=x"):
        r = await get(url + path)
        assert r.status_code in (400, 404) and r.headers["content-type"].startswith(("application/json", "text/html"))


async def test_live_view_metrics_and_acting_on_a_network(tmp_path):
    runs_dir = tmp_path / "runs"
    async with running_testnet(runs_dir / "net", nodes=5, users=2, min_swarm=1) as net:
        async with served(runs_dir) as url:
            live = (await get(url + "/api/live")).json()
            assert live["default"] == "net" and [r["key"] for r in live["runs"]] == ["net"]
            first = await trio.to_thread.run_sync(first_sse_event, url + "/api/live/stream?run=net")
            assert first["event"] == "full"
            snap = first["snapshot"]
            assert snap["run_id"] == net.plan.run_id and snap["can_act"] and snap["controller"] == "alive"
            assert sorted(n["name"] for n in snap["nodes"]) == ["n01", "n02", "n03", "n04", "n05"]
            assert all(n["state"] == "up" and n["messages"] is not None and n["connections"] for n in snap["nodes"])
            # The swarms as the registry has them: each node in the one its info names.
            registry = await net.call("registry", "get_service_nodes", {})
            swarms = {f"{n['swarm_id']:016x}" for n in registry["nodes"]}
            assert {s["id"] for s in snap["swarms"]} == swarms
            assert sum(len(s["members"]) for s in snap["swarms"]) == 5

            text = (await get(url + "/metrics")).text
            assert f'swarmnet_node_messages{{node="n01",run="{net.plan.run_id}"' in text
            assert "swarmnet_node_cpu_seconds_total" in text and "swarmnet_run_faults_active" in text
            assert text.count('swarmnet_node_state{') == 5 * 7

            token = await page_token(url)
            await refusals(url, token, net)
            r = await act(url, token, {"run": "net", "action": "kill", "node": "n02"})
            assert r.status_code == 200 and r.json()["result"]["state"] == "killed"
            assert [(f["fault"], f["kind"], f["phase"], f["targets"]["nodes"]) for f in faults(net.run_dir)] == \
                [("c1", "kill", "start", ["n02"])]
            snap = await snapshot_until(url, "net", lambda s: {n["name"]: n["state"] for n in s["snapshot"]["nodes"]}
                                        .get("n02") == "killed")
            feed = [e["text"] for e in snap["events"]]
            assert "kill n02: done" in feed and any("fault c1 kill started (control API)" in t for t in feed)
            assert snap["snapshot"]["faults"][0]["kind"] == "kill"
            status = await rundir.gather_status(rundir.load_run(net.run_dir))
            assert {n["name"]: (n["state"], n["process"]) for n in status["nodes"]}["n02"] == ("killed", "dead")

            # What the controller refuses is a 409 with its reason; a partition needs Toxiproxy.
            r = await act(url, token, {"run": "net", "action": "pause", "node": "n02"})
            assert r.status_code == 409 and "n02 is killed" in r.json()["error"]
            two = sorted(swarms) * 2
            r = await act(url, token, {"run": "net", "action": "partition", "swarms": two[:2] if len(swarms) > 1
                                       else [two[0], "0123456789abcdef"]})
            assert r.status_code == 409 and "Toxiproxy" in r.json()["error"]

            r = await act(url, token, {"run": "net", "action": "heal"})
            assert r.status_code == 200 and [h["fault"] for h in r.json()["result"]["healed"]] == ["c1"]
            assert net.nodes["n02"].state == "running"
            assert [(f["fault"], f["phase"]) for f in faults(net.run_dir)] == [("c1", "start"), ("c1", "end")]
            await snapshot_until(url, "net", lambda s: all(n["state"] == "up" for n in s["snapshot"]["nodes"])
                                 and any("restarted" in e["text"] for e in s["events"]))


@requires_toxiproxy
async def test_a_partition_between_two_swarms_and_heal_all(tmp_path):
    runs_dir = tmp_path / "runs"
    async with running_testnet(runs_dir / "net", nodes=6, users=1, min_swarm=1, links="toxiproxy") as net:
        async with served(runs_dir) as url:
            token = await page_token(url)
            snap = await snapshot_until(url, "net", lambda s: len(s["snapshot"].get("swarms") or []) >= 2)
            a, b = snap["snapshot"]["swarms"][:2]
            r = await act(url, token, {"run": "net", "action": "partition", "swarms": [a["id"], b["id"]]})
            assert r.status_code == 200, r.text
            out = r.json()["result"]
            assert out["side_a"] == a["members"] and out["side_b"] == b["members"]
            assert out["proxies"] == 2 * len(a["members"]) * len(b["members"])
            cut = {name for name, f in net.api.faulted().items() if not f["enabled"]}
            assert cut == {f"{x}->{y}" for x in a["members"] for y in b["members"]} | \
                          {f"{y}->{x}" for x in a["members"] for y in b["members"]}
            snap = await snapshot_until(url, "net", lambda s: s["snapshot"]["link_faults"])
            lf = snap["snapshot"]["link_faults"][0]
            assert (lf["kind"], lf["family"], lf["side_a"], lf["side_b"]) == \
                ("halves", "partition", a["members"], b["members"])
            assert {n["name"] for n in snap["snapshot"]["nodes"] if n["state"] == "partitioned"} == \
                set(a["members"]) | set(b["members"])
            r = await act(url, token, {"run": "net", "action": "heal"})
            assert r.status_code == 200 and r.json()["result"]["failed"] == []
            assert not any(not f["enabled"] for f in net.api.faulted().values())
            rec = faults(net.run_dir)
            assert [(f["kind"], f["phase"]) for f in rec] == [("halves", "start"), ("halves", "end")]
            assert rec[0]["targets"]["swarms"] == [a["id"], b["id"]] and rec[0]["targets"]["by"] == "control"
