"""The health page's history: small server-rendered SVG time series from ``/api/state``'s ``history``.

One chart per series (coverage minimum, servers online, bottleneck tokens/s; per run
loss, tokens/s, members, bytes per round), each at most :data:`MAX_CHART_POINTS` points
(the series is thinned to one point per pixel column), with its latest, lowest and
highest values written beside it. No charting library: a polyline per chart.
"""

from __future__ import annotations

import html
import math
from typing import Any

_WIDTH = 260
_HEIGHT = 64
_PAD = 4
MAX_CHART_POINTS = 240
SWARM_CHARTS = (
    ("coverage_min", "coverage minimum (servers on the thinnest block)"),
    ("servers_online", "servers online"),
    ("tokens_per_second", "bottleneck tokens/s (announced)"),
)
RUN_CHARTS = (
    ("loss", "loss"),
    ("tokens_per_second", "tokens/s"),
    ("members", "members"),
    ("bytes_per_round", "bytes per round"),
)


def _format(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:,.1f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:,.1f}k"
    return f"{value:,.3g}"


def render_series_chart(series: str, label: str, times: list[float], values: list[Any]) -> str:
    """One time series as an SVG polyline (gaps where a value is missing)."""
    points = [
        (t, float(v))
        for t, v in zip(times, values, strict=False)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if len(points) > MAX_CHART_POINTS:
        step = len(points) / MAX_CHART_POINTS
        points = [points[int(i * step)] for i in range(MAX_CHART_POINTS - 1)] + [points[-1]]
    header = (
        f'<figure class="history"><figcaption>{html.escape(label)}</figcaption>'
        f'<svg class="history-chart" data-series="{html.escape(series, quote=True)}" data-points="{len(points)}" '
        f'role="img" aria-label="{html.escape(label, quote=True)}" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}">'
    )
    if not points:
        return header + '<text x="6" y="20" font-size="11">no samples yet</text></svg></figure>'
    first, last = points[0][0], points[-1][0]
    low, high = min(v for _, v in points), max(v for _, v in points)
    if high - low < 1e-12:
        low, high = low - 1, high + 1
    plot_height = _HEIGHT - 2 * _PAD - 12

    def x(t: float) -> float:
        return _PAD + (t - first) / max(last - first, 1e-9) * (_WIDTH - 2 * _PAD)

    def y(v: float) -> float:
        return _PAD + (high - v) / (high - low) * plot_height

    coordinates = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    span_minutes = (last - first) / 60
    return (
        header
        + f'<polyline fill="none" stroke="#1565c0" stroke-width="1.5" points="{coordinates}"/>'
        + f'<circle cx="{x(last):.1f}" cy="{y(points[-1][1]):.1f}" r="2.5" fill="#1565c0"/>'
        + f'<text x="{_PAD}" y="{_HEIGHT - 3}" font-size="9" fill="#555">now {_format(points[-1][1])} · '
        + f"range {_format(min(v for _, v in points))}–{_format(max(v for _, v in points))} · "
        + f"last {span_minutes:.0f} min</text></svg></figure>"
    )


def render_history(history: dict[str, Any]) -> str:
    """The swarm's history charts (an empty note before the first sample)."""
    swarm = history.get("swarm") or {}
    times = swarm.get("t") or []
    if not times:
        return '<section id="history"><h2>History</h2><p class="muted">no samples yet</p></section>'
    charts = "".join(
        render_series_chart(key, label, times, swarm.get(key, [])) for key, label in SWARM_CHARTS
    )
    window = history.get("window", 0) / 60
    return (
        f'<section id="history"><h2>History <span class="muted">(last {window:.0f} min, '
        f'{len(times)} samples)</span></h2><div class="charts">{charts}</div></section>'
    )


def render_run_history(history: dict[str, Any], run: str) -> str:
    """One training run's history charts (nothing before its first sample)."""
    series = (history.get("runs") or {}).get(run)
    if not series or not series.get("t"):
        return ""
    charts = "".join(
        render_series_chart(f"{run}:{key}", label, series["t"], series.get(key, []))
        for key, label in RUN_CHARTS
    )
    return f'<div class="charts run-history">{charts}</div>'
