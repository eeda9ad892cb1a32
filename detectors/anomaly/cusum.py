"""Two-sided tabular CUSUM for sustained mean shifts (Page 1954)."""

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
class CUSUM(Detector):
    """Tabular CUSUM on ``z = (x - target) / sigma``, alarming when a one-sided sum passes ``h``.

    ``S+ = max(0, S+ + z - k)`` and ``S- = max(0, S- - z - k)``; ``k`` (allowance) and ``h``
    (decision interval) are in units of the reference sigma. ``target`` and ``sigma`` are
    estimated from the first ``warmup`` values unless given. After an alarm both sums restart
    from zero, so a persisting shift alarms again about every ``h / (shift - k)`` values.
    With ``k=0.5, h=5`` the in-control average run length (ARL) is about 465 values and a
    one-sigma shift is found after about 10 (Montgomery, Table 9.3); with an estimated
    sigma the run length varies with the estimate, so pass ``sigma`` when it is known or
    keep ``warmup`` long. Use it on window
    aggregates: a latency p99 per minute, a feedback score per hour.

    >>> d = CUSUM(k=0.5, h=5.0, target=0.0, sigma=1.0)
    >>> d.update([0.1, -0.2, 0.3, -0.1]).detected
    False
    >>> r = d.update([2.0] * 5)
    >>> r.detected, r.evidence.value("alarm_index"), r.evidence.value("direction")
    (True, 3.0, 1.0)

    References: E. S. Page, "Continuous inspection schemes", Biometrika 41 (1954);
    D. C. Montgomery, *Introduction to Statistical Quality Control*, ch. 9 (CUSUM).
    """

    name = "cusum"
    kind = DetectorKind.ANOMALY

    def __init__(
        self,
        k: float = 0.5,
        h: float = 5.0,
        warmup: int = 100,
        target: float | None = None,
        sigma: float | None = None,
        direction: str = "both",
    ) -> None:
        check_param("k", k, low=0.0)
        check_param("h", h, low=0.0, low_open=True)
        check_param("warmup", warmup, low=2, high=100_000)
        if sigma is not None:
            check_param("sigma", sigma, low=0.0, low_open=True)
        if target is not None:
            check_param("target", target)
        self.k = float(k)
        self.h = float(h)
        self.warmup = int(warmup)
        self.target = None if target is None else float(target)
        self.sigma = None if sigma is None else float(sigma)
        self.direction = check_direction(direction)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._warm: list[float] = []
        self._target: float | None = self.target if self.sigma is not None else None
        self._sigma: float | None = self.sigma if self.target is not None else None
        self._s_up = 0.0
        self._s_down = 0.0

    def update(self, batch: Any) -> DetectorResult:
        values = as_values(batch, "CUSUM")
        self._n_seen += int(values.size)
        offset = 0
        if self._sigma is None:
            rest = take_warmup(self._warm, values, self.warmup)
            offset = values.size - rest.size
            if len(self._warm) < self.warmup:
                return self._report(0.0, [], warming=True)
            self._fit_reference()
            values = rest
        assert self._target is not None and self._sigma is not None
        z = (values - self._target) / self._sigma
        peak, alarms = self._scan(z)
        return self._report(peak, [(offset + i, up) for i, up in alarms], warming=False)

    def _fit_reference(self) -> None:
        warm = np.asarray(self._warm)
        self._target = float(warm.mean()) if self.target is None else self.target
        spread = float(warm.std(ddof=1)) if self.sigma is None else self.sigma
        self._sigma = max(spread, sigma_floor(self._target))
        self._warm = []

    def _scan(self, z: np.ndarray) -> tuple[float, list[tuple[int, bool]]]:
        watch_up = self.direction in ("both", "up")
        watch_down = self.direction in ("both", "down")
        alarms: list[tuple[int, bool]] = []
        peak = 0.0
        start = 0
        while start < z.size:
            segment = z[start : start + _CHUNK]
            up = lindley(self._s_up, segment - self.k) if watch_up else None
            down = lindley(self._s_down, -segment - self.k) if watch_down else None
            hit, chunk_peak, upward = first_crossing(up, down, self.h)
            peak = max(peak, chunk_peak)
            if hit >= 0:
                alarms.append((start + hit, upward))
                self._s_up = self._s_down = 0.0
                start += hit + 1
            else:
                self._s_up = 0.0 if up is None else float(up[-1])
                self._s_down = 0.0 if down is None else float(down[-1])
                start += segment.size
        return peak, alarms

    def _report(self, peak: float, alarms: list[tuple[int, bool]], warming: bool) -> DetectorResult:
        first = alarms[0] if alarms else (-1, False)
        values = (
            ("s_up", self._s_up),
            ("s_down", self._s_down),
            *alarm_values(len(alarms), *first),
        )
        if not warming:
            values += (("target", float(self._target or 0.0)), ("sigma", float(self._sigma or 0.0)))
        return self._result(
            score=peak,
            threshold=self.h,
            detected=bool(alarms),
            n_seen=self._n_seen,
            evidence=Evidence(
                test="cusum", values=values, notes=("warming up",) if warming else ()
            ),
        )

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, shifted = normal_streams(constant, 3.0)
        level = 0.0 if constant is None else float(constant)
        invalid = ({"h": 0.0}, {"k": -0.1}, {"direction": "sideways"}, {"sigma": 0.0})
        return ContractExample(cls(target=level, sigma=1.0), stream, shifted, 0, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "warm": list(self._warm),
            "target": self._target,
            "sigma": self._sigma,
            "s_up": self._s_up,
            "s_down": self._s_down,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._warm = [float(v) for v in state["warm"]]
        self._target = None if state["target"] is None else float(state["target"])
        self._sigma = None if state["sigma"] is None else float(state["sigma"])
        self._s_up = float(state["s_up"])
        self._s_down = float(state["s_down"])
