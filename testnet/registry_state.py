"""The registry's rule book: the service-node list, its height, the swarm
assignment, the change log that deltas are built from, and the history of
past assignments; and the shape of its state file.

Time comes in as ms, requests as argument maps; answers go out as maps or
:class:`~testnet.base.protocol.RequestError`.  Nothing here touches a socket,
a clock or trio (only :func:`load_state` and :func:`save_state` a file), so
every rule is testable with plain calls (tests/test_registry.py);
:mod:`testnet.registry` serves it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections import deque
from dataclasses import replace
from typing import Any, Mapping

from .base.crypto import BadKey, BadSignature, ed25519_to_session_id, verify_request
from .base.protocol import RequestError, Status
from .base.records import NodeRecord, deregister_message, register_message
from .base.swarm import DEFAULT_MIN_SWARM_SIZE, RING, assign_swarms, swarms_of

TIMESTAMP_WINDOW_MS = 60_000  # a signed register/deregister is valid this long either side of our clock
MAX_WAIT_MS = 30_000  # longest get_service_nodes long-poll
# Past swarm assignments kept (in memory) for get_service_nodes {history: true}:
# a node that joins late learns which swarms its peers were in before, so it can
# tell a peer rehoming a swarm's messages from a stranger (nodes/auth.py).
HISTORY_LENGTH = 16
# Each history entry names only the nodes whose swarm then differs from the list it comes
# with; entries stop (oldest dropped first) before they hold more than this many names in
# all, so the answer stays far below the frame limit (~80 bytes a name).
HISTORY_MAX_NAMES = 6_000
# Heights whose changed keys are kept (in memory) to answer get_service_nodes {epoch}
# with only what changed since the caller's height (a delta) instead of the whole list.
CHANGE_LOG_LENGTH = 4096
STATE_FORMAT = 1  # version of the --state JSON shape
_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_BYTES = 64


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("swarmnet")
    except Exception:  # not installed (running from a bare checkout)
        return "0.0.0"


VERSION = _version()


class RegistryError(Exception):
    """Base of the registry's own errors (request errors are RequestError)."""


class StateFileError(RegistryError):
    """The --state file cannot be read or does not have the expected shape."""


# --------------------------------------------------------------------------- argument checks


def _bad(message: str) -> RequestError:
    return RequestError(Status.BAD_REQUEST, message)


def _need_args(args: object, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(args, Mapping):
        raise _bad("args must be a map")
    missing = [k for k in keys if k not in args]
    if missing:
        raise _bad(f"missing argument(s): {', '.join(missing)}")
    # Keys may be str or bytes (msgpack): sort their text, never the mixed keys themselves.
    extra = sorted(str(k) for k in set(args) - set(keys))
    if extra:
        raise _bad(f"unexpected argument(s): {', '.join(extra)}")
    return args


def _int(value: object, what: str) -> int:
    # bool is an int subclass; True as a port or a height is surely a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{what} must be an integer")
    return value


def _key_hex(value: object, what: str) -> str:
    if not isinstance(value, str) or not _KEY_HEX.fullmatch(value):
        raise _bad(f"{what} must be 64 lowercase hex characters")
    return value


def _host(value: object) -> str:
    # Nodes publish where they listen: an IP literal in canonical form, never a
    # name to resolve, so every follower dials exactly what was signed.
    if isinstance(value, str):
        try:
            if str(ipaddress.ip_address(value)) == value:
                return value
        except ValueError:
            pass
    raise _bad("host must be an IP address literal in canonical form")


def _port(value: object) -> int:
    port = _int(value, "port")
    if not 1 <= port <= 65535:
        raise _bad("port must be in [1, 65535]")
    return port


def _signature(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != _SIGNATURE_BYTES:
        raise _bad(f"signature must be {_SIGNATURE_BYTES} bytes")
    return bytes(value)


def _check_timestamp(timestamp: object, now_ms: int) -> int:
    ts = _int(timestamp, "timestamp")
    if abs(ts - now_ms) > TIMESTAMP_WINDOW_MS:
        raise RequestError(Status.CLOCK_OUT_OF_RANGE,
                           f"timestamp is {ts - now_ms:+d} ms from the registry clock "
                           f"(allowed: ±{TIMESTAMP_WINDOW_MS} ms)")
    return ts


def _check_signature(ed_hex: str, message: bytes, signature: bytes) -> None:
    try:
        verify_request(bytes.fromhex(ed_hex), message, signature)
    except BadSignature:
        raise RequestError(Status.UNAUTHORIZED, "signature does not verify") from None


def parse_poll_args(args: object) -> tuple[int | None, int]:
    """(since_height or None, wait_ms clamped to [0, MAX_WAIT_MS]) of a get_service_nodes request.

    ``since_height`` may be any integer (a follower that has seen nothing yet
    may send -1); ``wait_ms`` must not be negative.
    """
    if not isinstance(args, Mapping):
        raise _bad("args must be a map")
    extra = sorted(str(k) for k in set(args) - {"since_height", "wait_ms", "history", "epoch"})
    if extra:
        raise _bad(f"unexpected argument(s): {', '.join(extra)}")
    since = args.get("since_height")
    since = None if since is None else _int(since, "since_height")
    wait_ms = _int(args.get("wait_ms", 0), "wait_ms")
    if wait_ms < 0:
        raise _bad("wait_ms must not be negative")
    if not isinstance(args.get("history", False), bool):
        raise _bad("history must be a boolean")
    if args.get("epoch") is not None:
        _int(args["epoch"], "epoch")
    return since, min(wait_ms, MAX_WAIT_MS)


# --------------------------------------------------------------------------- the pure state


class RegistryState:
    """The service-node list and its height, with the rules for changing them.

    Every method that changes the list re-runs the swarm assignment and bumps
    ``height`` by exactly one; a request that changes nothing leaves it alone.
    Requests are validated in this order: shape (400), timestamp (406),
    signature (401), then existence (404).
    """

    def __init__(self, *, min_swarm: int = DEFAULT_MIN_SWARM_SIZE, seed: int = 0,
                 nodes: Mapping[str, NodeRecord] | None = None, height: int = 0,
                 staked: set[str] | None = None, epoch: int = 0) -> None:
        if isinstance(min_swarm, bool) or not isinstance(min_swarm, int) or min_swarm < 1:
            raise RegistryError(f"min_swarm must be an integer >= 1, got {min_swarm!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RegistryError(f"seed must be an integer, got {seed!r}")
        self.min_swarm = min_swarm
        self.seed = seed
        self.nodes: dict[str, NodeRecord] = dict(nodes or {})
        self.height = height
        # Keys allowed to register (Oxen: a stake on chain; here the controller stakes
        # them with the admin token).  None: open registration, for standalone use.
        self.staked = None if staked is None else set(staked)
        # (height, {ed25519 hex: swarm id}) of the assignments replaced most recently, oldest first.
        self.history: deque[tuple[int, dict[str, int]]] = deque(maxlen=HISTORY_LENGTH)
        self._snapshot: dict[str, Any] | None = None
        self._history_body: tuple[int, list[dict[str, Any]]] | None = None
        # This run of the registry: a list (and a height) from another run — a restart —
        # never gets a delta.  The server sets it from its clock at start.
        self.epoch = epoch
        # (height, keys whose record was added, changed or removed on the way to it), oldest
        # first, and the height from which that log is complete.
        self._changes: deque[tuple[int, frozenset[str]]] = deque(maxlen=CHANGE_LOG_LENGTH)
        self._log_from = height
        self._touched: set[str] = set()
        self._deltas: dict[int, dict[str, Any]] = {}  # since_height -> answer, at the current height
        self.answers = {"whole": 0, "delta": 0, "unchanged": 0}  # get_service_nodes answers given, by kind

    def forget_history(self) -> None:
        """Drop the replaced assignments (at genesis: none of them was ever published)."""
        self.history.clear()
        self._history_body = None

    def _assignment(self) -> dict[str, int]:
        return {k: r.swarm_id for k, r in self.nodes.items()}

    def _bump(self, before: dict[str, int]) -> None:
        """One change made: height + 1, remembering the assignment it replaced if swarms
        changed, and which records changed (for deltas)."""
        if before != self._assignment():
            self.history.append((self.height, before))
        self.height += 1
        if len(self._changes) == self._changes.maxlen:
            self._log_from = self._changes[0][0]  # the oldest change falls out of the log
        self._changes.append((self.height, frozenset(self._touched)))
        self._touched.clear()

    # -- requests

    def register(self, args: object, now_ms: int) -> dict[str, Any]:
        """Handle a ``register`` request; returns {"height", "swarm_id"} or raises RequestError.

        A known key keeps its swarm and gets its new address (a restart); the
        same address again changes nothing and returns the same height.
        """
        args = _need_args(args, ("ed25519_public", "x25519_public", "host", "port", "timestamp", "signature"))
        ed_hex = _key_hex(args["ed25519_public"], "ed25519_public")
        x_hex = _key_hex(args["x25519_public"], "x25519_public")
        host, port = _host(args["host"]), _port(args["port"])
        signature = _signature(args["signature"])
        ts = _int(args["timestamp"], "timestamp")
        try:
            # Service nodes' x25519 keys are derived from their ed25519 keys.
            derived = ed25519_to_session_id(bytes.fromhex(ed_hex))[2:]
        except BadKey:
            raise _bad("ed25519_public is not a valid ed25519 public key") from None
        if derived != x_hex:
            raise _bad("x25519_public is not the x25519 form of ed25519_public")
        _check_timestamp(ts, now_ms)
        _check_signature(ed_hex, register_message(ed_hex, x_hex, host, port, ts), signature)
        if self.staked is not None and ed_hex not in self.staked:
            raise RequestError(Status.FORBIDDEN, "not a staked service node")

        old = self.nodes.get(ed_hex)
        if old is not None and (old.host, old.port) == (host, port):
            return {"height": self.height, "swarm_id": old.swarm_id}
        before = self._assignment()
        if old is not None:
            self.nodes[ed_hex] = replace(old, host=host, port=port)
            self._touched.add(ed_hex)
            self._reassign()
        else:
            self._reassign(new=NodeRecord(ed_hex, x_hex, host, port, 0))
        self._bump(before)
        return {"height": self.height, "swarm_id": self.nodes[ed_hex].swarm_id}

    def deregister(self, args: object, now_ms: int) -> dict[str, Any]:
        """Handle a ``deregister`` request; returns {"height"} or raises RequestError (404 if unknown)."""
        args = _need_args(args, ("ed25519_public", "timestamp", "signature"))
        ed_hex = _key_hex(args["ed25519_public"], "ed25519_public")
        signature = _signature(args["signature"])
        ts = _check_timestamp(args["timestamp"], now_ms)
        _check_signature(ed_hex, deregister_message(ed_hex, ts), signature)
        if ed_hex not in self.nodes:
            raise RequestError(Status.NOT_FOUND, "no such service node")
        before = self._assignment()
        del self.nodes[ed_hex]
        self._touched.add(ed_hex)
        self._reassign()
        self._bump(before)
        return {"height": self.height}

    def stake(self, args: object) -> dict[str, Any]:
        """Allow a key to register (the admin token is the caller's to check)."""
        args = _need_args(args, ("ed25519_public",))
        ed_hex = _key_hex(args["ed25519_public"], "ed25519_public")
        if self.staked is not None:
            self.staked.add(ed_hex)
        return {"staked": ed_hex}

    def snapshot(self) -> dict[str, Any]:
        """The whole list: {"height", "changed": True, "epoch", "nodes": [...]} sorted by ed25519 key.

        Built once per height and shared by every answer at that height (every
        follower asks after each change): treat it as read-only."""
        if self._snapshot is None or self._snapshot["height"] != self.height:
            self._snapshot = {"height": self.height, "changed": True, "epoch": self.epoch,
                              "nodes": [self.nodes[k].to_wire() for k in sorted(self.nodes)]}
        return self._snapshot

    def delta(self, since_height: int) -> dict[str, Any] | None:
        """What changed after ``since_height``: {"height", "changed": True, "epoch",
        "since_height", "nodes": [records added or changed], "removed": [ed25519 hex]},
        or None when the change log does not reach back that far or the delta would
        not be smaller than the whole list.  Shared by every answer at this height."""
        if not self._log_from <= since_height < self.height:
            return None
        if self._deltas and next(iter(self._deltas.values()))["height"] != self.height:
            self._deltas.clear()
        body = self._deltas.get(since_height)
        if body is None:
            keys: set[str] = set()
            for height, changed in reversed(self._changes):
                if height <= since_height:
                    break
                keys |= changed
            if 2 * len(keys) >= max(len(self.nodes), 1):
                return None
            body = {"height": self.height, "changed": True, "epoch": self.epoch, "since_height": since_height,
                    "nodes": [self.nodes[k].to_wire() for k in sorted(keys) if k in self.nodes],
                    "removed": sorted(k for k in keys if k not in self.nodes)}
            self._deltas[since_height] = body
        return body

    def service_nodes(self, since_height: int | None, *, history: bool = False,
                      epoch: int | None = None) -> dict[str, Any]:
        """Answer to get_service_nodes once any waiting is over.

        Unchanged ({"height", "changed": False, "epoch", "nodes": []}) only when the
        caller already has this height (of this run of the registry, when it names
        the ``epoch`` it had it from).  A caller naming this run's epoch gets a
        :meth:`delta` when there is one.  Anything else, any height lower or higher
        (a registry restarted without --state), gets the whole list, and with
        ``history`` also the assignments it replaced, newest first, each as its
        differences from this list (see :meth:`_history_differences`).
        """
        same_run = epoch is None or epoch == self.epoch
        if since_height is not None and since_height == self.height and same_run:
            self.answers["unchanged"] += 1
            return {"height": self.height, "changed": False, "epoch": self.epoch, "nodes": []}
        if epoch == self.epoch and since_height is not None and not history:
            body = self.delta(since_height)
            if body is not None:
                self.answers["delta"] += 1
                return body
        self.answers["whole"] += 1
        body = self.snapshot()
        if history:
            if self._history_body is None or self._history_body[0] != self.height:
                self._history_body = (self.height, self._history_differences())
            body = {**body, "history": self._history_body[1]}
        return body

    def _history_differences(self) -> list[dict[str, Any]]:
        """The history, newest first, each assignment as its differences from the current one:
        ``{"height", "differ": {ed25519 hex: swarm_id then, or None when not on the list then}}``."""
        now = self._assignment()
        out: list[dict[str, Any]] = []
        budget = HISTORY_MAX_NAMES
        for height, then in reversed(self.history):
            differ: dict[str, int | None] = dict(then.items() - now.items())
            differ.update(dict.fromkeys(now.keys() - then.keys()))
            if len(differ) > budget:
                break
            budget -= len(differ)
            out.append({"height": height, "differ": {k: differ[k] for k in sorted(differ)}})
        return out

    def info(self) -> dict[str, Any]:
        return {"role": "registry", "version": VERSION, "height": self.height,
                "nodes": len(self.nodes), "swarms": len(self.swarms()), "min_swarm": self.min_swarm,
                "answers": dict(self.answers)}

    def swarms(self) -> dict[int, list[str]]:
        """Swarm id -> sorted member ed25519 keys."""
        return swarms_of({k: r.swarm_id for k, r in self.nodes.items()})

    def reassign(self) -> bool:
        """Re-run the swarm assignment (after loading with another min_swarm or
        seed); bumps the height and returns True if any node moved."""
        before = self._assignment()
        self._reassign()
        if before != self._assignment():
            self._bump(before)
            return True
        return False

    def _reassign(self, new: NodeRecord | None = None) -> None:
        """Add ``new`` (its swarm_id is ignored) and apply assign_swarms to every node."""
        current: dict[str, int | None] = {k: r.swarm_id for k, r in self.nodes.items()}
        if new is not None:
            current[new.ed25519_public] = None  # unassigned: assign_swarms places it
        # Compute before mutating, so a failure leaves the state as it was.
        assigned = assign_swarms(current, min_swarm_size=self.min_swarm, seed=self.seed)
        if new is not None:
            self.nodes[new.ed25519_public] = new
            self._touched.add(new.ed25519_public)
        for key, swarm_id in assigned.items():
            if self.nodes[key].swarm_id != swarm_id:
                self.nodes[key] = replace(self.nodes[key], swarm_id=swarm_id)
                self._touched.add(key)

    # -- persistence shape

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "height": self.height, "min_swarm": self.min_swarm,
                "seed": self.seed, "nodes": [self.nodes[k].to_wire() for k in sorted(self.nodes)],
                "staked": None if self.staked is None else sorted(self.staked)}

    @classmethod
    def from_json(cls, data: object, *, min_swarm: int | None = None, seed: int | None = None) -> RegistryState:
        """A state from :meth:`to_json` output.

        ``min_swarm``/``seed`` override the stored ones; when they differ the
        swarms are reassigned (and the height bumped if anything moved).
        """
        try:
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError(f"not a registry state of format {STATE_FORMAT}")
            nodes: dict[str, NodeRecord] = {}
            for raw in data["nodes"]:
                swarm_id = _int(raw["swarm_id"], "swarm_id")
                if not 0 <= swarm_id < RING:
                    raise ValueError(f"swarm_id {swarm_id} is outside [0, 2**64)")
                rec = NodeRecord(_key_hex(raw["ed25519_public"], "ed25519_public"),
                                 _key_hex(raw["x25519_public"], "x25519_public"),
                                 _host(raw["host"]), _port(raw["port"]), swarm_id)
                nodes[rec.ed25519_public] = rec
            stored_min, stored_seed = data["min_swarm"], data["seed"]
            staked = data.get("staked")
            state = cls(min_swarm=stored_min if min_swarm is None else min_swarm,
                        seed=stored_seed if seed is None else seed,
                        nodes=nodes, height=_int(data["height"], "height"),
                        staked=None if staked is None else {_key_hex(k, "staked") for k in staked})
        except RequestError as exc:
            raise StateFileError(f"bad registry state: {exc}") from None
        except (KeyError, TypeError, ValueError, RegistryError) as exc:
            raise StateFileError(f"bad registry state: {type(exc).__name__}: {exc}") from None
        if (state.min_swarm, state.seed) != (stored_min, stored_seed):
            state.reassign()
        return state


def load_state(path: str, *, min_swarm: int, seed: int) -> RegistryState:
    """The state saved at ``path`` (an empty one if the file does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return RegistryState(min_swarm=min_swarm, seed=seed)
    except (OSError, ValueError) as exc:
        raise StateFileError(f"cannot read registry state {path}: {exc}") from None
    return RegistryState.from_json(data, min_swarm=min_swarm, seed=seed)


def save_state(path: str, state: RegistryState) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`_write_json_atomic`)."""
    _write_json_atomic(path, state.to_json())


def _write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """A temp file in the same folder, fsync, then os.replace: readers see the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
