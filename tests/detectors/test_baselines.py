"""A model's baselines: warm-up, conservative bounds, healthy-only learning, refusal of a
worse candidate, and the calibration of baseline + sequential test on null streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from genmon.detectors import RateCUSUM, RateWindow
from genmon.detectors.calibration.baselines import (
    CountSums,
    LatencyBaseline,
    RateBaseline,
    upper_rate,
)
from genmon.detectors.sketch import QuantileSketch


def no_limit(rate: float) -> float:
    return 1.0


def test_a_rate_baseline_warms_up_then_holds_its_reference_at_upper_bounds() -> None:
    baseline = RateBaseline(None, warmup=5, refresh=100)
    for _ in range(4):
        baseline.learn(3, 100, healthy=True, limit=no_limit)
        assert baseline.reference() is None
    baseline.learn(3, 100, healthy=True, limit=no_limit)
    reference = baseline.reference()
    assert reference is not None and reference.observed == pytest.approx(0.03)
    assert reference.rate > 0.03  # the upper bound: a short reference errs towards silence
    assert reference.dispersion == 1.0  # identical windows: no excess spread
    again = RateBaseline(baseline.to_state(), warmup=5, refresh=100)
    assert again.reference() == reference


def test_the_dispersion_bound_sees_windows_that_vary_more_than_binomially() -> None:
    rng = np.random.default_rng(0)
    sums = CountSums()
    for p in rng.choice([0.01, 0.09], 200):  # half the windows quiet, half busy
        sums.add(int(rng.binomial(500, p)), 500)
    assert sums.dispersion() > 5
    binomial = CountSums()
    for x in rng.binomial(500, 0.05, 200):
        binomial.add(int(x), 500)
    assert 1.0 <= binomial.dispersion() < 1.5
    assert 1.0 <= binomial.long_run() < 1.8


def test_the_long_run_dispersion_sees_regimes_that_last_several_windows() -> None:
    rng = np.random.default_rng(1)
    lasting = CountSums()
    for block in range(100):  # each regime lasts five windows: 3 % or 7 %
        p = 0.07 if block % 2 else 0.03
        for _ in range(5):
            lasting.add(int(rng.binomial(400, p)), 400)
    # One window alone varies some; a sum over a regime varies five times as much.
    assert lasting.long_run() > 2 * lasting.dispersion()


def test_only_healthy_windows_are_learned_and_a_worse_candidate_is_refused() -> None:
    baseline = RateBaseline(None, warmup=4, refresh=8)
    for _ in range(4):
        baseline.learn(5, 100, True, no_limit)

    def limit(rate: float) -> float:
        return rate + 0.02

    for _ in range(20):  # an incident: never learned
        baseline.learn(60, 100, healthy=False, limit=limit)
    assert baseline.ref.count == 4 and baseline.cand.count == 0
    for _ in range(4):  # a young reference grows by a candidate as large as itself
        baseline.learn(6, 100, True, limit)
    assert baseline.ref.count == 8
    for _ in range(8):  # worse by more than the limit allows: refused, not learned
        baseline.learn(9, 100, True, limit)
    assert baseline.refused == 1 and baseline.ref.rate == pytest.approx(0.055)
    for _ in range(8):  # a better candidate replaces a grown-up reference
        baseline.learn(4, 100, True, limit)
    assert baseline.ref.count == 8 and baseline.ref.rate == pytest.approx(0.04)


def test_upper_rate_is_a_jeffreys_bound_shrunk_by_dispersion() -> None:
    assert upper_rate(0, 1000, 1.0) == pytest.approx(stats.beta.ppf(0.95, 0.5, 1000.5))
    assert upper_rate(30, 1000, 3.0) == pytest.approx(stats.beta.ppf(0.95, 10.5, 323.8333))


def sketch_of(values: np.ndarray) -> QuantileSketch:
    sketch = QuantileSketch()
    sketch.add_many(values.tolist())
    return sketch


def test_a_latency_baseline_counts_requests_above_its_quantile_bucket() -> None:
    rng = np.random.default_rng(1)
    baseline = LatencyBaseline(None, warmup=10, refresh=100, quantile=0.95)
    for _ in range(10):
        baseline.learn(sketch_of(rng.lognormal(6, 0.4, 500)), True, no_limit)
    reference = baseline.reference()
    assert reference is not None and 0.03 < reference.observed <= 0.05
    value = baseline.value()
    assert value == pytest.approx(math.exp(6 + 0.4 * 1.645), rel=0.05)
    slow = sketch_of(rng.lognormal(6 + 0.7, 0.4, 500))
    above, total = baseline.above(slow)
    assert total == 500 and above > 150
    again = LatencyBaseline(baseline.to_state(), warmup=10, refresh=100, quantile=0.95)
    assert again.above(slow) == (above, total) and again.reference() == reference


def _alarms_on_null(seed: int, arl: float, windows: int, spread: float) -> int:
    """Baseline learned from the stream itself, then a CUSUM at log(ARL): alarms counted.
    Traffic follows a day: 100 to 700 requests per window."""
    rng = np.random.default_rng(seed)
    baseline = RateBaseline(None, warmup=15, refresh=1440)
    detector = RateCUSUM(threshold=math.log(arl), min_increase=0.01)
    alarms = 0
    for t in range(windows):
        n = int(rng.poisson(400 + 300 * math.sin(2 * math.pi * t / 1440))) + 1
        p = 0.04 * float(rng.lognormal(0, spread)) if spread else 0.04
        x = int(rng.binomial(n, min(p, 1.0)))
        reference = baseline.reference()
        healthy = True
        if reference is not None:
            phi = reference.dispersion_of(n)
            result = detector.update([RateWindow(x, n, reference.rate, phi)])
            alarms += int(result.evidence.value("alarms") or 0)
            cusum = float(result.evidence.value("cusum") or 0.0)
            healthy = not result.detected and cusum <= detector.threshold / 2
        baseline.learn(x, n, healthy, lambda r: (r + 2 * r) / 2)
        del t
    return alarms


@pytest.mark.parametrize("spread", [0.0, 0.4])
def test_baseline_and_test_together_stay_within_the_budget(spread: float) -> None:
    # Fresh baselines learned from short warm-ups, 20 of them: the estimation error of each
    # reference must not turn into false alarms (300 expected at the budget).
    arl, runs, windows = 100.0, 20, 1500
    alarms = sum(_alarms_on_null(seed, arl, windows, spread) for seed in range(runs))
    expected = runs * windows / arl
    assert expected >= 300
    assert alarms <= stats.poisson.ppf(0.999, expected), (alarms, expected)


def test_a_refresh_by_the_clock_replaces_references_with_large_enough_candidates() -> None:
    """The scheduler's reference-refresh: the candidate replaces the reference at once
    (no waiting for ``refresh`` windows) once it holds ``minimum`` windows, and never
    when it is worse than the limit."""

    def limit(rate: float) -> float:
        return rate + 0.02

    baseline = RateBaseline(None, warmup=4, refresh=1000)
    assert baseline.refresh_now(4, limit) is None  # warming up: nothing to refresh
    for _ in range(8):  # the warm-up, then a candidate as large that grows it to 8
        baseline.learn(5, 100, True, limit)
    assert baseline.ref.count == 8
    for _ in range(3):
        baseline.learn(3, 100, True, limit)
    assert baseline.refresh_now(4, limit) is None  # three windows: too small, kept
    assert baseline.cand.count == 3 and baseline.ref.rate == pytest.approx(0.05)
    baseline.learn(3, 100, True, limit)  # four: by size it would wait for eight
    before = baseline.reference()
    assert baseline.refresh_now(4, limit) == "replace"
    reference = baseline.reference()
    assert reference is not None and before is not None
    assert reference.observed == pytest.approx(0.03) and reference.rate < before.rate
    assert baseline.ref.count == 4 and baseline.cand.count == 0
    again = RateBaseline(baseline.to_state(), warmup=4, refresh=1000)
    assert again.reference() == reference
    for _ in range(3):  # worse than the limit: refused and dropped, as by size
        baseline.learn(9, 100, True, limit)
    assert baseline.refresh_now(3, limit) == "refuse"
    assert baseline.refused == 1 and baseline.ref.rate == pytest.approx(0.03)
    assert baseline.cand.count == 0

    rng = np.random.default_rng(2)
    latency = LatencyBaseline(None, warmup=5, refresh=1000, quantile=0.95)
    for _ in range(5):
        latency.learn(sketch_of(rng.lognormal(6, 0.4, 500)), True, no_limit)
    slow = latency.value()
    for _ in range(4):  # faster traffic since: a lower p95 once refreshed
        latency.learn(sketch_of(rng.lognormal(5.5, 0.4, 500)), True, no_limit)
    assert latency.refresh_now(5, no_limit) is None and latency.value() == slow
    assert latency.refresh_now(4, no_limit) == "replace"
    value = latency.value()
    assert slow is not None and value is not None and value < 0.7 * slow
    assert latency.cand_sketch is None and latency.cand.count == 0
