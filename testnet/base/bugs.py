"""Deliberately broken behaviours, off by default (``swarmnet up --inject-bug NAME``).

Every checker must be able to fail; each bug here breaks one promise on
purpose, and the tests show the right checker catching it.
"""

from __future__ import annotations

# name -> (where it lives, what it breaks, the checker that must catch it)
BUGS: dict[str, tuple[str, str, str]] = {
    "client-id-in-layers": ("client", "the client writes its own Session ID into every onion layer",
                            "unlinkability"),
    "one-hop-path": ("client", "the client sends straight to the target node, without relays", "unlinkability"),
    "skip-replication": ("node", "nodes never forward stores to swarm peers nor run anti-entropy", "replication"),
    "ack-before-commit": ("node", "a store is acknowledged before it is committed or forwarded "
                                  "(written ~3 s later; a kill -9 loses it)", "delivery"),
    "ack-before-sync": ("node", "a store is acknowledged once committed but before it is synced (SQLite "
                                "synchronous=OFF): a power loss loses acknowledged stores", "delivery"),
    "wrong-inbox": ("node", "retrieve also returns another account's messages", "delivery"),
    "local-delete": ("node", "a delete removes the message at the node asked only: it neither tells the swarm "
                             "nor remembers the hash, so the other copies live on", "replication"),
    "no-node-auth": ("node", "nodes serve node-to-node ops (replicate*, ae_*) to any caller, authenticated or "
                             "not, for any account: a stranger can list, read and delete anyone's messages",
                     "authority"),
    "unsigned-peer-delete": ("node", "nodes take a swarm member's replicate_delete and replicate_expire without the "
                                     "account's signed request: a hostile member deletes and expires its swarm's "
                                     "messages everywhere", "authority"),
}

NODE_BUGS = frozenset(n for n, (where, _, _) in BUGS.items() if where == "node")
CLIENT_BUGS = frozenset(n for n, (where, _, _) in BUGS.items() if where == "client")


class UnknownBug(ValueError):
    pass


def check_bugs(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        raise UnknownBug(f"unknown bug(s) {', '.join(unknown)}; known: {', '.join(BUGS)}")
    return tuple(names)
