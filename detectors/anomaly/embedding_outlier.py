"""Outlier responses: embedding distance to a reference, cut at a calibrated false-alarm rate."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.drift._common import as_matrix, decode_array, encode_array
from genmon.detectors.exceptions import InputError, InvalidParameterError

METHODS = ("knn", "centroid")
METRICS = ("cosine", "euclidean")
#: Distances are float64 but embeddings are often float32; identical vectors can land a hair
#: above zero, which must not make a constant stream look like outliers.
_DISTANCE_TOLERANCE = 1e-6
#: Rows of the batch compared with the reference at once, to bound the distance matrix.
_ROWS = 1024


@register
class EmbeddingOutlierDetector(Detector):
    """Scores each embedding by its distance to a reference and tests the outlier rate.

    ``method="centroid"``: distance to the reference mean. ``method="knn"``: distance to the
    ``k``-th nearest reference row (Ramaswamy et al. 2000), which also catches points between
    clusters of a multi-modal reference. The per-row cut-off is the ``1 - false_alarm_rate``
    quantile of the reference's own (leave-one-out) distances, so a row from the reference
    distribution is flagged with probability ``false_alarm_rate``. A batch is *detected*
    when its outlier count is improbable under that rate: a one-sided binomial test at
    level ``alpha``. ``score`` is the batch's outlier fraction and ``threshold`` the smallest
    fraction that is significant for this batch size, so ``detected == score >= threshold``.
    :meth:`distances` gives the per-row distances for showing which responses are odd.
    The reference (n x d) is kept, at most ``max_reference`` evenly spaced rows.

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(300, 8))
    >>> d = EmbeddingOutlierDetector(reference=ref, method="knn", k=5, metric="euclidean")
    >>> d.update(rng.normal(size=(50, 8))).detected
    False
    >>> d.update(rng.normal(size=(50, 8)) + 4.0).detected
    True

    References: S. Ramaswamy, R. Rastogi and K. Shim, "Efficient algorithms for mining
    outliers from large data sets", SIGMOD 2000; V. Vovk et al., *Algorithmic Learning in a
    Random World* (2005) for calibrating a score threshold on held-in data.
    """

    name = "embedding_outlier"
    kind = DetectorKind.ANOMALY

    def __init__(
        self,
        reference: Any,
        method: str = "knn",
        k: int = 5,
        metric: str = "cosine",
        false_alarm_rate: float = 0.01,
        alpha: float = 0.01,
        max_reference: int = 2000,
    ) -> None:
        if method not in METHODS:
            raise InvalidParameterError(f"method={method!r} is not one of {METHODS}")
        if metric not in METRICS:
            raise InvalidParameterError(f"metric={metric!r} is not one of {METRICS}")
        check_param("k", k, low=1, high=1000)
        check_param("false_alarm_rate", false_alarm_rate, low=0.0, high=0.5, low_open=True)
        check_param("alpha", alpha, low=0.0, high=0.5, low_open=True)
        check_param("max_reference", max_reference, low=2, high=100_000)
        try:
            ref = as_matrix(decode_array(reference), None, "reference")
        except InputError as exc:
            raise InvalidParameterError(str(exc)) from exc
        if ref.shape[0] > max_reference:
            ref = ref[np.linspace(0, ref.shape[0] - 1, max_reference).astype(int)]
        if method == "knn" and ref.shape[0] <= k:
            raise InvalidParameterError(
                f"reference has {ref.shape[0]} rows; method='knn' with k={k} needs more than k"
            )
        self.method = method
        self.k = int(k)
        self.metric = metric
        self.false_alarm_rate = float(false_alarm_rate)
        self.alpha = float(alpha)
        self.max_reference = int(max_reference)
        # Stored encoded so get_params()/state_dict() stay compact, exact JSON.
        self.reference = encode_array(ref)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        raw = decode_array(self.reference).astype(np.float64)
        self._offset = raw.mean(axis=0) if self.metric == "euclidean" else 0.0
        self._points = self._prepare(raw)
        # Kept transposed and contiguous: multithreaded OpenBLAS is ~100x slower on a
        # strided (transposed-view) operand when the cores are busy.
        self._columns = np.ascontiguousarray(self._points.T)
        centroid = self._points.mean(axis=0, keepdims=True)
        self._centroid = _unit_rows(centroid) if self.metric == "cosine" else centroid
        self._cutoff = max(
            float(np.quantile(self._reference_distances(), 1.0 - self.false_alarm_rate)),
            _DISTANCE_TOLERANCE,
        )

    def distances(self, batch: Any) -> np.ndarray:
        """Distance of each row of ``batch`` (n x d) to the reference, by ``method``."""
        rows = self._prepare(
            as_matrix(batch, self._points.shape[1], "EmbeddingOutlierDetector batch").astype(
                np.float64
            )
        )
        if self.method == "centroid":
            return self._distance(rows, self._centroid.T)[:, 0]
        out = np.empty(rows.shape[0])
        for lo in range(0, rows.shape[0], _ROWS):
            block = self._distance(rows[lo : lo + _ROWS], self._columns)
            out[lo : lo + _ROWS] = np.partition(block, self.k - 1, axis=1)[:, self.k - 1]
        return out

    def update(self, batch: Any) -> DetectorResult:
        dist = self.distances(batch)
        self._n_seen += int(dist.size)
        n_out = int(np.count_nonzero(dist > self._cutoff))
        p_value = float(stats.binom.sf(n_out - 1, dist.size, self.false_alarm_rate))
        # Smallest count whose upper tail is within alpha: the significance cut-off.
        needed = int(stats.binom.isf(self.alpha, dist.size, self.false_alarm_rate)) + 1
        values = (
            ("n_outliers", float(n_out)),
            ("outlier_rate", n_out / dist.size),
            ("expected_rate", self.false_alarm_rate),
            ("distance_threshold", self._cutoff),
            ("max_distance", float(dist.max())),
            ("mean_distance", float(dist.mean())),
        )
        return self._result(
            score=n_out / dist.size,
            threshold=needed / dist.size,
            detected=n_out >= needed,
            n_seen=self._n_seen,
            p_value=p_value,
            effect_size=n_out / dist.size - self.false_alarm_rate,
            evidence=Evidence(test=f"{self.method}_distance_binomial", values=values),
        )

    def _prepare(self, rows: np.ndarray) -> np.ndarray:
        if self.metric == "euclidean":
            # Centring on the reference keeps |x|^2 + |y|^2 - 2xy from cancelling large
            # norms into rounding noise; distances do not change under translation.
            return rows - self._offset
        return _unit_rows(rows)

    def _distance(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Distances of ``rows`` (n x d) to the points held as ``columns`` (d x m)."""
        products = rows @ columns
        if self.metric == "cosine":
            return np.maximum(1.0 - products, 0.0)
        sq = (rows**2).sum(1)[:, None] + (columns**2).sum(0)[None, :] - 2.0 * products
        return np.sqrt(np.maximum(sq, 0.0))

    def _reference_distances(self) -> np.ndarray:
        if self.method == "centroid":
            # Leave-one-out centroids: a row pulls its own centroid towards it, which would
            # calibrate the cut-off too tight (badly so for near-isotropic references).
            n = self._points.shape[0]
            loo = (self._points.sum(axis=0, keepdims=True) - self._points) / (n - 1)
            if self.metric == "cosine":
                loo = _unit_rows(loo)
                return np.maximum(1.0 - np.einsum("ij,ij->i", self._points, loo), 0.0)
            return np.linalg.norm(self._points - loo, axis=1)
        out = np.empty(self._points.shape[0])
        for lo in range(0, self._points.shape[0], _ROWS):
            block = self._distance(self._points[lo : lo + _ROWS], self._columns)
            # Leave-one-out: column 0 after sorting is the row itself (distance ~0).
            out[lo : lo + _ROWS] = np.partition(block, self.k, axis=1)[:, self.k]
        return out

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> np.ndarray:
            if constant is not None:
                return np.full((n, 3), float(constant))
            return rng.normal(size=(n, 3))

        def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
            return rng.normal(size=(n, 3)) + 6.0

        reference = stream(np.random.default_rng(1), 200)
        invalid = (
            {"method": "lof"},
            {"k": 0},
            {"metric": "manhattan"},
            {"reference": [[1.0, 2.0]] * 3},
        )
        return ContractExample(cls(reference, metric="euclidean"), stream, shifted, 0, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {"n_seen": self._n_seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)
