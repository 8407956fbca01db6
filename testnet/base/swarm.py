"""Swarm maths: which swarm holds an account, and how nodes are put in swarms.

Two rules of the modelled network live here, as pure functions (no I/O, no
clocks, no global random state):

* **Account to swarm** (oxen-storage-server ``swarm.cpp``):
  :func:`swarm_space` folds a 66-hex-character account id into a point on the
  ring of 2**64, and :func:`swarm_for` picks the nearest swarm id on that ring.
* **Node to swarm** (oxen-core ``service_node_swarm.cpp``):
  :func:`assign_swarms` is what the registry runs on every join or leave. It
  fills small swarms with new nodes, lets starving swarms take nodes from big
  ones, forms new swarms from excess nodes, and dissolves swarms that stay
  under the minimum. It is deterministic for a given input and seed.

Choices where swarmnet differs from, or pins down, the modelled code (each is
also cited where it applies):

* Swarm ids use the whole ring ``[0, 2**64)``; "unassigned" is ``None``, not a
  reserved id, so with one swarm at 0 the next new swarm is ``2**63``.
* Ties in swarm size are ordered by swarm id (the modelled code's sort leaves
  them in an unspecified order), and unassigned nodes are placed in sorted
  order, so the result depends only on the input and the seed.
* The dissolve round stops while one swarm is left, even if that swarm is under
  the minimum: a network smaller than the minimum is one swarm.
* The random stream is ``random.Random`` seeded from a BLAKE2b digest of the
  seed and the whole input, not a Mersenne Twister seeded by block hash.

Every failure raises :class:`SwarmError` (a ``ValueError``).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "RING", "DEFAULT_MIN_SWARM_SIZE", "IDEAL_SWARM_MARGIN",
    "FILL_SWARM_LOWER_PERCENTILE", "STEALING_SWARM_UPPER_PERCENTILE",
    "DECOMMISSIONED_REDISTRIBUTION_LOWER_PERCENTILE",
    "SwarmError", "NodeMove", "SwarmChange",
    "swarm_space", "swarm_for", "swarm_for_space", "ideal_swarm_size",
    "new_swarm_id", "assign_swarms", "swarms_of", "diff_assignments",
]

RING = 2**64
"""Size of the swarm id ring; swarm ids and swarm-space points are in [0, RING)."""

DEFAULT_MIN_SWARM_SIZE = 5
# oxen-core service_node_rules.h: IDEAL_SWARM_SIZE = MIN_SWARM_SIZE + IDEAL_SWARM_MARGIN,
# and NEW_SWARM_SIZE = IDEAL_SWARM_SIZE.
IDEAL_SWARM_MARGIN = 2
# New nodes go to a random swarm among the smallest quarter.
FILL_SWARM_LOWER_PERCENTILE = 25
# Starving swarms take from swarms at or above the 75th percentile size.
STEALING_SWARM_UPPER_PERCENTILE = 75
# Nodes of a dissolved swarm go to the very smallest swarms.
DECOMMISSIONED_REDISTRIBUTION_LOWER_PERCENTILE = 0

_PREFIXED_ID = re.compile(r"[0-9a-fA-F]{66}")


class SwarmError(ValueError):
    """Bad input to the swarm maths (malformed account id, no swarms, bad size...)."""


# --------------------------------------------------------------------------
# Account to swarm (oxen-storage-server swarm.cpp)
# --------------------------------------------------------------------------


def swarm_space(session_id: str) -> int:
    """Fold a prefixed account id (66 hex chars, e.g. ``"05" + 64 hex``) into [0, 2**64).

    The one-byte prefix is skipped; the remaining 32 bytes are read as four
    big-endian uint64 words and XORed together.
    """
    if not isinstance(session_id, str):
        raise SwarmError(f"account id must be a str, not {type(session_id).__name__}")
    if _PREFIXED_ID.fullmatch(session_id) is None:
        raise SwarmError(
            f"account id must be 66 hex characters (1-byte prefix + 32-byte key), "
            f"got {len(session_id)} characters"
            + ("" if len(session_id) != 66 else " with a non-hex character")
        )
    key = bytes.fromhex(session_id)[1:]
    value = 0
    for offset in range(0, 32, 8):
        value ^= int.from_bytes(key[offset:offset + 8], "big")
    return value


def _check_swarm_id(swarm_id: object, what: str = "swarm id") -> int:
    # bool is an int subclass; True as a swarm id is surely a mistake.
    if not isinstance(swarm_id, int) or isinstance(swarm_id, bool):
        raise SwarmError(f"{what} must be an int, not {type(swarm_id).__name__}")
    if not 0 <= swarm_id < RING:
        raise SwarmError(f"{what} {swarm_id} is outside [0, 2**64)")
    return swarm_id


def swarm_for_space(value: int, swarm_ids: Iterable[int]) -> int:
    """The swarm id nearest to ``value`` on the ring of 2**64.

    Takes the first id at or after ``value`` (wrapping to the smallest) as
    *right* and the id before it (wrapping to the largest) as *left*.
    """
    value = _check_swarm_id(value, "swarm-space value")
    ids = sorted({_check_swarm_id(s) for s in swarm_ids})
    if not ids:
        raise SwarmError("no swarms to choose from")
    at = bisect.bisect_left(ids, value)
    right = ids[at % len(ids)]
    left = ids[at - 1]  # at == 0 wraps to the largest id
    # oxen-storage-server: distances are unsigned 64-bit differences, and the
    # right swarm wins only when strictly nearer -- a tie goes left.
    if (right - value) % RING < (value - left) % RING:
        return right
    return left


def swarm_for(session_id: str, swarm_ids: Iterable[int]) -> int:
    """The id of the swarm (among ``swarm_ids``) that holds ``session_id``'s messages."""
    return swarm_for_space(swarm_space(session_id), swarm_ids)


# --------------------------------------------------------------------------
# Node to swarm (oxen-core service_node_swarm.cpp)
# --------------------------------------------------------------------------


def ideal_swarm_size(min_swarm_size: int = DEFAULT_MIN_SWARM_SIZE) -> int:
    """The ideal swarm size, which is also the size of every new swarm (nodes)."""
    return _check_min_size(min_swarm_size) + IDEAL_SWARM_MARGIN


def _check_min_size(min_swarm_size: object) -> int:
    if not isinstance(min_swarm_size, int) or isinstance(min_swarm_size, bool):
        raise SwarmError(
            f"min_swarm_size must be an int, not {type(min_swarm_size).__name__}")
    if min_swarm_size < 1:
        raise SwarmError(f"min_swarm_size must be >= 1, got {min_swarm_size}")
    return min_swarm_size


def new_swarm_id(swarm_ids: Iterable[int]) -> int:
    """The id for a new swarm: the midpoint of the largest gap between existing ids.

    The first swarm is 0. Gaps are measured on the ring, the gap from the
    largest id round to the smallest included; with one swarm at 0 the next is
    2**63. Among equal gaps the one after the smallest id wins, and the
    wrap-around gap only wins when strictly larger (as in oxen-core).
    """
    ids = sorted({_check_swarm_id(s) for s in swarm_ids})
    if not ids:
        return 0
    best_gap, best_start = 0, ids[0]
    for lower, upper in zip(ids, ids[1:]):
        if upper - lower > best_gap:
            best_gap, best_start = upper - lower, lower
    wrap_gap = RING - ids[-1] + ids[0]
    if wrap_gap > best_gap:
        best_gap, best_start = wrap_gap, ids[-1]
    if best_gap < 2:
        raise SwarmError("the swarm id ring is full")
    return (best_start + best_gap // 2) % RING


class _Planner:
    """One run of the swarm assignment: swarms (id -> member list) and a random stream.

    Member lists keep insertion order (sorted for the input, then appended),
    which fixes the order of every random pick.
    """

    def __init__(self, swarms: dict[int, list[str]], min_size: int, rng: random.Random):
        self.swarms = swarms
        self.min_size = min_size
        self.ideal_size = min_size + IDEAL_SWARM_MARGIN
        self.rng = rng

    # -- measures ---------------------------------------------------------

    def excess(self) -> int:
        """Nodes above the minimum, summed over all swarms."""
        return sum(max(len(m) - self.min_size, 0) for m in self.swarms.values())

    def threshold(self) -> int:
        # oxen-core calc_threshold: enough excess for one new swarm of the
        # ideal size while leaving IDEAL_SWARM_MARGIN excess in every swarm.
        return self.ideal_size + len(self.swarms) * IDEAL_SWARM_MARGIN

    def has_starving(self) -> bool:
        return any(len(m) < self.min_size for m in self.swarms.values())

    def sorted_sizes(self) -> list[tuple[int, int]]:
        """(size, swarm id) smallest first; equal sizes by swarm id for determinism."""
        return sorted((len(m), sid) for sid, m in self.swarms.items())

    def excess_pool(self, above: int) -> tuple[list[tuple[str, int]], int]:
        """Every (node, swarm) of swarms with more than ``above`` nodes, and their excess.

        Pooling every member (not one entry per swarm) makes a swarm's chance
        of giving a node proportional to its size, as in oxen-core.
        """
        pool: list[tuple[str, int]] = []
        excess = 0
        for sid in sorted(self.swarms):
            members = self.swarms[sid]
            if len(members) > above:
                excess += len(members) - self.min_size
                pool.extend((node, sid) for node in members)
        return pool, excess

    def take_random(self, pool: list[tuple[str, int]]) -> str:
        node, sid = pool[self.rng.randrange(len(pool))]
        self.swarms[sid].remove(node)
        return node

    # -- steps ------------------------------------------------------------

    def create_from_excess(self) -> None:
        """Form new swarms of the ideal size while the excess reaches the threshold."""
        # oxen-core: no new swarm while any swarm is starving; those get the
        # excess first (or dissolve).
        if self.has_starving():
            return
        while self.excess() >= self.threshold():
            members: list[str] = []
            while len(members) < self.ideal_size:
                # Recomputed per pick: donors must stay above the minimum.
                pool, _ = self.excess_pool(self.min_size)
                if not pool:  # excess >= threshold > ideal size makes this unreachable
                    raise AssertionError("empty excess pool while creating a swarm")
                members.append(self.take_random(pool))
            sid = new_swarm_id(self.swarms)
            self.swarms[sid] = members

    def assign(self, nodes: Iterable[str], percentile: int) -> None:
        """Put each node in a random swarm among the ``percentile`` smallest.

        The candidates are the swarms up to the percentile index plus any of
        the same size just after it; the new-swarm round runs after each node.
        """
        for node in nodes:
            sizes = self.sorted_sizes()
            index = percentile * (len(sizes) - 1) // 100
            cutoff = sizes[index][0]
            upper = index
            while upper + 1 < len(sizes) and sizes[upper + 1][0] == cutoff:
                upper += 1
            _, sid = sizes[self.rng.randrange(upper + 1)]
            self.swarms[sid].append(node)
            self.create_from_excess()

    def robin_hood(self) -> None:
        """Starving swarms (smallest first) take nodes from the largest swarms."""
        # oxen-core takes one snapshot of the sizes for the whole round; the
        # percentile size below is read from it, the donors' sizes are live.
        sizes = self.sorted_sizes()
        index = STEALING_SWARM_UPPER_PERCENTILE * (len(sizes) - 1) // 100
        # Donors are strictly above the 75th percentile size minus one, and
        # never below the minimum, so every donor stays >= the minimum.
        above = max(self.min_size, sizes[index][0] - 1)
        for size, sid in sizes:
            if size >= self.min_size:
                return  # sorted: every starving swarm has been served
            poor = self.swarms[sid]
            while len(poor) < self.min_size:
                pool, excess = self.excess_pool(above)
                # If the donors cannot save this swarm, they cannot save the
                # next one either (it is no smaller): leave both to dissolve.
                if excess < self.min_size - len(poor):
                    return
                poor.append(self.take_random(pool))

    def dissolve_starving(self) -> None:
        """Dissolve swarms still under the minimum; their nodes go to the smallest swarms."""
        while len(self.swarms) > 1:
            starving = [sid for sid in sorted(self.swarms)
                        if len(self.swarms[sid]) < self.min_size]
            if not starving:
                return
            members = self.swarms.pop(starving[0])
            self.assign(members, DECOMMISSIONED_REDISTRIBUTION_LOWER_PERCENTILE)


def _rng_for(current: Mapping[str, int | None], min_size: int,
             seed: int | bytes) -> random.Random:
    """A random stream fixed by the seed and the whole input (same in, same out)."""
    digest = hashlib.blake2b(digest_size=32, person=b"swarmnet-swarms")

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))  # length-prefixed: unambiguous
        digest.update(data)

    if isinstance(seed, (bytes, bytearray)):
        put(b"b" + bytes(seed))
    else:
        put(b"i" + str(seed).encode())
    put(str(min_size).encode())
    for node in sorted(current):
        swarm = current[node]
        put(node.encode())
        put(b"-" if swarm is None else str(swarm).encode())
    return random.Random(int.from_bytes(digest.digest(), "big"))


def assign_swarms(current: Mapping[str, int | None], *,
                  min_swarm_size: int = DEFAULT_MIN_SWARM_SIZE,
                  seed: int | bytes = 0) -> dict[str, int]:
    """The new swarm of every node, after one round of swarm changes.

    ``current`` maps each registered node id (ed25519 hex) to its current
    swarm id, or to ``None`` if it is new or unassigned; nodes absent from it
    are gone. Returns a complete mapping node -> swarm id, keys in sorted
    order. The same ``current``, ``min_swarm_size`` and ``seed`` always give
    the same result.

    Steps (oxen-core ``calc_swarm_changes``), with ``ideal = min + 2``:

    1. With no swarm yet, swarm 0 is created (even if it will be under the
       minimum). Unassigned nodes, in sorted order, each go to a random swarm
       among the smallest quarter (at least the smallest, plus any of equal
       size); the new-swarm round (3) runs after each one.
    2. Swarms under the minimum, smallest first, take random nodes from the
       swarms bigger than ``max(min, size at the 75th percentile - 1)``,
       picked proportionally to size; donors never drop below the minimum.
       If the donors' excess over the minimum cannot cover a swarm's deficit,
       the round stops.
    3. While no swarm is under the minimum and the excess (sum over swarms of
       ``max(size - min, 0)``) is at least ``ideal + 2 * number_of_swarms``,
       a new swarm of ``ideal`` nodes is formed from random nodes of swarms
       above the minimum; its id is :func:`new_swarm_id`.
    4. While more than one swarm exists, the swarm with the lowest id among
       those under the minimum dissolves; its nodes go, one by one, to a
       random smallest swarm (running round 3 after each).

    Raises :class:`SwarmError` for a non-str node id, a swarm id outside
    [0, 2**64), a ``min_swarm_size`` under 1 or a seed that is not int/bytes.
    """
    min_size = _check_min_size(min_swarm_size)
    if not isinstance(seed, (int, bytes, bytearray)) or isinstance(seed, bool):
        raise SwarmError(f"seed must be an int or bytes, not {type(seed).__name__}")
    swarms: dict[int, list[str]] = {}
    unassigned: list[str] = []
    for node in sorted(_check_nodes(current)):
        swarm = current[node]
        if swarm is None:
            unassigned.append(node)
        else:
            swarms.setdefault(_check_swarm_id(swarm, f"swarm id of node {node[:16]}"),
                              []).append(node)
    if not swarms and not unassigned:
        return {}

    planner = _Planner(swarms, min_size, _rng_for(current, min_size, seed))
    if not planner.swarms:
        planner.swarms[new_swarm_id(())] = []
    planner.assign(unassigned, FILL_SWARM_LOWER_PERCENTILE)
    planner.robin_hood()
    planner.create_from_excess()
    planner.dissolve_starving()

    result = {node: sid for sid, members in planner.swarms.items() for node in members}
    if len(result) != len(current):  # every node placed exactly once
        raise AssertionError("swarm assignment lost or duplicated a node")
    return dict(sorted(result.items()))


def _check_nodes(current: Mapping[str, int | None]) -> Mapping[str, int | None]:
    if not isinstance(current, Mapping):
        raise SwarmError(f"current must be a mapping, not {type(current).__name__}")
    for node in current:
        if not isinstance(node, str) or not node:
            raise SwarmError(f"node ids must be non-empty str, got {node!r}")
    return current


def swarms_of(mapping: Mapping[str, int | None]) -> dict[int, list[str]]:
    """Swarm id -> sorted member node ids, by ascending swarm id.

    Nodes mapped to ``None`` (unassigned) belong to no swarm and are left out.
    """
    swarms: dict[int, list[str]] = {}
    for node in sorted(mapping):
        swarm = mapping[node]
        if swarm is not None:
            swarms.setdefault(swarm, []).append(node)
    return dict(sorted(swarms.items()))


# --------------------------------------------------------------------------
# What changed between two assignments
# --------------------------------------------------------------------------


class NodeMove(NamedTuple):
    """One node's change of swarm; ``None`` stands for "not in any swarm"."""

    node: str
    old_swarm: int | None
    new_swarm: int | None


@dataclass(frozen=True)
class SwarmChange:
    """The difference between two node -> swarm mappings.

    ``moved``: nodes in a swarm before and after, in a different one now.
    ``joined``: nodes in a swarm now that were in none (absent or ``None``).
    ``left``: nodes in a swarm before that are in none now.
    ``created`` / ``dissolved``: swarm ids present only after / only before.
    Every tuple is sorted (by node id, or by swarm id).
    """

    moved: tuple[NodeMove, ...] = ()
    joined: tuple[NodeMove, ...] = ()
    left: tuple[NodeMove, ...] = ()
    created: tuple[int, ...] = ()
    dissolved: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        """True when anything changed."""
        return bool(self.moved or self.joined or self.left or self.created or self.dissolved)


def diff_assignments(old: Mapping[str, int | None],
                     new: Mapping[str, int | None]) -> SwarmChange:
    """What changed from ``old`` to ``new`` (both node -> swarm id or ``None``)."""
    moved: list[NodeMove] = []
    joined: list[NodeMove] = []
    left: list[NodeMove] = []
    for node in sorted(set(old) | set(new)):
        before, after = old.get(node), new.get(node)
        if before == after:
            continue
        change = NodeMove(node, before, after)
        if before is None:
            joined.append(change)
        elif after is None:
            left.append(change)
        else:
            moved.append(change)
    old_ids = {s for s in old.values() if s is not None}
    new_ids = {s for s in new.values() if s is not None}
    return SwarmChange(
        moved=tuple(moved), joined=tuple(joined), left=tuple(left),
        created=tuple(sorted(new_ids - old_ids)),
        dissolved=tuple(sorted(old_ids - new_ids)),
    )
