"""Page-Hinkley: slow drift detection, average run length, batch invariance."""

from __future__ import annotations

import numpy as np

from genmon.detectors import PageHinkley


def _positions(detector: PageHinkley, values: np.ndarray, chunk: int) -> list[int]:
    out = []
    for start in range(0, values.size, chunk):
        result = detector.update(values[start : start + chunk])
        if result.detected:
            out.append(start + int(result.evidence.value("alarm_index")))
    return out


def test_slowly_falling_feedback_score_is_detected_early() -> None:
    rng = np.random.default_rng(5)
    delays, early_alarms = [], 0
    for _ in range(30):
        stable = np.clip(rng.normal(0.8, 0.05, 300), 0, 1)
        # From index 300 the mean score falls by 0.002 per event (one sigma in 25 events).
        falling = np.clip(0.8 - 0.002 * np.arange(1, 301) + rng.normal(0, 0.05, 300), 0, 1)
        detector = PageHinkley()
        early_alarms += detector.update(stable).detected
        result = detector.update(falling)
        assert result.detected and result.evidence.value("direction") == -1.0
        delays.append(result.evidence.value("alarm_index"))
    assert early_alarms <= 3
    assert np.median(delays) <= 70
    assert max(delays) <= 120


def test_in_control_average_run_length_with_known_sigma() -> None:
    rng = np.random.default_rng(11)
    n = 1_000_000
    result = PageHinkley(delta=0.5, threshold=8.0, sigma=1.0).update(rng.normal(size=n))
    arl = n / max(result.evidence.value("n_alarms"), 1.0)
    # Against a settled running mean PH is a CUSUM with k=delta, h=threshold, whose two-sided
    # ARL0 is ~9,560 by Siegmund's approximation; ~100 alarms give a ~10% standard error.
    assert 7_500 < arl < 13_500


def test_chunking_does_not_change_alarms() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0, 1, 2000), rng.normal(2, 1, 2000)])
    expected = _positions(PageHinkley(warmup=30), values, values.size)
    assert expected and expected[0] >= 2000
    for chunk in (1, 13, 512, 700):
        assert _positions(PageHinkley(warmup=30), values, chunk) == expected


def test_known_sigma_and_constant_stream() -> None:
    detector = PageHinkley(warmup=5, sigma=0.5)
    for _ in range(10):
        result = detector.update(np.full(50, -3.25))
        assert not result.detected
    assert result.evidence.value("sigma") == 0.5
