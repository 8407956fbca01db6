"""One Toxiproxy server's HTTP API: single calls, and many calls at once.

Single calls (setup, a proxy made, a fault on one link) use ``requests`` in a
worker thread with an explicit timeout (see :mod:`testnet.links` for why not
toxiproxy-python).  A fault on every link of a large network is thousands of
calls — Toxiproxy has no bulk toxic or bulk update endpoint, and ``/populate``
leaves an existing proxy as it is — and ``requests`` costs about 2 ms of CPU a
call here (3,000 toxics added took 7.5 s with 32 threads), so
:meth:`ToxiproxyApi.calls` sends them pipelined (HTTP/1.1: many requests on a
connection before the first answer; Toxiproxy's Go server answers them in
order) on a few connections, straight from trio: 3,000 toxics in 0.4 s, 40 µs
of CPU a call.

Errors say which server, which call and what happened (status, refused,
closed, no answer in time): :class:`LinkError` carries them as attributes,
:class:`BatchError` lists every failed call of a bulk change and how many of
how many failed.
"""

from __future__ import annotations

import errno
import itertools
import json as jsonlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import requests
import trio

DEFAULT_TIMEOUT_S = 5.0
POPULATE_BATCH = 1000  # proxies per /populate request
POPULATE_TIMEOUT_S = 30.0  # for one batch: a loaded server creates a thousand listeners in about a second
TOXIC_TYPES = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data")
# Bulk calls: connections per server and requests in flight on each.  Measured on 3,000 toxic
# adds to one server: 1 connection 0.9 s, 4 connections 0.4 s, 16 connections 0.6 s (the server,
# not the client, is then the limit); a deeper pipeline than 64 gained nothing.
BULK_CONNECTIONS = 4
BULK_WINDOW = 64
CALLS_PER_CONNECTION = 32  # fewer calls than this share a connection: a connection costs a handshake

_sessions = threading.local()  # per worker thread: server url -> requests.Session (kept-alive connections)
toxic_ids = itertools.count(1)  # a toxic's name is unique in this process


def _session(url: str) -> requests.Session:
    by_url = getattr(_sessions, "by_url", None)
    if by_url is None:
        by_url = _sessions.by_url = {}
    session = by_url.get(url)
    if session is None:
        session = by_url[url] = requests.Session()
    return session


class LinkError(Exception):
    """Toxiproxy refused or failed a request, or could not be reached.  ``server``
    (host:port), ``call`` ("POST /proxies/x"), ``proxy`` and ``status`` (None: no answer)
    say which request and how, where known."""

    def __init__(self, message: str, *, server: str | None = None, call: str | None = None,
                 proxy: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.server, self.call, self.proxy, self.status = server, call, proxy, status


class ProxyGone(LinkError):
    """The proxy named does not exist (any more): its link went with its node."""


class Call(NamedTuple):
    """One request of a bulk change; ``proxy`` names the link it is about (for errors).  ``body``
    is JSON, or bytes already encoded (a fault sends the same body to thousands of proxies)."""

    method: str
    path: str
    body: Any = None
    proxy: str | None = None

    @property
    def text(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class CallFailure:
    """A call of a bulk change that failed: where, which, and why (``status`` None: no answer)."""

    server: str
    call: str
    proxy: str | None
    status: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "call": self.call, "proxy": self.proxy, "status": self.status,
                "reason": self.reason}

    def __str__(self) -> str:
        return f"toxiproxy {self.server} {self.call}: {self.reason}"


class BatchError(LinkError):
    """Some calls of a bulk change failed.  ``failures`` lists each, ``calls`` is how many
    calls were made; ``done`` is what the change did or may have done (a call that got no
    answer may have been applied), so a heal knows what to undo."""

    def __init__(self, failures: Sequence[CallFailure], calls: int, done: Any = ()) -> None:
        self.failures = list(failures)
        self.calls = calls
        self.done = done
        first = self.failures[0] if self.failures else None
        super().__init__(batch_summary(self.failures, calls), server=first and first.server,
                         call=first and first.call, proxy=first and first.proxy, status=first and first.status)


def batch_summary(failures: Sequence[CallFailure], calls: int, shown: int = 3) -> str:
    """"N of M Toxiproxy calls failed: <server> <reason> xK (e.g. <call>); ..." — grouped by
    server and reason, the largest groups first."""
    groups: dict[tuple[str, str], list[CallFailure]] = {}
    for f in failures:
        groups.setdefault((f.server, f.reason), []).append(f)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{server} {reason}" + (f" x{len(fs):,}" if len(fs) > 1 else "") + f" (e.g. {fs[0].call})"
             for (server, reason), fs in ranked[:shown]]
    more = f"; {len(ranked) - shown} more kinds" if len(ranked) > shown else ""
    return f"{len(failures):,} of {calls:,} Toxiproxy calls failed: " + "; ".join(parts) + more


def _text(content: Any) -> str:
    if isinstance(content, (bytes, bytearray)):
        content = bytes(content).decode("utf-8", "replace")
    return str(content).strip()[:300]


class ToxiproxyApi:
    """One Toxiproxy server's HTTP API.  ``*_sync`` methods block: call them
    from worker threads; the async methods do that for you, with a deadline."""

    def __init__(self, host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.populate_timeout_s = max(timeout_s, POPULATE_TIMEOUT_S)  # a batch is a thousand listeners

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def call_sync(self, method: str, path: str, json: Any = None, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        call = f"{method.upper()} {path}"
        where = {"server": self.server, "call": call, "proxy": _proxy_of(path)}
        try:
            resp = _session(self.url).request(method.upper(), self.url + path, json=json, timeout=timeout_s)
        except requests.Timeout:
            raise LinkError(f"toxiproxy {self.server} {call}: no answer in {timeout_s:g} s", **where) from None
        except requests.RequestException as exc:
            raise LinkError(f"toxiproxy {self.server} {call}: unreachable ({_reason(exc)})", **where) from None
        if resp.status_code == 404:
            raise ProxyGone(f"toxiproxy {self.server} {call}: not found: {_text(resp.content)}", status=404, **where)
        if resp.status_code >= 400:
            raise LinkError(f"toxiproxy {self.server} {call}: status {resp.status_code}: {_text(resp.content)}",
                            status=resp.status_code, **where)
        return resp.json() if resp.content else None

    async def call(self, method: str, path: str, json: Any = None, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            with trio.fail_after(timeout_s + 1.0):
                return await trio.to_thread.run_sync(self.call_sync, method, path, json, timeout_s,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            call = f"{method.upper()} {path}"
            raise LinkError(f"toxiproxy {self.server} {call}: no answer in {timeout_s + 1.0:g} s",
                            server=self.server, call=call, proxy=_proxy_of(path)) from None

    async def version(self) -> str:
        return (await self.call("get", "/version"))["version"]

    async def proxies(self) -> dict[str, dict[str, Any]]:
        return await self.call("get", "/proxies")

    async def populate(self, proxies: list[dict[str, Any]]) -> None:
        """Create (or update) many proxies, each ``{"name", "listen", "upstream"}``, in big batches."""
        for i in range(0, len(proxies), POPULATE_BATCH):
            await self.call("post", "/populate", proxies[i:i + POPULATE_BATCH], timeout_s=self.populate_timeout_s)

    async def delete_proxy(self, name: str) -> None:
        await self.call("delete", f"/proxies/{name}")

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        # PATCH: Toxiproxy 2.12 logs a deprecation warning for every POST to a proxy.
        await self.call("patch", f"/proxies/{proxy}", {"enabled": enabled})

    async def add_toxic(self, proxy: str, type: str, attributes: dict[str, Any], *, stream: str = "downstream",
                        toxicity: float = 1.0, name: str | None = None) -> str:
        """Add one toxic to ``proxy``; returns its name."""
        if type not in TOXIC_TYPES:
            raise LinkError(f"unknown toxic type {type!r}; known: {', '.join(TOXIC_TYPES)}")
        name = name or f"{type}_{stream}_{next(toxic_ids)}"
        await self.call("post", f"/proxies/{proxy}/toxics", toxic_body(name, type, attributes, stream, toxicity))
        return name

    async def remove_toxic(self, proxy: str, name: str) -> None:
        await self.call("delete", f"/proxies/{proxy}/toxics/{name}")

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        await self.call("post", "/reset")

    # ------------------------------------------------------------------ many calls at once

    async def calls(self, calls: Sequence[Call], *, timeout_s: float | None = None,
                    connections: int = BULK_CONNECTIONS, window: int = BULK_WINDOW) -> list[CallFailure | None]:
        """Make every call, pipelined on up to ``connections`` connections; returns, per call,
        None (a 2xx answer) or its :class:`CallFailure`.  Never raises for a failed call: a
        connection that is refused, closed, or gives no answer for ``timeout_s`` fails the calls
        it still held, and the other connections go on."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        results: list[CallFailure | None] = [None] * len(calls)
        n = max(1, min(connections, -(-len(calls) // CALLS_PER_CONNECTION)))
        async with trio.open_nursery() as nursery:
            for k in range(n):
                nursery.start_soon(self._pipeline, calls, range(k, len(calls), n), results, timeout_s, window)
        return results

    async def _pipeline(self, calls: Sequence[Call], share: range, results: list[CallFailure | None],
                        timeout_s: float, window: int) -> None:
        """One connection's share of the calls: up to ``window`` in flight, answers in order."""
        def fail(indices: Any, status: int | None, reason: str) -> None:
            for i in indices:
                c = calls[i]
                results[i] = CallFailure(self.server, c.text, c.proxy, status, reason)

        todo = deque(share)
        try:
            with trio.fail_after(timeout_s):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            fail(todo, None, f"cannot connect ({_reason(exc)})")
            return
        inflight: deque[int] = deque()
        answers = _Answers()
        async with stream:
            while todo or inflight:
                try:
                    with trio.fail_after(timeout_s):  # no progress for this long: the server is stuck
                        if todo and len(inflight) <= window // 2:
                            data = bytearray()
                            while todo and len(inflight) < window:
                                i = todo.popleft()
                                inflight.append(i)
                                data += _request(self.host, self.port, calls[i])
                            await stream.send_all(data)
                        got = await stream.receive_some(1 << 16)
                except trio.TooSlowError:
                    fail(inflight, None, f"no answer in {timeout_s:g} s")
                    fail(todo, None, f"not sent: the connection got no answer in {timeout_s:g} s")
                    return
                except (OSError, trio.BrokenResourceError) as exc:
                    fail(inflight, None, f"connection lost ({_reason(exc)})")
                    fail(todo, None, "not sent: connection lost")
                    return
                if not got:
                    fail(inflight, None, "connection closed by the server")
                    fail(todo, None, "not sent: connection closed by the server")
                    return
                try:
                    for status, body in answers.feed(got):
                        i = inflight.popleft()
                        if status >= 300:
                            results[i] = CallFailure(self.server, calls[i].text, calls[i].proxy, status,
                                                     f"status {status}: {_text(body)[:120]}")
                except (ValueError, IndexError) as exc:
                    fail(inflight, None, f"unreadable answer ({exc})")
                    fail(todo, None, "not sent: unreadable answer before")
                    return


def toxic_body(name: str, type: str, attributes: dict[str, Any], stream: str, toxicity: float) -> dict[str, Any]:
    """A toxic as ``POST /proxies/{p}/toxics`` takes it."""
    return {"name": name, "type": type, "stream": stream, "toxicity": toxicity, "attributes": attributes}


def _proxy_of(path: str) -> str | None:
    parts = path.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "proxies" else None


def _reason(exc: BaseException) -> str:
    """What a connection error was, in a few words: refused, reset, timed out, or its errno's
    name; looked for in the causes too (trio's ``open_tcp_stream`` wraps each attempt's error)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e in seen:
            continue
        seen.append(e)
        if isinstance(e, ConnectionRefusedError):
            return "refused"
        if isinstance(e, ConnectionResetError):
            return "reset by peer"
        if isinstance(e, (TimeoutError, trio.TooSlowError)):
            return "timed out"
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        inner = getattr(e, "args", ())
        todo += [a for a in inner if isinstance(a, BaseException)]
    for e in seen:
        if isinstance(e, OSError) and e.errno:
            return errno.errorcode.get(e.errno, str(e.errno))
    text = str(exc).lower()
    if "refused" in text:
        return "refused"
    return type(exc).__name__


def _request(host: str, port: int, call: Call) -> bytes:
    body = call.body if isinstance(call.body, bytes) else b"" if call.body is None else jsonlib.dumps(call.body).encode()
    kind = "Content-Type: application/json\r\n" if body else ""
    return (f"{call.method} {call.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
            f"{kind}\r\n").encode() + body


class _Answers:
    """HTTP/1.1 responses read off one connection, in order: ``feed(bytes)`` returns the
    (status, body) of each response completed.  Bodies by Content-Length or chunked; none
    for 1xx, 204 and 304 (RFC 9112, 6.3).  Raises ValueError on what it cannot frame."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else bytes(data)
        out = []
        pos = 0
        while True:
            got = self._one(buf, pos)
            if got is None:
                break
            out.append(got[0])
            pos = got[1]
        self._buf = buf[pos:]
        if len(self._buf) > 1 << 20 and b"\r\n\r\n" not in self._buf[:1 << 16]:
            raise ValueError("response head longer than 64 KiB")
        return out

    @staticmethod
    def _one(buf: bytes, pos: int) -> tuple[tuple[int, bytes], int] | None:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        lines = buf[pos:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {lines[0][:60]!r}")
        status = int(parts[1])
        start = end + 4
        if status < 200 or status in (204, 304):
            return (status, b""), start
        length: bytes | None = None
        chunked = False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = value.strip()
            elif key == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
        if chunked:
            return _Answers._chunked(buf, status, start)
        if length is None or not length.isdigit():
            raise ValueError("response without a length")
        stop = start + int(length)
        if len(buf) < stop:
            return None
        return (status, buf[start:stop]), stop

    @staticmethod
    def _chunked(buf: bytes, status: int, pos: int) -> tuple[tuple[int, bytes], int] | None:
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", eol)  # the last chunk, then (empty) trailers
                if trailer_end < 0:
                    return None
                return (status, bytes(body)), trailer_end + 4
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
