"""Error analysis as evidence: cluster the affected examples of a finding.

When a feedback or quality detector fires, the pipeline embeds the affected requests
(``n x d`` embeddings plus their texts), calls :meth:`ExampleClusterer.cluster`, and
attaches the clusters to the finding with :func:`attach_clusters`. Pure computation,
deterministic for a given ``seed``.

References: Rousseeuw (1987), "Silhouettes: a graphical aid to the interpretation and
validation of cluster analysis", J. Comput. Appl. Math. 20:53-65; Kaufman & Rousseeuw
(1990), *Finding Groups in Data*, Wiley; Ward (1963), JASA
58:236-244; Arthur & Vassilvitskii (2007), "k-means++", SODA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import pairwise_distances_argmin_min, silhouette_score

from genmon.detectors._base import DetectorResult, ExampleCluster, check_param
from genmon.detectors.exceptions import InputError, InvalidParameterError

METHODS = ("kmeans", "agglomerative")


class ExampleClusterer:
    """Groups affected examples into clusters, largest first, with representative texts.

    - ``method="kmeans"``: k-means (k-means++, ``seed``) for every k in
      ``[k_min, k_max]`` (capped by the number of distinct points), keeping the k with
      the best silhouette; if even that is below ``min_silhouette`` the examples are one
      cluster (below 0.25 Kaufman & Rousseeuw find "no substantial structure").
    - ``method="agglomerative"``: Ward linkage cut at ``distance_threshold``.

    Fitting uses at most ``max_examples`` rows (a seeded sample without replacement);
    every example is then assigned to its nearest centroid, so ``size`` counts all of
    them. Embeddings are L2-normalised first when ``normalize`` (Euclidean distance then
    ranks like cosine). Each :class:`~genmon.detectors.ExampleCluster` has up to
    ``n_representatives`` distinct texts closest to its centroid, cut to ``max_chars``
    ("…" marks a cut), and ``centroid_distance`` = its members' mean distance to the
    centroid (lower is tighter).

    >>> rng = np.random.default_rng(0)
    >>> centres = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    >>> embeddings = np.repeat(centres, [6, 4, 2], axis=0) + rng.normal(0, 0.1, (12, 2))
    >>> texts = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)] + ["c0", "c1"]
    >>> clusters = ExampleClusterer(normalize=False, n_representatives=2).cluster(
    ...     embeddings, texts)
    >>> [c.size for c in clusters], [c.representatives[0][0] for c in clusters]
    ([6, 4, 2], ['a', 'b', 'c'])
    """

    def __init__(
        self,
        method: str = "kmeans",
        k_min: int = 2,
        k_max: int = 8,
        min_silhouette: float = 0.25,
        distance_threshold: float = 1.0,
        max_examples: int = 1000,
        n_representatives: int = 3,
        max_chars: int = 200,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise InvalidParameterError(f"method={method!r} is not one of {METHODS}")
        self.method = method
        self.k_min = int(k_min)
        self.k_max = int(k_max)
        self.min_silhouette = float(min_silhouette)
        self.distance_threshold = float(distance_threshold)
        self.max_examples = int(max_examples)
        self.n_representatives = int(n_representatives)
        self.max_chars = int(max_chars)
        self.normalize = bool(normalize)
        self.seed = int(seed)
        check_param("k_min", self.k_min, low=2)
        check_param("k_max", self.k_max, low=self.k_min)
        check_param("min_silhouette", self.min_silhouette, low=-1.0, high=1.0)
        check_param("distance_threshold", self.distance_threshold, low=0.0, low_open=True)
        check_param("max_examples", self.max_examples, low=3)
        check_param("n_representatives", self.n_representatives, low=1)
        check_param("max_chars", self.max_chars, low=2)

    def cluster(self, embeddings: Any, texts: Sequence[str]) -> tuple[ExampleCluster, ...]:
        """Cluster ``embeddings`` (n x d) whose i-th row embeds ``texts[i]``."""
        points = np.asarray(embeddings, dtype=float)
        if points.ndim != 2 or points.shape[0] == 0 or points.shape[0] != len(texts):
            raise InputError(
                f"embeddings must be an (n, d) array with one row per text (n={len(texts)}), "
                f"got shape {points.shape}"
            )
        if not np.isfinite(points).all():
            raise InputError("embeddings contain NaN or infinite values; drop those rows")
        if self.normalize:
            norms = np.linalg.norm(points, axis=1, keepdims=True)
            points = points / np.where(norms == 0.0, 1.0, norms)
        rng = np.random.default_rng(self.seed)
        sample = points
        if points.shape[0] > self.max_examples:
            sample = points[np.sort(rng.choice(points.shape[0], self.max_examples, replace=False))]
        labels = self._fit_labels(sample)
        centroids = np.stack([sample[labels == c].mean(axis=0) for c in np.unique(labels)])
        assigned, distances = pairwise_distances_argmin_min(points, centroids)
        clusters = []
        for c in range(centroids.shape[0]):
            members = np.flatnonzero(assigned == c)
            if members.size == 0:
                continue
            ranked = members[np.argsort(distances[members], kind="stable")]
            clusters.append(
                (
                    ExampleCluster(
                        size=int(members.size),
                        representatives=self._representatives(ranked, texts),
                        centroid_distance=float(distances[members].mean()),
                    ),
                    int(members[0]),
                )
            )
        clusters.sort(key=lambda item: (-item[0].size, item[1]))
        return tuple(cluster for cluster, _ in clusters)

    def _fit_labels(self, sample: np.ndarray) -> np.ndarray:
        n_distinct = np.unique(sample, axis=0).shape[0]
        # silhouette needs 2 <= k <= n - 1; k-means needs k distinct points.
        k_high = min(self.k_max, n_distinct, sample.shape[0] - 1)
        single = np.zeros(sample.shape[0], dtype=int)
        if self.method == "agglomerative":
            if n_distinct < 2:
                return single
            model = AgglomerativeClustering(
                n_clusters=None, distance_threshold=self.distance_threshold, linkage="ward"
            )
            return np.asarray(model.fit_predict(sample))
        best_labels, best_score = single, -np.inf
        for k in range(self.k_min, k_high + 1):
            labels = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit_predict(sample)
            score = silhouette_score(sample, labels)
            if score > best_score:
                best_labels, best_score = labels, score
        return best_labels if best_score >= self.min_silhouette else single

    def _representatives(self, ranked: np.ndarray, texts: Sequence[str]) -> tuple[str, ...]:
        chosen: list[str] = []
        for index in ranked.tolist():
            text = str(texts[index])
            if len(text) > self.max_chars:
                text = text[: self.max_chars - 1] + "…"
            if text not in chosen:
                chosen.append(text)
            if len(chosen) == self.n_representatives:
                break
        return tuple(chosen)


def attach_clusters(result: DetectorResult, clusters: Sequence[ExampleCluster]) -> DetectorResult:
    """A copy of ``result`` whose ``evidence.clusters`` are ``clusters`` (the rest unchanged).

    >>> from genmon.detectors import DetectorKind
    >>> r = DetectorResult("threshold", DetectorKind.QUALITY, 0.9, 0.5, True, 10)
    >>> attach_clusters(r, [ExampleCluster(3, ("timeout",))]).evidence.clusters[0].size
    3
    """
    if not all(isinstance(c, ExampleCluster) for c in clusters):
        raise InputError("clusters must be ExampleCluster items (from ExampleClusterer.cluster)")
    return replace(result, evidence=replace(result.evidence, clusters=tuple(clusters)))
