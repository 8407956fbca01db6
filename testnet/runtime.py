"""What the controller knows of a live run beyond its plan, shared by every part
of it (:mod:`testnet.controller` and the modules it delegates to): each node's
runtime, the controller's own error, and how long its calls may take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import plan as P
from . import procs

CALL_TIMEOUT_S = 2.0
OPEN_LINK_TIMEOUT_S = 10.0  # a node waits this long for its link's proxy (a boot asks for thousands at once)
BOOT_CALL_TIMEOUT_S = 30.0  # for the calls a boot makes to every node at once


class ControllerError(Exception):
    """A request to the controller cannot be done (unknown node, wrong state, ...)."""


def error_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, as trio nurseries raise them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in error_leaves(sub)]
    return [exc]


@dataclass
class NodeRuntime:
    """What the controller knows of one node beyond its plan."""

    plan: P.NodePlan
    state: str = "starting"
    child: procs.Child | None = None
    port: int = 0  # its main port, kept across restarts
    ingress: dict[str, int] = field(default_factory=dict)  # user -> local port of the node
    swarm_id: int | None = None
    exit_code: int | None = None
    links_stale: bool = False  # the dial table changed while it was paused: push it on resume
    ingress_open: bool = False  # this process of the node listens at its ingress ports

    @property
    def address(self) -> tuple[str, int]:
        return (self.plan.host, self.port)
