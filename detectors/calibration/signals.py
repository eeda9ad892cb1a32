"""The default signals of a window: what each counts, how its pages are titled and ranked.

Every default signal is a count per window of one version (or one segment of it), judged
against the model's baseline by the same binomial CUSUM (see
:mod:`~genmon.streams.detection.runner`):

==================  ==========================================  ========  ===============
signal              events of total                             kind      series
==================  ==========================================  ========  ===============
``ttft``            requests above the baseline's TTFT quantile  anomaly   each version
``tpot``            ... time per output token quantile           anomaly   each version
``latency``         ... end-to-end latency quantile (secondary)  anomaly   each version
``error_rate``      failed requests of requests                  anomaly   each version
``refusal_rate``    refusals of answered requests                quality   each version
``empty_rate``      empty answers of answered requests           quality   each version
``negative_feedback``  thumbs-down of scored feedback            quality   each version;
                                                                 / bias    each segment
==================  ==========================================  ========  ===============

**Severity** comes from the effect and the confidence, not from the detector: a rate is
*critical* when it rose by 25 points or more, an *error* when it at least doubled and
rose by 5 points, else a *warning*; a latency is *critical* when the window's quantile is
3x the baseline's or half the requests are above the baseline's quantile, an *error* at
1.5x or a quarter. An alarm that the window alone does not prove (neither its own
evidence passes the threshold nor its p-value the per-window alpha: it rests on earlier
windows) is one step less severe.

**Titles** say what happened with numbers: ``TTFT p95 2.4 s, baseline 0.6 s, support-bot
v3, locale=de``; ``Error rate 87% (1,044 of 1,200), baseline 0.4%, support-bot v3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genmon.schemas.events import FindingKind, Severity

ALL = "*"
_ORDER = (Severity.WARNING, Severity.ERROR, Severity.CRITICAL)


@dataclass(frozen=True)
class RateSignal:
    """A rate of one window series: ``events`` of ``total``."""

    signal: str
    label: str
    events: str
    total: str
    kind: FindingKind

    def counts(self, series: dict[str, Any]) -> tuple[int, int]:
        if self.signal == "negative_feedback":
            feedback = series["feedback"]
            negative = int(feedback["negative"])
            return negative, negative + int(feedback["positive"])
        events = series.get(self.events)
        if events is None:  # a series without the count: nothing to judge
            return 0, 0
        total = series.get(self.total)
        if total is None:  # a window record from before answered requests were counted
            total = series["requests"] - series.get("errors", 0)
        return int(events), int(total)


@dataclass(frozen=True)
class LatencySignal:
    """A latency of one window series, judged through its sketch."""

    signal: str
    label: str
    sketch: str
    kind: FindingKind = FindingKind.ANOMALY


RATE_SIGNALS = (
    RateSignal("error_rate", "Error rate", "errors", "requests", FindingKind.ANOMALY),
    RateSignal("refusal_rate", "Refusal rate", "refusal", "answered", FindingKind.QUALITY),
    RateSignal("empty_rate", "Empty answers", "empty", "answered", FindingKind.QUALITY),
)
FEEDBACK = RateSignal("negative_feedback", "Negative feedback", "", "", FindingKind.QUALITY)
LATENCY_SIGNALS = (
    LatencySignal("ttft", "TTFT", "ttft_ms"),
    LatencySignal("tpot", "Time per output token", "tpot_ms"),
    LatencySignal("latency", "Latency", "latency_ms"),
)
#: The latency signals (judged as the share of requests above the baseline's quantile).
LATENCY = frozenset(lat.signal for lat in LATENCY_SIGNALS)
#: Signals that explain the end-to-end latency: when one fires, ``latency`` does not page.
PRIMARY_LATENCY = frozenset({"ttft", "tpot"})


def where(model_id: str, version: str, segment: str) -> str:
    """``support-bot v3`` or ``support-bot v3, locale=de``."""
    return f"{model_id} {version}" + ("" if segment == ALL else f", {segment}")


def rate_title(
    label: str, events: int, total: int, baseline: float, model_id: str, version: str, seg: str
) -> str:
    rate = events / total if total else 0.0
    return (
        f"{label} {percent(rate)} ({events:,} of {total:,}), baseline {percent(baseline)}, "
        f"{where(model_id, version, seg)}"
    )


def latency_title(
    label: str,
    quantile: float,
    value: float | None,
    baseline: float | None,
    model_id: str,
    version: str,
) -> str:
    name = f"p{round(quantile * 100):d}"
    return (
        f"{label} {name} {duration(value)}, baseline {duration(baseline)}, "
        f"{where(model_id, version, ALL)}"
    )


def rate_severity(rate: float, baseline: float, confident: bool) -> Severity:
    rise = rate - baseline
    if rise >= 0.25:
        severity = Severity.CRITICAL
    elif rise >= 0.05 and rate >= 2 * baseline:
        severity = Severity.ERROR
    else:
        severity = Severity.WARNING
    return severity if confident else _less(severity)


def latency_severity(ratio: float, share_above: float, confident: bool) -> Severity:
    if ratio >= 3.0 or share_above >= 0.5:
        severity = Severity.CRITICAL
    elif ratio >= 1.5 or share_above >= 0.25:
        severity = Severity.ERROR
    else:
        severity = Severity.WARNING
    return severity if confident else _less(severity)


def shift_severity(shift_sd: float) -> Severity:
    """Embedding drift: the shift of the mean in standard deviations of single texts."""
    if shift_sd >= 1.0:
        return Severity.CRITICAL
    return Severity.ERROR if shift_sd >= 0.5 else Severity.WARNING


def breach_severity(value: float, limit: float) -> Severity:
    """An SLO: by how far the value is over its limit."""
    ratio = value / limit if limit > 0 else float("inf")
    if ratio >= 2.0:
        return Severity.CRITICAL
    return Severity.ERROR if ratio >= 1.25 else Severity.WARNING


def _less(severity: Severity) -> Severity:
    return _ORDER[max(_ORDER.index(severity) - 1, 0)]


def percent(rate: float) -> str:
    """``87%``, ``4.8%``, ``0.35%``: two significant digits below 10 %."""
    value = rate * 100
    if value >= 10 or value == 0:
        return f"{value:.0f}%"
    return f"{value:.2g}%" if value >= 1 else f"{value:.2f}%"


def duration(ms: float | None) -> str:
    """``2.4 s``, ``640 ms``, ``n/a``."""
    if ms is None:
        return "n/a"
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.3g} ms"
