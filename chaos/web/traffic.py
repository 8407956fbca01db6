"""The users' traffic of a live run, from its ``history.jsonl`` as it grows: stores and
receives per second, store latency (the client's, send to acknowledgement) and delivery
latency (send to the recipient's receive), over a sliding window of :data:`WINDOW_MS`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Iterable

WINDOW_MS = 2000
BACKFILL_S = 300  # a page opened late still sees the last 5 minutes, a point a second

Record = tuple[int, str, "float | None"]  # (t ms, store | store_failed | receive, latency ms)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def stats(recent: list[Record], t_ms: int) -> dict[str, Any]:
    """One point of the plots from the records of the window ending at ``t_ms``."""
    win = WINDOW_MS / 1000
    stores = [lat for _, k, lat in recent if k == "store"]
    receives = [lat for _, k, lat in recent if k == "receive"]
    store_lat = [x for x in stores if x is not None]
    deliv = [x for x in receives if x is not None]
    return {"t": t_ms,
            "stores_per_s": round(len(stores) / win, 2),
            "failed_per_s": round(sum(1 for _, k, _ in recent if k == "store_failed") / win, 2),
            "receives_per_s": round(len(receives) / win, 2),
            "store_ms_p50": statistics.median(store_lat) if store_lat else None,
            "store_ms_p95": _pct(store_lat, 0.95),
            "delivery_ms_p50": statistics.median(deliv) if deliv else None}


class Traffic:
    """What the history says so far; :meth:`read` takes its new records."""

    def __init__(self) -> None:
        self._invokes: dict[str, int] = {}  # msg_id -> invoke t (delivery latency)
        self._recent: deque[Record] = deque()
        self.totals = {"stores_ok": 0, "stores_failed": 0, "stores_unknown": 0, "receives": 0}

    def read(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            t, op, typ = r.get("t"), r.get("op"), r.get("type")
            if not isinstance(t, int):
                continue
            if op == "send":
                if typ == "invoke" and r.get("msg_id"):
                    self._invokes[str(r["msg_id"])] = t
                elif typ == "ok":
                    self.totals["stores_ok"] += 1
                    lat = r.get("latency_ms")
                    self._recent.append((t, "store", float(lat) if isinstance(lat, (int, float)) else None))
                elif typ in ("fail", "info"):
                    self.totals["stores_failed" if typ == "fail" else "stores_unknown"] += 1
                    self._recent.append((t, "store_failed", None))
            elif op == "receive" and typ == "ok":
                self.totals["receives"] += 1
                sent = self._invokes.pop(str(r.get("msg_id")), None)
                self._recent.append((t, "receive", float(t - sent) if sent is not None else None))

    def backfill(self, now: float) -> list[dict[str, Any]]:
        """Points for the history already read (call before the first :meth:`point`)."""
        recs = sorted(self._recent, key=lambda r: r[0])
        out: list[dict[str, Any]] = []
        if not recs:
            return out
        t_end = int(now * 1000)
        t = max(recs[0][0] + WINDOW_MS, t_end - BACKFILL_S * 1000)
        lo = 0
        while t < t_end - 1000:
            while lo < len(recs) and recs[lo][0] <= t - WINDOW_MS:  # the window is (t - 2 s, t]
                lo += 1
            hi = lo
            while hi < len(recs) and recs[hi][0] <= t:
                hi += 1
            out.append({**stats(recs[lo:hi], t), "node_stores_per_s": None})
            t += 1000
        return out

    def point(self, now: float, node_stores: float) -> dict[str, Any]:
        """The point for now (``node_stores``: the nodes' own stores per second)."""
        t_ms = int(now * 1000)
        while self._recent and self._recent[0][0] <= t_ms - WINDOW_MS:
            self._recent.popleft()
        return {**stats(list(self._recent), t_ms), "node_stores_per_s": round(node_stores, 2)}
