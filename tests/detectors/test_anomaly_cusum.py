"""CUSUM: detection delay, in-control average run length, batch invariance, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from genmon.detectors import CUSUM, InputError, InvalidParameterError


def _per_chunk(detector: CUSUM, values: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """(first alarm position or -1, alarm count) for each chunk fed to ``detector``."""
    out = []
    for start in range(0, values.size, chunk):
        result = detector.update(values[start : start + chunk])
        first = int(result.evidence.value("alarm_index"))
        out.append((start + first if first >= 0 else -1, int(result.evidence.value("n_alarms"))))
    return out


def _expected_per_chunk(alarms: list[int], size: int, chunk: int) -> list[tuple[int, int]]:
    out = []
    for start in range(0, size, chunk):
        inside = [a for a in alarms if start <= a < start + chunk]
        out.append((inside[0] if inside else -1, len(inside)))
    return out


def _naive_cusum(z: np.ndarray, k: float, h: float) -> list[int]:
    up = down = 0.0
    alarms = []
    for i, value in enumerate(z):
        up, down = max(0.0, up + value - k), max(0.0, down - value - k)
        if up > h or down > h:
            alarms.append(i)
            up = down = 0.0
    return alarms


def test_one_sigma_shift_found_within_delay_bound() -> None:
    rng = np.random.default_rng(42)
    delays = []
    for _ in range(50):
        detector = CUSUM(k=0.5, h=5.0, warmup=200)
        before = detector.update(rng.normal(10.0, 2.0, 400))
        after = detector.update(rng.normal(12.0, 2.0, 200))  # +1 sigma at index 400
        assert after.detected
        delays.append(after.evidence.value("alarm_index"))
        assert after.evidence.value("direction") == 1.0
        del before
    # Montgomery Table 9.3: ARL1 = 10.4 for a one-sigma shift with k=0.5, h=5.
    assert np.median(delays) <= 15
    assert max(delays) <= 60


def test_downward_shift_reports_direction() -> None:
    rng = np.random.default_rng(1)
    detector = CUSUM(target=0.0, sigma=1.0)
    detector.update(rng.normal(0.0, 1.0, 100))
    result = detector.update(rng.normal(-2.0, 1.0, 50))
    assert result.detected and result.evidence.value("direction") == -1.0
    assert result.evidence.value("alarm_index") < 10


def test_in_control_average_run_length_matches_montgomery() -> None:
    rng = np.random.default_rng(7)
    detector = CUSUM(k=0.5, h=5.0, target=0.0, sigma=1.0)
    n = 400_000
    result = detector.update(rng.normal(size=n))
    arl = n / result.evidence.value("n_alarms")
    # Two-sided ARL0 = 465 (Montgomery Table 9.3; Siegmund's approximation gives 469).
    # 400k points see ~860 alarms, so the estimate's standard error is about 3.4%.
    assert 400 < arl < 540


def test_matches_naive_loop_and_any_chunking() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 3000), rng.normal(1.5, 1, 3000)])
    expected = _naive_cusum(values, 0.5, 5.0)
    assert len(expected) > 50
    for chunk in (1, 7, 512, 513, 6000):
        got = _per_chunk(CUSUM(target=0.0, sigma=1.0), values, chunk)
        assert got == _expected_per_chunk(expected, values.size, chunk)


def test_warmup_estimates_reference_and_never_alarms_during_it() -> None:
    detector = CUSUM(warmup=20)
    result = detector.update(np.full(19, 5.0))
    assert not result.detected and "warming up" in result.evidence.notes
    result = detector.update([500.0, 5.0])
    assert not result.detected
    assert result.evidence.value("target") == pytest.approx((19 * 5 + 500) / 20)


def test_constant_stream_never_alarms() -> None:
    detector = CUSUM(warmup=10)
    for _ in range(20):
        assert not detector.update(np.full(100, 1234.5678)).detected


def test_bad_input_and_parameters() -> None:
    with pytest.raises(InvalidParameterError, match="h="):
        CUSUM(h=0)
    with pytest.raises(InvalidParameterError, match="direction"):
        CUSUM(direction="sideways")
    with pytest.raises(InputError, match="NaN"):
        CUSUM().update([1.0, float("nan")])
    with pytest.raises(InputError, match="at least one"):
        CUSUM().update([])
