"""Plotly figures as plain dicts, time buckets, percentiles and money for the dashboard. Pure.

The browser draws each figure with ``Plotly.react`` (``static/dashboard.js``); every figure has
both axes titled with their unit, and a legend under the plot so it stays readable on a phone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sparecycles.ledger.pricing import format_money
from sparecycles.types import MICROS_PER_UNIT

# name -> (span, bucket) in seconds: about 60 to 100 points whatever the range
RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 5),
    "15m": (900, 15),
    "1h": (3600, 60),
    "24h": (86_400, 900),
    "7d": (7 * 86_400, 7200),
    "30d": (30 * 86_400, 86_400),
}
DEFAULT_RANGE = "24h"
chart_height_px = 320
PALETTE = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16",
           "#ec4899", "#64748b", "#d97706")
TIME_AXIS = "time (UTC)"


def range_of(name: str | None) -> tuple[str, int, int]:
    """(name, span_s, bucket_s) of a range the page asked for; the default if unknown."""
    key = name if name in RANGES else DEFAULT_RANGE
    span, bucket = RANGES[key]
    return key, span, bucket


def buckets(now_s: float, span_s: int, bucket_s: int) -> list[int]:
    """Every bucket start of the last ``span_s`` seconds, the newest holding ``now_s``."""
    last = int(now_s // bucket_s) * bucket_s
    n = max(1, span_s // bucket_s)
    return [last - (n - 1 - i) * bucket_s for i in range(n)]


def span_of(bs: Sequence[int], bucket_s: int) -> tuple[str, str]:
    """The x range of a time figure: from the first bucket to the end of the last."""
    return stamp(bs[0]), stamp(bs[-1] + bucket_s)


def stamp(t_s: float) -> str:
    """A bucket's x value: UTC, in a form plotly reads as a date."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_s))


def day(t_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t_s))


def when(t_s: float | None) -> str:
    return "—" if t_s is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_s))


def money(micros: int | None, currency: str | None) -> str:
    """Exact, to the micro-unit: ``0.000122 USD``."""
    return "—" if micros is None else format_money(int(micros), currency)


def money_short(micros: int | None, currency: str) -> str:
    """For a tile: cents with thousands separators from one unit up, exact below."""
    if micros is None:
        return "—"
    if abs(micros) < MICROS_PER_UNIT:
        return format_money(int(micros), currency)
    return f"{micros / MICROS_PER_UNIT:,.2f} {currency}"


pct_shown_min = -999.0  # a margin below this reads "< -999 %" (tiny revenue, fixed costs)


def pct(value: float | None) -> str:
    if value is None:
        return "—"
    return f"< {pct_shown_min:,.0f} %" if value < pct_shown_min else f"{value:,.1f} %"


def present(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Only the points that have a value (an area chart draws a gap as zero)."""
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def units(micros: int | float | None) -> float | None:
    """Micro-units as a float of the currency, for plotting only (the money stays integer)."""
    return None if micros is None else round(micros / MICROS_PER_UNIT, 6)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (already sorted); None when empty."""
    if not values:
        return None
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def trace(name: str, x: Iterable[Any], y: Iterable[Any], *, kind: str = "line", i: int = 0,
          **extra: Any) -> dict[str, Any]:
    """A scatter line (markers show lone points), a bar or a stacked area trace."""
    t: dict[str, Any] = {"name": name, "x": list(x), "y": list(y)}
    color = PALETTE[i % len(PALETTE)]
    if kind == "bar":
        t.update(type="bar", marker={"color": color})
    elif kind == "area":
        t.update(type="scatter", mode="lines", stackgroup="one", line={"color": color, "width": 1})
    else:
        t.update(type="scatter", mode="lines+markers", marker={"size": 5, "color": color},
                 line={"color": color, "width": 2}, connectgaps=False)
    t.update(extra)
    return t


def figure(traces: list[dict[str, Any]], x_title: str, y_title: str, *,
           y2_title: str | None = None, barmode: str | None = None, x_type: str | None = "date",
           horizontal: bool = False, money_axis: bool = False, days: bool = False,
           x_range: Sequence[str] | None = None) -> dict[str, Any]:
    """A figure with titled axes and the legend under the plot."""
    layout: dict[str, Any] = {
        "height": chart_height_px,
        "margin": {"l": 64, "r": 64 if y2_title else 16, "t": 16, "b": 8},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12,
                 "color": "#1f2937"},
        "xaxis": {"title": {"text": x_title}, "automargin": True, "gridcolor": "#e5e7eb"},
        "yaxis": {"title": {"text": y_title}, "automargin": True, "rangemode": "tozero",
                  "gridcolor": "#e5e7eb", "zerolinecolor": "#9ca3af"},
        "legend": {"orientation": "h", "yanchor": "top", "y": -0.3, "x": 0},
        "hovermode": "closest" if horizontal else "x unified",
        "showlegend": True,
    }
    if x_type:
        layout["xaxis"]["type"] = x_type
    if x_range:  # the whole range asked for, even where there is no data yet
        layout["xaxis"]["range"] = list(x_range)
    if days:  # one bar a day: whole days on the axis, never hours
        layout["xaxis"].update(tickformat="%b %d", dtick=7 * 86_400_000, tick0="2000-01-03")
    if money_axis:  # amounts as decimals of the currency, not SI prefixes (µ, k, M)
        layout["yaxis"]["tickformat"] = ",.6~f"
    if y2_title:
        layout["yaxis2"] = {"title": {"text": y2_title}, "overlaying": "y", "side": "right",
                            "rangemode": "tozero", "automargin": True, "showgrid": False,
                            "tickformat": ",.3~r"}
    if barmode:
        layout["barmode"] = barmode
    if not traces:
        layout["annotations"] = [{"text": "no data in this range yet", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
                                  "font": {"size": 14, "color": "#6b7280"}}]
    return {"data": traces, "layout": layout}
