"""What the detector runner judges in a closed window: one observation per default series.

An :class:`Observation` is one series' count in one window (see
:mod:`~genmon.detectors.calibration.signals` for what each signal counts) with the model's
baseline it is judged against. :func:`observe` lists a window's observations;
:func:`one_cause` keeps the less specific of two findings of one cause from paging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from genmon.detectors import DetectorResult
from genmon.detectors.anomaly.rate_cusum import design_rate
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.baselines import AcceptLimit, LatencyBaseline, RateBaseline
from genmon.detectors.sketch import QuantileSketch
from genmon.schemas.events import FindingKind
from genmon.settings import Settings
from genmon.streams.windows.segment_cap import is_overflow

ALL = sig.ALL
#: Latency baselines a read-only caller keeps parsed (about four per model).
PARSED_MAX = 4096


@dataclass
class Observation:
    """One series' count in one window, before and after it is judged."""

    signal: str
    kind: FindingKind
    version: str
    segment: str
    events: int
    total: int
    series: dict[str, Any]
    baseline: RateBaseline | LatencyBaseline
    sketch: QuantileSketch | None = None
    label: str = ""
    result: DetectorResult | None = None
    healthy: bool = True


class ModelBaselines:
    """A model's baselines in its state (``state["baselines"]``), by signal and segment."""

    def __init__(
        self,
        stored: dict[str, Any],
        settings: Settings,
        parsed: dict[int, tuple[dict[str, Any], LatencyBaseline]] | None = None,
    ) -> None:
        """``parsed``: latency baselines already read, by the identity of their stored
        record, for callers that only read them (the early looks, every second: reading
        a baseline's sketches costs more than judging the window). Learning callers
        must not pass it: a learned baseline is saved as a new record anyway."""
        self.stored = stored
        d = settings.detectors
        self.warmup, self.refresh = d.baseline_warmup_windows, d.baseline_refresh_windows
        self.quantile = d.latency_quantile
        self.parsed = parsed

    def rate(self, signal: str, segment: str) -> RateBaseline:
        return RateBaseline(self.stored.get(key(signal, segment)), self.warmup, self.refresh)

    def latency(self, signal: str) -> LatencyBaseline:
        stored = self.stored.get(key(signal, ALL))
        if self.parsed is None or stored is None:
            return LatencyBaseline(stored, self.warmup, self.refresh, self.quantile)
        hit = self.parsed.get(id(stored))
        if hit is not None and hit[0] is stored:
            return hit[1]
        baseline = LatencyBaseline(stored, self.warmup, self.refresh, self.quantile)
        if len(self.parsed) >= PARSED_MAX:
            self.parsed.clear()
        self.parsed[id(stored)] = (stored, baseline)
        return baseline

    def save(self, obs: Observation, end_ms: int) -> None:
        self.stored[key(obs.signal, obs.segment)] = {**obs.baseline.to_state(), "seen_ms": end_ms}

    def refresh_now(self, limit_for: Callable[[str], AcceptLimit]) -> Counter[str]:
        """Replace every reference by its candidate where that holds the warm-up's windows
        (a refresh asked for by the clock, :mod:`~genmon.streams.detection.reference_refresh`),
        each under ``limit_for(signal)``; how many were replaced or refused."""
        verdicts: Counter[str] = Counter()
        for name, stored in list(self.stored.items()):
            baseline: RateBaseline | LatencyBaseline
            if "sketch" in stored:  # a latency baseline's record
                baseline = LatencyBaseline(stored, self.warmup, self.refresh, self.quantile)
            else:
                baseline = RateBaseline(stored, self.warmup, self.refresh)
            verdict = baseline.refresh_now(self.warmup, limit_for(name.split("\x1f", 1)[0]))
            if verdict is not None:
                self.stored[name] = {**baseline.to_state(), "seen_ms": stored["seen_ms"]}
                verdicts[verdict] += 1
        return verdicts

    def expire(self, now_ms: int, ttl_ms: int) -> None:
        """Drop segment baselines not judged for ``ttl_ms`` (the model's own stay)."""
        for stale in [
            k
            for k, b in self.stored.items()
            if not k.endswith(f"\x1f{ALL}") and now_ms - b["seen_ms"] > ttl_ms
        ]:
            del self.stored[stale]


def min_increase(settings: Settings, signal: str) -> float:
    """The smallest absolute rise worth a page: none for latency exceedance (it starts
    near 5 %, the odds ratio alone sets its design rise)."""
    return 0.0 if signal in sig.LATENCY else settings.detectors.rate_min_increase


def accept_limit(settings: Settings, signal: str) -> AcceptLimit:
    """The highest candidate rate a baseline of ``signal`` learns: half-way to the rise
    the test is designed for (a candidate worse than that is a degradation to page about,
    not a baseline to learn)."""
    odds_ratio, floor = settings.detectors.rate_odds_ratio, min_increase(settings, signal)

    def limit(rate: float) -> float:
        return (rate + design_rate(rate, odds_ratio, floor)) / 2

    return limit


def key(signal: str, segment: str) -> str:
    """Key of a baseline in a model's state."""
    return f"{signal}\x1f{segment}"


def observe(
    window: dict[str, Any], baselines: ModelBaselines, min_requests: int, min_feedback: int
) -> list[Observation]:
    """Every default series of a window with enough traffic to be judged: each version's
    rates and latencies (from ``min_requests`` requests), and the negative feedback of each
    version and segment (from ``min_feedback`` scored items), but not a segment holding all
    of its version's feedback (no second test of the same counts) nor an overflow series."""
    out: list[Observation] = []
    overall = {
        s["model_version"]: sig.FEEDBACK.counts(s) for s in window["series"] if s["segment"] == ALL
    }
    for series in sorted(window["series"], key=lambda s: (s["model_version"], s["segment"])):
        version, segment = series["model_version"], series["segment"]
        if segment == ALL and series["requests"] >= min_requests:
            out += _version(series, version, baselines, min_requests)
        if segment != ALL and is_overflow(segment):
            continue
        negative, scored = sig.FEEDBACK.counts(series)
        if segment != ALL and (negative, scored) == overall.get(version):
            continue
        if scored >= min_feedback:
            kind = FindingKind.QUALITY if segment == ALL else FindingKind.BIAS
            baseline = baselines.rate(sig.FEEDBACK.signal, segment)
            out.append(
                Observation(
                    sig.FEEDBACK.signal,
                    kind,
                    version,
                    segment,
                    negative,
                    scored,
                    series,
                    baseline,
                    label=sig.FEEDBACK.label,
                )
            )
    return out


def _version(
    series: dict[str, Any], version: str, baselines: ModelBaselines, min_requests: int
) -> list[Observation]:
    out: list[Observation] = []
    sketches = series.get("sketches", {})
    ttft_reported = series.get("ttft_ms", {}).get("n", 0) * 2 >= series["requests"]
    for lat in sig.LATENCY_SIGNALS:
        if lat.sketch not in sketches:
            continue
        if lat.signal == "latency" and ttft_reported:
            # End-to-end latency grows with the answer's length, which is the users' doing:
            # with TTFT and TPOT reported it explains nothing they do not.
            continue
        sketch = QuantileSketch.from_state(sketches[lat.sketch])
        if sketch.count < min_requests:
            continue
        baseline = baselines.latency(lat.signal)
        events, total = baseline.above(sketch) if baseline.ready else (0, sketch.count)
        out.append(
            Observation(
                lat.signal,
                lat.kind,
                version,
                ALL,
                events,
                total,
                series,
                baseline,
                sketch=sketch,
                label=lat.label,
            )
        )
    for rate in sig.RATE_SIGNALS:
        events, total = rate.counts(series)
        if total > 0:
            baseline = baselines.rate(rate.signal, ALL)
            out.append(
                Observation(
                    rate.signal,
                    rate.kind,
                    version,
                    ALL,
                    events,
                    total,
                    series,
                    baseline,
                    label=rate.label,
                )
            )
    return out


def one_cause(observations: Sequence[Observation]) -> None:
    """The more specific finding explains the less specific one, which does not page too:
    end-to-end latency when TTFT or TPOT fires for the version, and the version's negative
    feedback when one of its segments' fires."""

    def firing(obs: Observation) -> bool:
        return obs.result is not None and obs.result.detected

    latency = {o.version for o in observations if o.signal in sig.PRIMARY_LATENCY and firing(o)}
    feedback = {
        o.version
        for o in observations
        if o.signal == sig.FEEDBACK.signal and o.segment != ALL and firing(o)
    }
    for obs in observations:
        explained = (obs.signal == "latency" and obs.version in latency) or (
            obs.signal == sig.FEEDBACK.signal and obs.segment == ALL and obs.version in feedback
        )
        if explained and obs.result is not None:
            obs.result = replace(obs.result, detected=False)
