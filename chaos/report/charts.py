"""The report's three charts, as PNG bytes: latency of every send over fault
bands, throughput per second, and each node's state over time.  matplotlib is
imported inside these functions: importing the report stays cheap for the CLI."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from chaos.report.model import (BAD, DELIVERED, FAILED, LOST, NOT_DELIVERED, OUTCOMES, UNKNOWN, FaultSpan, Send,
                                as_number)
from chaos.scenario import NEMESES

_OUTCOME_STYLE = {DELIVERED: ("tab:green", "o"), NOT_DELIVERED: ("tab:gray", "o"), FAILED: ("tab:purple", "s"),
                  UNKNOWN: ("tab:orange", "^"), BAD: ("black", "D"), LOST: ("red", "x")}
_STATE_COLOUR = {"killed": "tab:red", "paused": "tab:orange", "left": "tab:brown", "skewed": "tab:purple",
                 "partitioned": "tab:blue", "link fault": "tab:cyan", "joined": "tab:green"}
MAX_BINS = 20_000  # throughput bins at most (1 s each up to ~5.5 h of run)


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: nightly runs are headless
    from matplotlib.figure import Figure  # a bare Figure keeps pyplot's global state out of it

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    # Same side margins on every plot (no tight bbox) so their time axes line up on the page.
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.6 / height, top=1 - 0.4 / height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def kind_colours(spans: Sequence[FaultSpan]) -> dict[str, Any]:
    """One colour per fault kind, the same in every report (known kinds by their NEMESES order)."""
    from matplotlib import colormaps

    # 18 strong colours (pale ones vanish under a translucent band); process and
    # partition faults, the common ones, take the most distinct.
    palette = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
    order = {"process": 0, "partition": 1, "clock": 2, "link": 3}
    known = sorted(NEMESES, key=lambda k: order.get(NEMESES[k][0], 4))
    extra = sorted({s.kind for s in spans} - set(known))
    return {k: palette[i % len(palette)] for i, k in enumerate(known + extra)}


def _bands(ax: Any, spans: Sequence[FaultSpan], t0: float, run_end: float, colours: Mapping[str, Any]) -> list[Any]:
    """Shade each fault's interval; returns one legend handle per kind drawn."""
    from matplotlib.patches import Patch

    drawn: dict[str, Any] = {}
    for span in spans:
        iv = span.interval(run_end)
        if iv is None:
            continue
        ax.axvspan((iv[0] - t0) / 1000, (iv[1] - t0) / 1000, color=colours[span.kind], alpha=0.25, lw=0)
        drawn.setdefault(span.kind, Patch(color=colours[span.kind], alpha=0.4, label=f"fault: {span.kind}"))
    return [drawn[k] for k in sorted(drawn)]


def _legend(ax: Any, handles: list[Any]) -> None:
    if handles:  # outside the axes, on the right margin _png leaves for it
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _plain_log_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # 1-2-5 ticks labelled as plain numbers: a run's latencies often span less than one decade.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_latency(sends: Mapping[str, Send], outcomes: Mapping[str, str], spans: Sequence[FaultSpan],
                 t0: float, run_end: float) -> bytes:
    """PNG: store latency (ms, log) per message at its invoke time, over fault bands."""
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    handles = _bands(ax, spans, t0, run_end, kind_colours(spans))
    any_point = False
    for outcome in OUTCOMES:
        pts = [((s.invoke_ms - t0) / 1000, max(s.latency_ms, 0.1)) for mid, s in sends.items()
               if outcomes.get(mid) == outcome and s.invoke_ms is not None and s.latency_ms is not None]
        if not pts:
            continue
        any_point = True
        colour, marker = _OUTCOME_STYLE[outcome]
        xs, ys = zip(*pts)
        size = 30 if outcome in (LOST, BAD) else 12
        handles.insert(0, ax.scatter(xs, ys, s=size, c=colour, marker=marker, label=f"{outcome} ({len(pts)})",
                                     alpha=0.8, linewidths=1.2 if marker == "x" else 0))
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    if not any_point:
        ax.set_ylim(1, 1000)
        ax.text(0.5, 0.5, "no completed sends", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    ax.set_xlabel("time since first history record (s)")
    ax.set_ylabel("store latency (ms)")
    ax.set_title("Store latency by delivery outcome, with faults")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, handles)
    return _png(fig)


def plot_throughput(history: Sequence[Mapping[str, Any]], spans: Sequence[FaultSpan],
                    t0: float, run_end: float) -> bytes:
    """PNG: sends acknowledged and receives per second (1 s bins, wider past MAX_BINS), over fault bands."""
    bin_s = max(1, math.ceil((run_end - t0) / 1000 / MAX_BINS))  # a stray far-off "t" must not eat memory
    n_bins = int((run_end - t0) // (1000 * bin_s)) + 1
    acks, recvs = [0.0] * n_bins, [0.0] * n_bins
    for r in history:
        t = as_number(r.get("t"))
        if t is None or r.get("type") != "ok" or r.get("op") not in ("send", "receive"):
            continue
        i = min(max(int((t - t0) // (1000 * bin_s)), 0), n_bins - 1)
        (acks if r["op"] == "send" else recvs)[i] += 1 / bin_s
    fig = _figure(11, 3.4)
    ax = fig.add_subplot()
    handles = _bands(ax, spans, t0, run_end, kind_colours(spans))
    xs = [i * bin_s for i in range(n_bins + 1)]
    (l1,) = ax.plot(xs, acks + acks[-1:], drawstyle="steps-post", color="tab:blue", label="sends acknowledged/s")
    (l2,) = ax.plot(xs, recvs + recvs[-1:], drawstyle="steps-post", color="tab:green", label="receives/s")
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since first history record (s)")
    ax.set_ylabel("messages per second")
    ax.set_title(f"Throughput ({bin_s} s bins), with faults")
    ax.grid(True, alpha=0.3)
    _legend(ax, [l1, l2] + handles)
    return _png(fig)


NODE_ROWS_ALL = 40  # above this many nodes the state chart shows only those with a state to show


def plot_nodes(timeline: Mapping[str, Sequence[tuple[str, float, float]]], t0: float, run_end: float) -> bytes:
    """PNG: one row per node, a bar per interval the node was killed, paused, skewed, partitioned, left."""
    from matplotlib.patches import Patch

    names = list(timeline)
    hidden = 0
    if len(names) > NODE_ROWS_ALL:  # a large network: only the nodes something happened to
        shown = [n for n in names if timeline[n]]
        hidden, names = len(names) - len(shown), shown
    fig = _figure(11, max(2.0, 0.32 * len(names) + 1.2))
    ax = fig.add_subplot()
    used: set[str] = set()
    for row, name in enumerate(reversed(names)):
        states = sorted({s for s, _, _ in timeline[name]})
        lane = 0.8 / max(len(states), 1)  # overlapping states get their own lane within the row
        for state, start, end in timeline[name]:
            y = row - 0.4 + lane * states.index(state)
            ax.broken_barh([((start - t0) / 1000, max((end - start) / 1000, 0.05))], (y, lane),
                           facecolors=_STATE_COLOUR.get(state, "tab:gray"))
            used.add(state)
    ax.set_yticks(range(len(names)), list(reversed(names)), fontsize=7 if len(names) > 30 else 9)
    ax.set_ylim(-0.6, max(len(names), 1) - 0.4)
    ax.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    if not names:
        ax.text(0.5, 0.5, "no nodes known", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlabel("time since first history record (s)")
    ax.set_title("Node state over time" + (f" ({hidden} nodes without a fault not shown)" if hidden else ""))
    ax.grid(True, axis="x", alpha=0.3)
    _legend(ax, [Patch(color=_STATE_COLOUR.get(s, "tab:gray"), label=s) for s in sorted(used)])
    return _png(fig)


# ---------------------------------------------------------------- html
