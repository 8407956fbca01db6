"""The report's chart of a run over time, as PNG bytes: three panels on one time
axis — latency of every send, throughput per second, and each node's state —
each over the faults' bands.  matplotlib is imported inside these functions:
importing the report stays cheap for the CLI.

Strategy: one figure, drawn and encoded once.  Most of a chart's cost is text
(tick labels, legends, titles: laid out and rasterised one by one), so the
panels share the time axis (labelled once, at the bottom) and the fault kinds'
legend (beside the first panel); three separate figures drew both three
times, and cost twice as much.
"""

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
NODE_ROWS_ALL = 40  # above this many nodes the state panel shows only those with a state to show
LATENCY_IN, THROUGHPUT_IN = 3.6, 2.6  # panel heights (inches)
MARGIN_IN = 0.9  # above the first panel (its title) and below the last (the time axis)


def figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: nightly runs are headless
    from matplotlib.figure import Figure  # a bare Figure keeps pyplot's global state out of it

    return Figure(figsize=(width, height), dpi=100)


def png(fig: Any) -> bytes:
    """The figure as PNG bytes.  zlib level 3, not 6: a chart's flat colours compress nearly as
    well (7 % larger here) in two thirds of the time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 3})
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
    if handles:  # outside the axes, on the right margin the figure leaves for it
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _plain_log_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    # 1-2-5 ticks labelled as plain numbers: a run's latencies often span less than one decade.
    # No minor ticks: the 1-2-5 grid is enough to read by, and each tick is an object drawn.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def plot_over_time(sends: Mapping[str, Send], outcomes: Mapping[str, str], history: Sequence[Mapping[str, Any]],
                   spans: Sequence[FaultSpan], timeline: Mapping[str, Sequence[tuple[str, float, float]]],
                   t0: float, run_end: float) -> bytes:
    """PNG: the run over time (s since ``t0``), over fault bands — store latency per message by
    delivery outcome (ms, log), sends acknowledged and receives per second, and a row per node
    with a bar per interval it was killed, paused, skewed, partitioned or left."""
    names, hidden = _node_rows(timeline)
    nodes_in = max(1.2, 0.32 * len(names) + 0.4)
    fig = figure(11, LATENCY_IN + THROUGHPUT_IN + nodes_in + MARGIN_IN * 2)
    height = fig.get_size_inches()[1]
    grid = fig.add_gridspec(3, 1, height_ratios=(LATENCY_IN, THROUGHPUT_IN, nodes_in), hspace=0.1,
                            left=0.08, right=0.8, bottom=MARGIN_IN / height, top=1 - MARGIN_IN / 2 / height)
    latency = fig.add_subplot(grid[0])
    throughput = fig.add_subplot(grid[1], sharex=latency)
    nodes = fig.add_subplot(grid[2], sharex=latency)
    colours = kind_colours(spans)
    fault_handles = _bands(latency, spans, t0, run_end, colours)
    _bands(throughput, spans, t0, run_end, colours)
    _latency(latency, sends, outcomes, t0, fault_handles)
    _throughput(throughput, history, t0, run_end)
    _nodes(nodes, timeline, names, hidden, t0)
    latency.set_xlim(0, max((run_end - t0) / 1000, 1.0))
    for ax in (latency, throughput):
        ax.tick_params(labelbottom=False)  # one time axis, labelled under the last panel
    nodes.set_xlabel("time since first history record (s)")
    latency.set_title("The run over time: store latency by delivery outcome, throughput and node state, "
                      "with faults", fontsize=11)
    return png(fig)


def _latency(ax: Any, sends: Mapping[str, Send], outcomes: Mapping[str, str], t0: float,
             fault_handles: list[Any]) -> None:
    handles = list(fault_handles)
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
    ax.set_ylabel("store latency (ms)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, handles)


def _throughput(ax: Any, history: Sequence[Mapping[str, Any]], t0: float, run_end: float) -> None:
    """Sends acknowledged and receives per second (1 s bins, wider past MAX_BINS)."""
    bin_s = max(1, math.ceil((run_end - t0) / 1000 / MAX_BINS))  # a stray far-off "t" must not eat memory
    n_bins = int((run_end - t0) // (1000 * bin_s)) + 1
    acks, recvs = [0.0] * n_bins, [0.0] * n_bins
    for r in history:
        t = as_number(r.get("t"))
        if t is None or r.get("type") != "ok" or r.get("op") not in ("send", "receive"):
            continue
        i = min(max(int((t - t0) // (1000 * bin_s)), 0), n_bins - 1)
        (acks if r["op"] == "send" else recvs)[i] += 1 / bin_s
    xs = [i * bin_s for i in range(n_bins + 1)]
    (l1,) = ax.plot(xs, acks + acks[-1:], drawstyle="steps-post", color="tab:blue", label="sends acknowledged/s")
    (l2,) = ax.plot(xs, recvs + recvs[-1:], drawstyle="steps-post", color="tab:green", label="receives/s")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"messages per second\n({bin_s} s bins)")
    ax.grid(True, alpha=0.3)
    _legend(ax, [l1, l2])


def _node_rows(timeline: Mapping[str, Sequence[tuple[str, float, float]]]) -> tuple[list[str], int]:
    """The nodes given a row, and how many are left out (a large network: only those something happened to)."""
    names = list(timeline)
    if len(names) <= NODE_ROWS_ALL:
        return names, 0
    shown = [n for n in names if timeline[n]]
    return shown, len(names) - len(shown)


def _nodes(ax: Any, timeline: Mapping[str, Sequence[tuple[str, float, float]]], names: list[str], hidden: int,
           t0: float) -> None:
    from matplotlib.patches import Patch

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
    if not names:
        ax.text(0.5, 0.5, "no nodes known", transform=ax.transAxes, ha="center", color="gray")
    if hidden:
        ax.set_ylabel(f"nodes ({hidden} without\na fault not shown)", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    _legend(ax, [Patch(color=_STATE_COLOUR.get(s, "tab:gray"), label=s) for s in sorted(used)])
