"""False alarms of the default rate test at the default budget, where CI cannot go.

``tests/detectors/test_rate_cusum.py`` checks the calibration rule at three short
allowances (20, 60 and 200 windows between false alarms). At the default budget (one
false page per model-week, a tenth of it per signal: ARL = 100,800 one-minute windows)
300 expected alarms take 30 million windows, so this section runs the detector's
recursion vectorised over thousands of parallel null streams (the vectorised step is
checked equal to :class:`~genmon.detectors.RateCUSUM` first) and counts its alarms,
windows of about 300 requests at a 5 % baseline, binomial and three times as dispersed.

    .venv/bin/python -m bench.detectors --only budget
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special, stats

from genmon.detectors import RateCUSUM, RateWindow
from genmon.detectors.anomaly.rate_cusum import design_rate, intraclass
from genmon.detectors.calibration.budget import Budget
from genmon.settings import Settings

P0 = 0.05
REQUESTS = 300


def _windows(rng: np.random.Generator, streams: int, dispersion: float) -> tuple[Any, Any]:
    n = rng.poisson(REQUESTS, streams) + 1
    if dispersion == 1.0:
        return rng.binomial(n, P0), n
    rho = (dispersion - 1) / (REQUESTS - 1)
    a, b = P0 * (1 / rho - 1), (1 - P0) * (1 / rho - 1)
    return rng.binomial(n, rng.beta(a, b, streams)), n


class _Vectorised:
    """:meth:`RateCUSUM.update` for many streams at once (one window each per step)."""

    def __init__(self, streams: int, threshold: float, alpha: float, dispersion: float) -> None:
        self.threshold, self.alpha, self.phi = threshold, alpha, dispersion
        self.p1 = design_rate(P0, Settings().detectors.rate_odds_ratio, 0.01)
        self.sum = np.zeros(streams)
        self.firing = np.zeros(streams, dtype=bool)

    def _llr_and_p(self, x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p0, p1 = P0, self.p1
        llr = x * math.log(p1 / p0) + (n - x) * math.log((1 - p1) / (1 - p0))
        if self.phi <= 1.0:
            return llr, np.where(x > 0, special.bdtrc(x - 1, n, p0), 1.0)
        detector = RateCUSUM(threshold=self.threshold)
        scale = np.array(
            [
                detector.llr(RateWindow(1, int(m), p0, self.phi))
                / detector.llr(RateWindow(1, int(m), p0))
                for m in n
            ]
        )
        rho = np.array([intraclass(self.phi, int(m)) for m in n])
        k = 1.0 / rho - 1.0
        p = np.ones_like(llr)
        look = (x > 0) & (llr > 0)  # only these can be improbable enough
        p[look] = stats.betabinom.sf(x[look] - 1, n[look], p0 * k[look], (1 - p0) * k[look])
        return llr * scale, p

    def step(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Advance one window; return which streams raised a new alarm."""
        thr = self.threshold
        llr, p = self._llr_and_p(x, n)
        s = np.maximum(0.0, self.sum + llr)
        s = np.where(~self.firing & (p < self.alpha), thr + 1e-9, s)
        held = np.minimum(s, thr)
        still = self.firing & (held > thr / 2)
        s = np.where(self.firing, np.where(still, held, 0.0), s)
        alarm = ~self.firing & (s > thr)
        self.sum = np.where(alarm, thr, s)
        self.firing = still | alarm
        return alarm


def _check_equal_to_the_detector(threshold: float, alpha: float) -> None:
    rng = np.random.default_rng(0)
    streams, steps = 4, 400
    vector = _Vectorised(streams, threshold, alpha, 2.0)
    detectors = [
        RateCUSUM(threshold=threshold, min_increase=0.01, window_alpha=alpha)
        for _ in range(streams)
    ]
    for _ in range(steps):
        x, n = _windows(rng, streams, 1.0)
        x = np.where(rng.random(streams) < 0.05, n // 3, x)  # some alarms to compare
        vector.step(x, n)
        for k, det in enumerate(detectors):
            det.update([RateWindow(int(x[k]), int(n[k]), P0, 2.0)])
            state = det.state_dict()["state"]
            assert math.isclose(state["sum"], vector.sum[k], rel_tol=1e-9, abs_tol=1e-9)
            assert state["firing"] == bool(vector.firing[k])


def run(quick: bool = False) -> list[dict[str, Any]]:
    budget = Budget(Settings())
    arl = budget.arl_windows("error_rate")  # every 10 % share: 100,800 windows
    threshold, alpha = budget.rate_test("error_rate", 1)
    _check_equal_to_the_detector(threshold, alpha)
    streams = 2_000
    windows = int((10 if quick else 300) * arl)
    rows = []
    for dispersion in (1.0, 3.0):
        rng = np.random.default_rng(int(dispersion))
        vector = _Vectorised(streams, threshold, alpha, dispersion)
        alarms = 0
        for _ in range(windows // streams):
            alarms += int(vector.step(*_windows(rng, streams, dispersion)).sum())
        expected = windows / arl
        rows.append(
            {
                "windows simulated": windows,
                "dispersion": dispersion,
                "allowed (ARL)": arl,
                "alarms at budget": expected,
                "alarms": alarms,
                "share of budget": alarms / expected,
                "p (calibrated)": float(stats.poisson.sf(alarms - 1, expected)),
                "false pages / model-week (share 0.1)": 0.1 * alarms / expected,
            }
        )
    return rows
