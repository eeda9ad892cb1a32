"""Embedding outliers: calibrated per-row false-alarm rate, batch test, methods and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genmon.detectors import EmbeddingOutlierDetector, InputError, InvalidParameterError, load_state


def _clusters(rng: np.random.Generator, n: int, dim: int = 16, noise: float = 1.0) -> np.ndarray:
    centres = np.eye(dim)[:3] * 5.0
    return centres[rng.integers(0, 3, n)] + rng.normal(0.0, noise, (n, dim))


@pytest.mark.parametrize("method", ["knn", "centroid"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_per_row_rate_is_calibrated(method: str, metric: str) -> None:
    rng = np.random.default_rng(0)
    detector = EmbeddingOutlierDetector(
        _clusters(rng, 1000), method=method, metric=metric, false_alarm_rate=0.05
    )
    fresh = _clusters(rng, 10_000)
    rate = float(
        np.mean(
            detector.distances(fresh)
            > detector.update(fresh[:1]).evidence.value("distance_threshold")
        )
    )
    # The cut-off is an empirical 95% quantile of 1000 reference distances: +-1.5 points.
    assert 0.03 < rate < 0.075


def test_knn_catches_points_between_clusters_that_centroid_misses() -> None:
    rng = np.random.default_rng(1)
    reference = _clusters(rng, 600, noise=0.3)
    # The centroid of three tight clusters is empty space: far from every reference row.
    between = np.tile(np.eye(16)[:3].mean(axis=0) * 5.0, (40, 1)) + rng.normal(0, 0.3, (40, 16))
    knn = EmbeddingOutlierDetector(reference, method="knn", metric="euclidean")
    centroid = EmbeddingOutlierDetector(reference, method="centroid", metric="euclidean")
    assert knn.update(between).detected
    assert not centroid.update(between).detected


def test_batch_false_alarms_stay_near_alpha() -> None:
    rng = np.random.default_rng(2)
    detector = EmbeddingOutlierDetector(_clusters(rng, 1000), metric="euclidean", alpha=0.01)
    fired = sum(detector.update(_clusters(rng, 50)).detected for _ in range(100))
    assert fired <= 5  # alpha=1% of 100 batches is 1 (plus calibration noise)


def test_off_topic_answers_are_flagged_with_evidence() -> None:
    rng = np.random.default_rng(3)
    detector = EmbeddingOutlierDetector(_clusters(rng, 500), method="knn", k=5)
    batch = np.vstack([_clusters(rng, 45), rng.normal(size=(5, 16)) + np.eye(16)[7] * 6])
    result = detector.update(batch)
    assert result.detected and result.evidence.value("n_outliers") >= 5
    assert result.p_value is not None and result.p_value < 0.01
    assert result.score >= result.threshold
    assert np.argsort(detector.distances(batch))[-5:].min() >= 45


def test_state_is_compact_and_exact() -> None:
    rng = np.random.default_rng(4)
    detector = EmbeddingOutlierDetector(
        rng.normal(size=(5000, 32)).astype(np.float32), max_reference=1000
    )
    text = json.dumps(detector.state_dict())
    assert len(text) < 200_000  # 1000 x 32 float32 as base64, not 5000 rows of JSON numbers
    restored = load_state(text)
    batch = rng.normal(size=(20, 32))
    assert np.array_equal(restored.distances(batch), detector.distances(batch))


def test_bad_inputs() -> None:
    rng = np.random.default_rng(5)
    detector = EmbeddingOutlierDetector(rng.normal(size=(50, 4)))
    with pytest.raises(InputError, match="dimensions"):
        detector.update(rng.normal(size=(3, 5)))
    with pytest.raises(InvalidParameterError, match="more than k"):
        EmbeddingOutlierDetector(rng.normal(size=(5, 4)), k=5)


def test_off_topic_share_rising_mid_stream_is_caught_at_once() -> None:
    rng = np.random.default_rng(6)
    detector = EmbeddingOutlierDetector(_clusters(rng, 800), method="knn", metric="cosine")
    stable = [detector.update(_clusters(rng, 40)).detected for _ in range(20)]
    assert sum(stable) <= 1
    # From batch 20 on, 15% of answers land in an unrelated topic (a new direction).
    changed = [
        detector.update(
            np.vstack([_clusters(rng, 34), rng.normal(size=(6, 16)) + np.eye(16)[9] * 6])
        )
        for _ in range(3)
    ]
    assert changed[0].detected and changed[0].evidence.value("n_outliers") >= 6
