"""Scoring, the same for every configuration: alarms -> pages, detections, delays, rates.

A configuration's output on one stream is its **alarms**: event times (epoch seconds, on
the arrival clock) per signal. From them, with the stream's change point (None for a
stationary stream) and the end of its warm-up:

- **pages**: per signal, an alarm starts a page unless the signal alarmed within
  :data:`DEAD_TIME_S` before it (further alarms within 10 minutes of an alarm are the same
  page; genmon's own incidents behave alike: an open incident does not page again);
- **false pages**: pages that start at or after the warm-up and before the change point
  (on a stationary stream: before the end of its traffic; a replay that stops leaves a
  last, partial window, and a page about traffic stopping is not a false one), on any
  signal;
- **detection**: the first alarm at or after the change point on one of the class's
  signals; its **delay** in seconds of traffic (alarm time - change point) and in events
  (requests that arrived from the change point to the alarm, both included).

Warm-up alarms are ignored: genmon judges a new model only after
``detectors.baseline_warmup_windows`` windows, and every configuration gets the same grace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

#: Alarms of one signal within this long after one of its alarms are the same page.
DEAD_TIME_S = 600.0
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class Outcome:
    """One configuration on one stream."""

    false_pages: dict[str, int]  # by signal (only signals that paged)
    detected_at: float | None = None
    delay_s: float | None = None
    delay_events: int | None = None
    via: str = ""  # what detected it, e.g. "page:error_rate" or "finding:error_rate"
    #: From the first request that started at or after the change to the alarm: the delay
    #: in seconds of traffic, which a lull without requests after the change does not add to.
    traffic_delay_s: float | None = None

    @property
    def false_total(self) -> int:
        return sum(self.false_pages.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "false_pages": self.false_pages,
            "detected_at": self.detected_at,
            "delay_s": self.delay_s,
            "delay_events": self.delay_events,
            "via": self.via,
            "traffic_delay_s": self.traffic_delay_s,
        }


def pages(alarms: Sequence[float], dead_time_s: float = DEAD_TIME_S) -> list[float]:
    """Start times of the pages of one signal's sorted alarms (the chain rule above)."""
    out: list[float] = []
    last = -math.inf
    for t in alarms:
        if t - last > dead_time_s:
            out.append(t)
        last = t
    return out


def false_pages(
    alarms: Mapping[str, Sequence[float]],
    judged_from: float,
    until: float,
    dead_time_s: float = DEAD_TIME_S,
) -> dict[str, int]:
    """Pages per signal that start in ``[judged_from, until)``. Alarms before
    ``judged_from`` (warm-up) are dropped before paging."""
    end = until
    out: dict[str, int] = {}
    for signal, times in alarms.items():
        kept = sorted(t for t in times if t >= judged_from)
        n = sum(1 for t in pages(kept, dead_time_s) if t < end)
        if n:
            out[signal] = n
    return out


def first_at_or_after(
    alarms: Mapping[str, Sequence[float]], signals: Iterable[str], change_at: float
) -> tuple[float, str] | None:
    """(time, signal) of the first alarm at or after ``change_at`` on ``signals``."""
    best: tuple[float, str] | None = None
    for signal in signals:
        after = [t for t in alarms.get(signal, ()) if t >= change_at]
        if after and (best is None or min(after) < best[0]):
            best = (min(after), signal)
    return best


def score(
    alarms: Mapping[str, Sequence[float]],
    *,
    judged_from: float,
    change_at: float | None,
    end: float = math.inf,
    signals: Iterable[str] = (),
    started: np.ndarray | None = None,
    fallback: Mapping[str, Sequence[float]] | None = None,
) -> Outcome:
    """The :class:`Outcome` of one configuration's ``alarms`` on one stream.

    ``end``: the end of the stream's traffic (false pages are counted before it);
    ``signals``: the class's signals (detection); ``started``: the stream's request start
    times, sorted (delay in events); ``fallback``: other alarms that count as a detection when
    ``alarms`` has none after the change (genmon's detected findings: a page is the
    primary detection, a finding the fallback when an incident opened before the change
    was still open and so could not page again).
    """
    false = false_pages(alarms, judged_from, end if change_at is None else change_at)
    if change_at is None:
        return Outcome(false)
    signals = tuple(signals)
    hit, via = first_at_or_after(alarms, signals, change_at), "page"
    if hit is None and fallback is not None:
        hit, via = first_at_or_after(fallback, signals, change_at), "finding"
    if hit is None:
        return Outcome(false)
    at, signal = hit
    events, traffic_s = None, None
    if started is not None:
        lo = int(np.searchsorted(started, change_at, side="left"))
        events = int(np.searchsorted(started, at, side="right")) - lo
        if lo < len(started):
            traffic_s = max(at - float(started[lo]), 0.0)
    return Outcome(false, at, at - change_at, events, f"{via}:{signal}", traffic_s)


# -- summaries ---------------------------------------------------------------------------------


@dataclass
class Summary:
    """One configuration on one class: detection rate and delays over its variants."""

    variants: int = 0
    detected: int = 0
    delays_s: list[float] = field(default_factory=list)  # detected variants only
    delays_events: list[int] = field(default_factory=list)
    traffic_delays_s: list[float] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.variants += 1
        if outcome.delay_s is not None:
            self.detected += 1
            self.delays_s.append(outcome.delay_s)
            if outcome.delay_events is not None:
                self.delays_events.append(outcome.delay_events)
            if outcome.traffic_delay_s is not None:
                self.traffic_delays_s.append(outcome.traffic_delay_s)

    @property
    def rate(self) -> float | None:
        return self.detected / self.variants if self.variants else None

    def quantile_s(self, q: float) -> float:
        """Delay quantile over *all* variants, a miss counting as infinitely late
        (``inf`` when more than ``1 - q`` of them were missed)."""
        return quantile_with_misses(self.delays_s, self.variants, q)

    def quantile_traffic_s(self, q: float) -> float:
        """Delay quantile in seconds of traffic (misses infinitely late)."""
        return quantile_with_misses(self.traffic_delays_s, self.variants, q)

    def quantile_events(self, q: float) -> float:
        return quantile_with_misses(self.delays_events, self.variants, q)

    def to_dict(self) -> dict[str, object]:
        return {
            "variants": self.variants,
            "detected": self.detected,
            "rate": self.rate,
            "median_s": finite(self.quantile_s(0.5)),
            "p90_s": finite(self.quantile_s(0.9)),
            "median_traffic_s": finite(self.quantile_traffic_s(0.5)),
            "p90_traffic_s": finite(self.quantile_traffic_s(0.9)),
            "median_events": finite(self.quantile_events(0.5)),
            "p90_events": finite(self.quantile_events(0.9)),
        }


def quantile_with_misses(values: Sequence[float], total: int, q: float) -> float:
    """The ``q`` quantile (lower, nearest rank) of ``values`` padded with ``inf`` up to
    ``total`` entries; NaN when ``total`` is 0."""
    if total == 0:
        return math.nan
    padded = sorted(values) + [math.inf] * (total - len(values))
    rank = max(math.ceil(q * total) - 1, 0)
    return float(padded[rank])


def finite(x: float) -> float | None:
    """JSON-friendly: None for NaN and inf."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Rate:
    """False pages over an exposure of model time."""

    pages: int
    exposure_s: float

    @property
    def days(self) -> float:
        return self.exposure_s / SECONDS_PER_DAY

    @property
    def per_day(self) -> float:
        return self.pages / self.days if self.days else math.nan

    @property
    def per_week(self) -> float:
        return 7.0 * self.per_day

    @property
    def upper_per_week(self) -> float:
        """One-sided 95 % upper bound of the Poisson rate, per model-week."""
        if not self.days:
            return math.nan
        return float(stats.chi2.ppf(0.95, 2 * self.pages + 2) / 2.0) / self.days * 7.0

    def to_dict(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "model_days": self.days,
            "per_day": self.per_day,
            "per_week": self.per_week,
            "upper95_per_week": self.upper_per_week,
        }
