"""The statistics of the gate: paired comparisons, bootstrap intervals, thresholds applied.

Kept apart from :mod:`genmon.retrain.gate` (which scores the models and decides) so the
whole-set, per-segment and golden-set checks share one definition of "better" and "worse".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from genmon.retrain.gate import GateConfig, MetricThreshold

__all__ = ["NUMERICAL_TOLERANCE", "Comparison", "compare", "fmt", "judge", "paired_bootstrap"]

#: Differences smaller than this (relative to the serving value, at least 1) are float
#: noise, not evidence: an adapter of zeros scores a hair apart from its base on some kernels.
NUMERICAL_TOLERANCE = 1e-6


#: Resampled indexes held at once by :func:`paired_bootstrap` (bounds its memory).
_BOOTSTRAP_BLOCK = 2_000_000


def paired_bootstrap(
    diffs: np.ndarray, samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampled in
    blocks: the per-segment checks ask for many samples at a high confidence)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_BLOCK // max(1, len(diffs)))
    means = np.concatenate(
        [
            diffs[rng.integers(0, len(diffs), size=(min(rows, samples - done), len(diffs)))].mean(
                axis=1
            )
            for done in range(0, samples, rows)
        ]
    )
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def fmt(value: float) -> str:
    return "0.000" if abs(value) < 5e-4 else f"{value:.3f}"


@dataclass
class Comparison:
    """One metric for both models on the same items, and the threshold's judgement."""

    metric: str
    candidate: float
    serving: float
    ci: tuple[float, float]  # of the change, candidate - serving
    n: int
    confidence: float
    status: str = "pass"  # pass | fail | insufficient
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        level = round(self.confidence * 100)
        return (
            f"{self.metric} {fmt(self.serving)} -> {fmt(self.candidate)} "
            f"({level}% CI of change {fmt(self.ci[0])}..{fmt(self.ci[1])})"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["change"] = self.candidate - self.serving
        out["ci"] = list(self.ci)
        del out["extra"]
        return {**_finite(out), **self.extra}


def compare(
    metric: str, candidate: np.ndarray, serving: np.ndarray, config: GateConfig
) -> Comparison:
    """Paired comparison of per-item values (means, and the interval of the change)."""
    diffs = np.asarray(candidate, np.float64) - np.asarray(serving, np.float64)
    ci = paired_bootstrap(diffs, config.bootstrap_samples, config.confidence, config.seed)
    ours, theirs = float(np.mean(candidate)), float(np.mean(serving))
    return Comparison(metric, ours, theirs, ci, len(diffs), config.confidence)


def judge(comparison: Comparison, threshold: MetricThreshold) -> Comparison:
    """Apply ``threshold``: set ``status`` and ``reason`` on ``comparison``."""
    sign = 1.0 if threshold.greater_is_better else -1.0
    improvement = sign * (comparison.candidate - comparison.serving)
    low, high = sorted((sign * comparison.ci[0], sign * comparison.ci[1]))
    tolerance = NUMERICAL_TOLERANCE * max(1.0, abs(comparison.serving))
    worse, better = high < -tolerance, low > tolerance
    text = comparison.describe()
    if worse:
        comparison.status, comparison.reason = "fail", f"significantly worse: {text}"
    elif not threshold.must_improve:
        comparison.reason = f"{'improved' if better else 'not significantly worse'}: {text}"
    elif not better:
        comparison.status, comparison.reason = "fail", f"no significant improvement: {text}"
    else:
        comparison.status, comparison.reason = _minimums(comparison, threshold, improvement, text)
    if comparison.status == "pass" and threshold.threshold is not None:
        bound = threshold.threshold
        if sign * (comparison.candidate - bound) < 0:
            side = "below" if threshold.greater_is_better else "above"
            comparison.status = "fail"
            comparison.reason = (
                f"{comparison.metric} {fmt(comparison.candidate)} is {side} the threshold "
                f"{fmt(bound)}: {text}"
            )
    return comparison


def _minimums(
    comparison: Comparison, threshold: MetricThreshold, improvement: float, text: str
) -> tuple[str, str]:
    if improvement < threshold.min_absolute_change:
        return "fail", (
            f"improvement too small: {text}; it improves by {fmt(improvement)}, "
            f"min_absolute_change asks for {fmt(threshold.min_absolute_change)}"
        )
    base = abs(comparison.serving)
    relative = improvement / base if base > 0 else math.inf
    if relative < threshold.min_relative_change:
        return "fail", (
            f"improvement too small: {text}; it improves by {relative:.1%} of the serving "
            f"value, min_relative_change asks for {threshold.min_relative_change:.1%}"
        )
    return "pass", f"improved: {text}"


def _finite(data: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as ``None``: PostgreSQL's JSON has no NaN."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in data.items()}
