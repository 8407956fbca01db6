"""The registry: pure rules of RegistryState, its trio server in-process, and
one real ``python -m testnet.registry`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings, strategies as st

from testnet.base.crypto import Identity
from testnet.base.protocol import RequestError, Status
from testnet.base.records import deregister_args, deregister_message, register_args, register_message
from testnet.registry import run_registry
from testnet.registry_state import (
    MAX_WAIT_MS, RegistryState, StateFileError, load_state, parse_poll_args, save_state,
)
from testnet.base.rpc import call_once, open_rpc

NOW = 1_700_000_000_000  # ms
IDS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(16)]
ROOT = Path(__file__).resolve().parents[1]


def reg(state: RegistryState, i: int, port: int = 20000, now: int = NOW, host: str | None = None) -> dict:
    return state.register(register_args(IDS[i], host or f"127.30.0.{i + 1}", port, now), now)


def status_of(fn, *args) -> int:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.status


# --------------------------------------------------------------------------- pure


def test_signed_messages_have_the_contract_layout():
    assert register_message("ab", "cd", "127.0.0.1", 80, 5) == b"register|ab|cd|127.0.0.1|80|5"
    assert deregister_message("ab", 5) == b"deregister|ab|5"
    # Fields cannot run into each other: another port and time never sign the same bytes.
    assert register_message("ab", "cd", "127.0.0.1", 8055, 5) != register_message("ab", "cd", "127.0.0.1", 805, 55)
    args = register_args(IDS[0], "127.0.0.1", 80, NOW)
    assert args["ed25519_public"] == IDS[0].ed25519_public.hex()
    assert args["x25519_public"] == IDS[0].x25519_public.hex()
    assert len(args["signature"]) == 64


def test_register_reregister_and_deregister():
    state = RegistryState(min_swarm=3)
    assert reg(state, 0) == {"height": 1, "swarm_id": 0}
    assert reg(state, 1)["height"] == 2
    # Same address again: nothing changes, same height.
    assert reg(state, 0, now=NOW + 1000) == {"height": 2, "swarm_id": 0}
    assert state.height == 2
    # A restart on a new port: address updated, swarm kept, height bumped.
    assert reg(state, 0, port=20001) == {"height": 3, "swarm_id": 0}
    node = {n["ed25519_public"]: n for n in state.snapshot()["nodes"]}[IDS[0].ed25519_public.hex()]
    assert (node["host"], node["port"], node["swarm_id"]) == ("127.30.0.1", 20001, 0)
    assert node["x25519_public"] == IDS[0].x25519_public.hex()

    assert state.deregister(deregister_args(IDS[0], NOW), NOW) == {"height": 4}
    assert [n["ed25519_public"] for n in state.snapshot()["nodes"]] == [IDS[1].ed25519_public.hex()]
    assert status_of(state.deregister, deregister_args(IDS[0], NOW), NOW) == Status.NOT_FOUND
    assert state.height == 4
    assert state.info() | {"version": None} == {
        "role": "registry", "version": None, "height": 4, "nodes": 1, "swarms": 1, "min_swarm": 3,
        "answers": {"whole": 0, "delta": 0, "unchanged": 0}}


def test_bad_signatures_are_401_and_change_nothing():
    state = RegistryState()
    forged = register_args(IDS[0], "127.0.0.1", 20000, NOW)
    forged["signature"] = IDS[1].sign(register_message(
        forged["ed25519_public"], forged["x25519_public"], "127.0.0.1", 20000, NOW))
    assert status_of(state.register, forged, NOW) == Status.UNAUTHORIZED
    moved = register_args(IDS[0], "127.0.0.1", 20000, NOW) | {"port": 20001}  # signed for another port
    assert status_of(state.register, moved, NOW) == Status.UNAUTHORIZED
    reg(state, 0)
    other = deregister_args(IDS[1], NOW) | {"ed25519_public": IDS[0].ed25519_public.hex()}
    assert status_of(state.deregister, other, NOW) == Status.UNAUTHORIZED
    assert state.height == 1 and len(state.nodes) == 1


@pytest.mark.parametrize("skew_ms, ok", [(60_000, True), (-60_000, True), (60_001, False), (-600_000, False)])
def test_timestamps_outside_60_s_are_406(skew_ms, ok):
    state = RegistryState()
    args = register_args(IDS[0], "127.0.0.1", 20000, NOW + skew_ms)
    if ok:
        assert state.register(args, NOW)["height"] == 1
        assert state.deregister(deregister_args(IDS[0], NOW - skew_ms), NOW) == {"height": 2}
    else:
        assert status_of(state.register, args, NOW) == Status.CLOCK_OUT_OF_RANGE
        reg(state, 0)
        assert status_of(state.deregister, deregister_args(IDS[0], NOW + skew_ms), NOW) == 406
        assert state.height == 1


GOOD = register_args(IDS[0], "127.0.0.1", 20000, NOW)


@pytest.mark.parametrize("change", [
    {"ed25519_public": None},
    {"ed25519_public": GOOD["ed25519_public"].upper()},
    {"ed25519_public": GOOD["ed25519_public"][:-2]},
    {"x25519_public": IDS[1].x25519_public.hex()},  # not derived from the ed25519 key
    {"host": ""}, {"host": "localhost"}, {"host": "127.0.0.01"}, {"host": 127},
    {"port": 0}, {"port": 65536}, {"port": True}, {"port": "20000"},
    {"timestamp": str(NOW)}, {"timestamp": 1.5},
    {"signature": b"\0" * 63}, {"signature": GOOD["signature"].hex()},
    {"extra": 1},
])
def test_malformed_register_is_400(change):
    state = RegistryState()
    args = {k: v for k, v in (GOOD | change).items() if v is not None}
    with pytest.raises(RequestError) as info:
        state.register(args, NOW)
    assert info.value.status == Status.BAD_REQUEST
    assert info.value.body["error"]
    assert state.height == 0 and not state.nodes


def test_malformed_deregister_and_poll_args_are_400():
    state = RegistryState()
    for bad in ({}, {"ed25519_public": "zz", "timestamp": NOW, "signature": b"\0" * 64},
                deregister_args(IDS[0], NOW) | {"timestamp": None}):
        assert status_of(state.deregister, bad, NOW) == Status.BAD_REQUEST
    for bad in ({"since_height": "1"}, {"wait_ms": -1}, {"wait_ms": True}, {"other": 1}):
        assert status_of(parse_poll_args, bad) == Status.BAD_REQUEST
    assert parse_poll_args({}) == (None, 0)
    assert parse_poll_args({"since_height": -1, "wait_ms": 10**9}) == (-1, MAX_WAIT_MS)


def test_service_nodes_answers_unchanged_only_at_the_current_height():
    state = RegistryState()
    reg(state, 0)
    assert state.service_nodes(1) == {"height": 1, "changed": False, "epoch": 0, "nodes": []}
    for since in (None, -1, 0, 7):  # 7: a follower of a registry restarted without state
        body = state.service_nodes(since)
        assert body["changed"] is True and body["height"] == 1 and len(body["nodes"]) == 1


def test_history_lists_the_assignments_replaced_newest_first_and_only_when_asked():
    state = RegistryState(min_swarm=1)
    for i in range(4):
        reg(state, i)
    before = state.snapshot()
    assert "history" not in state.service_nodes(None)
    history = state.service_nodes(-1, history=True)["history"]
    heights = [h["height"] for h in history]
    assert heights == sorted(heights, reverse=True) and heights[0] == state.height - 1
    # Each entry is the assignment at its height, as its differences from the list it came with:
    # the newest one lacks the last node (None), and names no node whose swarm did not change.
    assert history[0]["differ"] == {IDS[3].ed25519_public.hex(): None}
    now = {n["ed25519_public"]: n["swarm_id"] for n in state.snapshot()["nodes"]}
    for entry, (height, then) in zip(history, reversed(state.history)):
        rebuilt = {k: v for k, v in {**now, **entry["differ"]}.items() if v is not None}
        assert entry["height"] == height and rebuilt == then
    # A change of address only (a restart) moves no node: nothing new to remember.
    reg(state, 0, port=20001)
    assert state.height == before["height"] + 1
    assert [h["height"] for h in state.service_nodes(-1, history=True)["history"]] == heights
    assert status_of(parse_poll_args, {"history": 1}) == Status.BAD_REQUEST


def test_history_stops_before_it_names_too_many_nodes(monkeypatch):
    import testnet.registry_state as R

    state = RegistryState(min_swarm=1)
    for i in range(8):
        reg(state, i)
    full = state.service_nodes(-1, history=True)["history"]
    names = [len(e["differ"]) for e in full]  # newest first: 1, 2, 3, ...
    monkeypatch.setattr(R, "HISTORY_MAX_NAMES", names[0] + names[1])
    state.register(register_args(IDS[9], "127.30.0.10", 20000, NOW), NOW)
    state.deregister(deregister_args(IDS[9], NOW), NOW)  # a new height: the history is made again
    cut = state.service_nodes(-1, history=True)["history"]
    assert 0 < sum(len(e["differ"]) for e in cut) <= names[0] + names[1] and len(cut) < len(full)
    assert [e["height"] for e in cut] == [e["height"] for e in state.service_nodes(-1, history=True)["history"]]


def test_a_first_list_with_history_fits_in_a_frame_at_1000_nodes():
    """Whole past assignments of 1,000 nodes, 16 times, were 1.2 MB: over the 1 MiB frame
    limit, every late joiner's first get_service_nodes was refused (413), forever."""
    import random

    from testnet.base.protocol import Response, encode_message
    from testnet.base.records import NodeRecord

    rng = random.Random(3)
    nodes = {k: NodeRecord(k, k, "127.30.0.1", 20000, rng.getrandbits(64))
             for k in (rng.randbytes(32).hex() for _ in range(1000))}
    state = RegistryState(nodes=nodes, height=100)
    for h in range(84, 100):  # every node in another swarm at every past height: the worst case
        state.history.append((h, {k: rng.getrandbits(64) for k in nodes}))
    body = state.service_nodes(-1, history=True)
    assert len(body["nodes"]) == 1000 and body["history"]
    encode_message(Response(1, Status.OK, body))  # raises when over the frame limit
    assert sum(len(e["differ"]) for e in body["history"]) <= 6_000


def apply(nodes: dict[str, dict], body: dict) -> dict[str, dict]:
    """A follower's list after an answer: unchanged, the whole list, or a delta applied to ``nodes``."""
    if not body["changed"]:
        return nodes
    if "since_height" not in body:
        return {n["ed25519_public"]: n for n in body["nodes"]}
    out = {k: v for k, v in nodes.items() if k not in body["removed"]}
    out.update({n["ed25519_public"]: n for n in body["nodes"]})
    return out


def test_a_follower_naming_this_run_gets_only_what_changed_since_its_height():
    state = RegistryState(min_swarm=2, epoch=5)
    for i in range(12):
        reg(state, i)
    h, held = state.height, apply({}, state.service_nodes(None))
    reg(state, 12)
    reg(state, 3, port=20001)  # a restart: new address, same swarm
    state.deregister(deregister_args(IDS[5], NOW), NOW)
    body = state.service_nodes(h, epoch=5)
    assert body["since_height"] == h and body["height"] == h + 3 and body["epoch"] == 5
    assert body["removed"] == [IDS[5].ed25519_public.hex()]
    changed = {n["ed25519_public"] for n in body["nodes"]}
    assert {IDS[12].ed25519_public.hex(), IDS[3].ed25519_public.hex()} <= changed and len(changed) < 12
    assert apply(held, body) == apply({}, state.snapshot())
    assert state.service_nodes(h, epoch=5) is body  # one answer per height, shared
    # No epoch (an old follower), another run's epoch (a restarted registry) or asking
    # for history: the whole list.  At the current height of another run: not "unchanged".
    for args in ({}, {"epoch": 4}, {"epoch": 5, "history": True}):
        assert "since_height" not in state.service_nodes(h, **args)
    assert state.service_nodes(state.height, epoch=4)["changed"] is True
    assert state.service_nodes(state.height, epoch=5)["changed"] is False
    assert status_of(parse_poll_args, {"epoch": "5"}) == Status.BAD_REQUEST


def test_a_delta_falls_back_to_the_whole_list_when_the_log_ends_or_it_is_not_smaller():
    import testnet.registry_state as R

    state = RegistryState(min_swarm=2, epoch=1, height=40)
    assert state.delta(39) is None  # before this run's log began
    for i in range(6):
        reg(state, i)
    assert state.delta(40) is None  # every node changed: the list is smaller
    reg(state, 6)
    assert state.delta(46) is not None and state.delta(47) is None  # 47: the current height
    small = R.RegistryState(min_swarm=2, epoch=1)
    small._changes = type(small._changes)(maxlen=2)  # a short log: what falls out is gone
    for i in range(10):
        reg(small, i)
    assert small.delta(7) is None and small.delta(8) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(1, 3)), min_size=1, max_size=30),
       st.data())
def test_applying_a_delta_to_any_height_gives_the_current_list(ops, data):
    state = RegistryState(min_swarm=2, epoch=3)
    lists = {0: {}}
    for join, i, port in ops:
        try:
            if join:
                reg(state, i, port=port)
            else:
                state.deregister(deregister_args(IDS[i], NOW), NOW)
        except RequestError:
            pass
        lists[state.height] = apply({}, state.snapshot())
    since = data.draw(st.sampled_from(sorted(lists)))
    assert apply(lists[since], state.service_nodes(since, epoch=3)) == lists[state.height]


def test_swarms_form_and_dissolve_with_min_swarm_3():
    state = RegistryState(min_swarm=3, seed=1)
    for i in range(12):
        assert reg(state, i)["height"] == i + 1
    swarms = state.swarms()
    assert len(swarms) >= 2
    assert all(len(members) >= 3 for members in swarms.values())
    assert sum(map(len, swarms.values())) == 12
    assert state.info()["swarms"] == len(swarms)
    for i in range(10):
        state.deregister(deregister_args(IDS[i], NOW), NOW)
        sizes = [len(m) for m in state.swarms().values()]
        assert len(sizes) == 1 or min(sizes) >= 3
    assert state.height == 22 and len(state.swarms()) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(1, 3)), max_size=30))
def test_height_bumps_exactly_when_the_list_changes(ops):
    state = RegistryState(min_swarm=2)
    for join, i, port in ops:
        before = (state.height, state.snapshot()["nodes"])
        try:
            if join:
                reg(state, i, port=port)
            else:
                state.deregister(deregister_args(IDS[i], NOW), NOW)
        except RequestError as exc:
            assert exc.status == Status.NOT_FOUND
        after = state.snapshot()["nodes"]
        assert state.height == before[0] + (after != before[1])
        sizes = [len(m) for m in state.swarms().values()]
        assert len(sizes) <= 1 or min(sizes) >= 2


def test_state_file_round_trip(tmp_path):
    path = str(tmp_path / "registry.json")
    assert load_state(path, min_swarm=3, seed=0).height == 0  # no file yet: empty
    state = RegistryState(min_swarm=5, seed=5)
    for i in range(12):
        reg(state, i)
    assert len(state.swarms()) == 1  # 12 nodes are too few for two swarms of 7
    save_state(path, state)
    again = load_state(path, min_swarm=5, seed=5)
    assert (again.height, again.snapshot()) == (state.height, state.snapshot())
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]  # no temp file left behind
    # A smaller min_swarm reassigns (12 nodes now split) and bumps the height once.
    smaller = load_state(path, min_swarm=3, seed=5)
    assert len(smaller.swarms()) >= 2 and smaller.height == state.height + 1
    for text in ("{", "[]", json.dumps(state.to_json() | {"format": 99}),
                 json.dumps(state.to_json() | {"nodes": [{"ed25519_public": "x"}]})):
        Path(path).write_text(text)
        with pytest.raises(StateFileError):
            load_state(path, min_swarm=3, seed=5)


# --------------------------------------------------------------------------- in-process server


async def test_only_staked_keys_register_and_only_the_admin_token_stakes(tmp_path):
    state_path = str(tmp_path / "state.json")
    async with trio.open_nursery() as nursery:
        host, port = await _registry(nursery, min_swarm=1, state_path=state_path, admin_token="t0ken",
                                     stakes=[IDS[0].ed25519_public.hex()])
        async with open_rpc(host, port) as rpc:
            assert (await rpc.call("register", register_args(IDS[0], "127.30.0.1", 20000, _now()),
                                   timeout=5)).status == Status.OK
            # A valid signature by a key nobody staked: authenticated, not allowed.
            stranger = register_args(IDS[1], "127.30.0.2", 20000, _now())
            assert (await rpc.call("register", stranger, timeout=5)).status == Status.FORBIDDEN
            key = {"ed25519_public": IDS[1].ed25519_public.hex()}
            for token in (None, "wrong", 7):
                args = key if token is None else key | {"token": token}
                assert (await rpc.call("stake", args, timeout=5)).status == Status.UNAUTHORIZED
            assert (await rpc.call("stake", key | {"token": "t0ken", "x": 1}, timeout=5)).status == 400
            assert (await rpc.call_ok("stake", key | {"token": "t0ken"}, timeout=5)) == {"staked": key["ed25519_public"]}
            stranger = register_args(IDS[1], "127.30.0.2", 20000, _now())
            assert (await rpc.call_ok("register", stranger, timeout=5))["height"] == 2
        nursery.cancel_scope.cancel()
    # Stakes survive a restart with the state file.
    assert set(load_state(state_path, min_swarm=1, seed=0).staked) == {IDS[0].ed25519_public.hex(),
                                                                        IDS[1].ed25519_public.hex()}


async def test_server_long_poll_wakes_on_change_and_times_out(tmp_path):
    state_path = str(tmp_path / "state.json")
    async with trio.open_nursery() as nursery:
        host, port = await _registry(nursery, min_swarm=3, state_path=state_path)
        async with open_rpc(host, port) as rpc:
            first = await rpc.call_ok("get_service_nodes", {}, timeout=5)
            epoch = first.pop("epoch")
            assert first == {"height": 0, "changed": True, "nodes": []} and isinstance(epoch, int)

            async def join_later():
                await trio.sleep(0.1)
                args = register_args(IDS[0], "127.30.0.1", 20000, _now())
                assert (await rpc.call_ok("register", args, timeout=5))["height"] == 1

            nursery.start_soon(join_later)
            started = trio.current_time()
            body = await rpc.call_ok("get_service_nodes", {"since_height": 0, "wait_ms": 5000}, timeout=8)
            assert trio.current_time() - started < 2
            assert body["changed"] is True and body["height"] == 1
            assert [n["port"] for n in body["nodes"]] == [20000]

            started = trio.current_time()
            body = await rpc.call_ok("get_service_nodes", {"since_height": 1, "wait_ms": 200}, timeout=5)
            assert trio.current_time() - started >= 0.19
            assert body == {"height": 1, "changed": False, "epoch": epoch, "nodes": []}
            # A follower of another run of the registry at the same height gets the whole list at once.
            body = await rpc.call_ok("get_service_nodes", {"since_height": 1, "wait_ms": 5000, "epoch": epoch - 1},
                                     timeout=2)
            assert body["changed"] is True and len(body["nodes"]) == 1

            assert (await rpc.call("nope", {}, timeout=5)).status == Status.NOT_FOUND
            bad = register_args(IDS[1], "127.30.0.2", 20000, _now()) | {"port": 20001}
            assert (await rpc.call("register", bad, timeout=5)).status == Status.UNAUTHORIZED
            assert (await rpc.call("get_service_nodes", {"wait_ms": -5}, timeout=5)).status == 400
        nursery.cancel_scope.cancel()

    # A restarted registry keeps its list.
    async with trio.open_nursery() as nursery:
        host, port = await _registry(nursery, min_swarm=3, state_path=state_path)
        info = (await call_once(host, port, "info", {}, timeout=5)).body
        assert (info["role"], info["height"], info["nodes"], info["min_swarm"]) == ("registry", 1, 1, 3)
        nursery.cancel_scope.cancel()


def _now() -> int:
    return int(time.time() * 1000)


async def _registry(nursery: trio.Nursery, **options) -> tuple[str, int]:
    """A registry served in ``nursery`` on 127.0.0.1 (``options`` as run_registry takes them); its address."""
    ((host, port),) = await nursery.start(lambda task_status: run_registry("127.0.0.1", 0, task_status=task_status,
                                                                           **options))
    return host, port


async def test_a_burst_of_registrations_wakes_long_polls_a_few_times_and_is_saved_whole(tmp_path):
    from testnet.registry import PUBLISH_EVERY_S, load_state

    state_path = str(tmp_path / "state.json")
    async with trio.open_nursery() as nursery:
        host, port = await _registry(nursery, min_swarm=3, state_path=state_path)
        async with open_rpc(host, port) as rpc:
            await trio.sleep(PUBLISH_EVERY_S)  # quiet: the first change wakes at once
            wakes: list[tuple[float, int]] = []

            async def follow() -> None:
                height = 0
                while height < len(IDS):
                    body = await rpc.call_ok("get_service_nodes", {"since_height": height, "wait_ms": 5000},
                                             timeout=8)
                    height = body["height"]
                    wakes.append((trio.current_time(), height))

            async def register(i: int) -> None:
                await rpc.call_ok("register", register_args(IDS[i], f"127.30.0.{i + 1}", 20000, _now()), timeout=5)

            nursery.start_soon(follow)
            await trio.sleep(0.05)
            started = trio.current_time()
            await register(0)
            async with trio.open_nursery() as burst:  # the rest at once, as at a boot
                for i in range(1, len(IDS)):
                    burst.start_soon(register, i)
            with trio.fail_after(5):
                while not wakes or wakes[-1][1] < len(IDS):
                    await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert wakes[0][0] - started < PUBLISH_EVERY_S  # after a quiet spell: at once
    assert len(wakes) <= 4 < len(IDS)  # a burst: a few wakes, not one per change
    assert len(load_state(state_path, min_swarm=3, seed=0).nodes) == len(IDS)  # the newest state was saved


# --------------------------------------------------------------------------- a real process


@pytest.mark.parametrize("registering", [3, 2])
async def test_genesis_publishes_the_list_once_every_staked_node_registered_or_registrations_stall(
        monkeypatch, registering):
    import testnet.registry as R

    monkeypatch.setattr(R, "GENESIS_STALL_S", 0.6)
    async with trio.open_nursery() as nursery:
        host, port = await _registry(nursery, min_swarm=1, genesis=True,
                                     stakes=[IDS[i].ed25519_public.hex() for i in range(3)])
        async with open_rpc(host, port) as rpc:
            # Nothing published before genesis: a short poll answers "unchanged" at the asker's height.
            assert (await rpc.call_ok("get_service_nodes", {"since_height": -1, "wait_ms": 100},
                                      timeout=5))["changed"] is False
            got: list[tuple[float, dict]] = []

            async def follow():
                body = await rpc.call_ok("get_service_nodes", {"since_height": -1, "wait_ms": 10_000, "history": True},
                                         timeout=15)
                got.append((trio.current_time(), body))

            nursery.start_soon(follow)
            for i in range(registering):
                await trio.sleep(0.05)
                await rpc.call_ok("register", register_args(IDS[i], f"127.30.0.{i + 1}", 20000, _now()), timeout=5)
            last = trio.current_time()
            info = await rpc.call_ok("info", {}, timeout=5)
            assert info["height"] == registering  # assigned one by one all the same
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
            at, body = got[0]
            assert body["changed"] and len(body["nodes"]) == registering and body["height"] == registering
            # The assignments genesis went through were never published: no history (nodes/auth.py).
            assert body["history"] == []
            if registering == 3:
                assert at - last < 0.3  # at once, with the last staked node
            else:
                assert at - last >= 0.5  # the stall ended it: one staked node never came
        nursery.cancel_scope.cancel()


async def test_registry_process_announces_answers_and_stops_on_sigterm(tmp_path):
    log_path = tmp_path / "registry.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testnet.registry", "--host", "127.0.0.1", "--port", "0",
         "--min-swarm", "3", "--log", str(log_path), "--parent-pid", str(os.getpid())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with trio.fail_after(5):
            line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        ready = json.loads(line)
        assert ready["event"] == "listening" and ready["pid"] == proc.pid
        ((host, port),) = ready["addresses"]
        info = (await call_once(host, port, "info", {}, timeout=5)).body
        assert info["role"] == "registry" and info["min_swarm"] == 3 and info["nodes"] == 0

        os.kill(proc.pid, signal.SIGTERM)
        with trio.fail_after(5):
            code = await trio.to_thread.run_sync(proc.wait)
        assert code == 0, proc.stderr.read().decode()
        assert proc.stdout.read() == b""  # exactly one line on stdout
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
        assert "listening" in events and "stopping" in events
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
