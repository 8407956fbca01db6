"""Helpers of the web page's tests: a served runs directory, HTTP from a worker thread."""

from __future__ import annotations

import functools
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import requests
import trio

from chaos.web.cli import serve_forever


@asynccontextmanager
async def served(runs_dir: Path, **options: Any) -> AsyncIterator[str]:
    """``swarmnet serve`` over ``runs_dir`` in this trio run, on a free port; yields its URL."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_forever, runs_dir, port=0, shutdown=stop, **options))
        try:
            yield url
        finally:
            stop.set()


async def get(url: str, **kw: Any) -> requests.Response:
    return await trio.to_thread.run_sync(functools.partial(requests.get, url, timeout=30, **kw))


async def post(url: str, **kw: Any) -> requests.Response:
    return await trio.to_thread.run_sync(functools.partial(requests.post, url, timeout=60, **kw))


async def page_token(url: str) -> str:
    page = (await get(url + "/")).text
    return re.search(r'name="swarmnet-token" content="([^"]+)"', page).group(1)


async def act(url: str, token: str, body: dict[str, Any]) -> requests.Response:
    return await post(url + "/api/act", data=json.dumps(body),
                      headers={"Content-Type": "application/json", "X-Swarmnet-Token": token, "Origin": url})


def first_sse_event(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The first ``data:`` of a server-sent event stream (blocking: call from a thread)."""
    with requests.get(url, stream=True, timeout=timeout_s) as r:
        r.raise_for_status()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                return {"event": event, **json.loads(line.split(":", 1)[1])}
    raise AssertionError("the stream ended before its first event")
