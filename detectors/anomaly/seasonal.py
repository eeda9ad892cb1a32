"""Seasonal throughput spike/drop: each bucket against the history of its own slot of the period."""

from __future__ import annotations

from typing import Any

import numpy as np

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
    count_streams,
    poisson_z,
    watched_side,
)
from genmon.detectors.exceptions import InputError


@register
class SeasonalThroughputDetector(ZScoreDetector):
    """Compares each count with the baseline of its slot in a period (e.g. hour-of-week).

    Consecutive buckets map to slots ``(start_slot + t) % period``: with hourly buckets,
    ``period=168`` is hour-of-week and ``period=24`` hour-of-day. Each slot keeps an
    exponentially weighted mean and variance over past seasons (``alpha`` per season), so
    state is ``2 * period`` floats whatever the stream length. The score is
    ``(count - mean) / sqrt(max(variance, mean))`` (counts are at least Poisson-noisy); it
    alarms past ``threshold`` once the slot has seen ``min_seasons`` seasons and the relative
    change is at least ``min_relative_change``. Monday 9:00 is then judged against earlier
    Monday 9:00s, not against the quiet night before it.

    >>> d = SeasonalThroughputDetector(period=4, min_seasons=2)
    >>> d.update([10, 100, 50, 5] * 3).detected
    False
    >>> r = d.update([10, 100, 5, 5])
    >>> r.detected, r.evidence.value("alarm_index"), r.evidence.value("slot")
    (True, 2.0, 2.0)

    References: R. J. Hyndman and G. Athanasopoulos, *Forecasting: Principles and Practice*,
    3rd ed., ch. 8 (seasonal exponential smoothing); D. C. Montgomery, *Introduction to
    Statistical Quality Control*, ch. 7 (Poisson limits for counts).
    """

    name = "seasonal_throughput"

    def __init__(
        self,
        period: int = 168,
        alpha: float = 0.2,
        threshold: float = 4.0,
        min_seasons: int = 2,
        min_relative_change: float = 0.0,
        start_slot: int = 0,
        direction: str = "both",
    ) -> None:
        check_param("period", period, low=2, high=100_000)
        check_param("alpha", alpha, low=0.0, high=1.0, low_open=True)
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("min_seasons", min_seasons, low=1)
        check_param("min_relative_change", min_relative_change, low=0.0)
        check_param("start_slot", start_slot, low=0, high=period - 1)
        self.period = int(period)
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.min_seasons = int(min_seasons)
        self.min_relative_change = float(min_relative_change)
        self.start_slot = int(start_slot)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._means = np.zeros(self.period)
        self._vars = np.zeros(self.period)
        self._seasons = np.zeros(self.period, dtype=np.int64)

    def update(self, batch: Any) -> DetectorResult:
        counts = as_values(batch, "SeasonalThroughputDetector")
        if np.any(counts < 0):
            raise InputError("SeasonalThroughputDetector.update() needs counts >= 0 per bucket")
        slots = (self.start_slot + self._n_seen + np.arange(counts.size)) % self.period
        self._n_seen += int(counts.size)
        z = np.zeros(counts.size)
        alarms = np.zeros(counts.size, dtype=bool)
        # Within one period every slot appears at most once, so each chunk updates its slots
        # with plain fancy indexing and no Python loop per value.
        for lo in range(0, counts.size, self.period):
            part, idx = counts[lo : lo + self.period], slots[lo : lo + self.period]
            means, variances, seen = self._means[idx], self._vars[idx], self._seasons[idx]
            chunk_z, _, relative = poisson_z(part, means, variances, seen >= self.min_seasons)
            z[lo : lo + part.size] = chunk_z
            alarms[lo : lo + part.size] = beyond(chunk_z, self.threshold, self.direction) & (
                relative >= self.min_relative_change
            )
            deviation = part - means
            first = seen == 0
            self._means[idx] = np.where(first, part, means + self.alpha * deviation)
            self._vars[idx] = np.where(
                first, 0.0, (1 - self.alpha) * (variances + self.alpha * deviation**2)
            )
            self._seasons[idx] = seen + 1
        return self._report(z, alarms, slots)

    def _report(self, z: np.ndarray, alarms: np.ndarray, slots: np.ndarray) -> DetectorResult:
        hits = np.flatnonzero(alarms)
        shown = int(hits[0]) if hits.size else int(np.argmax(watched_side(z, self.direction)))
        values = (("slot", float(slots[shown])), ("slot_mean", float(self._means[slots[shown]])))
        return self._z_report(z, alarms, values, "seasonal_poisson_z")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, spiked = count_streams(constant)
        detector = cls(period=4, min_seasons=2)
        invalid = ({"period": 1}, {"start_slot": 4}, {"alpha": 0.0})
        return ContractExample(detector, stream, changes_after(stream, spiked, 8), 8, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "means": self._means.tolist(),
            "vars": self._vars.tolist(),
            "seasons": self._seasons.tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._means = np.asarray(state["means"], dtype=float)
        self._vars = np.asarray(state["vars"], dtype=float)
        self._seasons = np.asarray(state["seasons"], dtype=np.int64)
