"""Error analysis: clustering affected examples and attaching them to a finding."""

from __future__ import annotations

import numpy as np
import pytest

from genmon.detectors import (
    DetectorKind,
    DetectorResult,
    Evidence,
    ExampleCluster,
    ExampleClusterer,
    InputError,
    InvalidParameterError,
    attach_clusters,
)

SIZES = (120, 70, 30)
TOPICS = ("timeout", "refusal", "wrong_language")


def three_blobs(seed: int = 0, dim: int = 16) -> tuple[np.ndarray, list[str]]:
    """Three well-separated directions (so they stay separate after normalisation)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 10.0
    parts, texts = [], []
    for centre, size, topic in zip(centres, SIZES, TOPICS, strict=True):
        parts.append(centre + rng.normal(0.0, 0.5, (size, dim)))
        texts += [f"{topic} example {i}" for i in range(size)]
    order = rng.permutation(sum(SIZES))
    return np.vstack(parts)[order], [texts[i] for i in order]


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_three_separated_clusters_are_recovered_largest_first(method: str) -> None:
    embeddings, texts = three_blobs()
    clusters = ExampleClusterer(method=method, n_representatives=4).cluster(embeddings, texts)
    assert [c.size for c in clusters] == list(SIZES)
    for cluster, topic in zip(clusters, TOPICS, strict=True):
        assert len(cluster.representatives) == 4
        assert all(text.startswith(topic) for text in cluster.representatives)
        assert cluster.centroid_distance > 0.0


def test_representatives_are_the_examples_closest_to_the_centroid() -> None:
    embeddings = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [50.0, 50.0], [51.0, 50.0]])
    texts = ["centre-ish", "near", "far", "other-a", "other-b"]
    clusterer = ExampleClusterer(normalize=False, n_representatives=2, min_silhouette=0.0)
    big, small = clusterer.cluster(embeddings, texts)
    # centroid of the first three is (0.367, 0): "near" is closest, then "centre-ish".
    assert big.representatives == ("near", "centre-ish")
    assert small.size == 2


def test_sampling_bounds_the_fit_but_every_example_is_counted() -> None:
    embeddings, texts = three_blobs(seed=1)
    big = np.vstack([embeddings] * 10)
    clusterer = ExampleClusterer(max_examples=200, seed=5)
    clusters = clusterer.cluster(big, texts * 10)
    assert [c.size for c in clusters] == [s * 10 for s in SIZES]
    assert clusters == ExampleClusterer(max_examples=200, seed=5).cluster(big, texts * 10)


def test_structureless_examples_stay_one_cluster() -> None:
    rng = np.random.default_rng(3)
    embeddings = rng.normal(0.0, 1.0, (200, 2)) + 100.0
    (only,) = ExampleClusterer(normalize=False, min_silhouette=0.5).cluster(
        embeddings, [f"t{i}" for i in range(200)]
    )
    assert only.size == 200


def test_tiny_and_duplicate_inputs_do_not_break() -> None:
    assert ExampleClusterer().cluster([[1.0, 0.0]], ["one"])[0].size == 1
    same = ExampleClusterer().cluster([[1.0, 2.0]] * 5, ["dup"] * 5)
    assert len(same) == 1 and same[0].representatives == ("dup",)


def test_representatives_are_truncated_and_distinct() -> None:
    embeddings = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    texts = ["x" * 500, "x" * 500, "short", "y", "y", "z"]
    clusters = ExampleClusterer(max_chars=10, n_representatives=3).cluster(embeddings, texts)
    first = clusters[0].representatives
    assert "x" * 9 + "…" in first and len(first) == len(set(first))
    assert all(len(text) <= 10 for c in clusters for text in c.representatives)


def test_attach_clusters_replaces_only_the_clusters() -> None:
    result = DetectorResult(
        detector="segment_rate_bias",
        kind=DetectorKind.BIAS,
        score=3.0,
        threshold=1.3,
        detected=True,
        n_seen=100,
        evidence=Evidence(segment="fr", notes=("kept",)),
    )
    clusters = (ExampleCluster(5, ("a",), 0.1), ExampleCluster(2, ("b",), 0.2))
    enriched = attach_clusters(result, clusters)
    assert enriched.evidence.clusters == clusters
    assert enriched.evidence.segment == "fr" and enriched.evidence.notes == ("kept",)
    assert result.evidence.clusters == ()  # the original is untouched (frozen)
    assert enriched.to_dict()["evidence"]["clusters"][0]["size"] == 5
    with pytest.raises(InputError, match="ExampleCluster"):
        attach_clusters(result, [("a", 1)])


def test_bad_inputs_and_parameters_raise_clear_errors() -> None:
    with pytest.raises(InputError, match="one row per text"):
        ExampleClusterer().cluster(np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(InputError, match="NaN"):
        ExampleClusterer().cluster(np.array([[np.nan, 1.0]]), ["a"])
    with pytest.raises(InvalidParameterError, match="method"):
        ExampleClusterer(method="dbscan")
    with pytest.raises(InvalidParameterError, match="k_max"):
        ExampleClusterer(k_min=5, k_max=3)
