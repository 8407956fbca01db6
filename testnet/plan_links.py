"""Every directed link of a plan, derived rather than listed.

A network of N nodes and U users has N(N-1) + UN directed links (2,000 nodes:
4.0 M), and every one of them is a rule of the address plan: its name is
``src->dst``, its proxy listens at the source's proxy address on the port
that names ``dst`` (:mod:`testnet.plan`).  So the plan keeps no table of
them: :meth:`testnet.plan.NetworkPlan.link` computes one link from its ends,
the views here (:class:`LinkNames`, :class:`LinkTable`) answer ``len()`` and
membership in constant time and list the links only when iterated, and the
questions a fault asks (the links touching some nodes, the links between two
sides) are answered in time proportional to what they return.  Listing every
link planned 1,000 nodes on 8 hosts in 16 s of CPU and 256 MiB; 2,000 would
have been 4 M records.

Every view iterates in one order, the plan's: each node's links in node
order (to every other node in node order), then each user's.  The simulation
replays a seed byte for byte, so what a fault on many links does must not
depend on anything but the plan.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Set
from dataclasses import dataclass
from typing import Any

Address = tuple[str, int]


@dataclass(frozen=True)
class LinkPlan:
    """One directed link through Toxiproxy: ``src`` (node or user) -> node ``dst``.

    The proxy listens at ``listen``; its upstream (``dst``'s main address, or
    its ingress listener for ``src`` when ``src`` is a user) is known only once
    ``dst`` runs (:meth:`testnet.wiring.Wiring.upstream`).
    """

    name: str
    src: str
    dst: str
    listen: Address
    from_user: bool


class LinkNames(Set):
    """The name of every link of a plan, as a set that lists nothing: ``len()`` and ``in``
    are arithmetic and two dictionary lookups.  Set operations with a real set on either
    side iterate the real set (``made & names`` costs what ``made`` holds) and give a
    frozenset; iterating lists every name, in the plan's order."""

    __slots__ = ("_plan",)

    def __init__(self, plan: Any) -> None:
        self._plan = plan

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._plan._ends(name) is not None

    def __len__(self) -> int:
        return self._plan.link_count

    def __iter__(self) -> Iterator[str]:
        for src, dsts in self._plan._sources():
            prefix = src.name + "->"
            for d in dsts:
                yield prefix + d.name

    @classmethod
    def _from_iterable(cls, it: Any) -> frozenset[str]:
        return frozenset(it)  # Set's default would build one of these from the result

    def __repr__(self) -> str:
        return f"<LinkNames: {len(self):,} links of run {self._plan.run_id}>"


class LinkTable(Collection):
    """Every link of a plan as a :class:`LinkPlan`, made as it is iterated (in the plan's
    order); ``len()``, truth and ``in`` without listing.  Iterate it only when every link
    is wanted (``links.json``): the plan answers narrower questions directly."""

    __slots__ = ("_plan",)

    def __init__(self, plan: Any) -> None:
        self._plan = plan

    def __contains__(self, link: object) -> bool:
        return isinstance(link, LinkPlan) and self._plan.link_named(link.name) == link

    def __len__(self) -> int:
        return self._plan.link_count

    def __iter__(self) -> Iterator[LinkPlan]:
        make = self._plan._link_between
        for src, dsts in self._plan._sources():
            for d in dsts:
                yield make(src, d)

    def __repr__(self) -> str:
        return f"<LinkTable: {len(self):,} links of run {self._plan.run_id}>"
