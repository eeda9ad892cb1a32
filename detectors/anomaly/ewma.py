"""Z-score of each value against an exponentially weighted mean and variance (Roberts 1959)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.signal import lfilter

from genmon.detectors._base import (
    ContractExample,
    DetectorResult,
    check_param,
    register,
)
from genmon.detectors.anomaly._common import (
    ZScoreDetector,
    as_values,
    beyond,
    changes_after,
    check_direction,
    normal_streams,
    sigma_floor,
    take_warmup,
)


@register
class EWMAZScore(ZScoreDetector):
    """Flags values more than ``threshold`` sigmas from an exponentially weighted baseline.

    Each value is scored against the mean and variance *before* it arrives, then folded in:
    ``d = x - m``, ``m += alpha * d``, ``v = (1 - alpha) * (v + alpha * d**2)`` (Finch 2009).
    Both recurrences are linear, so a batch is evaluated with two IIR filters instead of a
    Python loop. The baseline starts from the plain mean and variance of the first
    ``warmup`` values; nothing alarms before that. Flagged values still update the baseline,
    so a lasting level change stops alarming after about ``1 / alpha`` values (use
    :class:`CUSUM` to keep tracking it). With Gaussian noise the per-value false-alarm rate is
    near the two-sided tail ``2 * (1 - Phi(threshold))`` (6e-5 at 4 sigmas); noise in the
    variance estimate fattens it, by about 1.3x at 3 sigmas and 2x at 4 with ``alpha=0.02``
    (a smaller ``alpha`` gets closer but adapts more slowly).
    Feed it window aggregates: error or refusal rate per minute, latency p99 per minute.

    >>> d = EWMAZScore(alpha=0.1, threshold=4.0, warmup=10)
    >>> d.update([10.0, 10.2, 9.9, 10.1, 9.8, 10.0, 10.3, 9.7, 10.1, 9.9, 10.0]).detected
    False
    >>> r = d.update([10.1, 14.0])
    >>> r.detected, r.evidence.value("alarm_index"), r.evidence.value("direction")
    (True, 1.0, 1.0)

    References: S. W. Roberts, "Control chart tests based on geometric moving averages",
    Technometrics 1 (1959); T. Finch, "Incremental calculation of weighted mean and
    variance" (2009); D. C. Montgomery, *Introduction to Statistical Quality Control*, ch. 9.
    """

    name = "ewma_zscore"

    def __init__(
        self,
        alpha: float = 0.02,
        threshold: float = 4.0,
        warmup: int = 30,
        direction: str = "both",
    ) -> None:
        check_param("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("warmup", warmup, low=2, high=100_000)
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.warmup = int(warmup)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._warm: list[float] = []
        self._mean: float | None = None
        self._var = 0.0

    def update(self, batch: Any) -> DetectorResult:
        values = as_values(batch, "EWMAZScore")
        self._n_seen += int(values.size)
        offset = 0
        if self._mean is None:
            rest = take_warmup(self._warm, values, self.warmup)
            offset = values.size - rest.size
            if len(self._warm) < self.warmup:
                return self._report(np.zeros(0), np.zeros(0, dtype=bool))
            warm = np.asarray(self._warm)
            self._mean, self._var = float(warm.mean()), float(warm.var(ddof=1))
            self._warm = []
            values = rest
        if values.size == 0:
            return self._report(np.zeros(0), np.zeros(0, dtype=bool))
        z = self._scores(values)
        return self._report(z, beyond(z, self.threshold, self.direction), offset)

    def _scores(self, values: np.ndarray) -> np.ndarray:
        assert self._mean is not None
        a, keep = self.alpha, 1.0 - self.alpha
        means = lfilter([a], [1.0, -keep], values, zi=[keep * self._mean])[0]
        means_before = np.concatenate(([self._mean], means[:-1]))
        deviation = values - means_before
        variances = lfilter([a * keep], [1.0, -keep], deviation**2, zi=[keep * self._var])[0]
        variances_before = np.concatenate(([self._var], variances[:-1]))
        floor = sigma_floor(self._mean)
        # v tracks spread around the updated mean; a new value's error against the previous
        # mean has variance v / (1 - alpha) in steady state, which keeps z at unit variance.
        z = deviation / np.maximum(np.sqrt(variances_before / keep), floor)
        self._mean, self._var = float(means[-1]), float(variances[-1])
        return z

    def _report(self, z: np.ndarray, alarms: np.ndarray, offset: int = 0) -> DetectorResult:
        values = (
            ("mean", float(self._mean or 0.0)),
            ("sigma", float(np.sqrt(self._var / (1.0 - self.alpha)))),
        )
        notes = ("warming up",) if self._mean is None else ()
        return self._z_report(z, alarms, values, "ewma_zscore", offset, notes)

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, jumped = normal_streams(constant, 10.0)
        detector = cls(alpha=0.05, threshold=4.0, warmup=20)
        invalid = ({"alpha": 1.0}, {"threshold": 0.0}, {"warmup": 1})
        return ContractExample(detector, stream, changes_after(stream, jumped, 20), 20, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "warm": list(self._warm),
            "mean": self._mean,
            "var": self._var,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._warm = [float(v) for v in state["warm"]]
        self._mean = None if state["mean"] is None else float(state["mean"])
        self._var = float(state["var"])
