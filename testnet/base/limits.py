"""How long and how many connections a swarmnet server keeps: the limits,
and the gate every listener of one process shares to count connections per
source address and in all (see PROTOCOL.md, "Connection limits")."""

from __future__ import annotations

from dataclasses import dataclass


# nodes/auth.py (SESSION_NODE) sets this Peer.session key once a registered
# service node has proven its key on the connection.
AUTHENTICATED_SESSION_KEY = "node"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long and how many connections a server keeps (timeouts in seconds).

    Trade-off of ``frame_timeout_s``: under the chaos library's bandwidth
    fault (16 KB/s) 30 s lets a frame of ~480 KB through, while a full 1 MiB
    frame (~64 s) is cut.  Callers give up long before that (client requests
    10 s, replication 2 s), so the deadline only ends transfers nobody waits
    for, and a peer that trickles a frame holds its connection for at most
    30 s.  ``math.inf`` turns a timeout off.
    """

    # No request in flight, no partial frame, no bytes for this long: closed.
    idle_timeout_s: float = 60.0
    # From the first byte of a frame to its last.
    frame_timeout_s: float = 30.0
    # One write of ours (responses queued together) must be taken this fast;
    # a peer that stops reading would otherwise pin up to max_in_flight handlers.
    send_timeout_s: float = 30.0
    # Concurrent connections per remote IP not (yet) authenticated as a service node.
    max_per_source: int = 256
    # Concurrent connections in all (the process may hold 20,000 descriptors).
    max_connections: int = 10_000

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "frame_timeout_s", "send_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        for name in ("max_per_source", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")


@dataclass(frozen=True, slots=True)
class GateStatistics:
    """What a :class:`ConnectionGate` has seen (counts since it was made, unless "now")."""

    open: int  # connections open now
    unauthenticated: int  # of those, still counted against their source address
    sources: int  # remote addresses holding unauthenticated connections now
    accepted: int
    authenticated: int  # slots given back because a service node authenticated
    refused_per_source: int  # max_per_source reached: 429 and closed
    refused_total: int  # max_connections reached: 429 and closed
    closed_idle: int
    closed_slow_frame: int
    closed_slow_send: int


class _Admission:
    """One admitted connection's hold on its gate."""

    __slots__ = ("host", "counted", "released")

    def __init__(self, host: str) -> None:
        self.host = host
        self.counted = True  # against its source address
        self.released = False


class ConnectionGate:
    """Admission and counters for every connection of one server process.

    Share one gate between all the ``serve`` calls of a process (pass it as
    ``gate=``) so that ``max_per_source`` and ``max_connections`` hold across
    all of its listeners.  Synchronous: trio runs one task at a time, so
    check-and-count needs no lock.
    """

    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        self.limits = ConnectionLimits() if limits is None else limits
        self._per_source: dict[str, int] = {}
        self._open = 0
        self._unauthenticated = 0
        self._accepted = 0
        self._authenticated = 0
        self._refused_per_source = 0
        self._refused_total = 0
        self._closed = {"idle": 0, "slow_frame": 0, "slow_send": 0}

    def admit(self, host: str) -> tuple[_Admission | None, str]:
        """A slot for a new connection from ``host``, or ``(None, reason)`` when a limit is reached."""
        if self._open >= self.limits.max_connections:
            self._refused_total += 1
            return None, "too many connections"
        n = self._per_source.get(host, 0)
        if n >= self.limits.max_per_source:
            self._refused_per_source += 1
            return None, "too many connections from this address"
        self._per_source[host] = n + 1
        self._open += 1
        self._unauthenticated += 1
        self._accepted += 1
        return _Admission(host), ""

    def authenticated(self, admission: _Admission) -> None:
        """The connection's peer proved it is a service node: it stops counting against its source."""
        if admission.counted and not admission.released:
            admission.counted = False
            self._authenticated += 1
            self._uncount(admission.host)

    def release(self, admission: _Admission, closed_by: str | None = None) -> None:
        """The connection closed (``closed_by``: "idle", "slow_frame" or "slow_send" when we closed it)."""
        if admission.released:
            return
        admission.released = True
        self._open -= 1
        if admission.counted:
            admission.counted = False
            self._uncount(admission.host)
        if closed_by is not None:
            self._closed[closed_by] += 1

    def _uncount(self, host: str) -> None:
        self._unauthenticated -= 1
        n = self._per_source[host] - 1
        if n:
            self._per_source[host] = n
        else:
            del self._per_source[host]

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            open=self._open,
            unauthenticated=self._unauthenticated,
            sources=len(self._per_source),
            accepted=self._accepted,
            authenticated=self._authenticated,
            refused_per_source=self._refused_per_source,
            refused_total=self._refused_total,
            closed_idle=self._closed["idle"],
            closed_slow_frame=self._closed["slow_frame"],
            closed_slow_send=self._closed["slow_send"],
        )
