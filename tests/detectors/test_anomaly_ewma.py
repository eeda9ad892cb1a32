"""EWMA z-score: spike detection, false alarms near the Gaussian tail, batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from genmon.detectors import EWMAZScore


def _naive(values: np.ndarray, alpha: float, warmup: int) -> np.ndarray:
    mean, var = values[:warmup].mean(), values[:warmup].var(ddof=1)
    z = []
    for x in values[warmup:]:
        d = x - mean
        z.append(d / np.sqrt(var / (1 - alpha)))
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return np.array(z)


def test_latency_spike_is_flagged_at_once() -> None:
    rng = np.random.default_rng(0)
    p99 = rng.normal(250.0, 10.0, 500)
    p99[400] = 400.0
    detector = EWMAZScore(alpha=0.02, threshold=4.0)
    first = detector.update(p99[:400])
    assert not first.detected
    result = detector.update(p99[400:])
    assert result.detected and result.evidence.value("alarm_index") == 0.0
    assert result.evidence.value("direction") == 1.0
    assert result.evidence.value("mean") == pytest.approx(250.0, abs=5.0)


def test_false_alarm_rate_is_near_the_gaussian_tail() -> None:
    rng = np.random.default_rng(9)
    n = 200_000
    result = EWMAZScore(alpha=0.01, threshold=3.0).update(rng.normal(size=n))
    ratio = result.evidence.value("n_alarms") / n / (2 * norm.sf(3.0))
    # 200k values at a 0.27% tail give ~540 alarms (SE ~4%); estimation noise in the
    # variance adds ~15% at alpha=0.01.
    assert 0.85 < ratio < 1.45


def test_vectorised_update_matches_the_recurrence_and_chunking() -> None:
    rng = np.random.default_rng(4)
    values = rng.standard_t(4, 3000)
    expected = _naive(values, 0.05, 30)
    whole = EWMAZScore(alpha=0.05, threshold=3.0, warmup=30)
    chunked = EWMAZScore(alpha=0.05, threshold=3.0, warmup=30)
    z_whole = whole.update(values).evidence.value("n_alarms")
    z_chunks = sum(
        chunked.update(part).evidence.value("n_alarms") for part in np.array_split(values, 41)
    )
    assert z_whole == z_chunks == np.count_nonzero(np.abs(expected) > 3.0)
    assert whole.state_dict()["state"]["mean"] == pytest.approx(
        chunked.state_dict()["state"]["mean"]
    )


def test_direction_filter_and_constant_stream() -> None:
    rng = np.random.default_rng(8)
    up_only = EWMAZScore(warmup=10, direction="up")
    up_only.update(rng.normal(5.0, 1.0, 50))
    assert not up_only.update([-100.0]).detected
    assert up_only.update([100.0]).detected
    constant = EWMAZScore(warmup=10)
    assert not any(constant.update(np.full(100, 0.1)).detected for _ in range(5))
