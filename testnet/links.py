"""Links through Toxiproxy: the server's lifecycle, the proxy table, and
per-link fault primitives that always heal.

We talk to Toxiproxy's HTTP API ourselves (:mod:`testnet.toxiproxy`: an
explicit timeout on every call; many calls pipelined), not through
toxiproxy-python: its ``Toxiproxy``/``Proxy`` objects take no timeout and
populate client-side with a full ``GET /proxies`` per proxy (quadratic at the
960 proxies of a 30-node network), and its ``APIConsumer`` keeps the server
address class-wide, so calls to several servers — a large network's — could
only take turns (a one-way partition of a 300-node network, 22,500 proxies,
took over 100 s that way).  Bulk creation uses the server's own ``/populate``;
a fault on many links records what it asks of links not made yet and sends
the calls for the made ones at once (:meth:`ProxyTable.set_enabled_links`,
:meth:`ProxyTable.add_toxics`, :meth:`ProxyTable.remove_toxics`).

Every fault is an async context manager whose exit heals, shielded from
cancellation and bounded by a deadline (Jepsen: a nemesis always heals).
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import trio

from .procs import Child, ChildFailed, spawn, stop_children
from .toxiproxy import (DEFAULT_TIMEOUT_S, POPULATE_BATCH, POPULATE_TIMEOUT_S, TOXIC_TYPES, BatchError, Call,
                        CallFailure, LinkError, ProxyGone, ToxiproxyApi, toxic_body, toxic_ids)

__all__ = ["DEFAULT_TIMEOUT_S", "POPULATE_BATCH", "POPULATE_TIMEOUT_S", "TOXIC_TYPES", "BatchError", "Call",
           "CallFailure", "LinkError", "ProxyGone", "ProxyTable", "ToxiproxyApi", "ToxiproxyMissing",
           "ToxiproxyServers", "find_toxiproxy", "open_toxiproxy", "proxies_needed", "servers_needed",
           "spawn_toxiproxy", "wait_toxiproxy"]

Address = tuple[str, int]
OPEN_BATCH_S = 0.01  # proxies asked for within this long of the first are made in one request
HEAL_TIMEOUT_S = 5.0
PROJECT_BIN = Path(__file__).resolve().parent.parent / "bin" / "toxiproxy-server"
ToxicSpec = tuple[str, dict[str, Any], str]  # (type, attributes, stream)


class ToxiproxyMissing(LinkError):
    """No Toxiproxy server binary on this machine."""


PROXY_FD_RESERVE = 1024  # descriptors a Toxiproxy server needs beyond its listeners: its API, logs


def proxies_needed(nodes: int, users: int) -> int:
    """Proxies of a run with these many nodes and users: one per directed node link and per user->node link."""
    return nodes * (nodes - 1) + users * nodes


MAX_SERVERS = 64  # Toxiproxy processes one run may start


def servers_needed(nodes: int, users: int, open_files: int) -> int:
    """Toxiproxy servers to share a run's proxies among: each may give at most half of the
    descriptors it may hold (``open_files``, after a reserve) to listening sockets, the other
    half to the connections it proxies (two descriptors each).  Raises :class:`LinkError`,
    saying why, when that would take more than :data:`MAX_SERVERS`."""
    per_server = (open_files - PROXY_FD_RESERVE) // 2
    proxies = proxies_needed(nodes, users)
    needed = -(-proxies // per_server) if per_server > 0 else MAX_SERVERS + 1
    if needed > MAX_SERVERS:
        raise LinkError(
            f"Toxiproxy links for {nodes} nodes and {users} users are {proxies:,} proxies, each a listening "
            f"socket; a process here may hold {open_files:,} open files (ulimit -n; raised to the hard limit), so "
            f"they would need more than {MAX_SERVERS} Toxiproxy servers. Use fewer nodes, --links direct (no link "
            f"faults), or raise the hard limit on open files.")
    return max(1, needed)


def find_toxiproxy(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Toxiproxy server binary: ``explicit``, ``$SWARMNET_TOXIPROXY``, ``bin/`` of the project, or PATH."""
    candidates = [explicit, os.environ.get("SWARMNET_TOXIPROXY"), PROJECT_BIN,
                  shutil.which("toxiproxy-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise ToxiproxyMissing(
        f"Toxiproxy server not found (looked in {PROJECT_BIN} and PATH). "
        "Install it with `make toxiproxy` (needs Go), or run with `--links direct` "
        "(no link faults, process faults only).")


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
    """What the faults say a proxy should be: enabled or not, and its toxics (name -> request body)."""

    enabled: bool = True
    toxics: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ToxiproxyApi.add_toxic's arguments


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
    Faults name any planned link, made or not: for a link not made yet what they ask (disabled, toxics) is
    recorded and applied when its proxy is made, before :meth:`open` returns, so no byte ever
    crosses a link in a state the faults did not ask for.  The fault methods of
    :class:`ToxiproxyApi`, so fault code never knows which proxies exist yet, nor where.

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
        self._wanted: dict[str, _Wanted] = {}  # only links a fault touches
        self._locks: dict[str, trio.Lock] = {}
        self._opening: dict[str, _Opening] = {}
        self._queues: dict[int, list[str]] = {}  # server -> names waiting to be made

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
            # nodes ask for meanwhile) would otherwise each hold what the other waits for.
            for name in sorted(names):  # fresh links: a fault being recorded holds one briefly
                await held.enter_async_context(self._locked(name))
            items = []
            for name in names:
                if name in self.made:
                    continue
                try:
                    spec = self._spec(name)
                except LinkError as exc:
                    errors[name] = exc
                    continue
                want = self._wanted.get(name)
                items.append({**spec, "enabled": want.enabled if want else True})
            api = self.apis[server]
            try:
                await api.populate(items)
                made = [item["name"] for item in items]
            except (LinkError, trio.TooSlowError) as exc:
                made = []
                if len(items) == 1:
                    errors[items[0]["name"]] = _as_link_error(exc)
                else:  # one bad proxy fails its whole batch: make them one by one
                    for item in items:
                        try:
                            await api.populate([item])
                            made.append(item["name"])
                        except (LinkError, trio.TooSlowError) as one:
                            errors[item["name"]] = _as_link_error(one)
            for name in made:
                want = self._wanted.get(name)
                try:
                    for toxic_name, toxic in (want.toxics.items() if want else ()):
                        await api.add_toxic(name, name=toxic_name, **toxic)
                except (LinkError, trio.TooSlowError) as exc:
                    errors[name] = _as_link_error(exc)
                    await _heal(api.delete_proxy, name)  # never leave it up without its faults
                    continue
                self.made.add(name)
        return errors

    # ---------------------------------------------------------------- faults

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        self._spec_known(proxy)
        async with self._locked(proxy):
            if proxy in self.made:
                await self._made_call(proxy, self.api_for(proxy).set_enabled, proxy, enabled)
            self._wanted.setdefault(proxy, _Wanted()).enabled = enabled
            self._forget_default(proxy)

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
        """Forget link ``name``: its proxy if made, what the faults asked of it."""
        async with self._locked(name):
            self._wanted.pop(name, None)
            if name in self.made:
                self.made.discard(name)
                await self.api_for(name).delete_proxy(name)

    async def reset(self) -> None:
        """Every link enabled and without toxics, made or not."""
        self._wanted.clear()
        await self.servers.reset()

    def wanted(self, proxy: str) -> dict[str, Any] | None:
        """What the faults ask of link ``proxy`` now (``None``: nothing, it is a plain link)."""
        want = self._wanted.get(proxy)
        return None if want is None else {"enabled": want.enabled, "toxics": sorted(want.toxics)}

    def faulted(self) -> dict[str, dict[str, Any]]:
        """Every link a fault holds now, made or not, with what it asks (see :meth:`wanted`)."""
        return {name: self.wanted(name) for name in self._wanted}  # type: ignore[misc]

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

    async def set_enabled_links(self, names: Sequence[str], enabled: bool) -> list[str]:
        """:meth:`set_enabled` on many links at once.  Returns the links changed, in ``names``'
        order, leaving out those the plan no longer has; raises :class:`BatchError` (``done``:
        what to undo) if calls failed, once every other call is made.  See :meth:`_change`."""
        def record(name: str) -> None:
            self._wanted.setdefault(name, _Wanted()).enabled = enabled
            self._forget_default(name)

        done = await self._change(names, record, lambda name: [Call("POST", f"/proxies/{name}", {"enabled": enabled},
                                                                    name)],
                                  lambda name: self.set_enabled(name, enabled), undo=enabled)
        return done

    async def add_toxics(self, names: Sequence[str], toxics: Sequence[ToxicSpec], *,
                         toxicity: float = 1.0) -> list[tuple[str, str]]:
        """Each toxic of ``toxics`` ((type, attributes, stream)) on every link of ``names``, under
        one name per toxic; returns the (link, toxic name) pairs added, as
        :meth:`set_enabled_links` returns links."""
        for type, _, _ in toxics:
            if type not in TOXIC_TYPES:
                raise LinkError(f"unknown toxic type {type!r}; known: {', '.join(TOXIC_TYPES)}")
        named = [(f"{type}_{stream}_{next(toxic_ids)}",
                  {"type": type, "attributes": attributes, "stream": stream, "toxicity": toxicity})
                 for type, attributes, stream in toxics]

        def record(name: str) -> None:
            want = self._wanted.setdefault(name, _Wanted())
            for toxic_name, toxic in named:
                want.toxics[toxic_name] = toxic

        async def one(name: str) -> None:
            for toxic_name, toxic in named:
                await self.add_toxic(name, name=toxic_name, **toxic)

        done = await self._change(
            names, record, lambda name: [Call("POST", f"/proxies/{name}/toxics", toxic_body(toxic_name, **toxic), name)
                                         for toxic_name, toxic in named], one, undo=False)
        return [(name, toxic_name) for name in done for toxic_name, _ in named]

    async def remove_toxics(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Remove each (link, toxic name); a toxic already gone counts as removed.  Returns the
        pairs removed, as :meth:`set_enabled_links` returns links."""
        by_link: dict[str, list[str]] = {}
        for name, toxic_name in pairs:
            by_link.setdefault(name, []).append(toxic_name)

        def record(name: str) -> None:
            want = self._wanted.get(name)
            if want is not None:
                for toxic_name in by_link[name]:
                    want.toxics.pop(toxic_name, None)
                self._forget_default(name)

        async def one(name: str) -> None:
            for toxic_name in by_link[name]:
                await self.remove_toxic(name, toxic_name)

        done = await self._change(
            list(by_link), record,
            lambda name: [Call("DELETE", f"/proxies/{name}/toxics/{t}", None, name) for t in by_link[name]],
            one, undo=True)
        return [(name, toxic_name) for name in done for toxic_name in by_link[name]]

    async def _change(self, names: Sequence[str], record: Callable[[str], None],
                      calls_for: Callable[[str], list[Call]], one: Callable[[str], Any], *, undo: bool) -> list[str]:
        """One change on many links: ``record(name)`` says what the faults now ask of a link;
        a link not made yet gets only that (applied when it is made), a made one the calls
        ``calls_for(name)`` too, all at once per server (:meth:`ToxiproxyApi.calls`).  A link
        someone holds right now (being made, or another fault's single call) goes through
        ``one(name)``, after them.

        A change that undoes a fault (``undo``) is recorded only where its calls succeeded, so
        :meth:`faulted` still shows what a failed heal left; one that makes a fault is recorded
        even where a call failed, since a call without an answer may have been applied, and its
        heal must try.  Returns the links changed (for a fault: or maybe changed)."""
        made: list[str] = []
        busy: list[str] = []
        recorded: set[str] = set()
        for name in dict.fromkeys(names):
            if name in self._locks:
                busy.append(name)
            elif not self._planned(name):
                continue  # its node left: nothing to change
            elif name in self.made:
                self._hold_nowait(name)
                made.append(name)
            else:
                record(name)
                recorded.add(name)
        failures: list[CallFailure] = []
        calls = 0
        try:
            by_server: dict[int, list[Call]] = {}
            for name in made:
                by_server.setdefault(self.servers.server_of(name), []).extend(calls_for(name))
            calls = sum(map(len, by_server.values()))
            failed: dict[str, list[CallFailure]] = {}

            async def send(server: int, batch: list[Call]) -> None:
                for call, failure in zip(batch, await self.apis[server].calls(batch)):
                    if failure is not None:
                        failed.setdefault(call.proxy or "", []).append(failure)

            async with trio.open_nursery() as nursery:
                for server, batch in by_server.items():
                    nursery.start_soon(send, server, batch)
            for name in made:
                problems = failed.get(name, [])
                if any(f.status == 404 for f in problems) and not undo:
                    self.made.discard(name)  # gone behind our back: made again on use, with this change
                    problems = [f for f in problems if f.status != 404]
                    if not self._planned(name):
                        continue
                problems = [f for f in problems if f.status != 404]  # undoing: already gone is undone
                failures += problems
                if not problems or not undo:
                    record(name)
                    recorded.add(name)
        finally:
            for name in made:
                self._let_go(name)
        if busy:
            async def slow(name: str) -> None:
                try:
                    await one(name)
                except ProxyGone:
                    if undo:
                        recorded.add(name)
                    return
                except LinkError as exc:
                    failures.append(CallFailure(exc.server or "?", exc.call or "?", name, exc.status, str(exc)))
                    if undo:
                        return
                recorded.add(name)

            calls += len(busy)
            async with trio.open_nursery() as nursery:
                for name in busy:
                    nursery.start_soon(slow, name)
        done = [name for name in dict.fromkeys(names) if name in recorded]
        if failures:
            raise BatchError(failures, calls, done)
        return done

    def _planned(self, name: str) -> bool:
        try:
            self._spec_known(name)
        except ProxyGone:
            return False
        return True

    def _hold_nowait(self, name: str) -> None:
        lock = self._locks[name] = trio.Lock()
        lock.acquire_nowait()

    def _let_go(self, name: str) -> None:
        lock = self._locks[name]
        lock.release()
        if not lock.locked():  # nobody waits for it
            self._locks.pop(name, None)


def _as_link_error(exc: BaseException) -> LinkError:
    return exc if isinstance(exc, LinkError) else LinkError(f"toxiproxy did not answer in time ({exc!r})")


# --------------------------------------------------------------------------- server lifecycle


def check_bindable(addresses: Iterable[Address]) -> None:
    """Raise :class:`LinkError` naming the first address we cannot bind (someone holds it)."""
    for host, port in addresses:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as exc:
            raise LinkError(f"cannot listen at {host}:{port}: {exc.strerror}") from None
        finally:
            s.close()


def spawn_toxiproxy(host: str, port: int, *, log: Path, seed: int | None = None,
                    binary: Path | None = None) -> tuple[Child, ToxiproxyApi]:
    """Start a Toxiproxy server at ``host:port`` (then :func:`wait_toxiproxy`).

    The caller owns the returned child: it must run ``child.watch()`` and stop it.
    """
    binary = binary or find_toxiproxy()
    check_bindable([(host, port)])
    argv = [str(binary), "-host", host, "-port", str(port)]
    if seed is not None:
        argv += ["-seed", str(seed % (1 << 63))]
    # Toxiproxy announces nothing on stdout; its API answering is the readiness.
    child, _ = spawn("toxiproxy", argv, stderr=log, env={**os.environ, "LOG_LEVEL": "info"}, ready_pipe=False)
    child.ready = {"event": "listening", "addresses": [[host, port]], "pid": child.pid}
    return child, ToxiproxyApi(host, port)


@asynccontextmanager
async def open_toxiproxy(host: str, port: int, *, log: Path, seed: int | None = None,
                         timeout_s: float = 10.0) -> AsyncIterator[ToxiproxyApi]:
    """A Toxiproxy server for the duration of the block, stopped (SIGTERM, then SIGKILL) on exit."""
    child, api = spawn_toxiproxy(host, port, log=log, seed=seed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.watch)
            try:
                await wait_toxiproxy(child, api, timeout_s)
                yield api
            finally:
                with trio.CancelScope(shield=True):
                    await stop_children([child])
    finally:
        child.kill()


async def wait_toxiproxy(child: Child, api: ToxiproxyApi, timeout_s: float = 10.0) -> str:
    """Poll the API until it answers (its version) or raise naming the failure."""
    last: Exception | None = None
    with trio.move_on_after(timeout_s):
        while child.running:
            try:
                with trio.fail_after(1.0):
                    return await api.version()
            except (LinkError, trio.TooSlowError) as exc:
                last = exc
            await trio.sleep(0.02)
    reason = "exited before its API answered" if not child.running else \
        f"API did not answer within {timeout_s:.3g} s ({last})"
    raise child.failure(reason, ChildFailed)


# --------------------------------------------------------------------------- fault primitives


async def _heal(action: Any, *args: Any) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(HEAL_TIMEOUT_S):
            try:
                await action(*args)
            except LinkError:
                pass  # the proxy or toxic is already gone: nothing left to heal


@asynccontextmanager
async def toxic(api: ToxiproxyApi, proxy: str, type: str, attributes: dict[str, Any], *,
                stream: str = "downstream", toxicity: float = 1.0) -> AsyncIterator[str]:
    """One toxic on one proxy for the duration of the block; yields its name."""
    name = await api.add_toxic(proxy, type, attributes, stream=stream, toxicity=toxicity)
    try:
        yield name
    finally:
        await _heal(api.remove_toxic, proxy, name)


@asynccontextmanager
async def latency(api: ToxiproxyApi, proxy: str, latency_ms: int, jitter_ms: int = 0,
                  stream: str = "downstream") -> AsyncIterator[str]:
    """Delay data on ``proxy`` by ``latency_ms`` (± ``jitter_ms``) in ``stream`` direction."""
    async with toxic(api, proxy, "latency", {"latency": latency_ms, "jitter": jitter_ms}, stream=stream) as name:
        yield name


@asynccontextmanager
async def links_down(api: ToxiproxyApi, proxies: Iterable[str]) -> AsyncIterator[list[str]]:
    """Disable every proxy given (live connections close, new ones are refused); re-enable on exit."""
    names = list(proxies)
    done: list[str] = []
    try:
        for name in names:
            await api.set_enabled(name, False)
            done.append(name)
        yield names
    finally:
        for name in done:
            await _heal(api.set_enabled, name, True)


@asynccontextmanager
async def link_down(api: ToxiproxyApi, proxy: str) -> AsyncIterator[str]:
    """One cut link (see :func:`links_down`)."""
    async with links_down(api, [proxy]):
        yield proxy
