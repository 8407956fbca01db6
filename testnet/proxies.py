"""The proxy table: every planned link's Toxiproxy proxy, made on first use, and the
faults on links, made or not (see :class:`ProxyTable`)."""

from __future__ import annotations

import itertools
import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import AbstractSet, Any, AsyncIterator, Callable, Iterable, Sequence

import trio

from .toxiproxy import (POPULATE_BATCH, TOXIC_TYPES, BatchError, Call, CallFailure, LinkError, ProxyGone,
                        ToxiproxyApi, toxic_body, toxic_ids)

OPEN_BATCH_S = 0.01  # proxies asked for within this long of the first are made in one request
HEAL_TIMEOUT_S = 5.0  # for one call that undoes what a failed make did
RECONCILE_ROUNDS = 5  # a new proxy's calls re-read the faults at most this often (each round: one bulk call)
# Bulk calls a second, all servers together, until this run has measured its own (estimate_s):
# toxics added or removed — 6,226 calls of an all-links latency on 300 nodes took 1.0-1.3 s on a
# quiet 2-core machine — and links cut or enabled, which close or reopen a listener and every
# connection through it (536 in 0.6-1.0 s at load 44).
BULK_RATES_DEFAULT = {"toxic": 5000.0, "cut": 800.0}
BULK_RATE_MIN_CALLS = 500  # a bulk change of fewer calls says little about the rate (latency, not work)
ToxicSpec = tuple[str, dict[str, Any], str]  # (type, attributes, stream)


class ToxiproxyServers:
    """Several Toxiproxy servers seen as one: each proxy lives on the server ``server_of(name)``
    says (:meth:`api_for`); calls about all proxies go to every server.  Faults go through a
    :class:`ProxyTable` over them, so fault code never knows how the proxies are shared out."""

    def __init__(self, apis: list[ToxiproxyApi], server_of: Any) -> None:
        self.apis = apis
        self._server_of = server_of

    def server_of(self, proxy: str) -> int:
        return self._server_of(proxy)

    def api_for(self, proxy: str) -> ToxiproxyApi:
        return self.apis[self._server_of(proxy)]

    @property
    def url(self) -> str:
        first = self.apis[0].url
        return first if len(self.apis) == 1 else f"{first} (+{len(self.apis) - 1} more servers)"

    async def version(self) -> str:
        return await self.apis[0].version()

    async def proxies(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for api in self.apis:
            out.update(await api.proxies())
        return out

    async def reset(self) -> None:
        for api in self.apis:
            await api.reset()


@dataclass
class _Wanted:
    """What single-link faults say a proxy should be: enabled or not, and its toxics (name -> request body)."""

    enabled: bool = True
    toxics: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ToxiproxyApi.add_toxic's arguments


_fault_ids = itertools.count(1)


@dataclass
class LinkFault:
    """One fault held on many links (:meth:`ProxyTable.fault_links`): they are cut
    (``enabled`` False) or carry ``toxics`` (name -> request body) until it is healed.
    ``calls``: how many Toxiproxy calls its start made (one per made proxy and toxic)."""

    id: int
    names: AbstractSet[str]  # a set of names; a view the plan derives, for all links
    enabled: bool = True
    toxics: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: int = 0

    @property
    def calls_per_link(self) -> int:
        return 1 if not self.enabled else len(self.toxics)

    @property
    def work(self) -> str:
        """What its calls do, for their rate (:meth:`ProxyTable.estimate_s`): "cut" or "toxic"."""
        return "toxic" if self.enabled else "cut"

    @property
    def links(self) -> int:
        return len(self.names)


class _Opening:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: LinkError | None = None


class ProxyTable:
    """Every planned link's proxy, made when the link is first used (or by :meth:`populate`).

    A network of N nodes has N(N-1) directed links, and a proxy costs its Toxiproxy server a
    listening socket and ~15 KiB; a run uses few of them (swarm peers, onion hops).  A node whose
    first dial of a link is refused asks for its proxy (:meth:`open`, through the controller).
    Faults name any planned link, made or not: for a link not made yet what they ask (disabled,
    toxics) is recorded and applied when its proxy is made, before :meth:`open` returns, so no
    byte ever crosses a link in a state the faults did not ask for.  The fault methods are those of
    :class:`ToxiproxyApi`, so fault code never knows which proxies exist yet, nor where.

    A fault on many links (:meth:`fault_links`) is recorded once, as the set of its links, not
    link by link: a fault on all 92,100 links of a 300-node network costs a set, plus one call
    per made proxy (a few thousand), sent at once to every server (:meth:`ToxiproxyApi.calls`).
    A link is enabled when no fault holding it cuts it, so two overlapping cuts heal one at a time.

    ``spec(name)`` gives a link's proxy as Toxiproxy takes it (``name``, ``listen``,
    ``upstream``); it raises :class:`ProxyGone` for a name the plan does not have and
    :class:`LinkError` when the link cannot be made yet (its destination never ran).
    Proxies asked for at about the same time are made in one ``/populate`` per server.
    """

    def __init__(self, servers: ToxiproxyServers, spec: Callable[[str], dict[str, str]],
                 nursery: trio.Nursery) -> None:
        self.servers = servers
        self.apis = servers.apis
        self._spec = spec
        self._nursery = nursery
        self.made: set[str] = set()
        self._wanted: dict[str, _Wanted] = {}  # links a single-link fault touches
        self._faults: dict[int, LinkFault] = {}  # faults on many links, until healed
        self._locks: dict[str, trio.Lock] = {}
        # Links whose calls a fault on many links is making now -> set when they are done.  Not a
        # lock each: thousands of trio.Locks made and taken were a tenth of a second or more of a
        # loaded machine, at the fault's planned time.
        self._bulk: dict[str, trio.Event] = {}
        self._opening: dict[str, _Opening] = {}
        self._queues: dict[int, list[str]] = {}  # server -> names waiting to be made
        self.bulk_rates = dict(BULK_RATES_DEFAULT)  # calls a second of a large bulk change, as last measured

    @property
    def url(self) -> str:
        return self.servers.url

    def api_for(self, proxy: str) -> ToxiproxyApi:
        return self.servers.api_for(proxy)

    async def version(self) -> str:
        return await self.servers.version()

    async def proxies(self) -> dict[str, dict[str, Any]]:
        """The proxies made so far, as Toxiproxy reports them."""
        return await self.servers.proxies()

    @asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Link ``name`` to ourselves: its proxy made, or a fault recorded and applied, at a time."""
        while (bulk := self._bulk.get(name)) is not None:
            await bulk.wait()
        # From here to the lock's registration no checkpoint: a fault on many links that starts
        # meanwhile finds it in _locks and waits for us.
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = trio.Lock()
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked():  # nobody else waits for it (release hands it to a waiter)
                self._locks.pop(name, None)

    # ---------------------------------------------------------------- making proxies

    async def open(self, name: str) -> None:
        """Make the proxy of link ``name`` unless it exists; raises :class:`LinkError` if it cannot be made."""
        if name in self.made:
            return
        opening = self._opening.get(name)
        if opening is None:
            self._spec(name)  # refuse at once what can never be made
            opening = self._opening[name] = _Opening()
            server = self.servers.server_of(name)
            queue = self._queues.get(server)
            if queue is None:
                self._queues[server] = [name]
                self._nursery.start_soon(self._make_queued, server)
            else:
                queue.append(name)
        await opening.done.wait()
        if opening.error is not None:
            raise opening.error

    async def _make_queued(self, server: int) -> None:
        """Make the proxies queued for ``server``, a batch at a time, until none are left."""
        try:
            await trio.sleep(OPEN_BATCH_S)  # let the others asking now join this batch
            while self._queues.get(server):
                batch = self._queues[server][:POPULATE_BATCH]
                del self._queues[server][:len(batch)]
                errors: dict[str, LinkError] = {}
                try:
                    errors = await self._make(server, batch)
                finally:  # whatever happened, nobody waits for this batch any more
                    for name in batch:
                        opening = self._opening.pop(name)
                        opening.error = errors.get(name) or (
                            None if name in self.made else LinkError(f"link {name}: its proxy was not made"))
                        opening.done.set()
        finally:
            for name in self._queues.pop(server, ()):
                opening = self._opening.pop(name)
                opening.error = LinkError(f"link {name}: its proxy was not made")
                opening.done.set()

    async def populate(self, proxies: list[dict[str, Any]]) -> None:
        """Make these links' proxies now (``{"name", ...}`` each; ``listen`` and ``upstream`` come
        from the plan); raises the first :class:`LinkError` met."""
        by_server: dict[int, list[str]] = {}
        for p in proxies:
            by_server.setdefault(self.servers.server_of(p["name"]), []).append(p["name"])
        errors: dict[str, LinkError] = {}

        async def make(server: int, names: list[str]) -> None:
            for i in range(0, len(names), POPULATE_BATCH):
                errors.update(await self._make(server, names[i:i + POPULATE_BATCH]))

        async with trio.open_nursery() as nursery:
            for server, names in by_server.items():
                nursery.start_soon(make, server, names)
        if errors:
            raise next(iter(errors.values()))

    async def _make(self, server: int, names: list[str]) -> dict[str, LinkError]:
        """Make ``names`` (all on ``server``) as the faults want them; returns the failures by name."""
        errors: dict[str, LinkError] = {}
        async with AsyncExitStack() as held:
            # In one order for everyone: two batches sharing links (a bulk populate and the links
            # nodes ask for meanwhile) would otherwise each hold what the other waits for.  Links
            # made already are not held: a fault's calls on them need not wait for this batch.
            for name in sorted({n for n in names if n not in self.made}):
                await held.enter_async_context(self._locked(name))
            items = []
            for name in names:
                if name in self.made or name not in self._locks:
                    continue
                try:
                    spec = self._spec(name)
                except LinkError as exc:
                    errors[name] = exc
                    continue
                items.append({**spec, "enabled": self._state(name)[0]})
            api = self.apis[server]
            try:
                await api.populate(items)
                made = [item["name"] for item in items]
            except LinkError as exc:
                made = []
                if len(items) == 1 or exc.status is None:  # no answer: asking again one by one would not help
                    errors.update((item["name"], exc) for item in items)
                else:  # one bad proxy fails its whole batch: make them one by one
                    for item in items:
                        try:
                            await api.populate([item])
                            made.append(item["name"])
                        except LinkError as one:
                            errors[item["name"]] = one
            for name, exc in (await self._reconcile(api, {item["name"]: item["enabled"] for item in items
                                                          if item["name"] in made})).items():
                errors[name] = exc
                await _undo(api.delete_proxy, name)  # never leave it up without its faults
        return errors

    async def _reconcile(self, api: ToxiproxyApi, made: dict[str, bool]) -> dict[str, LinkError]:
        """Bring proxies just made (name -> enabled as made, no toxics yet) to what the faults ask,
        and count them made.  A fault on many links does not wait for links being made: what it
        asks is read here, again after each round of calls, until a round needs none — and then,
        in that same step, the links count as made, so a fault recorded later finds them made."""
        applied: dict[str, tuple[bool, set[str]]] = {name: (enabled, set()) for name, enabled in made.items()}
        errors: dict[str, LinkError] = {}
        for _ in range(RECONCILE_ROUNDS):
            calls = []
            for name in applied:
                enabled, toxics = self._state(name)
                was, had = applied[name]
                if enabled != was:
                    calls.append(Call("PATCH", f"/proxies/{name}", {"enabled": enabled}, name))
                calls += [Call("POST", f"/proxies/{name}/toxics", toxic_body(t, **toxics[t]), name)
                          for t in toxics.keys() - had]
                calls += [Call("DELETE", f"/proxies/{name}/toxics/{t}", None, name) for t in had - toxics.keys()]
                applied[name] = (enabled, set(toxics))
            if not calls:
                break
            for call, failure in zip(calls, await api.calls(calls)):
                # Already there (409) or already gone (404): as asked.
                if failure is not None and failure.status not in (404, 409) and call.proxy in applied:
                    del applied[call.proxy]
                    errors[call.proxy] = LinkError(str(failure), server=failure.server, call=failure.call,
                                                   proxy=call.proxy, status=failure.status)
        self.made.update(applied)
        return errors

    # ---------------------------------------------------------------- what the faults ask

    def _state(self, name: str) -> tuple[bool, dict[str, dict[str, Any]]]:
        """(enabled, toxics by name) that the faults ask of link ``name`` now."""
        want = self._wanted.get(name)
        enabled = want.enabled if want is not None else True
        toxics = dict(want.toxics) if want is not None else {}
        for fault in self._faults.values():
            if name in fault.names:
                enabled = enabled and fault.enabled
                toxics.update(fault.toxics)
        return enabled, toxics

    def wanted(self, proxy: str) -> dict[str, Any] | None:
        """What the faults ask of link ``proxy`` now (``None``: nothing, it is a plain link)."""
        enabled, toxics = self._state(proxy)
        return None if enabled and not toxics else {"enabled": enabled, "toxics": sorted(toxics)}

    def faulted(self) -> dict[str, dict[str, Any]]:
        """Every link a fault holds now, made or not, with what it asks (see :meth:`wanted`)."""
        names = set(self._wanted).union(*(f.names for f in self._faults.values()))
        out = {name: self.wanted(name) for name in sorted(names)}
        return {name: w for name, w in out.items() if w is not None}

    # ---------------------------------------------------------------- faults on one link

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        self._spec_known(proxy)
        async with self._locked(proxy):
            self._wanted.setdefault(proxy, _Wanted()).enabled = enabled
            self._forget_default(proxy)
            if proxy in self.made:
                await self._made_call(proxy, self.api_for(proxy).set_enabled, proxy, self._state(proxy)[0])

    async def add_toxic(self, proxy: str, type: str, attributes: dict[str, Any], *, stream: str = "downstream",
                        toxicity: float = 1.0, name: str | None = None) -> str:
        if type not in TOXIC_TYPES:
            raise LinkError(f"unknown toxic type {type!r}; known: {', '.join(TOXIC_TYPES)}")
        self._spec_known(proxy)
        name = name or f"{type}_{stream}_{next(toxic_ids)}"
        async with self._locked(proxy):
            if proxy in self.made:
                await self._made_call(proxy, self.api_for(proxy).add_toxic, proxy, type, attributes,
                                      stream=stream, toxicity=toxicity, name=name)
            self._wanted.setdefault(proxy, _Wanted()).toxics[name] = {
                "type": type, "attributes": attributes, "stream": stream, "toxicity": toxicity}
        return name

    async def remove_toxic(self, proxy: str, name: str) -> None:
        async with self._locked(proxy):
            want = self._wanted.get(proxy)
            if want is not None:
                want.toxics.pop(name, None)
                self._forget_default(proxy)
            if proxy in self.made:
                await self._made_call(proxy, self.api_for(proxy).remove_toxic, proxy, name)

    async def delete_proxy(self, name: str) -> None:
        """Forget link ``name``: its proxy if made, what single-link faults asked of it."""
        async with self._locked(name):
            self._wanted.pop(name, None)
            if name in self.made:
                self.made.discard(name)
                await self.api_for(name).delete_proxy(name)

    async def reset(self) -> None:
        """Every link enabled and without toxics, made or not."""
        self._wanted.clear()
        self._faults.clear()
        await self.servers.reset()

    def _spec_known(self, proxy: str) -> None:
        try:
            self._spec(proxy)
        except ProxyGone:
            raise
        except LinkError:
            pass  # planned, not makeable yet: the fault is recorded for when it is

    def _forget_default(self, proxy: str) -> None:
        want = self._wanted.get(proxy)
        if want is not None and want.enabled and not want.toxics:
            del self._wanted[proxy]

    async def _made_call(self, proxy: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await fn(*args, **kwargs)
        except ProxyGone:
            self.made.discard(proxy)  # gone behind our back (its server restarted): made again on use
            raise

    # ---------------------------------------------------------------- faults on many links

    def estimate_s(self, names: Sequence[str] | AbstractSet[str], calls_per_link: int, work: str) -> float:
        """How long a bulk change of ``calls_per_link`` calls on each made link of ``names``
        would take now, at the rate this table last measured for that ``work`` ("cut" or
        "toxic": :attr:`bulk_rates`): a fault on thousands of links cannot change them all at
        one instant, so the player centres that span on the planned time (chaos.run.play)."""
        made = self.made & names if isinstance(names, AbstractSet) else [n for n in names if n in self.made]
        return len(made) * calls_per_link / self.bulk_rates[work]

    async def fault_links(self, names: Sequence[str] | AbstractSet[str], *, cut: bool = False,
                          toxics: Sequence[ToxicSpec] = (), toxicity: float = 1.0) -> LinkFault:
        """Cut every link of ``names`` (``cut``), or put each toxic of ``toxics`` ((type,
        attributes, stream)) on each, until :meth:`heal_links`.  Recorded at once for every
        link; the made proxies' calls are then sent, every server at once.  Raises
        :class:`BatchError` (``done``: the :class:`LinkFault`, to heal) when calls failed,
        after every other call was made."""
        for type, _, _ in toxics:
            if type not in TOXIC_TYPES:
                raise LinkError(f"unknown toxic type {type!r}; known: {', '.join(TOXIC_TYPES)}")
        fault = LinkFault(next(_fault_ids), names if isinstance(names, AbstractSet) else frozenset(names),
                          enabled=not cut, toxics={
            f"{type}_{stream}_{next(toxic_ids)}": {"type": type, "attributes": attributes, "stream": stream,
                                                   "toxicity": toxicity} for type, attributes, stream in toxics})
        self._faults[fault.id] = fault

        # The same body for every proxy, encoded once: a fault on every link is thousands of calls.
        bodies = [(toxic_name, json.dumps(toxic_body(toxic_name, **toxic)).encode())
                  for toxic_name, toxic in fault.toxics.items()]
        cut_body = json.dumps({"enabled": False}).encode()

        def calls_for(name: str) -> list[Call]:
            if cut:
                return [Call("PATCH", f"/proxies/{name}", cut_body, name)]
            return [Call("POST", f"/proxies/{name}/toxics", body, name) for _, body in bodies]

        # A toxic already there was put by the proxy's making, which read this fault.
        failures, calls = await self._apply(fault, calls_for, fine=(409,))
        fault.calls = calls
        if failures:
            raise BatchError(failures, calls, fault)
        return fault

    async def heal_links(self, fault: LinkFault) -> None:
        """End ``fault``: its toxics removed, its links enabled unless another fault cuts them.
        Raises :class:`BatchError` naming the calls that failed, after making all the others."""
        if self._faults.pop(fault.id, None) is None:
            return

        enable = json.dumps({"enabled": True}).encode()

        def calls_for(name: str) -> list[Call]:
            if not fault.enabled:
                return [Call("PATCH", f"/proxies/{name}", enable, name)] if self._state(name)[0] else []
            return [Call("DELETE", f"/proxies/{name}/toxics/{toxic_name}", None, name) for toxic_name in fault.toxics]

        failures, calls = await self._apply(fault, calls_for, fine=(404,))  # already gone: healed
        if failures:
            raise BatchError(failures, calls, fault)

    async def _apply(self, fault: LinkFault, calls_for: Callable[[str], list[Call]],
                     fine: tuple[int, ...]) -> tuple[list[CallFailure], int]:
        """Send ``calls_for(name)`` for every made proxy of ``fault``, all at once per server (a
        status in ``fine`` counts as done); returns the failed calls and how many were made.  A
        made link another bulk change holds right now gets its calls once that change is over,
        in bulk again with the others that waited for it; one a single-link fault holds, after it."""
        bulk, locks = self._bulk, self._locks
        failures: list[CallFailure] = []
        count = 0

        async def send(server: int, batch: list[Call]) -> None:
            for call, failure in zip(batch, await self.apis[server].calls(batch)):
                if failure is not None and failure.status not in fine:
                    failures.append(failure)

        async def later(name: str) -> None:
            nonlocal count
            async with self._locked(name):
                if name in self.made:
                    batch = calls_for(name)
                    count += len(batch)
                    await send(self.servers.server_of(name), batch)

        # Links being made are not waited for: their making reads what the faults ask (_reconcile).
        pending: Iterable[str] = self.made & fault.names  # iterates the smaller of the two
        first = True
        while True:
            mine, locked, waited = [], [], []
            holders: set[trio.Event] = set()
            done = trio.Event()
            for name in pending:
                holder = bulk.get(name)
                if holder is not None:  # another bulk change's call on it, right now
                    holders.add(holder)
                    waited.append(name)
                elif name in locks:  # a single-link fault's, or its making's
                    locked.append(name)
                else:
                    bulk[name] = done
                    mine.append(name)
            try:
                by_server: dict[int, list[Call]] = {}
                for name in mine:
                    by_server.setdefault(self.servers.server_of(name), []).extend(calls_for(name))
                calls = sum(map(len, by_server.values()))
                count += calls
                began = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for server, batch in by_server.items():
                        nursery.start_soon(send, server, batch)
                took = trio.current_time() - began
                if first and calls >= BULK_RATE_MIN_CALLS and took > 0 and not failures:
                    self.bulk_rates[fault.work] = calls / took
            finally:
                for name in mine:
                    del bulk[name]
                done.set()
            first = False
            async with trio.open_nursery() as nursery:
                for name in locked:
                    nursery.start_soon(later, name)
            if not waited:
                return failures, count
            for holder in holders:
                await holder.wait()
            pending = [name for name in waited if name in self.made]


async def _undo(action: Any, *args: Any) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(HEAL_TIMEOUT_S):
            try:
                await action(*args)
            except LinkError:
                pass  # already gone: nothing left to undo
