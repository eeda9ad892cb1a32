"""`genmon replay --report`: the page opens offline in a real browser and shows each signal.

The page is rendered by headless Chromium (Debian's ``chromium``, which
``infra/bootstrap.sh`` installs) with the network blocked, and its *rendered* DOM is read:
Plotly drew every chart, one per signal the replay judged, the error burst's incident is
there, and nothing points outside the file. The unit tests below check the bounded point
log and that text from the stream cannot inject markup.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bench.replay import traffic
from genmon.replay import report as report_module
from genmon.replay.engine import Page, ReplayReport
from genmon.replay.point_log import PointLog
from genmon.replay.report import render
from genmon.streams.detection.points import SignalPoint

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"
START = datetime(2026, 1, 5, tzinfo=UTC)
MODEL = "coder"


# -- one replay through the command, its page rendered by Chromium ----------------------------
@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`genmon replay stream.jsonl --json --report out.html` on 30 minutes of real traffic
    with an error burst from minute 20 (after the baselines' warm-up); the command's
    ReplayReport is caught on its way to the page."""
    from genmon.cli import main

    if not (DATA_DIR / "azure_llm_inference_trace_2023").is_dir():
        pytest.fail(f"the replay tests read the shared data sets at {DATA_DIR}")
    change = traffic.Change("error_burst", timedelta(minutes=20))
    _, changed, _ = traffic.scenario(
        DATA_DIR, "azure_conv", 0.5, change, seed=3, model_id=MODEL, start=START
    )
    folder = tmp_path_factory.mktemp("report")
    stream, page = folder / "stream.jsonl", folder / "out" / "report.html"
    traffic.write_jsonl(changed, stream)
    caught: list[ReplayReport] = []
    real = report_module.write_report

    def catch(report: ReplayReport, path: Path, **kw: Any) -> Path:
        caught.append(report)
        return real(report, path, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "write_report", catch)
        args = ["replay", str(stream), "--json", "--no-embeddings", "--report", str(page)]
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (report,) = caught
    return {"result": result, "report": report, "page": page, "folder": folder}


def chromium_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with no network."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail(
            "headless Chromium is missing: run infra/bootstrap.sh (as root it installs "
            "Debian's `chromium` package), then rerun this test"
        )
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # Every request but the file itself goes to a closed port.
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=15000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Charts(HTMLParser):
    """The chart divs of a DOM (``div.genmon-chart`` / ``div.genmon-segments``): their
    attributes, whether Plotly's ``svg.main-svg`` is inside and the text drawn in them."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, Any]] = []
        self._open: list[tuple[str, dict[str, Any] | None]] = []  # (tag, chart it opened)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.links += [a[k] for k in ("src", "href", "xlink:href") if k in a]
        classes = set(a.get("class", "").split())
        chart = None
        if tag == "div" and classes & {"genmon-chart", "genmon-segments"}:
            kind = "chart" if "genmon-chart" in classes else "segments"
            chart = {"kind": kind, "svg": False, "text": [], **a}
            self.charts.append(chart)
        inside = self._inside()
        if tag == "svg" and "main-svg" in classes and inside is not None:
            inside["svg"] = True
        if tag not in {"br", "img", "input", "meta", "link", "hr"}:
            self._open.append((tag, chart))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        chart = self._inside()
        if chart is not None:
            chart["text"].append(data)

    def _inside(self) -> dict[str, Any] | None:
        return next((c for _, c in reversed(self._open) if c is not None), None)


@pytest.fixture(scope="module")
def rendered(replayed: dict[str, Any]) -> tuple[str, Charts]:
    dom = chromium_dom(replayed["page"], replayed["folder"] / "chromium-profile")
    charts = Charts()
    charts.feed(dom)
    return dom, charts


def test_the_command_writes_the_page_and_keeps_its_json_clean(replayed: dict[str, Any]) -> None:
    result, page = replayed["result"], replayed["page"]
    document = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert set(document) == {"pages", "incidents", "counts"}
    assert f"report written to {page}" in result.stderr
    assert page.stat().st_size > 1_000_000  # Plotly's JavaScript is inside


def test_plotly_draws_one_chart_per_judged_signal_offline(
    replayed: dict[str, Any], rendered: tuple[str, Charts]
) -> None:
    report: ReplayReport = replayed["report"]
    assert report.points is not None
    judged = report.points.signals()
    assert {"error_rate", "ttft", "negative_feedback"} <= {s for _, s in judged}
    charts = [c for c in rendered[1].charts if c["kind"] == "chart"]
    assert sorted((c["data-model"], c["data-signal"]) for c in charts) == sorted(judged)
    assert len({c["id"] for c in rendered[1].charts}) == len(rendered[1].charts)
    undrawn = [c["id"] for c in rendered[1].charts if not c["svg"]]
    assert undrawn == [], f"Plotly drew no svg in {undrawn}"
    # Per-segment comparison of the feedback judged per segment.
    assert any(
        c["kind"] == "segments" and c["data-signal"] == "negative_feedback"
        for c in rendered[1].charts
    )


def test_the_error_burst_is_paged_and_marked_on_its_chart(
    replayed: dict[str, Any], rendered: tuple[str, Charts]
) -> None:
    report: ReplayReport = replayed["report"]
    dom, charts = rendered
    (incident,) = [i for i in report.incidents if i["signal"] == "error_rate"]
    assert incident["title"].startswith("Error rate")
    assert html.escape(incident["title"], quote=False) in dom
    (chart,) = [
        c for c in charts.charts if c["kind"] == "chart" and c["data-signal"] == "error_rate"
    ]
    legend = " ".join(chart["text"])
    assert "fired" in legend and "pages" in legend, legend


def test_nothing_in_the_page_points_outside_it(rendered: tuple[str, Charts]) -> None:
    dom, charts = rendered
    external = [link for link in charts.links if re.match(r"\s*(https?:)?//", link, re.I)]
    assert external == []
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?https?:", dom, re.I)


# -- units: the page's text and the bounded log -------------------------------------------------
HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'


def point(at_ms: int, **kw: Any) -> SignalPoint:
    values: dict[str, Any] = {
        "model_id": MODEL,
        "version": "v1",
        "segment": "*",
        "signal": "error_rate",
        "detector": "rate_cusum",
        "at_ms": at_ms,
        "value": 0.01,
        "baseline": 0.01,
        "score": 0.0,
        "threshold": 10.0,
        "detected": False,
        "n": 100,
    }
    return SignalPoint(**{**values, **kw})


def test_text_from_the_stream_is_escaped_everywhere() -> None:
    log = PointLog()
    log.add(point(60_000, model_id=f"m{HOSTILE}", segment=f"app={HOSTILE}", detected=True))
    log.add(point(60_000, signal="negative_feedback", segment=f"app={HOSTILE}"))
    incident = {
        "id": "i1",
        "model_id": f"m{HOSTILE}",
        "model_version": "v1",
        "signal": "error_rate",
        "segment": HOSTILE,
        "kind": "anomaly",
        "severity": "critical",
        "status": "open",
        "title": f"Error rate {HOSTILE}",
        "opened_at": "2026-01-05T00:01:00+00:00",
        "resolved_at": None,
        "finding_count": 1,
        "related_to": None,
    }
    page = Page("2026-01-05T00:01:00+00:00", "i1", "trigger", "critical", f"Error rate {HOSTILE}")
    text = render(ReplayReport([page], [incident], {"pages": 1}, [], log), source=HOSTILE)
    for fragment in ("<script>alert", "<img src=x", "</script><script>", 'alert("x")</script>'):
        assert fragment not in text
    assert html.escape(f"Error rate {HOSTILE}") in text  # the tables show it, escaped
    # The figures' JSON is a script of its own and holds no markup either.
    figures = re.search(r'id="genmon-figures">(.*?)</script>', text, re.S)
    assert figures is not None and "<" not in figures.group(1)
    marks = [t for f in json.loads(figures.group(1)) for t in f["data"] if t["name"] == "pages"]
    assert [t["hovertext"] for t in marks] == [[html.escape(f"trigger (critical): {page.title}")]]


def test_the_point_log_stays_bounded_and_keeps_every_firing() -> None:
    log = PointLog(max_points=16, max_series=2)
    fired_at = {1234, 4321}
    for i in range(10_000):
        log.add(point(i * 60_000, detected=i in fired_at, score=float(i % 7)))
    log.add(point(0, signal="ttft"))
    log.add(point(0, signal="tpot"))  # a third series: not kept, counted
    (kept,) = [v for k, v in log.series().items() if k[1] == "error_rate"]
    assert len(kept) <= 16 + 1
    assert {p.at_ms // 60_000 for p in kept if p.detected} == fired_at
    assert [p.at_ms for p in kept] == sorted(p.at_ms for p in kept)
    assert log.dropped == 1 and log.seen == 10_002
    value, baseline, fired = log.means(next(k for k in log.series() if k[1] == "error_rate"))
    assert (value, baseline, fired) == (pytest.approx(0.01), pytest.approx(0.01), 2)
