"""What a judgement looked like, for charts: one :class:`SignalPoint` per judged signal.

The runner reports each judgement through ``DetectorRunner.points`` (a callback, ``None``
in the live worker, so the worker pays nothing); ``genmon replay --report`` collects them
and draws each signal against its baseline and its detector's score against the threshold
(:mod:`genmon.replay.report`).
"""

from __future__ import annotations

from dataclasses import dataclass

from genmon.detectors import DetectorResult
from genmon.detectors.calibration.baselines import LatencyBaseline
from genmon.streams.detection.observations import Observation


@dataclass(frozen=True, slots=True)
class SignalPoint:
    """One judgement of one signal: what the report charts (value against baseline/threshold)."""

    model_id: str
    version: str
    segment: str
    signal: str  # e.g. "error_rate", "ttft", "embedding_prompt", "language_mix"
    detector: str  # REGISTRY name, e.g. "rate_cusum"
    at_ms: int  # event time of the judgement (window end, or sample time)
    value: float | None  # what the signal measured (rate 0..1, latency quantile ms, shift SD, ...)
    baseline: float | None  # what value is compared with (baseline rate/quantile); None if none
    score: float  # the detector's score (CUSUM sum, statistic, ...)
    threshold: float  # the detector's threshold on score
    detected: bool
    n: int  # observations behind it
    early: bool = False  # judged on a partial window (LEAD's early detection)


def observation_point(
    model_id: str, obs: Observation, at_ms: int, quantile: float
) -> SignalPoint | None:
    """The point of one judged window observation (None while its baseline warms up).

    A rate's value is the window's ``events / total`` against the reference's own rate; a
    latency's is the window's ``quantile`` (ms) against the reference's. The score is the
    CUSUM sum, which carries over windows: what actually pages.
    """
    result = obs.result
    if result is None:
        return None
    if isinstance(obs.baseline, LatencyBaseline):
        value = obs.sketch.quantile(quantile) if obs.sketch is not None else None
        baseline = obs.baseline.value()
    else:
        reference = obs.baseline.reference()
        value = obs.events / obs.total if obs.total else None
        baseline = reference.observed if reference is not None else None
    return SignalPoint(
        model_id=model_id,
        version=obs.version,
        segment=obs.segment,
        signal=obs.signal,
        detector=result.detector,
        at_ms=at_ms,
        value=value,
        baseline=baseline,
        score=float(result.evidence.value("cusum") or 0.0),
        threshold=float(result.threshold),
        detected=bool(result.detected),
        n=obs.total,
    )


def result_point(
    model_id: str,
    version: str,
    segment: str,
    signal: str,
    at_ms: int,
    result: DetectorResult,
    value: float | None,
    baseline: float | None = None,
) -> SignalPoint:
    """The point of a judgement that is not a window's rate test (an SLO check, an
    embedding sample): its score and threshold as the detector gives them."""
    return SignalPoint(
        model_id=model_id,
        version=version,
        segment=segment,
        signal=signal,
        detector=result.detector,
        at_ms=at_ms,
        value=value,
        baseline=baseline,
        score=float(result.score),
        threshold=float(result.threshold),
        detected=bool(result.detected),
        n=int(result.n_seen),
    )
