"""Throughput spike/drop against a rolling and a seasonal baseline."""

from __future__ import annotations

import numpy as np
import pytest

from genmon.detectors import InputError, SeasonalThroughputDetector, ThroughputDetector


def test_drop_to_a_third_is_flagged_in_the_first_bucket() -> None:
    rng = np.random.default_rng(3)
    counts = rng.poisson(500, 200).astype(float)
    counts[150:] = rng.poisson(150, 50)
    detector = ThroughputDetector(window=60, threshold=4.0)
    assert not detector.update(counts[:150]).detected
    result = detector.update(counts[150:])
    assert result.detected
    assert result.evidence.value("alarm_index") == 0.0
    assert result.evidence.value("direction") == -1.0


def test_poisson_counts_rarely_alarm() -> None:
    rng = np.random.default_rng(4)
    result = ThroughputDetector(window=60, threshold=4.0).update(rng.poisson(80, 20_000))
    # Gaussian tail at 4 sigma is 6e-5 per bucket; the 60-bucket baseline adds some noise.
    assert result.evidence.value("n_alarms") <= 8


def test_min_relative_change_ignores_tiny_but_significant_moves() -> None:
    detector = ThroughputDetector(window=30, min_samples=10, min_relative_change=0.2)
    detector.update(np.full(30, 100_000.0))
    assert not detector.update([101_500.0]).detected  # 1.5%: 4.7 sigma but not 20%
    assert detector.update([140_000.0]).detected


def test_chunking_gives_same_scores() -> None:
    rng = np.random.default_rng(6)
    counts = rng.poisson(50, 400).astype(float)
    counts[300] = 200
    whole = ThroughputDetector(window=25).update(counts)
    parts = ThroughputDetector(window=25)
    results = [parts.update(p) for p in np.array_split(counts, 17)]
    assert whole.evidence.value("n_alarms") == sum(r.evidence.value("n_alarms") for r in results)
    assert whole.score == pytest.approx(max(r.score for r in results))


def test_counts_must_be_non_negative() -> None:
    with pytest.raises(InputError, match=">= 0"):
        ThroughputDetector().update([3, -1])


def _weekly(rng: np.random.Generator, weeks: int) -> np.ndarray:
    hours = np.arange(168 * weeks)
    daily = 1.0 + 0.8 * np.sin(2 * np.pi * (hours % 24) / 24)
    weekend = np.where((hours // 24) % 7 >= 5, 0.4, 1.0)
    return rng.poisson(200 * daily * weekend).astype(float)


def test_seasonal_baseline_catches_a_peak_hour_drop_a_rolling_day_misses() -> None:
    rng = np.random.default_rng(10)
    history = _weekly(rng, 3)
    seasonal = SeasonalThroughputDetector(period=168, alpha=0.3, min_seasons=2)
    rolling = ThroughputDetector(window=24, threshold=4.0)
    assert seasonal.update(history).evidence.value("n_alarms") <= 2
    rolling.update(history)
    week = _weekly(rng, 1)
    assert not seasonal.update(week[:24]).detected
    rolling.update(week[:24])
    tuesday = week[24:48].copy()
    tuesday[6] = week[18]  # Tuesday's peak hour falls to the nightly trough
    # A day-long rolling baseline spans the daily swing, so a peak-hour drop to night
    # levels looks ordinary; against earlier Tuesdays at that hour it is an outage.
    assert not rolling.update(tuesday).detected
    result = seasonal.update(tuesday)
    assert result.detected and result.evidence.value("alarm_index") == 6.0
    assert result.evidence.value("slot") == 30.0 and result.evidence.value("direction") == -1.0


def test_seasonal_state_is_bounded_by_period() -> None:
    rng = np.random.default_rng(1)
    detector = SeasonalThroughputDetector(period=24)
    for _ in range(10):
        detector.update(rng.poisson(30, 100))
    state = detector.state_dict()["state"]
    assert len(state["means"]) == len(state["vars"]) == 24
    assert state["n_seen"] == 1000
