"""RateCUSUM: seeded streams with known change points, and its false-alarm calibration.

The calibration rule of the false-alarm budget: a CUSUM with ``threshold = log(ARL)``
raises at most one false alarm per ``ARL`` windows. Each run below simulates enough null
windows that 300 alarms would be expected if the detector spent its whole allowance, so
a detector with 20 % more false alarms than configured fails at p < 0.001; the default
ARL (about 100,000 windows per signal) is too long for CI, so three ARLs test the
scaling rule and BENCHMARKS.md has the full-default figure (``bench/detectors/budget.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from genmon.detectors import RateCUSUM, RateWindow
from genmon.detectors.anomaly.rate_cusum import (
    design_rate,
    evidence_scale,
    intraclass,
    window_p_value,
)

EXPECTED_AT_BUDGET = 300


def _bound(expected: float) -> float:
    """Largest count a calibrated detector may show: the Poisson 0.999 quantile."""
    return float(stats.poisson.ppf(0.999, expected))


def test_the_calibration_runs_can_tell_twenty_percent_too_many_alarms() -> None:
    # At 300 expected alarms, 20 % more (360) lies beyond the 0.999 quantile.
    assert stats.poisson.sf(1.2 * EXPECTED_AT_BUDGET - 1, EXPECTED_AT_BUDGET) < 0.001
    assert _bound(EXPECTED_AT_BUDGET) < 1.2 * EXPECTED_AT_BUDGET


def _null_alarms(arl: float, dispersion: float, seed: int) -> tuple[int, float]:
    """Alarms of one detector over a null stream long enough for 300 alarms at the ARL."""
    rng = np.random.default_rng(seed)
    windows = int(EXPECTED_AT_BUDGET * arl)
    n = rng.poisson(300, windows) + 1
    p0 = 0.05
    if dispersion == 1.0:
        x = rng.binomial(n, p0)
    else:
        # Beta-binomial windows whose variance is `dispersion` times binomial at n=300.
        rho = (dispersion - 1) / 299
        a, b = p0 * (1 / rho - 1), (1 - p0) * (1 / rho - 1)
        x = rng.binomial(n, rng.beta(a, b, windows))
    # Half the allowance on the sequential test, half on the single window's p-value.
    detector = RateCUSUM(threshold=math.log(2 * arl), window_alpha=1 / (2 * arl))
    alarms = 0
    for xi, ni in zip(x.tolist(), n.tolist(), strict=True):
        result = detector.update([RateWindow(xi, ni, p0, dispersion)])
        alarms += int(result.evidence.value("alarms") or 0)
    return alarms, windows / arl


@pytest.mark.parametrize("dispersion", [1.0, 3.0])
@pytest.mark.parametrize("arl", [20.0, 60.0, 200.0])
def test_false_alarms_stay_within_one_per_arl_windows(arl: float, dispersion: float) -> None:
    alarms, expected = _null_alarms(arl, dispersion, seed=int(arl * 10 + dispersion))
    assert expected >= EXPECTED_AT_BUDGET
    assert alarms <= _bound(expected), (
        f"{alarms} false alarms in {expected * arl:.0f} windows, budget {expected:.0f}"
    )


def test_an_error_burst_fires_in_its_first_window_and_only_after_it() -> None:
    rng = np.random.default_rng(7)
    detector = RateCUSUM(threshold=math.log(100_800 * 2))
    fired = []
    for t in range(400):
        p = 0.87 if t >= 300 else 0.004
        n = int(rng.poisson(1200))
        result = detector.update([RateWindow(int(rng.binomial(n, p)), n, 0.005)])
        fired.append(result.detected)
    assert not any(fired[:300])
    assert fired[300], "a burst where most requests fail must page in its first window"
    assert all(fired[300:]), "a lasting burst stays one firing alarm"


def test_a_small_sustained_rise_is_found_within_minutes_and_clears_after() -> None:
    rng = np.random.default_rng(3)
    detector = RateCUSUM(threshold=math.log(100_800), min_increase=0.01)
    results = []
    for t in range(300):
        p = 0.12 if 100 <= t < 200 else 0.05
        n = int(rng.poisson(600))
        results.append(detector.update([RateWindow(int(rng.binomial(n, p)), n, 0.05)]))
    first = next(t for t, r in enumerate(results) if r.detected)
    assert 100 <= first <= 104
    assert not any(r.detected for r in results[205:])


def test_a_huge_jump_in_a_small_window_alarms_at_once_through_its_p_value() -> None:
    threshold, alpha = math.log(2e5), 1 / 2e5
    window = RateWindow(11, 32, 0.026)
    assert RateCUSUM(threshold=threshold).llr(window) < threshold  # too little for the sum
    assert not RateCUSUM(threshold=threshold).update([window]).detected
    assert RateCUSUM(threshold=threshold, window_alpha=alpha).update([window]).detected


def test_dispersion_scales_the_evidence_so_wald_s_bound_still_holds() -> None:
    detector = RateCUSUM(threshold=10.0)
    window = RateWindow(30, 300, 0.05)
    plain, spread = detector.llr(window), detector.llr(window._replace(dispersion=3.0))
    assert 0 < spread < plain  # the same window is weaker evidence when windows vary more
    p1 = design_rate(0.05, 2.0, 0.0)
    rho = intraclass(3.0, 300)
    assert rho == pytest.approx(2 / 299)
    c = evidence_scale(300, 0.05, p1, rho)
    assert c < 1 / 3  # below the quasi-likelihood's
    # The detector rounds window and correlation up: a scale at most as large.
    assert plain * c * 0.98 <= spread <= plain * c
    # E[exp(c L)] = 1 under the beta-binomial null: the likelihood-ratio martingale's mean.
    k = 1 / rho - 1
    x = np.arange(301)
    pmf = stats.betabinom.pmf(x, 300, 0.05 * k, 0.95 * k)
    ratio = x * np.log(p1 / 0.05) + (300 - x) * np.log((1 - p1) / 0.95)
    assert float(np.sum(pmf * np.exp(c * ratio))) == pytest.approx(1.0, abs=1e-6)
    # An overestimated dispersion only scales further down: never more alarms.
    assert evidence_scale(300, 0.05, p1, intraclass(30.0, 300)) < c
    assert evidence_scale(300, 0.05, p1, 0.0) == 1.0


def test_the_design_rate_and_the_window_p_value() -> None:
    assert design_rate(0.05, 2.0, 0.0) == pytest.approx(0.0952, abs=1e-4)
    assert design_rate(0.001, 2.0, 0.01) == pytest.approx(0.011)
    assert design_rate(1.0, 2.0, 0.01) < 1.0  # a baseline of 100 % stays finite
    assert window_p_value(30, 300, 0.05) == pytest.approx(stats.binom.sf(29, 300, 0.05))
    k = 1 / intraclass(3.0, 300) - 1
    assert window_p_value(30, 300, 0.05, 3.0) == pytest.approx(
        stats.betabinom.sf(29, 300, 0.05 * k, 0.95 * k)
    )
    # At equal variance the beta-binomial tail is the heavier: the conservative choice.
    assert window_p_value(60, 300, 0.05, 3.0) > stats.binom.sf(19, 100, 0.05)
