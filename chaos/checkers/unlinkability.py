"""The unlinkability checker: could one honest-but-curious node link a
message's sender to its recipient?

Each node is judged by what it could know: its own capture file (every byte
it read or wrote, with the connection's addresses) opened with its own
x25519 key only.  For every ``onion`` request it received we record what the
node observes (an *observation*): who connected (a user, by address or by
the per-user ingress port a Toxiproxy link lands on), every user identifier
inside the layer it can open, the final request's op and account, and the
constants that cross hops (the blob it received, the blob it forwarded, the
reply bytes it returned).  A message is tied to its target's ``store``
observation by its hash, and to the rest of its path by those constants:
the target received what the previous hop forwarded, and relays pass the
target's reply back unchanged, so every hop of a path sees the same reply.

Anonymity testbeds judge an adversary by its observations; constants across
hops are the classic links between them, so the smallest colluding set that
links a message is reported as a finding (typically {guard, target}).
"""

from __future__ import annotations

import hashlib
import mmap
import re
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import msgpack
from nacl import bindings as sodium

from nodes.capture import capture_frames
from testnet.base.onion import LayerError, parse_layer
from testnet.base import crypto
from testnet.base.protocol import Request, Response, decode_body

from .delivery import capped
from .replication import GroundTruth, load_ground_truth

__all__ = ["UnlinkabilityError", "Observation", "UserKeys", "observe_node", "check_unlinkability",
           "scan_for_plaintext"]

_HEX_RUN = re.compile(r"[0-9a-f]{64,}")
_MAX_COUNT = 10_000  # occurrences counted per needle and file


class UnlinkabilityError(Exception):
    """A node's key or capture cannot be read."""


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class UserKeys:
    """Every identifier that names one user: its x25519 and ed25519 keys, raw and hex."""

    name: str
    session_id: str
    ed25519_hex: str | None = None

    def needles(self) -> list[bytes]:
        """Byte strings whose presence in a node's data names this user."""
        x_hex = self.session_id[2:].lower()
        out = [x_hex.encode(), bytes.fromhex(x_hex)]
        if self.ed25519_hex:
            out += [self.ed25519_hex.lower().encode(), bytes.fromhex(self.ed25519_hex)]
        return out


class _IdScanner:
    """Finds users named in an opened layer: raw bytes (canaries) and hex in any case."""

    def __init__(self, users: Iterable[UserKeys]) -> None:
        self.hex_to_user: dict[str, str] = {}
        self.needles: list[tuple[bytes, str]] = []
        for u in users:
            self.hex_to_user[u.session_id[2:].lower()] = u.name
            if u.ed25519_hex:
                self.hex_to_user[u.ed25519_hex.lower()] = u.name
            self.needles += [(n, u.name) for n in u.needles()]

    def user_of(self, account: Any) -> str | None:
        """The user a Session ID or ed25519 hex string names, if any."""
        if not isinstance(account, str):
            return None
        key = account.lower()
        return self.hex_to_user.get(key[2:] if len(key) == 66 else key)

    def scan(self, plaintext: bytes, obj: Any) -> set[str]:
        found = {name for needle, name in self.needles if needle in plaintext}
        stack = [obj]
        while stack:  # hex in other cases, anywhere in the layer's strings
            x = stack.pop()
            if isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
            elif isinstance(x, str) and len(x) >= 64:
                for run in _HEX_RUN.finditer(x.lower()):
                    s = run.group()
                    for i in range(len(s) - 63):
                        name = self.hex_to_user.get(s[i:i + 64])
                        if name:
                            found.add(name)
        return found


@dataclass(slots=True, eq=False)
class Observation:
    """What one node saw of one onion request it received."""

    node: str
    t: int
    remote: tuple[str, int]
    local: tuple[str, int]
    client: str | None  # user at the other end of the connection, by address or ingress port
    kind: str  # "relay" | "request" | "bad"
    received: bytes  # blake2b-128 of the blob it received
    forwarded: bytes | None = None  # blake2b-128 of the blob it relayed on
    next_hop: str | None = None
    op: str | None = None
    account: str | None = None  # user named by a final request's pubkey
    store_hash: str | None = None
    ids: frozenset[str] = frozenset()  # users named anywhere in the opened layer
    reply: bytes | None = None  # blake2b-128 of the reply data it returned


def observe_node(name: str, capture_path: Path, x25519_secret: bytes, users: Sequence[UserKeys], *,
                 user_hosts: Mapping[str, str], ingress_ports: Mapping[int, str]) -> tuple[list[Observation], Counter]:
    """Replay one node's capture with its own key: its observations and statistics (one pass)."""
    scanner = _IdScanner(users)
    keys = (x25519_secret, sodium.crypto_scalarmult_base(x25519_secret))
    conns: dict[tuple, dict[int, Observation]] = {}  # connection -> its onion requests awaiting a reply
    stats: Counter = Counter()
    observations: list[Observation] = []
    for t, conn, direction, local, remote, body in capture_frames(str(capture_path), stats=stats):
        # Only onion requests in and the answers to them out are read; most frames are
        # neither (replication, anti-entropy, the registry), and decoding them was most of
        # this checker's time.  Any msgpack encoding of the op "onion" holds those bytes.
        if direction == "in":
            if _ONION not in body:
                continue
            msg = decode_body(body)
            if isinstance(msg, Request) and msg.op == "onion":
                obs = _observe(name, t, local, remote, msg.args, keys, scanner, user_hosts, ingress_ports, stats)
                if obs is not None:
                    observations.append(obs)
                    conns.setdefault(conn, {})[msg.id] = obs
        else:
            pending = conns.get(conn)
            if not pending:
                continue
            msg = decode_body(body)
            if isinstance(msg, Response):
                obs = pending.pop(msg.id, None)
                if obs is not None and isinstance(msg.body, dict) and isinstance(msg.body.get("data"), bytes):
                    obs.reply = _digest(msg.body["data"])
    return observations, stats


_ONION = b"onion"


def _observe(node: str, t: Any, local: tuple[str, int], remote: tuple[str, int], args: Mapping[str, Any],
             keys: tuple[bytes, bytes], scanner: _IdScanner, user_hosts: Mapping[str, str], ingress_ports: Mapping[int, str],
             stats: Counter) -> Observation | None:
    eph, data = args.get("ephemeral_key"), args.get("data")
    stats["onion_requests"] += 1
    if not isinstance(eph, bytes) or not isinstance(data, bytes):
        stats["layer_errors"] += 1
        return None
    client = user_hosts.get(remote[0]) or ingress_ports.get(local[1])
    obs = Observation(node, int(t) if isinstance(t, int) else 0, remote, local, client, "bad", _digest(data))
    if client is not None:
        stats["from_users"] += 1
    try:
        plaintext, _ = crypto.open_layer_keyed(data, keys[0], eph, keys[1])
        kind, what = parse_layer(plaintext)
        layer = msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
    except (crypto.CryptoError, LayerError, ValueError, msgpack.UnpackException):
        stats["layer_errors"] += 1
        return obs
    obs.kind = kind
    obs.ids = frozenset(scanner.scan(plaintext, layer))
    if kind == "relay":
        stats["relayed"] += 1
        obs.next_hop, obs.forwarded = what[0], _digest(what[2])
        return obs
    stats["final"] += 1
    op, req_args = what
    obs.op = op
    stats[f"op:{op}"[:40]] += 1
    obs.account = scanner.user_of(req_args.get("pubkey"))
    if op == "store":
        try:
            ns = req_args.get("namespace", 0)
            obs.store_hash = crypto.message_hash(req_args.get("pubkey"), ns, req_args.get("data"))
        except (crypto.CryptoError, TypeError):
            pass
    return obs


# ---------------------------------------------------------------- judging messages


@dataclass
class _Message:
    msg_id: str
    hash: str
    sender: str | None
    recipient: str | None


def _messages(history: Sequence[Mapping[str, Any]]) -> list[_Message]:
    """Every send with a known hash (from its invoke or its ok)."""
    out: dict[str, _Message] = {}
    for r in history:
        if r.get("op") != "send" or r.get("msg_id") is None:
            continue
        mid = str(r["msg_id"])
        m = out.get(mid)
        if r.get("type") == "invoke":
            if m is None:
                m = out[mid] = _Message(mid, "", None, None)
            m.sender, m.recipient = r.get("from") or r.get("process"), r.get("to")
        if isinstance(r.get("hash"), str):
            if m is None:
                m = out[mid] = _Message(mid, "", r.get("process"), None)
            m.hash = m.hash or r["hash"]
    return [m for m in out.values() if m.hash]


class _Index:
    def __init__(self, observations: Iterable[Observation]) -> None:
        self.by_store: dict[str, list[Observation]] = defaultdict(list)
        self.by_forwarded: dict[bytes, list[Observation]] = defaultdict(list)
        self.by_reply: dict[bytes, list[Observation]] = defaultdict(list)
        for o in observations:
            if o.store_hash:
                self.by_store[o.store_hash].append(o)
            if o.forwarded:
                self.by_forwarded[o.forwarded].append(o)
            if o.reply:
                self.by_reply[o.reply].append(o)

    def path_to(self, target: Observation) -> tuple[list[Observation], list[str]]:
        """The observations of the path that ended at ``target``, guard first, with their roles."""
        chain, on = [target], {id(target)}
        while True:
            prev = next((p for p in self.by_forwarded.get(chain[0].received, ()) if id(p) not in on), None)
            if prev is None:
                break
            chain.insert(0, prev)
            on.add(id(prev))
        roles = ["target" if o is target else "guard" if i == 0 else "relay" for i, o in enumerate(chain)]
        # Hops whose blob chain we could not follow (a missing capture) still share the reply.
        for o in self.by_reply.get(target.reply, ()) if target.reply else ():
            if id(o) not in on:
                chain.append(o)
                roles.append("on-path")
                on.add(id(o))
        return chain, roles


def _ends(o: Observation, m: _Message) -> tuple[list[str], list[str]]:
    sender = [f"address of {m.sender}"] if o.client == m.sender else []
    sender += [f"id of {m.sender}"] if m.sender in o.ids else []
    recipient = [f"id of {m.recipient}"] if m.recipient in o.ids else []
    recipient += [f"address of {m.recipient}"] if o.client == m.recipient else []
    return sender, recipient


def _smallest_collusion(path: list[Observation], roles: list[str], s_end: list[bool],
                        r_end: list[bool]) -> tuple[list[str], list[str]] | None:
    """Fewest nodes joined by shared constants, one seeing a sender end and one a recipient end."""
    by_const: dict[bytes, list[int]] = defaultdict(list)
    for i, o in enumerate(path):
        for c in {o.received, o.forwarded, o.reply} - {None}:
            by_const[c].append(i)
    sources = [i for i, s in enumerate(s_end) if s]
    parent: dict[int, int | None] = {i: None for i in sources}
    queue = deque(sources)
    while queue:  # breadth first: the first recipient end reached is the nearest
        i = queue.popleft()
        if r_end[i]:
            chosen, j = [], i
            while j is not None:
                chosen.append(j)
                j = parent[j]
            nodes, rs = [], []
            for k in reversed(chosen):
                if path[k].node not in nodes:
                    nodes.append(path[k].node)
                    rs.append(roles[k])
            return nodes, rs
        o = path[i]
        for c in {o.received, o.forwarded, o.reply} - {None}:
            for j in by_const[c]:
                if j not in parent:
                    parent[j] = i
                    queue.append(j)
    return None


def _judge_message(m: _Message, index: _Index) -> dict[str, Any]:
    linkers: dict[str, dict[str, list[str]]] = {}
    best: tuple[list[str], list[str]] | None = None
    targets = index.by_store.get(m.hash, [])
    for target in targets:
        path, roles = index.path_to(target)
        ends = [_ends(o, m) for o in path]
        per_node: dict[str, tuple[set[str], set[str]]] = {}
        for o, (s, r) in zip(path, ends):
            seen = per_node.setdefault(o.node, (set(), set()))
            seen[0].update(s)
            seen[1].update(r)
        for node, (s, r) in per_node.items():
            if s and r:  # one node, within what it ties to this path by itself
                linkers[node] = {"sender_end": sorted(s), "recipient_end": sorted(r)}
        found = _smallest_collusion(path, roles, [bool(s) for s, _ in ends], [bool(r) for _, r in ends])
        if found is not None and (best is None or len(found[0]) < len(best[0])):
            best = found
    return {"msg_id": m.msg_id, "hash": m.hash, "from": m.sender, "to": m.recipient, "paths_seen": len(targets),
            "linked_by": linkers,
            "min_collusion": None if best is None else {"nodes": best[0], "roles": best[1], "size": len(best[0])}}


# ---------------------------------------------------------------- the checker


def _node_secret(truth: GroundTruth, name: str) -> bytes:
    path = truth.node_file(name, "seed_file", "seed")
    try:
        return crypto.Identity.from_seed(bytes.fromhex(path.read_text().strip())).x25519_secret
    except (OSError, ValueError, crypto.CryptoError) as exc:
        raise UnlinkabilityError(f"cannot read {name}'s seed: {type(exc).__name__}") from None


def check_unlinkability(run_dir: str | Path, history: Sequence[Mapping[str, Any]], *,
                        scan_files: bool = True) -> dict[str, Any]:
    """Judge unlinkability of every send in ``history`` from the nodes' captures in ``run_dir``.

    With ``scan_files``, the databases, logs and captures are also searched
    for the identifiers of users who send but are never sent to.
    """
    truth = load_ground_truth(run_dir)
    users = [UserKeys(n, sid, truth.user_entries[n].get("ed25519_public")) for n, sid in truth.users.items()]
    user_hosts = {str(u["host"]): n for n, u in truth.user_entries.items() if u.get("host")}
    observations: list[Observation] = []
    per_node: dict[str, dict[str, Any]] = {}
    missing: dict[str, str] = {}
    for name in truth.nodes:
        capture = truth.node_file(name, "capture", "capture.bin")
        if not capture.exists():
            missing[name] = "no capture file"
            continue
        try:
            secret = _node_secret(truth, name)
        except UnlinkabilityError as exc:
            missing[name] = str(exc)
            continue
        ports = {p: u for u, p in truth.ingress.get(name, {}).items()}
        obs, stats = observe_node(name, capture, secret, users, user_hosts=user_hosts, ingress_ports=ports)
        observations.extend(obs)
        per_node[name] = {"stats": dict(sorted(stats.items())),
                          "clients_seen": dict(Counter(o.client for o in obs if o.client)),
                          "messages_linked": 0, "sender_ids_seen": {}}

    messages = _messages(history)
    senders = {m.sender for m in messages if m.sender}
    index = _Index(observations)
    judged = [_judge_message(m, index) for m in messages]
    linked = [j for j in judged if j["linked_by"]]
    for j in linked:
        for node in j["linked_by"]:
            per_node[node]["messages_linked"] += 1

    # A node should never see a sender's identifier, except as the account of its own request.
    seen_ids: Counter = Counter()
    inbox_ip: Counter = Counter()
    for o in observations:
        for user in o.ids - {o.account}:
            if user in senders:
                seen_ids[(o.node, user)] += 1
        if o.op == "retrieve" and o.client is not None and o.client == o.account:
            inbox_ip[o.node] += 1
    sender_id_seen_by = [{"node": n, "user": u, "where": "onion-layer", "count": c}
                         for (n, u), c in sorted(seen_ids.items())]
    for (n, u), c in seen_ids.items():
        per_node[n]["sender_ids_seen"][u] = c
    recipients = {m.recipient for m in messages}
    pure_senders = [u for u in users if u.name in senders and u.name not in recipients]
    if scan_files and pure_senders:
        needles = {f"{u.name}:{i}": nd for u in pure_senders for i, nd in enumerate(u.needles()[:2])}
        for f in scan_for_plaintext(run_dir, needles):
            sender_id_seen_by.append({"node": f["node"], "user": f["needle"].split(":")[0], "where": f["kind"],
                                      "count": f["count"]})

    sizes = Counter(j["min_collusion"]["size"] if j["min_collusion"] else None for j in judged)
    roles = Counter("+".join(j["min_collusion"]["roles"]) for j in judged
                    if j["min_collusion"] and j["min_collusion"]["size"] > 1)
    traced = sum(1 for j in judged if j["paths_seen"])
    counts = {"messages": len(messages), "traced": traced, "linked_by_single_node": len(linked),
              "observations": len(observations), "nodes_analyzed": len(per_node),
              "nodes_missing_capture": len(missing), "sender_id_sightings": len(sender_id_seen_by),
              "inbox_ip_sightings": sum(inbox_ip.values())}
    findings = []
    if roles:
        role, n = roles.most_common(1)[0]
        findings.append(f"{n} of {traced} traced messages could be linked by a colluding {role} "
                        f"(joined by constants that cross hops: forwarded blobs, unchanged replies)")
    if inbox_ip:
        findings.append(f"nodes saw an account's own address on its retrieve: {dict(inbox_ip)}")
    if linked:
        valid: bool | str = False
    elif not per_node or traced == 0:
        valid = "unknown"  # no capture to judge from, or no message seen reaching a target
    else:
        valid = True
    ordered = linked + [j for j in judged if not j["linked_by"]]
    return {
        "checker": "unlinkability", "valid": valid, "counts": counts,
        "linked": capped(linked), "messages": capped(ordered),
        "collusion": {"min_size_histogram": {str(k): v for k, v in sorted(sizes.items(), key=lambda kv: str(kv[0]))},
                      "roles": dict(roles.most_common())},
        "sender_id_seen_by": capped(sender_id_seen_by), "per_node": per_node,
        "nodes_missing_capture": missing, "findings": findings,
    }


# ---------------------------------------------------------------- byte scans


def _node_files(truth: GroundTruth, name: str) -> Iterator[tuple[str, Path]]:
    db = truth.node_file(name, "db", "db.sqlite")
    yield "db", db
    yield "db-wal", db.with_name(db.name + "-wal")
    yield "log", truth.node_file(name, "log", "node.log")
    yield "stderr", truth.node_file(name, "stderr", "stderr.log")
    yield "capture", truth.node_file(name, "capture", "capture.bin")


def scan_for_plaintext(run_dir: str | Path, needles: Sequence[bytes] | Mapping[str, bytes]) -> list[dict[str, Any]]:
    """Where any needle occurs in any node's database, WAL, logs or capture, byte for byte.

    One finding per (node, file, needle): {"node", "kind", "path" (relative
    to the run dir), "needle" (its label or index, never its bytes),
    "offset" of the first occurrence, "count" (capped at 10,000)}.
    """
    truth = load_ground_truth(run_dir)
    labelled = list(needles.items()) if isinstance(needles, Mapping) else [(str(i), n) for i, n in enumerate(needles)]
    labelled = [(label, bytes(n)) for label, n in labelled if n]
    findings: list[dict[str, Any]] = []
    for name in truth.nodes:
        for kind, path in _node_files(truth, name):
            try:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    for label, needle in labelled:
                        first = mm.find(needle)
                        if first < 0:
                            continue
                        count, at = 1, first
                        while count < _MAX_COUNT and (at := mm.find(needle, at + 1)) >= 0:
                            count += 1
                        try:
                            shown = str(path.relative_to(truth.run_dir))
                        except ValueError:
                            shown = str(path)
                        findings.append({"node": name, "kind": kind, "path": shown, "needle": label,
                                         "offset": first, "count": count})
            except (OSError, ValueError):  # missing or empty file: nothing to find
                continue
    return findings
