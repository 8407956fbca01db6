"""The byzantine nemesis: hostile members of swarms, with their own registered keys, must not
change an account's messages on the other members (chaos/adversary/byzantine.py)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from chaos.adversary.byzantine import hostile_members
from chaos.scenario import ScenarioError, check_byzantine_params, parse_scenario
from chaos.sim.jobs import run_jobs


@given(st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), st.integers(0, 5), max_size=40),
       st.integers(1, 5), st.integers(0, 1000))
def test_hostile_members_leave_every_swarm_an_honest_majority(swarms, per_swarm, seed):
    hostile = hostile_members(swarms, per_swarm, random.Random(seed))
    assert hostile == sorted(set(hostile)) and set(hostile) <= set(swarms)
    size = Counter(swarms.values())
    for sid, n in Counter(swarms[h] for h in hostile).items():
        assert n <= per_swarm and 2 * n < size[sid]
    # Every swarm of three or more holds one (the nemesis must not quietly do nothing).
    assert {sid for sid, n in size.items() if n >= 3} == {swarms[h] for h in hostile}


def test_byzantine_params_name_what_is_wrong():
    assert check_byzantine_params({})["behaviours"] == ["delete", "expire", "plant", "alter", "lie-retrieve",
                                                         "drop-replication", "lie-digest", "misrelay"]
    with pytest.raises(ScenarioError, match="behaviours must be"):
        check_byzantine_params({"behaviours": ["delete", "lie"]})
    with pytest.raises(ScenarioError, match="unknown key"):
        check_byzantine_params({"per_node": 1})
    with pytest.raises(ScenarioError, match="per_swarm"):
        parse_scenario({"faults": {"timeline": [{"kind": "byzantine", "params": {"per_swarm": 0}}]}})


SMALL = """
name = "byzantine-small"
description = "A hostile member in each of two swarms of 4 while users send and delete."

[topology]
nodes = 8
min_swarm = 4
users = 3

[workload]
rate = 8
duration_s = 6
delete_fraction = 0.3
drain_s = 6

[[faults.timeline]]
at_s = 0.5
duration_s = 7
kind = "byzantine"
params = { interval_s = 0.2 }

[check]
quiet_s = 2
checkers = ["delivery", "replication", "authority"]
"""


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("byzantine")
    path = base / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    jobs = [{"scenario": str(path), "seed": 1, "runs_dir": str(base / "honest")},
            {"scenario": str(path), "seed": 1, "runs_dir": str(base / "canary"),
             "inject_bugs": ["unsigned-peer-delete"]}]
    return {("canary" if "canary" in r["run_dir"] else "honest"): r for r in run_jobs(jobs, 2)}


def test_honest_members_refuse_every_hostile_members_change(small_runs):
    from pathlib import Path

    r = small_runs["honest"]
    assert r["valid"] is True, r
    records = [json.loads(line) for line in (Path(r["run_dir"]) / "adversary.jsonl").read_text().splitlines()]
    tried = Counter((x["op"], x.get("variant")) for x in records if x.get("attack") == "byzantine")
    for op in [("replicate_delete", None), ("replicate_expire", None), ("replicate", "altered")]:
        assert tried[op] > 0, tried
    assert sum(n for (op, v), n in tried.items() if op == "replicate" and v != "altered") > 0
    assert all(x["status"] != 200 for x in records if x.get("op", "").startswith("replicate"))


def test_the_unsigned_peer_delete_canary_fails_authority(small_runs):
    r = small_runs["canary"]
    assert r["valid"] is False and "authority" in r["failing"], r


def test_a_lying_retrieve_leaves_out_repeats_and_alters_under_the_true_hash():
    from nodes.hostile import Hostility
    from nodes.storage import StoredMessage
    from testnet.base.protocol import RequestError

    msgs = [StoredMessage("05" + "ab" * 32, 0, f"h{i}", b"data %d" % i, 1, 2) for i in range(400)]
    h = Hostility(random.Random(7))
    assert h.tamper(msgs) and "lie-retrieve" not in h
    with pytest.raises(RequestError, match="unknown behaviour"):
        h.arm(["lie-about-everything"])
    assert h.arm(["lie-retrieve"]) == ["lie-retrieve"] and "lie-retrieve" in h
    out = h.tamper(msgs)
    by_hash = Counter(m.hash for m in out)
    original = {m.hash: m.data for m in msgs}
    assert 50 < len(msgs) - len(by_hash) < 150  # left out
    assert 20 < sum(1 for n in by_hash.values() if n > 1) < 100  # repeated
    assert 20 < sum(1 for m in out if m.data != original[m.hash]) < 100  # altered, hash kept
    again = Hostility(random.Random(7))
    again.tamper(msgs)
    assert again.tamper(msgs) == out  # the node's seeded Random: exact in the simulation


def test_a_hostile_member_lies_in_replication_digests_and_relaying_and_counts_each_lie():
    from nodes.hostile import Hostility
    from nodes.storage import StoredMessage

    h = Hostility(random.Random(3))
    assert h.arm(["drop-replication", "lie-digest", "misrelay"]) == ["drop-replication", "lie-digest", "misrelay"]
    pk = "05" + "ab" * 32
    h.drop_copies([StoredMessage(pk, 0, f"d{i}", b"x", 1, 2) for i in range(3)])
    plans = [h.store_plan() for _ in range(200)]
    assert {True, False} == {keep for keep, _ in plans} == {forge for _, forge in plans}
    digests = [h.lie_digest([pk], {}, 100) for _ in range(50)]
    assert {} in digests and any(set(d.get(pk, {})) == {97, 98, 99, 100} for d in digests)
    hashes = [h.lie_hashes({pk: ["real"]}) for _ in range(50)]
    assert {pk: []} in hashes  # claims emptiness: honest peers push
    claimed = next(x[pk] for x in hashes if x[pk])
    assert {"real", "d0", "d1", "d2"} < set(claimed) and len(claimed) == 5  # what it dropped, and a made-up hash
    acts = [h.relay_act()[0] for _ in range(1000)]
    assert 50 < acts.count("drop") < 150 and 100 < acts.count("delay") < 200 and 100 < acts.count("replay") < 200
    assert h.acts["copies-dropped"] == 3 and h.acts["stores-not-forwarded"] == 200
    assert h.acts["relay-drop"] == acts.count("drop")
    h.arm([])  # honest again: what it dropped is forgotten
    assert not any("d0" in h.lie_hashes({pk: []})[pk] for _ in range(20))


def test_a_client_counts_only_results_their_members_signed_and_catches_a_forged_one():
    from clients.client import Client, ServiceNode
    from testnet.base import crypto

    members = [crypto.Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3)]
    outsider = crypto.Identity.from_seed(bytes([9]) * 32)
    nodes = [ServiceNode(m.ed25519_public.hex(), m.x25519_public.hex(), "127.0.0.1", 1, 0) for m in members]

    class View:
        def swarm_for(self, _):
            return nodes

    want = "h" * 43
    root, paths = crypto.results_root(["other" * 8, want, "more" * 10])  # one peer's request of three copies

    def signed(who, root=root):
        return crypto.sign_fast(who, crypto.store_result_message(who.ed25519_public.hex(), root))

    own_root = crypto.results_root([want])[0]
    results = {nodes[0].ed25519_public: {"status": 200, "signature": signed(members[0], own_root)},
               nodes[1].ed25519_public: {"status": 200, "signature": signed(members[1]), "proof": paths[1]},
               nodes[2].ed25519_public: {"status": 502, "error": "timeout"},
               outsider.ed25519_public.hex(): {"status": 200, "signature": signed(outsider, own_root)}}
    vouched, forged = Client._vouched(View(), "05" + "00" * 32, want, {"hash": want, "swarm": results})
    assert vouched == sorted(n.ed25519_public for n in nodes[:2]) and not forged
    # The target claims a peer stored it, under its own signature (or the path of another copy).
    for lie in ({"status": 200, "signature": signed(members[0], own_root)},
                {"status": 200, "signature": signed(members[2]), "proof": paths[0]}):
        results[nodes[2].ed25519_public] = lie
        vouched, forged = Client._vouched(View(), "05" + "00" * 32, want, {"hash": want, "swarm": results})
        assert forged and len(vouched) == 2
    assert Client._vouched(View(), "05" + "00" * 32, want, {"hash": "x", "swarm": results}) == ([], False)


def test_delivery_owes_only_what_an_honest_member_vouched_for():
    from chaos.checkers.delivery import HostilePeriod, check_delivery

    def send(mid, vouched, t):
        return [{"type": "invoke", "op": "send", "msg_id": mid, "from": "a", "to": "b", "body_digest": "d",
                 "hash": mid, "t": t},
                {"type": "ok", "op": "send", "msg_id": mid, "hash": mid, "vouched": vouched, "t": t + 10}]

    history = send("m1", ["evil"], 100) + send("m2", ["evil", "good"], 100) + send("m3", ["evil"], 900)
    hostile = [HostilePeriod(frozenset({"evil"}), 50, 500)]
    v = check_delivery(history, {"a": "05a", "b": "05b"}, hostile=hostile)
    assert v["unvouched"] == ["m1"] and sorted(v["lost"]) == ["m2", "m3"] and v["counts"]["honestly_vouched"] == 2
    assert sorted(check_delivery(history, {"a": "05a", "b": "05b"})["lost"]) == ["m1", "m2", "m3"]
