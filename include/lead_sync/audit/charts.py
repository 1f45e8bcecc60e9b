"""The report's charts: matplotlib figures as inline SVG, and the status colours the page shares.

matplotlib (and numpy with it) is imported when a chart is drawn, not with this module.
"""
from __future__ import annotations

import io
import re
import threading
from datetime import date, datetime, timedelta
from typing import Protocol, Sequence

from markupsafe import Markup

from lead_sync.events import DELIVERED, FAILED, PENDING, REJECTED, SKIPPED

# How the statuses stack in the chart and are listed in tables, with their colours.
STATUS_ORDER = (DELIVERED, SKIPPED, PENDING, REJECTED, FAILED)
STATUS_COLORS = {DELIVERED: "#2e7d32", SKIPPED: "#9e9e9e", PENDING: "#f2a900", REJECTED: "#e65100",
                 FAILED: "#b71c1c"}
# One line per percentile the report reads (report.QUANTILES), in this order.
LATENCY_COLORS = {"p50": "#1565c0", "p90": "#6a1b9a", "p99": "#c2185b"}


class DayLatency(Protocol):
    """One day of sending's latency percentiles (ms), as the report reads them (report.Latency)."""

    day: date | None
    answered: int
    p50: float | None
    p90: float | None
    p99: float | None


_MATPLOTLIB = threading.Lock()  # rcParams are process-wide: one chart at a time
_SVG_ROOT = re.compile(r"<svg\b[^>]*>", re.S)


def _svg(figure, salt: str) -> Markup:
    """A figure as an inline <svg> element: text kept as text, fixed ids, scales to its container."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(out, format="svg", metadata={"Date": None})
    svg = out.getvalue()
    svg = svg[svg.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML

    def root(match: re.Match) -> str:
        tag = re.sub(r'\s(width|height)="[^"]*"', "", match.group(0))
        return tag.replace("<svg", f'<svg class="chart" role="img" aria-labelledby="{salt}-title"', 1)

    svg = _SVG_ROOT.sub(root, svg, count=1)
    return Markup(svg)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    ax = figure.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e0e0e0", linewidth=0.8)
    ax.set_axisbelow(True)
    return figure, ax


def _date_axis(ax, days: list[date]) -> None:
    import matplotlib.dates as mdates

    span = (days[-1] - days[0]).days
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=10) if span > 7 else mdates.DayLocator())
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))
    pad = timedelta(hours=18)
    ax.set_xlim(datetime.combine(days[0], datetime.min.time()) - pad, datetime.combine(days[-1], datetime.min.time()) + pad)


def deliveries_chart(daily: dict[date, dict[str, int]], since: date | None = None,
                     until: date | None = None) -> Markup | None:
    """Stacked bars: events per partition day by status, every day from `since` to `until` on the
    axis (each bar segment has the id bar-<status>-<day>)."""
    if not daily:
        return None
    first, last = min([*daily, *([since] if since else [])]), max([*daily, *([until] if until else [])])
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    with _MATPLOTLIB:
        figure, ax = _figure(10, 3.0)
        bottom = {day: 0 for day in days}
        for status in STATUS_ORDER:
            drawn = [day for day in days if daily.get(day, {}).get(status)]
            if not drawn:
                continue
            values = [daily[day][status] for day in drawn]
            bars = ax.bar(drawn, values, bottom=[bottom[day] for day in drawn], width=0.8,
                          color=STATUS_COLORS[status], label=status)
            for day, bar, value in zip(drawn, bars, values):
                bar.set_gid(f"bar-{status}-{day.isoformat()}")
                bottom[day] += value
        ax.set_ylabel("events")
        ax.yaxis.get_major_locator().set_params(integer=True)
        _date_axis(ax, days)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=5, frameon=False, borderaxespad=0.2)
        return _svg(figure, "chart-deliveries")


def latency_chart(per_day: Sequence[DayLatency], since: date | None = None,
                  until: date | None = None) -> Markup | None:
    """Lines: p50/p90/p99 latency (ms) per day of sending, on the axis from `since` to `until`."""
    days = [l.day for l in per_day if l.answered]
    if not days:
        return None
    with _MATPLOTLIB:
        figure, ax = _figure(10, 2.4)
        for name, colour in LATENCY_COLORS.items():
            values = [getattr(l, name) for l in per_day if l.answered]
            line, = ax.plot(days, values, marker="o", markersize=4, linewidth=1.6, color=colour, label=name)
            line.set_gid(f"latency-{name}")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        _date_axis(ax, [min([*days, *([since] if since else [])]), max([*days, *([until] if until else [])])])
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=5, frameon=False, borderaxespad=0.2)
        return _svg(figure, "chart-latency")
