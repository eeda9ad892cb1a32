"""Throughput spike/drop: a bucket's count against the mean and spread of the previous buckets."""

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
)
from genmon.detectors.exceptions import InputError


@register
class ThroughputDetector(ZScoreDetector):
    """Flags a request count per time bucket that is a spike or drop against a rolling baseline.

    Each count is compared with the mean of the previous ``window`` buckets; the spread is
    their sample variance, but never below the mean, since arrivals are at least
    Poisson-noisy (a flat history must not make a one-request wobble look like 1000 sigmas).
    ``z = (count - mean) / sqrt(max(variance, mean))`` alarms past ``threshold`` if the
    relative change ``|count / mean - 1|`` is also at least ``min_relative_change``.
    Alarmed buckets join the baseline, so a lasting new level stops alarming after about
    ``window`` buckets. For traffic with a daily or weekly rhythm use
    :class:`~genmon.detectors.anomaly.seasonal.SeasonalThroughputDetector`.

    >>> d = ThroughputDetector(window=10, threshold=4.0, min_samples=5)
    >>> d.update([100, 96, 104, 99, 101, 98, 103]).detected
    False
    >>> r = d.update([12])
    >>> r.detected, r.evidence.value("direction")
    (True, -1.0)

    References: D. C. Montgomery, *Introduction to Statistical Quality Control*, ch. 7
    (c-charts: Poisson limits ``mean +- L*sqrt(mean)`` for counts).
    """

    name = "throughput"

    def __init__(
        self,
        window: int = 60,
        threshold: float = 4.0,
        min_samples: int = 10,
        min_relative_change: float = 0.0,
        direction: str = "both",
    ) -> None:
        check_param("window", window, low=2, high=100_000)
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("min_samples", min_samples, low=2, high=window)
        check_param("min_relative_change", min_relative_change, low=0.0)
        self.window = int(window)
        self.threshold = float(threshold)
        self.min_samples = int(min_samples)
        self.min_relative_change = float(min_relative_change)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._history: list[float] = []

    def update(self, batch: Any) -> DetectorResult:
        counts = as_values(batch, "ThroughputDetector")
        if np.any(counts < 0):
            raise InputError("ThroughputDetector.update() needs counts >= 0 per time bucket")
        self._n_seen += int(counts.size)
        known = len(self._history)
        full = np.concatenate((np.asarray(self._history, dtype=float), counts))
        sums = np.concatenate(([0.0], np.cumsum(full)))
        squares = np.concatenate(([0.0], np.cumsum(full**2)))
        # Baseline of position p is full[max(0, p - window) : p], with p the scored position.
        positions = known + np.arange(counts.size)
        starts = np.maximum(0, positions - self.window)
        sizes = positions - starts
        ready = sizes >= self.min_samples
        safe = np.maximum(sizes, 1)
        means = (sums[positions] - sums[starts]) / safe
        second = (squares[positions] - squares[starts]) / safe
        variances = np.maximum(second - means**2, 0.0) * safe / np.maximum(safe - 1, 1)
        z, spreads, relative = poisson_z(counts, means, variances, ready)
        alarms = beyond(z, self.threshold, self.direction) & (relative >= self.min_relative_change)
        self._history = full[-self.window :].tolist()
        return self._report(z, alarms, float(means[-1]), float(spreads[-1]))

    def _report(
        self, z: np.ndarray, alarms: np.ndarray, mean: float, spread: float
    ) -> DetectorResult:
        values = (("baseline_mean", mean), ("sigma", spread))
        return self._z_report(z, alarms, values, "rolling_poisson_z")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, spiked = count_streams(constant)
        detector = cls(window=20, threshold=4.0, min_samples=10)
        invalid = ({"window": 1}, {"min_samples": 21}, {"min_relative_change": -0.1})
        return ContractExample(detector, stream, changes_after(stream, spiked, 10), 10, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {"n_seen": self._n_seen, "history": list(self._history)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._history = [float(v) for v in state["history"]][-self.window :]
