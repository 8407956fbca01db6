"""Tests for testnet.base.swarm: account -> swarm, node -> swarm assignment, diffs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testnet.base.swarm import (
    RING, NodeMove, SwarmChange, SwarmError, assign_swarms, diff_assignments,
    ideal_swarm_size, new_swarm_id, swarm_for, swarm_for_space, swarm_space, swarms_of,
)

VECTOR_ID = "05d2ad010eeb72d72e561d9de7bd7b6989af77dcabffa03a5111a6c859ae5c3a72"
HALF = 2**63

PROPS = settings(max_examples=150, deadline=None)


def node(i: int) -> str:
    return f"{i:064x}"


def space_id(value: int) -> str:
    """An account id whose swarm-space value is ``value`` (only the first word set)."""
    return "05" + value.to_bytes(8, "big").hex() + "00" * 24


def moved_existing(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(1 for n, s in before.items() if n in after and after[n] != s)


# -- swarm_space -----------------------------------------------------------


def test_swarm_space_vector():
    key = bytes.fromhex(VECTOR_ID[2:])
    words = [int.from_bytes(key[i:i + 8], "big") for i in range(0, 32, 8)]
    expected = words[0] ^ words[1] ^ words[2] ^ words[3]
    assert swarm_space(VECTOR_ID) == expected
    assert swarm_space(VECTOR_ID.upper()) == expected


def test_swarm_space_ignores_prefix_and_uses_big_endian():
    assert swarm_space(space_id(1)) == 1  # little-endian would give 2**56
    assert swarm_space("03" + space_id(1)[2:]) == 1
    # Four equal words cancel out.
    assert swarm_space("05" + "ab" * 8 * 4) == 0


@pytest.mark.parametrize("bad", [
    "", "05", VECTOR_ID[:-2], VECTOR_ID + "00", VECTOR_ID[:-1] + "g",
    VECTOR_ID[:-1] + " ", " " + VECTOR_ID[1:], VECTOR_ID[:-1] + "\n",
])
def test_swarm_space_rejects_malformed_ids(bad):
    with pytest.raises(SwarmError):
        swarm_space(bad)


def test_swarm_space_rejects_non_str():
    with pytest.raises(SwarmError, match="str"):
        swarm_space(bytes.fromhex(VECTOR_ID))  # type: ignore[arg-type]


# -- swarm_for ---------------------------------------------------------------


def test_swarm_for_exact_match():
    assert swarm_for_space(500, [100, 500, 900]) == 500
    assert swarm_for(space_id(500), [100, 500, 900]) == 500


def test_swarm_for_nearest_between():
    assert swarm_for_space(290, [100, 500, 900]) == 100
    assert swarm_for_space(310, [100, 500, 900]) == 500


def test_swarm_for_exact_tie_goes_left():
    assert swarm_for_space(300, [100, 500]) == 100
    # Tie across the wrap: 0 and 2**63 are both 2**62 away from 2**62 * 3.
    assert swarm_for_space(3 * 2**62, [0, HALF]) == HALF


def test_swarm_for_wraps_past_the_top():
    # v above the largest id: right wraps to the smallest id.
    assert swarm_for_space(RING - 10, [100, HALF]) == 100
    assert swarm_for_space(HALF + 10, [100, HALF]) == HALF


def test_swarm_for_wraps_below_the_bottom():
    # v below the smallest id: left wraps to the largest id.
    assert swarm_for_space(5, [100, RING - 10]) == RING - 10
    assert swarm_for_space(95, [100, RING - 10]) == 100


def test_swarm_for_near_the_ends_of_the_ring():
    ids = [999, HALF, RING - 1000]
    assert swarm_for_space(0, ids) == 999
    assert swarm_for_space(RING - 1, ids) == RING - 1000
    # 0 is 1000 from both ends: a tie, so left (the largest id) wins.
    assert swarm_for_space(0, [1000, RING - 1000]) == RING - 1000
    assert swarm_for_space(RING - 1, [0, HALF]) == 0
    assert swarm_for_space(0, [RING - 1, 5]) == RING - 1


def test_swarm_for_one_id_and_unsorted_input():
    for v in (0, 1, HALF, RING - 1):
        assert swarm_for_space(v, [12345]) == 12345
    assert swarm_for_space(310, (900, 500, 100)) == 500
    assert swarm_for_space(310, iter({900, 100, 500})) == 500


def test_swarm_for_errors():
    with pytest.raises(SwarmError, match="no swarms"):
        swarm_for(VECTOR_ID, [])
    with pytest.raises(SwarmError):
        swarm_for_space(RING, [0])
    with pytest.raises(SwarmError):
        swarm_for_space(5, [-1])


@PROPS
@given(st.integers(0, RING - 1), st.lists(st.integers(0, RING - 1), min_size=1, max_size=20))
def test_swarm_for_is_nearest_on_ring(value, ids):
    chosen = swarm_for_space(value, ids)
    assert chosen in ids

    def dist(s):
        return min((s - value) % RING, (value - s) % RING)

    assert dist(chosen) == min(dist(s) for s in ids)


# -- new_swarm_id ------------------------------------------------------------


def test_new_swarm_id_midpoint_of_largest_gap():
    assert new_swarm_id([]) == 0
    assert new_swarm_id([0]) == HALF
    assert new_swarm_id([0, HALF]) == 2**62  # equal gaps: the first one
    assert new_swarm_id([0, 2**62, HALF]) == 3 * 2**62  # the wrap gap is largest
    assert new_swarm_id([HALF]) == 0  # wraps past 2**64


# -- assign_swarms: hand-made cases ------------------------------------------


def test_fewer_nodes_than_minimum_is_one_swarm_at_zero():
    result = assign_swarms({node(i): None for i in range(3)})
    assert result == {node(i): 0 for i in range(3)}
    assert assign_swarms({}) == {}


def test_starving_swarm_takes_one_node_from_the_largest():
    current = {node(i): 0 for i in range(9)} | {node(i): HALF for i in range(9, 13)}
    result = assign_swarms(current, seed=7)
    sizes = {s: len(m) for s, m in swarms_of(result).items()}
    assert sizes == {0: 8, HALF: 5}
    change = diff_assignments(current, result)
    assert len(change.moved) == 1 and change.moved[0][1:] == (0, HALF)


def test_donors_never_drop_below_the_minimum():
    # Swarm 0 sits at the minimum; only swarm 2**62 may give to the starving HALF.
    at_min = {node(i): 0 for i in range(5)}
    current = at_min | {node(i): 2**62 for i in range(5, 17)} | {
        node(i): HALF for i in range(17, 20)}
    for seed in range(20):
        result = assign_swarms(current, seed=seed)
        assert {n: result[n] for n in at_min} == at_min
        assert {s: len(m) for s, m in swarms_of(result).items()} == {
            0: 5, 2**62: 10, HALF: 5}


def test_starving_swarms_are_fed_before_a_new_swarm_forms():
    # The new node joins the starving swarm (4 < 5); only after it is fed
    # from swarm 0 does the excess form a new swarm, taken from swarm 0 too.
    current = {node(i): 0 for i in range(20)} | {node(i): HALF for i in range(20, 23)}
    for seed in range(20):
        result = assign_swarms({**current, node(99): None}, seed=seed)
        assert result[node(99)] == HALF
        assert {s: len(m) for s, m in swarms_of(result).items()} == {
            0: 12, 2**62: 7, HALF: 5}


def test_new_node_goes_to_a_smallest_swarm():
    # Sizes 5, 9, 9, 9: excess 12 < 7 + 2 * 4, so no new swarm; the smallest
    # quarter of four swarms is just the smallest one.
    current = {node(i): 0 for i in range(5)}
    for sid, start in ((2**62, 5), (HALF, 14), (3 * 2**62, 23)):
        current |= {node(i): sid for i in range(start, start + 9)}
    for seed in range(20):
        result = assign_swarms({**current, node(99): None}, seed=seed)
        assert result[node(99)] == 0
        assert diff_assignments(current, result).moved == ()


def test_unsaveable_swarm_dissolves_into_the_others():
    current = {node(i): 0 for i in range(5)} | {node(i): 77 for i in range(5, 8)}
    result = assign_swarms(current)
    assert set(result.values()) == {0} and len(result) == 8


def test_unsaveable_swarm_is_not_fed_before_it_dissolves():
    # Swarm 2**62 needs 3 nodes but the donors' excess is 1: nobody is taken
    # from swarms 0 or HALF; only the dissolved swarm's nodes move.
    keep = {node(i): 0 for i in range(6)} | {node(i): HALF for i in range(6, 11)}
    current = keep | {node(i): 2**62 for i in range(11, 13)}
    for seed in range(20):
        result = assign_swarms(current, seed=seed)
        assert {n: result[n] for n in keep} == keep
        assert sorted(len(m) for m in swarms_of(result).values()) == [6, 7]


def test_excess_forms_a_new_swarm_at_the_ring_midpoint():
    current = {node(i): 0 for i in range(14)}
    result = assign_swarms(current)
    assert {s: len(m) for s, m in swarms_of(result).items()} == {0: 7, HALF: 7}
    # 13 nodes: excess 8 < threshold 7 + 2 * 1 = 9, so no new swarm.
    assert set(assign_swarms({node(i): 0 for i in range(13)}).values()) == {0}


def test_min_swarm_size_is_configurable():
    result = assign_swarms({node(i): None for i in range(10)}, min_swarm_size=2)
    assert ideal_swarm_size(2) == 4
    # Swarms = max(1, n // ideal) when nodes arrive with nothing else changing.
    assert len(swarms_of(result)) == 2
    assert all(len(m) >= 2 for m in swarms_of(result).values())


def test_seed_changes_the_outcome():
    current = {node(i): None for i in range(30)}
    outcomes = {tuple(assign_swarms(current, seed=s).items()) for s in range(8)}
    assert len(outcomes) > 1
    assert assign_swarms(current, seed=b"x") == assign_swarms(current, seed=b"x")


@pytest.mark.parametrize("kwargs", [{"min_swarm_size": 0}, {"min_swarm_size": True},
                                    {"seed": 1.5}, {"seed": None}])
def test_assign_rejects_bad_options(kwargs):
    with pytest.raises(SwarmError):
        assign_swarms({node(1): None}, **kwargs)


@pytest.mark.parametrize("current", [{node(1): -1}, {node(1): RING}, {node(1): "0"},
                                     {1: None}, {"": None}])
def test_assign_rejects_bad_input(current):
    with pytest.raises(SwarmError):
        assign_swarms(current)


# -- assign_swarms: growth and shrinkage ----------------------------------------


def test_building_up_one_node_at_a_time():
    mapping: dict[str, int] = {}
    for i in range(60):
        before = mapping
        mapping = assign_swarms({**mapping, node(i): None}, seed=3)
        n = i + 1
        swarms = swarms_of(mapping)
        # oxen-core's own expectation for registrations without deregistrations.
        assert len(swarms) == max(1, n // 7), n
        if n >= 7:
            excess = sum(max(len(m) - 5, 0) for m in swarms.values())
            assert excess == 2 * len(swarms) + n % 7, n
        if n >= 5:
            assert min(len(m) for m in swarms.values()) >= 5, n
        assert moved_existing(before, mapping) <= 7
    assert len(swarms_of(mapping)) == 8


def test_shrinking_down_to_one_swarm():
    mapping = assign_swarms({node(i): None for i in range(60)}, seed=9)
    assert len(swarms_of(mapping)) >= 5
    for step in range(59):
        # Always from the largest swarm, which keeps swarms near the minimum.
        largest = max(swarms_of(mapping).values(), key=len)
        victim = largest[step % len(largest)]
        before = {k: v for k, v in mapping.items() if k != victim}
        mapping = assign_swarms(before, seed=step)
        swarms = swarms_of(mapping)
        assert len(mapping) == 59 - step
        if len(mapping) >= 5:
            assert min(len(m) for m in swarms.values()) >= 5
        else:
            assert len(swarms) == 1
        assert moved_existing(before, mapping) <= 7
    assert len(swarms_of(mapping)) == 1


# -- assign_swarms: properties ---------------------------------------------------

SWARM_IDS = st.sampled_from([0, 1, 2**62, HALF, 3 * 2**62, RING - 1, 123456789])


@st.composite
def arbitrary_inputs(draw):
    ids = draw(st.lists(st.integers(0, 10**6), unique=True, max_size=45))
    return {node(i): draw(st.one_of(st.none(), SWARM_IDS)) for i in ids}


@st.composite
def stable_assignments(draw):
    """An assignment that assign_swarms produced, its minimum, and spare node ids."""
    min_size = draw(st.integers(1, 6))
    count = draw(st.integers(0, 45))
    seed = draw(st.integers(0, 2**32))
    mapping = assign_swarms({node(i): None for i in range(count)},
                            min_swarm_size=min_size, seed=seed)
    return mapping, min_size


@PROPS
@given(arbitrary_inputs(), st.integers(1, 7), st.one_of(st.integers(), st.binary(max_size=8)))
def test_every_node_in_one_valid_swarm(current, min_size, seed):
    result = assign_swarms(current, min_swarm_size=min_size, seed=seed)
    assert list(result) == sorted(current)
    assert all(isinstance(s, int) and 0 <= s < RING for s in result.values())
    swarms = swarms_of(result)
    members = [n for m in swarms.values() for n in m]
    assert sorted(members) == sorted(current)  # each node exactly once
    assert len(set(swarms)) == len(swarms)
    if len(current) >= min_size:
        assert all(len(m) >= min_size for m in swarms.values())
    elif current:
        assert len(swarms) == 1
    # Deterministic: same input, same seed, same output (also from a reordered mapping).
    assert assign_swarms(dict(reversed(list(current.items()))),
                         min_swarm_size=min_size, seed=seed) == result


@PROPS
@given(stable_assignments(), st.integers(0, 2**32))
def test_adding_one_node_moves_few(stable, seed):
    mapping, min_size = stable
    after = assign_swarms({**mapping, node(10**7): None}, min_swarm_size=min_size, seed=seed)
    assert node(10**7) in after
    assert moved_existing(mapping, after) <= ideal_swarm_size(min_size)
    # A stable assignment stays put when nothing changes.
    assert assign_swarms(mapping, min_swarm_size=min_size, seed=seed) == mapping


@PROPS
@given(stable_assignments(), st.integers(0, 2**32), st.data())
def test_removing_one_node_moves_few(stable, seed, data):
    mapping, min_size = stable
    if not mapping:
        return
    gone = data.draw(st.sampled_from(sorted(mapping)))
    before = {k: v for k, v in mapping.items() if k != gone}
    after = assign_swarms(before, min_swarm_size=min_size, seed=seed)
    assert set(after) == set(before)
    assert moved_existing(before, after) <= ideal_swarm_size(min_size)


# -- swarms_of / diff_assignments ----------------------------------------------


def test_swarms_of_groups_and_sorts():
    assert swarms_of({"b": 5, "a": 5, "c": 1, "d": None}) == {1: ["c"], 5: ["a", "b"]}
    assert list(swarms_of({"x": HALF, "y": 0})) == [0, HALF]


def test_diff_assignments():
    old = {"a": 0, "b": 0, "c": HALF, "d": None, "e": HALF}
    new = {"a": 0, "b": 2**62, "d": 2**62, "e": 2**62, "f": 0}
    change = diff_assignments(old, new)
    assert change == SwarmChange(
        moved=(NodeMove("b", 0, 2**62), NodeMove("e", HALF, 2**62)),
        joined=(NodeMove("d", None, 2**62), NodeMove("f", None, 0)),
        left=(NodeMove("c", HALF, None),),
        created=(2**62,),
        dissolved=(HALF,),
    )
    assert change.moved[0].new_swarm == 2**62
    assert change
    assert not diff_assignments(new, dict(new))
    with pytest.raises(AttributeError):
        change.moved = ()  # type: ignore[misc]
