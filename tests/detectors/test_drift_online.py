"""Online embedding drift (MMD, LSDD): delay at a known change point, calibrated ERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genmon.detectors import (
    InputError,
    InvalidParameterError,
    OnlineLSDDDrift,
    OnlineMMDDrift,
    load_state,
)

ONLINE = pytest.mark.parametrize("cls", [OnlineMMDDrift, OnlineLSDDDrift], ids=["mmd", "lsdd"])


def _stream_with_change(rng: np.random.Generator, before: int, after: int, dim: int) -> np.ndarray:
    shifted = rng.normal(size=(after, dim))
    shifted[:, : dim // 2] += 0.6  # half the dimensions move by 0.6 sd
    return np.concatenate([rng.normal(size=(before, dim)), shifted]).astype(np.float32)


@ONLINE
@pytest.mark.parametrize("batch", [1, 37, 1000])
def test_detects_known_change_point_within_delay_bound(cls, batch: int) -> None:
    rng = np.random.default_rng(42)
    window, change = 32, 400
    detector = cls(rng.normal(size=(600, 16)), window_size=window, ert=2000, seed=3)
    stream = _stream_with_change(rng, change, 400, 16)
    alarms = []
    for start in range(0, len(stream), batch):
        result = detector.update(stream[start : start + batch])
        if result.detected:
            alarms.append(start + int(result.evidence.value("first_detection_index")))
    assert alarms, "the shift was never detected"
    assert alarms[0] >= change, f"false alarm at {alarms[0]} before the change at {change}"
    assert alarms[0] - change <= window, f"delay {alarms[0] - change} exceeds one window"


@ONLINE
def test_stationary_run_length_matches_configured_ert(cls) -> None:
    # Pooled over three references: mean tested updates between false alarms ~ ert.
    window, ert, total, alarms = 20, 100, 0, 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        detector = cls(rng.normal(size=(600, 8)), window_size=window, ert=ert, seed=seed)
        for _ in range(30):
            result = detector.update(rng.normal(size=(1000, 8)))
            alarms += int(result.evidence.value("detections"))
            total += 1000
    # Each run is window - 1 warm-up updates, then tested updates up to and including the alarm.
    mean_run = total / alarms - (window - 1)
    assert 0.7 * ert <= mean_run <= 1.4 * ert, f"mean run length {mean_run:.1f} vs ert {ert}"


@ONLINE
def test_batched_and_single_updates_agree(cls) -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(200, 6))
    batched = cls(reference, window_size=15, ert=50, seed=1)
    single = cls(reference, window_size=15, ert=50, seed=1)
    stream = _stream_with_change(rng, 150, 150, 6)
    batched_alarms = batched.update(stream).evidence.value("detections")
    single_alarms = sum(single.update(row).detected for row in stream)
    assert batched_alarms == single_alarms > 0
    assert batched.state_dict()["state"]["n_seen"] == single.state_dict()["state"]["n_seen"] == 300


@ONLINE
def test_no_test_until_window_full_and_restart_after_alarm(cls) -> None:
    rng = np.random.default_rng(1)
    detector = cls(rng.normal(size=(200, 4)), window_size=10, ert=100, seed=0)
    far = rng.normal(5.0, 1.0, size=(9, 4))
    result = detector.update(far)
    assert not result.detected and np.isnan(result.score)
    result = detector.update(rng.normal(5.0, 1.0, size=(1, 4)))
    assert result.detected and result.score > result.threshold
    assert result.evidence.value("window_fill") == 0  # warm-up starts again
    assert not detector.update(rng.normal(5.0, 1.0, size=(9, 4))).detected


@ONLINE
def test_set_reference_recalibrates_and_resets(cls) -> None:
    rng = np.random.default_rng(2)
    detector = cls(rng.normal(size=(200, 4)), window_size=10, ert=100, seed=0)
    new_regime = rng.normal(3.0, 1.0, size=(200, 4))
    assert detector.update(rng.normal(3.0, 1.0, size=(30, 4))).detected
    detector.set_reference(new_regime)
    assert detector.state_dict()["state"]["n_seen"] == 0
    assert not detector.update(rng.normal(3.0, 1.0, size=(100, 4))).detected
    restored = load_state(json.loads(json.dumps(detector.state_dict())))
    assert np.array_equal(restored.reference, detector.reference)


@ONLINE
def test_state_is_compact(cls) -> None:
    reference = np.random.default_rng(0).normal(size=(1000, 384)).astype(np.float32)
    detector = cls(reference, window_size=32, ert=200)
    size = len(json.dumps(detector.state_dict()))
    assert size < 1.4 * reference.nbytes  # base64 float32, not a JSON list of floats


@ONLINE
def test_bad_input_and_parameters(cls) -> None:
    rng = np.random.default_rng(0)
    detector = cls(rng.normal(size=(100, 4)), window_size=10, ert=50)
    with pytest.raises(InputError, match="dimensions"):
        detector.update(np.zeros((3, 5)))
    with pytest.raises(InputError, match="NaN"):
        detector.update(np.full((3, 4), np.nan))
    with pytest.raises(InvalidParameterError, match="at least"):
        cls(rng.normal(size=(20, 4)), window_size=10)
    with pytest.raises(InvalidParameterError, match="n_bootstraps"):
        cls(rng.normal(size=(100, 4)), window_size=10, ert=500, n_bootstraps=100)
