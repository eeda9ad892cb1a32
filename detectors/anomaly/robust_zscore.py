"""Modified z-score against the median and MAD of a bounded rolling window (Hampel 1974)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from genmon.detectors._base import (
    ContractExample,
    DetectorResult,
    check_param,
    register,
)
from genmon.detectors.anomaly._common import (
    RELATIVE_SIGMA_FLOOR,
    ZScoreDetector,
    as_values,
    beyond,
    changes_after,
    check_direction,
    normal_streams,
)

#: MAD * 1.4826 estimates sigma for Gaussian data; mean absolute deviation * 1.2533 does too
#: and is the Iglewicz-Hoaglin fallback when more than half the window is one value (MAD 0).
_MAD_TO_SIGMA = 1.4826
_MEANAD_TO_SIGMA = 1.2533
#: Rows of the sliding-window matrix evaluated at once, to bound memory on large batches.
_ROWS = 4096


@register
class RobustZScore(ZScoreDetector):
    """Flags values whose modified z-score ``(x - median) / (1.4826 * MAD)`` passes ``threshold``.

    The median and MAD come from the previous ``window`` values only (the value being scored
    and later ones are excluded), so memory is bounded and a single outlier cannot mask
    itself. Nothing alarms until ``min_samples`` values are in the window. When the MAD is
    0 (a mostly constant signal such as an error rate that is usually 0) the mean absolute
    deviation is used instead; if that is 0 too, any departure from the constant alarms.
    ``threshold=3.5`` is the Iglewicz-Hoaglin recommendation. Suits heavy-tailed signals
    (latency quantiles, rates with bursts) where mean and variance are dragged by outliers.

    >>> d = RobustZScore(window=20, threshold=3.5, min_samples=5)
    >>> d.update([100, 102, 98, 101, 99, 250, 100, 103]).evidence.value("alarm_index")
    5.0
    >>> d.update([101, 99, 100]).detected
    False

    References: F. R. Hampel, "The influence curve and its role in robust estimation",
    JASA 69 (1974); B. Iglewicz and D. C. Hoaglin, *How to Detect and Handle Outliers*,
    ASQC (1993).
    """

    name = "robust_zscore"

    def __init__(
        self,
        window: int = 100,
        threshold: float = 3.5,
        min_samples: int = 20,
        direction: str = "both",
    ) -> None:
        check_param("window", window, low=3, high=100_000)
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("min_samples", min_samples, low=3, high=window)
        self.window = int(window)
        self.threshold = float(threshold)
        self.min_samples = int(min_samples)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._history: list[float] = []

    def update(self, batch: Any) -> DetectorResult:
        values = as_values(batch, "RobustZScore")
        self._n_seen += int(values.size)
        full = np.concatenate((np.asarray(self._history, dtype=float), values))
        known = len(self._history)
        centers = np.zeros(values.size)
        scales = np.full(values.size, np.inf)
        # While the window is still filling its length varies, so score those one by one.
        growing = min(values.size, max(0, self.window - known))
        for i in range(growing):
            past = full[: known + i]
            if past.size >= self.min_samples:
                center, scale = _center_scale(past[None, :])
                centers[i], scales[i] = center[0], scale[0]
        for lo in range(growing, values.size, _ROWS):
            hi = min(values.size, lo + _ROWS)
            first = known + lo - self.window
            rows = sliding_window_view(full[first : known + hi - 1], self.window)
            centers[lo:hi], scales[lo:hi] = _center_scale(rows)
        z = (values - centers) / scales
        self._history = full[-self.window :].tolist()
        return self._report(z, centers[-1], scales[-1])

    def _report(self, z: np.ndarray, center: float, scale: float) -> DetectorResult:
        alarms = beyond(z, self.threshold, self.direction)
        values = (("median", float(center)), ("sigma", float(scale) if np.isfinite(scale) else 0.0))
        return self._z_report(z, alarms, values, "modified_zscore")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, jumped = normal_streams(constant, 10.0)
        detector = cls(window=30, threshold=3.5, min_samples=10)
        invalid = ({"window": 2}, {"min_samples": 31}, {"threshold": -1.0})
        return ContractExample(detector, stream, changes_after(stream, jumped, 10), 10, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {"n_seen": self._n_seen, "history": list(self._history)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._history = [float(v) for v in state["history"]][-self.window :]


def _center_scale(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row median and robust sigma (MAD, else mean absolute deviation, else a float floor)."""
    center = np.median(rows, axis=1)
    spread = np.abs(rows - center[:, None])
    scale = _MAD_TO_SIGMA * np.median(spread, axis=1)
    fallback = _MEANAD_TO_SIGMA * spread.mean(axis=1)
    scale = np.where(scale > 0, scale, fallback)
    floor = RELATIVE_SIGMA_FLOOR * np.maximum(1.0, np.abs(center))
    return center, np.maximum(scale, floor)
