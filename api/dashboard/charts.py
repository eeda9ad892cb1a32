"""Plotly figures as plain dicts: the page embeds them as JSON and ``dashboard.js`` draws
them with the Plotly that ships inside the ``plotly`` Python package (no CDN, no build).

Plain dicts rather than ``plotly.graph_objects``: a figure is a few traces, and building
them by hand keeps the page's work to a JSON dump.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from genmon.api.dashboard.views import Comparison, ScorePoint
from genmon.api.queries import aware
from genmon.schemas.signals import WindowSignal

Figure = dict[str, Any]

FIRING = "#b3261e"
LINE = "#1f4e8c"
MUTED = "#5f6368"


def _layout(title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 15}},
        "margin": {"l": 60, "r": 20, "t": 48, "b": 40},
        "height": 320,
        "xaxis": {"type": "date", "title": {"text": "window end (UTC)"}},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": -0.25},
        "hovermode": "x unified",
        **extra,
    }


def score_figure(points: Sequence[ScorePoint], signal: str, source: str) -> Figure:
    """The signal's score per window against its threshold, firing windows marked."""
    x = [p.at for p in points]
    firing = [p for p in points if p.detected]
    data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": f"{signal} score",
            "x": x,
            "y": [p.score for p in points],
            "line": {"color": LINE},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "threshold",
            "x": x,
            "y": [p.threshold for p in points],
            "line": {"color": MUTED, "dash": "dash"},
        },
        {
            "type": "scatter",
            "mode": "markers",
            "name": "firing window",
            "x": [p.at for p in firing],
            "y": [p.score for p in firing],
            "marker": {"color": FIRING, "size": 11, "symbol": "diamond"},
        },
    ]
    title = f"{signal}: {len(firing)} of {len(points)} windows over the threshold"
    layout = _layout(title, "score", meta={"source": source})
    thresholds = {p.threshold for p in points if p.threshold is not None}
    if len(thresholds) == 1:
        # One threshold throughout: a line across the whole chart, visible with one point.
        (level,) = thresholds
        layout["shapes"] = [
            {
                "type": "line",
                "xref": "paper",
                "x0": 0,
                "x1": 1,
                "y0": level,
                "y1": level,
                "line": {"color": MUTED, "dash": "dash"},
            }
        ]
    at = _instant(x[0]) if len(x) == 1 else None
    if at is not None:
        # Plotly zooms a single point to milliseconds: show the minutes around it.
        layout["xaxis"]["range"] = [
            (at - timedelta(minutes=2)).isoformat(),
            (at + timedelta(minutes=2)).isoformat(),
        ]
    return {"data": data, "layout": layout}


def _instant(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def comparison_figure(comparisons: Sequence[Comparison], rate: str) -> Figure:
    """Each segment's rate and the rest of the model's, with 95 % Wilson intervals."""

    def trace(name: str, color: str, rates: list[Any], lows: list[Any], highs: list[Any]) -> Any:
        return {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [c.segment for c in comparisons],
            "y": rates,
            "marker": {"color": color, "size": 10},
            "error_y": {
                "type": "data",
                "symmetric": False,
                "array": [
                    h - r if None not in (h, r) else 0 for h, r in zip(highs, rates, strict=True)
                ],
                "arrayminus": [
                    r - lo if None not in (lo, r) else 0 for lo, r in zip(lows, rates, strict=True)
                ],
            },
        }

    data = [
        trace(
            "segment",
            FIRING,
            [c.rate for c in comparisons],
            [c.low for c in comparisons],
            [c.high for c in comparisons],
        ),
        trace(
            "rest of the model",
            MUTED,
            [c.rest_rate for c in comparisons],
            [c.rest_low for c in comparisons],
            [c.rest_high for c in comparisons],
        ),
    ]
    layout = _layout(f"{rate} by segment vs the rest (95 % intervals)", rate)
    layout["xaxis"] = {"type": "category", "title": {"text": "segment"}}
    layout["yaxis"]["tickformat"] = ".1%"
    layout["hovermode"] = "closest"
    return {"data": data, "layout": layout}


def _gap(low: float | None, high: float | None) -> float:
    return high - low if low is not None and high is not None else 0.0


def _rate(stored: float | None, k: int, n: int) -> float | None:
    """The row's rate, or the one its counts make when it stored none."""
    if stored is not None:
        return stored
    return k / n if n else None


def _x(rows: Sequence[WindowSignal]) -> list[str]:
    return [aware(r.window_end).isoformat() for r in rows]


def traffic_figure(rows: Sequence[WindowSignal], model_id: str) -> Figure:
    """Requests and errors per window."""
    data = [
        {"type": "bar", "name": "requests", "x": _x(rows), "y": [r.requests for r in rows]},
        {
            "type": "bar",
            "name": "errors",
            "x": _x(rows),
            "y": [r.errors for r in rows],
            "marker": {"color": FIRING},
        },
    ]
    total = sum(r.requests for r in rows)
    errors = sum(r.errors for r in rows)
    title = f"{model_id}: {total:,} requests, {errors:,} errors in {len(rows)} windows"
    return {"data": data, "layout": _layout(title, "per window", barmode="overlay")}


def error_rate_figure(rows: Sequence[WindowSignal], model_id: str) -> Figure:
    """Error and negative-feedback rates per window."""
    data = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "error rate",
            "x": _x(rows),
            "y": [_rate(r.error_rate, r.errors, r.requests) for r in rows],
            "line": {"color": FIRING},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "negative feedback rate",
            "x": _x(rows),
            "y": [_rate(r.negative_rate, r.negative_feedback, r.feedback) for r in rows],
            "line": {"color": MUTED},
        },
    ]
    peak = max((_rate(r.error_rate, r.errors, r.requests) or 0.0 for r in rows), default=0.0)
    layout = _layout(f"{model_id}: error rate, peak {100 * peak:.1f} %", "rate")
    layout["yaxis"]["tickformat"] = ".1%"
    return {"data": data, "layout": layout}


def latency_figure(rows: Sequence[WindowSignal], model_id: str) -> Figure:
    """Latency quantiles per window."""
    data = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": name,
            "x": _x(rows),
            "y": [getattr(r, f"latency_{name}_ms") for r in rows],
        }
        for name in ("p50", "p95", "p99")
    ]
    latest = next((r.latency_p95_ms for r in reversed(rows) if r.latency_p95_ms), None)
    title = f"{model_id}: latency" + (f", p95 now {latest:,.0f} ms" if latest else "")
    return {"data": data, "layout": _layout(title, "ms")}
