"""Page-Hinkley test for a sustained shift away from the running mean (Page 1954; Hinkley 1971)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.anomaly._common import (
    alarm_values,
    as_values,
    changes_after,
    check_direction,
    first_crossing,
    lindley,
    normal_streams,
    sigma_floor,
    take_warmup,
)

#: Restarting after an alarm recomputes the rest of a chunk; bounded chunks keep that linear.
_CHUNK = 512


@register
class PageHinkley(Detector):
    """Page-Hinkley: cumulative deviation from the running mean, minus its running minimum.

    With ``z_t = (x_t - mean_t) / sigma`` (``mean_t`` the mean since the last alarm,
    including ``x_t``), the upward statistic is ``m_t - min_{u<=t} m_u`` where
    ``m_t = sum(z - delta)``; the downward one mirrors it. An alarm fires when either passes
    ``threshold``; ``delta`` (tolerated drift) and ``threshold`` are in units of ``sigma``,
    which is estimated from the first ``warmup`` values unless given, so one setting works
    for latencies in seconds and scores in [0, 1]. After an alarm the mean and the sums
    restart and no alarm fires for ``warmup`` values. Unlike :class:`CUSUM` it needs no
    target: it suits slow drifts such as a gradually falling feedback score. With a known
    sigma, ``delta=0.5, threshold=8`` gives an in-control average run length near 10,000
    values (as a CUSUM with ``k=0.5, h=8``); the run length grows exponentially with
    ``threshold / sigma``, so an estimated sigma makes it vary: pass ``sigma`` when known
    or keep ``warmup`` long.

    >>> d = PageHinkley(delta=0.5, threshold=5.0, warmup=5, sigma=0.1)
    >>> d.update([0.8, 0.81, 0.79, 0.8, 0.8, 0.79, 0.81]).detected
    False
    >>> r = d.update([0.8 - 0.05 * i for i in range(1, 11)])
    >>> r.detected, r.evidence.value("direction")
    (True, -1.0)

    References: E. S. Page, "Continuous inspection schemes", Biometrika 41 (1954);
    D. V. Hinkley, "Inference about the change-point from cumulative sum tests",
    Biometrika 58 (1971); J. Gama et al., "A survey on concept drift adaptation",
    ACM Computing Surveys 46 (2014).
    """

    name = "page_hinkley"
    kind = DetectorKind.ANOMALY

    def __init__(
        self,
        delta: float = 0.5,
        threshold: float = 8.0,
        warmup: int = 100,
        sigma: float | None = None,
        direction: str = "both",
    ) -> None:
        check_param("delta", delta, low=0.0)
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("warmup", warmup, low=2, high=100_000)
        if sigma is not None:
            check_param("sigma", sigma, low=0.0, low_open=True)
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.warmup = int(warmup)
        self.sigma = None if sigma is None else float(sigma)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._warm: list[float] = []
        self._sigma: float | None = None
        self._count = 0
        self._total = 0.0
        self._up = 0.0
        self._down = 0.0

    def update(self, batch: Any) -> DetectorResult:
        values = as_values(batch, "PageHinkley")
        self._n_seen += int(values.size)
        offset = 0
        if self._sigma is None:
            rest = take_warmup(self._warm, values, self.warmup)
            offset = values.size - rest.size
            if len(self._warm) < self.warmup:
                return self._report(0.0, [])
            warm = np.asarray(self._warm)
            spread = float(warm.std(ddof=1)) if self.sigma is None else self.sigma
            self._sigma = max(spread, sigma_floor(float(warm.mean())))
            self._count, self._total = warm.size, float(warm.sum())
            self._warm = []
            values = rest
        peak, alarms = self._scan(values, self._sigma)
        return self._report(peak, [(offset + i, up) for i, up in alarms])

    def _scan(self, values: np.ndarray, sigma: float) -> tuple[float, list[tuple[int, bool]]]:
        watch_up = self.direction in ("both", "up")
        watch_down = self.direction in ("both", "down")
        alarms: list[tuple[int, bool]] = []
        peak = 0.0
        start = 0
        while start < values.size:
            segment = values[start : start + _CHUNK]
            counts = self._count + np.arange(1, segment.size + 1)
            means = (self._total + np.cumsum(segment)) / counts
            z = (segment - means) / sigma
            # Both sums are kept (and reported) even when only one side may alarm.
            up = lindley(self._up, z - self.delta)
            down = lindley(self._down, -z - self.delta)
            hit, chunk_peak, upward = first_crossing(
                up if watch_up else None,
                down if watch_down else None,
                self.threshold,
                eligible=counts >= self.warmup,
            )
            peak = max(peak, chunk_peak)
            if hit >= 0:
                alarms.append((start + hit, upward))
                self._count, self._total, self._up, self._down = 0, 0.0, 0.0, 0.0
                start += hit + 1
            else:
                self._count = int(counts[-1])
                self._total += float(segment.sum())
                self._up, self._down = float(up[-1]), float(down[-1])
                start += segment.size
        return peak, alarms

    def _report(self, peak: float, alarms: list[tuple[int, bool]]) -> DetectorResult:
        first = alarms[0] if alarms else (-1, False)
        mean = self._total / self._count if self._count else 0.0
        values = (
            ("mean", mean),
            ("sigma", float(self._sigma or 0.0)),
            ("ph_up", self._up),
            ("ph_down", self._down),
            *alarm_values(len(alarms), *first),
        )
        notes = ("warming up",) if self._sigma is None else ()
        return self._result(
            score=peak,
            threshold=self.threshold,
            detected=bool(alarms),
            n_seen=self._n_seen,
            evidence=Evidence(test="page_hinkley", values=values, notes=notes),
        )

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, jumped = normal_streams(constant, 3.0)
        detector = cls(delta=0.5, threshold=5.0, warmup=20, sigma=1.0)
        invalid = ({"threshold": 0.0}, {"delta": -1.0}, {"direction": "left"})
        return ContractExample(detector, stream, changes_after(stream, jumped, 20), 20, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "warm": list(self._warm),
            "sigma": self._sigma,
            "count": self._count,
            "total": self._total,
            "up": self._up,
            "down": self._down,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._warm = [float(v) for v in state["warm"]]
        self._sigma = None if state["sigma"] is None else float(state["sigma"])
        self._count = int(state["count"])
        self._total = float(state["total"])
        self._up = float(state["up"])
        self._down = float(state["down"])
