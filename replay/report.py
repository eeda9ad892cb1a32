"""``genmon replay FILE --report out.html``: one self-contained page of charts.

For people tuning detectors on their own logs: each signal a replay judged, over event
time, against what it was compared with, and why it paged or did not.

**One file, no network.** Plotly's JavaScript is inlined from the ``plotly`` Python package
(``pip install 'genmon[report]'``, imported only here), the figures are JSON in the page,
nothing is fetched: the page opens offline and can be mailed or attached to a ticket.

**Per model, one chart per judged signal** (``div.genmon-chart``, ``data-model``,
``data-signal``): the top row is what the signal measured in each judgement (a window's rate
or latency quantile, an embedding sample's shift, an SLO's metric) and, dashed, its
baseline (the SLO's limit); the bottom row is the detector's score (the CUSUM sum, which
carries across windows) against its threshold, dashed. Each version and segment is a line.
Judgements that fired are shaded and marked; pages of the signal's incidents are vertical
lines with their titles on hover. A signal judged per segment gets a bar chart of each
segment's measured value against its baseline over the whole replay
(``div.genmon-segments``). Tables list the pages and the incidents.

**Bounded.** A line shows at most :data:`~genmon.replay.point_log.MAX_POINTS` points,
each the most alarming of a run of consecutive judgements (the page says how many); the
per-segment means are exact. All text from the stream (titles, segments, model ids) is
escaped, in the HTML and in the figures' JSON.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genmon.detectors.calibration.signals import ALL, LATENCY
from genmon.exceptions import ConfigurationError
from genmon.replay.point_log import MAX_POINTS, PointLog, SeriesKey
from genmon.streams.detection.points import SignalPoint

if TYPE_CHECKING:
    from genmon.replay.engine import Page, ReplayReport

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
FIRING = "#d62728"
Lines = dict[SeriesKey, list[SignalPoint]]
#: Lines a chart shows at first: beyond, the segments that never fired start hidden.
MAX_SHOWN = 6
#: Rows of each table (the rest is counted).
MAX_ROWS = 1000


def write_report(report: ReplayReport, path: Path, *, source: str = "") -> Path:
    """Write the page of ``report`` (a replay run with ``collect_points=True``) to ``path``."""
    page = render(report, source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def render(report: ReplayReport, *, source: str = "") -> str:
    """The page, as one string of HTML."""
    points = report.points if report.points is not None else PointLog()
    pages = _pages_by_chart(report)
    by_model: dict[str, dict[str, Lines]] = defaultdict(lambda: defaultdict(dict))
    for key, kept in points.series().items():
        by_model[key[0]][key[1]][key] = kept
    sections, figures = [], []
    for m, model in enumerate(sorted(by_model)):
        html_, figs = _model_section(m, model, by_model[model], pages, points)
        sections.append(html_)
        figures += figs
    return _PAGE.format(
        title=_e(f"genmon replay {source}".strip()),
        summary=_summary(report, points, source),
        sections="\n".join(sections) or "<p>No signal was judged (too little traffic?).</p>",
        tables=_pages_table(report.pages, report.incidents) + _incidents_table(report.incidents),
        plotly=_plotly_js(),
        figures=_json(figures),
    )


def _model_section(
    m: int,
    model: str,
    signals: dict[str, Lines],
    pages: dict[tuple[str, str], list[Page]],
    log: PointLog,
) -> tuple[str, list[dict[str, Any]]]:
    """A model's charts (their divs, and their figures keyed by div id), on one time range."""
    paged = {signal: pages.get((model, signal), []) for signal in signals}
    times = [p.at_ms for lines in signals.values() for kept in lines.values() for p in kept]
    times += [_ms(page.at) for shown in paged.values() for page in shown]
    span = _span(times)
    divs, figures = [], []
    for signal in sorted(signals):
        lines = signals[signal]
        chart = Chart(f"chart-{m}-{_slug(signal)}", model, signal, lines, log, span)
        divs.append(_div("genmon-chart", chart.div_id, model, signal))
        figures.append({"id": chart.div_id, **chart.figure(paged[signal])})
        if any(key[3] != ALL for key in lines):
            div_id = f"segments-{m}-{_slug(signal)}"
            divs.append(_div("genmon-segments", div_id, model, signal))
            figures.append({"id": div_id, **_segment_figure(signal, lines, log)})
    return f"<section><h2>Model {_e(model)}</h2>\n{''.join(divs)}</section>", figures


# -- one chart per signal ------------------------------------------------------------------
@dataclass
class Chart:
    """One signal of one model: its lines (version x segment x detector) in two rows."""

    div_id: str
    model: str
    signal: str
    lines: Lines
    log: PointLog
    span: list[str]  # the model's time range: its charts line up

    def figure(self, pages: Sequence[Page]) -> dict[str, Any]:
        data: list[dict[str, Any]] = []
        crowded = len(self.lines) > MAX_SHOWN
        for n, (key, kept) in enumerate(sorted(self.lines.items())):
            traces = self._traces(key, kept, PALETTE[n % len(PALETTE)])
            if crowded and key[3] != ALL and not any(p.detected for p in kept):
                for trace in traces:  # one click on the legend shows it
                    trace["visible"] = "legendonly"
            data += traces
        firing = [p for kept in self.lines.values() for p in kept if p.detected]
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "fired",
                "x": [_time(p.at_ms) for p in firing],
                "y": [p.score for p in firing],
                "xaxis": "x",
                "yaxis": "y2",
                "marker": {"color": FIRING, "symbol": "x", "size": 8},
            }
        )
        shapes = self._shading(firing)
        if pages:
            data.append(_page_marks(pages))
            shapes += [_vline(page.at) for page in pages]
        unit = _unit(self.signal, self.lines.values())
        return {"data": data, "layout": self._layout(unit, shapes)}

    def _traces(self, key: SeriesKey, kept: list[SignalPoint], color: str) -> list[dict[str, Any]]:
        _, _, version, segment, detector, early = key
        name = version if segment == ALL else f"{version} {segment}"
        name += f" ({detector}{', early' if early else ''})"
        stride = self.log.stride(key)
        if stride > 1:
            name += f" [1 point per {stride} judgements]"
        x = [_time(p.at_ms) for p in kept]
        mode = "markers" if early else "lines"
        group = _e(name)
        common = {"type": "scatter", "legendgroup": group, "xaxis": "x"}
        line = {"color": color, "width": 1.5}
        dashed = {"color": color, "width": 1, "dash": "dash"}
        traces: list[dict[str, Any]] = [
            {
                **common,
                "mode": mode,
                "name": group,
                "x": x,
                "y": [p.value for p in kept],
                "yaxis": "y",
                "line": line,
                "marker": {"color": color, "size": 4},
                "hovertext": [f"n={p.n}" for p in kept],
            },
            {
                **common,
                "mode": mode,
                "name": _e(f"{name} score"),
                "showlegend": False,
                "x": x,
                "y": [p.score for p in kept],
                "yaxis": "y2",
                "line": line,
                "marker": {"color": color, "size": 4},
            },
            {
                **common,
                "mode": "lines",
                "name": _e(f"{name} threshold"),
                "showlegend": False,
                "x": x,
                "y": [p.threshold for p in kept],
                "yaxis": "y2",
                "line": dashed,
            },
        ]
        if any(p.baseline is not None for p in kept):
            traces.insert(
                1,
                {
                    **common,
                    "mode": "lines",
                    "name": _e(f"{name} baseline"),
                    "showlegend": False,
                    "x": x,
                    "y": [p.baseline for p in kept],
                    "yaxis": "y",
                    "line": dashed,
                },
            )
        return traces

    def _shading(self, firing: Sequence[SignalPoint]) -> list[dict[str, Any]]:
        """A shaded span per run of firing judgements: from one judgement's spacing before
        each to it (a window's length, for windows)."""
        times = sorted({p.at_ms for kept in self.lines.values() for p in kept})
        gaps = [b - a for a, b in pairwise(times)]
        step = min(gaps) if gaps else 60_000
        spans: list[list[int]] = []
        for at in sorted({p.at_ms for p in firing}):
            if spans and at - step <= spans[-1][1]:
                spans[-1][1] = at
            else:
                spans.append([at - step, at])
        return [
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": _time(start),
                "x1": _time(end),
                "y0": 0,
                "y1": 1,
                "fillcolor": FIRING,
                "opacity": 0.12,
                "line": {"width": 0},
                "layer": "below",
            }
            for start, end in spans
        ]

    def _layout(self, unit: str, shapes: list[dict[str, Any]]) -> dict[str, Any]:
        value_axis: dict[str, Any] = {
            "domain": [0.42, 1],
            "title": {"text": _e(f"{self.signal} ({unit})" if unit else self.signal)},
            "rangemode": "tozero",
        }
        if unit == "%":
            value_axis["tickformat"] = ".1%"
            value_axis["title"] = {"text": _e(self.signal)}
        return {
            "title": {"text": _e(f"{self.model}: {self.signal}")},
            "height": 460,
            "margin": {"t": 50, "r": 20, "b": 40, "l": 70},
            "hovermode": "closest",
            "xaxis": {
                "type": "date",
                "anchor": "y2",
                "range": self.span,
                "title": {"text": "event time (UTC)"},
            },
            "yaxis": value_axis,
            "yaxis2": {"domain": [0, 0.34], "title": {"text": "score"}, "rangemode": "tozero"},
            "yaxis3": {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
            "legend": {"orientation": "h", "y": -0.15},
            "shapes": shapes,
        }


def _page_marks(pages: Sequence[Page]) -> dict[str, Any]:
    """The pages of the signal's incidents, as markers at the top with their titles."""
    return {
        "type": "scatter",
        "mode": "markers",
        "name": "pages",
        "x": [_iso_time(page.at) for page in pages],
        "y": [0.97] * len(pages),
        "xaxis": "x",
        "yaxis": "y3",
        "marker": {"color": "black", "symbol": "triangle-down", "size": 11},
        "hovertext": [_e(f"{p.transition} ({p.severity}): {p.title}") for p in pages],
        "hoverinfo": "text+x",
    }


def _vline(at: str) -> dict[str, Any]:
    x = _iso_time(at)
    return {
        "type": "line",
        "xref": "x",
        "yref": "paper",
        "x0": x,
        "x1": x,
        "y0": 0,
        "y1": 1,
        "line": {"color": "black", "width": 1, "dash": "dot"},
    }


def _segment_figure(signal: str, lines: Lines, log: PointLog) -> dict[str, Any]:
    """Each segment's value and baseline over the whole replay (exact means, weighted by
    the observations behind each judgement), and how often it fired."""
    names, values, baselines, fired = [], [], [], []
    for key in sorted(lines):
        if key[5]:  # early judgements overlap the window's
            continue
        value, baseline, count = log.means(key)
        names.append(_e(key[2] if key[3] == ALL else f"{key[2]} {key[3]}"))
        values.append(value)
        baselines.append(baseline)
        fired.append(_e(f"fired in {count} judgement(s)"))
    unit = _unit(signal, lines.values())
    bars = [
        {"type": "bar", "name": "measured", "x": names, "y": values, "hovertext": fired},
        {"type": "bar", "name": "baseline", "x": names, "y": baselines},
    ]
    axis: dict[str, Any] = {"title": {"text": _e(signal)}}
    if unit == "%":
        axis["tickformat"] = ".1%"
    layout = {
        "title": {"text": _e(f"{signal} per segment (mean over the replay)")},
        "barmode": "group",
        "height": 360,
        "margin": {"t": 50, "r": 20, "b": 90, "l": 70},
        "yaxis": axis,
    }
    return {"data": bars, "layout": layout}


def _pages_by_chart(report: ReplayReport) -> dict[tuple[str, str], list[Page]]:
    """Pages on the chart of their incident's signal (an SLO's on the SLO's chart when no
    default detector judged that signal)."""
    charted = report.points.signals() if report.points is not None else set()
    incidents = {i["id"]: i for i in report.incidents}
    out: dict[tuple[str, str], list[Page]] = defaultdict(list)
    for page in report.pages:
        incident = incidents.get(page.incident_id)
        if incident is None:
            continue
        model, signal = incident["model_id"], incident["signal"]
        if (model, signal) not in charted and (model, f"slo_{signal}") in charted:
            signal = f"slo_{signal}"
        out[(model, signal)].append(page)
    return out


# -- header and tables -------------------------------------------------------------------
def _summary(report: ReplayReport, log: PointLog, source: str) -> str:
    c = report.counts
    times = [p.at_ms for p in log.points] + [_ms(p.at) for p in report.pages]
    span = f"{_time(min(times))} to {_time(max(times))} UTC" if times else "none"
    facts = [
        ("source", source or "-"),
        ("inference events", f"{c.get('inference_events', 0):,}"),
        ("feedback events", f"{c.get('feedback_events', 0):,}"),
        ("windows closed", f"{c.get('windows_closed', 0):,}"),
        ("judgements charted", f"{log.seen:,}"),
        ("findings detected", f"{c.get('findings_detected', 0):,}"),
        ("incidents", f"{c.get('incidents', len(report.incidents)):,}"),
        ("pages", f"{c.get('pages', len(report.pages)):,} ({c.get('triggers', 0):,} triggers)"),
        ("time span (judged, paged)", span),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    note = (
        f"Each line shows at most {MAX_POINTS:,} points; a longer series is thinned to its "
        "most alarming judgement per run of consecutive ones (the legend says how many)."
    )
    if log.dropped:
        note += f" {log.dropped:,} judgement(s) of series beyond {log.max_series} not charted."
    return f'<table class="summary">{rows}</table><p class="note">{_e(note)}</p>'


def _pages_table(pages: Sequence[Page], incidents: Sequence[dict[str, Any]]) -> str:
    by_id = {i["id"]: i for i in incidents}
    header = ("at (event time)", "transition", "severity", "model", "signal", "segment", "title")
    rows = []
    for page in pages[:MAX_ROWS]:
        incident = by_id.get(page.incident_id, {})
        rows.append(
            (
                page.at,
                page.transition,
                page.severity,
                incident.get("model_id", ""),
                incident.get("signal", ""),
                incident.get("segment", ""),
                page.title,
            )
        )
    return _table("Pages", "pages", header, rows, len(pages))


def _incidents_table(incidents: Sequence[dict[str, Any]]) -> str:
    header = [*("opened", "resolved", "model", "version", "signal", "segment", "kind")]
    header += ("severity", "status", "findings", "title")
    fields = [*("opened_at", "resolved_at", "model_id", "model_version", "signal", "segment")]
    fields += ("kind", "severity", "status", "finding_count", "title")
    rows = [tuple(i.get(f) for f in fields) for i in incidents[:MAX_ROWS]]
    return _table("Incidents", "incidents", header, rows, len(incidents))


def _table(
    title: str, css: str, header: Sequence[str], rows: Iterable[Sequence[Any]], total: int
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e('' if v is None else v)}</td>" for v in row) + "</tr>"
        for row in rows
    )
    more = f"<p>{total - MAX_ROWS:,} more not shown.</p>" if total > MAX_ROWS else ""
    if not total:
        return f"<h2>{_e(title)}</h2><p>None.</p>"
    return (
        f'<h2>{_e(title)}</h2><table class="{css}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>{more}"
    )


# -- helpers ------------------------------------------------------------------------------
def check_plotly() -> None:
    """Raise ``ConfigurationError`` saying what to install when plotly is missing."""
    _plotly_js(load=False)


def _plotly_js(load: bool = True) -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise ConfigurationError(
            f"--report needs plotly ({exc}); install it with `pip install 'genmon[report]'`"
        ) from exc
    if not load:
        return ""
    # The library is a script of its own: nothing in it may close the tag early.
    return str(get_plotlyjs()).replace("</script", "<\\/script")


def _div(css: str, div_id: str, model: str, signal: str) -> str:
    return (
        f'<div class="{css}" id="{_e(div_id)}" data-model="{_e(model)}" '
        f'data-signal="{_e(signal)}"></div>\n'
    )


def _unit(signal: str, lines: Iterable[list[SignalPoint]]) -> str:
    if signal in LATENCY or re.search(r"_p\d\d$", signal):
        return "ms"
    if signal.startswith("embedding_"):
        return "SD"
    values = [p.value for kept in lines for p in kept if p.value is not None]
    return "%" if values and all(0.0 <= v <= 1.0 for v in values) else ""


def _slug(text: str) -> str:
    """An id-safe form of a signal name (distinct names stay distinct: a hash is added when
    the name had other characters)."""
    slug = re.sub(r"[^a-z0-9_-]", "-", text.lower())
    if slug != text:
        slug += f"-{sum(map(ord, text)) % 99991}"
    return slug


def _time(ms: int) -> str:
    """Event time in milliseconds as Plotly reads dates (UTC, no zone suffix)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _iso_time(at: str) -> str:
    return _time(_ms(at))


def _ms(at: str) -> int:
    return round(datetime.fromisoformat(at).timestamp() * 1000)


def _span(times: Sequence[int]) -> list[str]:
    """A time range holding ``times``, with a little room on both sides."""
    first, last = min(times), max(times)
    room = max((last - first) // 50, 30_000)
    return [_time(first - room), _time(last + room)]


def _e(value: Any) -> str:
    """Text of the stream, safe in HTML (and as Plotly's text, which reads tags)."""
    return html.escape(str(value), quote=True)


def _json(value: Any) -> str:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` left to end it."""
    text = json.dumps(_finite(value), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: Plotly leaves a gap for null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left;
  vertical-align: top; }}
table.summary th {{ background: #f4f4f4; }}
.note {{ color: #555; font-size: 0.9em; }}
.genmon-chart, .genmon-segments {{ margin-bottom: 1.5em; }}
</style>
<script>{plotly}</script>
</head>
<body>
<h1>{title}</h1>
{summary}
{sections}
{tables}
<script type="application/json" id="genmon-figures">{figures}</script>
<script>
(function () {{
  var figures = JSON.parse(document.getElementById("genmon-figures").textContent);
  figures.forEach(function (f) {{
    Plotly.newPlot(f.id, f.data, f.layout, {{displaylogo: false, responsive: true}});
  }});
}})();
</script>
</body>
</html>
"""
