"""The live network's links: which Toxiproxy proxies exist, where they lead,
and where each user and node dials.

The link table itself is planned (:mod:`testnet.plan`); :mod:`testnet.links`
makes and faults proxies.  This part of the controller joins them to the
running processes: a proxy leads to its destination node, or to that node's
ingress listener for the user it carries (one listener per user, so a node
tells users apart at the transport layer).  Proxies are made either all at
boot or each when its link is first dialled (``open_link``, asked by the node
or the user whose dial was refused); a node's dial table is pushed to it when
the table changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from . import links as L
from . import plan as P
from .base.crypto import BadSignature, link_open_message, verify_request
from .base.protocol import RequestError, Status
from .base.rpc import RpcError
from .runtime import BOOT_CALL_TIMEOUT_S, OPEN_LINK_TIMEOUT_S, NodeRuntime

if TYPE_CHECKING:
    from .controller import Testnet


class Wiring:
    """The links of ``net`` (its proxy table is ``net.api``, ``None`` with direct links)."""

    def __init__(self, net: Testnet) -> None:
        self.net = net

    # ------------------------------------------------------------------ where things lead

    def user_links(self, name: str) -> dict[str, tuple[str, int]]:
        """Where user ``name`` dials each node (by ed25519 hex): its proxies, or the nodes themselves."""
        net = self.net
        table = {rt.plan.ed25519_public: rt.address for rt in net.nodes.values()}
        table.update(net.plan.dial_table(name))
        return table

    def proxy_name(self, src: str, dst: str) -> str:
        """The Toxiproxy proxy of the directed link ``src`` -> ``dst`` (for :mod:`testnet.links` faults)."""
        return self.net.plan.link(src, dst).name

    def upstream(self, link: P.LinkPlan) -> tuple[str, int] | None:
        """Where the proxy of ``link`` leads: the node, or its ingress listener for that user."""
        dst = self.net.nodes.get(link.dst)
        if dst is None or not dst.port:
            return None
        if link.from_user:
            port = dst.ingress.get(link.src)
            return (dst.plan.host, port) if port else None
        return dst.address

    def proxy_spec(self, name: str) -> dict[str, str]:
        """Link ``name``'s proxy as Toxiproxy takes it (see :class:`links.ProxyTable`)."""
        link = self.net.plan.link_named(name)
        if link is None:
            raise L.ProxyGone(f"no link {name} in this run")
        up = self.upstream(link)
        if up is None:
            raise L.LinkError(f"link {name}: {link.dst} has not listened yet")
        return {"name": name, "listen": f"{link.listen[0]}:{link.listen[1]}", "upstream": f"{up[0]}:{up[1]}"}

    # ------------------------------------------------------------------ making proxies

    def boot_links(self, touching: str | None = None) -> list[P.LinkPlan]:
        """The links whose proxies are made at once (of those touching node ``touching``, if given):
        all of them, or none when links are made on first use.  Users' links too: a user dials
        only its guards (an onion request's first hop), a few of its N links, while every link
        made is a proxy that a fault on all links must call (300 nodes, 8 users: 2,400 of them)."""
        if self.net.proxies_on_use:
            return []
        plan = self.net.plan
        return list(plan.links) if touching is None else plan.links_touching([touching])

    @property
    def link_opener(self) -> tuple[str, int] | None:
        """Where a user asks for the proxy of one of its links (``open_link``, as nodes do), or
        ``None`` when every proxy is made at boot."""
        return self.net.plan.controller if self.net.proxies_on_use else None

    def _user_keys(self) -> dict[str, str]:
        keys = getattr(self, "_users_by_key", None)
        if keys is None:
            keys = self._users_by_key = {u.identity.ed25519_public.hex(): u.name for u in self.net.plan.users}
        return keys

    async def open_user_link(self, user: str, node: str) -> None:
        """Make user ``user``'s link to ``node`` now (the controller's own calls through it)."""
        net = self.net
        if net.api is not None and net.proxies_on_use:
            with trio.fail_after(OPEN_LINK_TIMEOUT_S):
                await net.api.open(net.plan.link(user, node).name)

    async def populate(self, wanted: tuple[P.LinkPlan, ...] | list[P.LinkPlan]) -> None:
        """Create the proxies of ``wanted`` links whose destination has run (has an upstream)."""
        net = self.net
        assert net.api is not None
        items = [(link, self.upstream(link)) for link in wanted]
        items = [(link, up) for link, up in items if up is not None]
        net.launcher.check_bindable([link.listen for link, _ in items])
        await net.api.populate([{"name": link.name, "listen": f"{link.listen[0]}:{link.listen[1]}",
                                 "upstream": f"{up[0]}:{up[1]}"} for link, up in items])

    async def open_link(self, args: dict[str, Any]) -> dict[str, Any]:
        """A node asks for the proxy of its link to another when its first dial of it is refused
        (``open_link {src, dst, signature}``: both nodes' ed25519 keys, hex, signed by ``src``;
        PROTOCOL.md), and so does a user (``src`` its own ed25519 key).  Answers once the proxy
        exists, with every fault on the link applied."""
        net = self.net
        src_key, dst_key, sig = args.get("src"), args.get("dst"), args.get("signature")
        if not (isinstance(src_key, str) and isinstance(dst_key, str) and isinstance(sig, bytes)):
            raise RequestError(Status.BAD_REQUEST, "open_link needs 'src' and 'dst' (hex keys) and 'signature' (bytes)")
        src = net.by_key.get(src_key)
        user = self._user_keys().get(src_key) if src is None else None
        if src is None and user is None:
            raise RequestError(Status.FORBIDDEN, "open_link: 'src' is neither a node nor a user of this run")
        try:
            verify_request(bytes.fromhex(src_key), link_open_message(src_key, dst_key), sig)
        except BadSignature as exc:
            raise RequestError(Status.UNAUTHORIZED, f"open_link: {exc}") from None
        dst = net.by_key.get(dst_key)
        if dst is None:
            raise RequestError(Status.NOT_FOUND, "open_link: 'dst' is not a node of this run")
        if net.api is None or net.state not in ("starting", "ready"):
            raise RequestError(Status.NOT_READY, f"open_link: no proxies to make (the run is {net.state})")
        try:
            name = net.plan.link(src.plan.name if src is not None else user, dst.plan.name).name
        except P.PlanError as exc:
            raise RequestError(Status.NOT_FOUND, f"open_link: {exc}") from None
        try:
            with trio.fail_after(OPEN_LINK_TIMEOUT_S):
                await net.api.open(name)
        except L.LinkError as exc:
            raise RequestError(Status.NOT_READY, f"open_link {name}: {exc}") from None
        except trio.TooSlowError:
            raise RequestError(Status.GATEWAY_TIMEOUT,
                               f"open_link {name}: not made in {OPEN_LINK_TIMEOUT_S:g} s") from None
        return {"link": name}

    async def make_swarm_links(self, timeout_s: float) -> None:
        """Make the proxies between the members of each swarm as soon as the registry publishes
        its first list (its genesis): every member starts anti-entropy with every other at once,
        and one /populate per server beats thousands of open_link calls.  Other links are made
        on first use."""
        net = self.net
        try:
            body = await net.call("registry", "get_service_nodes", {"since_height": -1, "wait_ms": 30_000},
                                  timeout=min(timeout_s, 35.0))
        except (RpcError, RequestError):
            return  # the nodes ask for their links themselves
        swarms: dict[Any, list[str]] = {}
        for rec in body.get("nodes") or ():
            rt = net.by_key.get(rec.get("ed25519_public"))
            if rt is not None and rec.get("swarm_id") is not None:
                swarms.setdefault(rec["swarm_id"], []).append(rt.plan.name)
        wanted = [{"name": net.plan.link(a, b).name} for members in swarms.values()
                  for a in members for b in members if a != b]
        try:
            assert net.api is not None
            await net.api.populate(wanted)
        except L.LinkError as exc:
            net.progress(f"not every swarm link made at once ({exc}); the nodes ask for the rest")
            return
        net.progress(f"{len(wanted):,} proxies made between swarm members")

    # ------------------------------------------------------------------ the nodes' side

    async def open_ingress(self, names: list[str]) -> None:
        """A listener per user on each node of ``names`` (the upstream of that user's proxy), so the
        node can tell users apart at the transport layer; same ports again after a restart."""
        net = self.net
        users = [u.name for u in net.plan.users]

        async def ingress(rt: NodeRuntime) -> None:
            want = [[rt.plan.host, rt.ingress.get(u, 0)] for u in users]
            # At boot every node is asked at once: a large network on two cores answers slowly
            # (500 nodes: connecting alone took the whole 2 s of a call).
            got = await net.admin(rt.plan.name, "admin_listen", addresses=want, timeout=BOOT_CALL_TIMEOUT_S)
            rt.ingress = {u: int(a[1]) for u, a in zip(users, got["addresses"])}
            rt.ingress_open = True

        if users:
            async with trio.open_nursery() as nursery:
                for name in names:
                    if not net.nodes[name].ingress_open:
                        nursery.start_soon(ingress, net.nodes[name])

    async def push_links(self, exclude: str | None = None, only: str | None = None) -> None:
        """Send running nodes their current dial table (admin_set_links); a paused node gets
        it when resumed, a dead one from its config when restarted."""
        net = self.net

        async def push(rt: NodeRuntime) -> None:
            table = {k: list(v) for k, v in net.plan.dial_table(rt.plan.name).items()}
            await net.admin(rt.plan.name, "admin_set_links", links=table)
            rt.links_stale = False

        async with trio.open_nursery() as nursery:
            for rt in net.nodes.values():
                if rt.plan.name == exclude or only not in (None, rt.plan.name):
                    continue
                if rt.state == "running":
                    nursery.start_soon(push, rt)
                elif rt.state == "paused":
                    rt.links_stale = True
