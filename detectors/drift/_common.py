"""Shared pieces of the drift detectors: compact array state, kernels, bounded windows,
contract-example streams.

Reference samples and windows are stored in ``state_dict`` as base64 of their raw
bytes rather than JSON lists: exact, and about four times smaller (a 1,000 x 384
float32 reference is ~2 MB of JSON instead of ~8 MB).

>>> import numpy as np
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> np.array_equal(decode_array(encode_array(a)), a)
True
>>> round(float(median_sigma(np.array([[0.0], [1.0], [3.0]]))), 4)
1.4142
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np

from genmon.detectors.exceptions import InputError, InvalidParameterError


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A JSON-serialisable, exact encoding of ``array``."""
    array = np.ascontiguousarray(array)
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "b64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def decode_array(obj: Any) -> np.ndarray:
    """Inverse of :func:`encode_array`; other values go through ``np.asarray``."""
    if isinstance(obj, dict) and "b64" in obj:
        raw = base64.b64decode(obj["b64"])
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    return np.asarray(obj)


def as_matrix(batch: Any, dim: int | None, what: str) -> np.ndarray:
    """``batch`` as a float32 (n, d) matrix; one vector becomes one row."""
    try:
        values = np.asarray(batch, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be numeric vectors (n x d): {exc}") from exc
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.shape[0] == 0:
        raise InputError(f"{what} must be a non-empty n x d matrix, got shape {values.shape}")
    if dim is not None and values.shape[1] != dim:
        raise InputError(f"{what} has {values.shape[1]} dimensions; the reference has {dim}")
    if not np.isfinite(values).all():
        raise InputError(f"{what} contains NaN or infinite values; drop or impute them first")
    return values


def as_reference(reference: Any, min_rows: int) -> np.ndarray:
    """Validate a reference sample of embeddings (``InvalidParameterError`` if unusable)."""
    try:
        ref = as_matrix(decode_array(reference), None, "reference")
    except InputError as exc:
        raise InvalidParameterError(str(exc)) from exc
    if ref.shape[0] < min_rows:
        raise InvalidParameterError(
            f"reference has {ref.shape[0]} rows; this configuration needs at least {min_rows} "
            "(collect a larger reference or use a smaller window_size)"
        )
    return ref


def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (float32 matmul; clipped at 0)."""
    x_sq = np.einsum("ij,ij->i", x, x)
    y_sq = np.einsum("ij,ij->i", y, y)
    d2 = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d2, 0.0, out=d2)


def rbf(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian kernel ``exp(-|x - y|^2 / (2 sigma^2))`` (float32; sum it in float64)."""
    d2 = sq_dists(x, y)
    d2 *= np.float32(-1.0 / (2.0 * sigma * sigma))
    return np.exp(d2, out=d2)


def median_sigma(x: np.ndarray, max_rows: int = 1000) -> float:
    """Median heuristic: ``sigma^2 = median(|x_i - x_j|^2) / 2`` over distinct pairs.

    Falls back to 1.0 when the sample is constant (all distances zero).
    """
    x = x[:max_rows]
    d2 = sq_dists(x, x)[np.triu_indices(len(x), k=1)]
    med = float(np.median(d2)) if d2.size else 0.0
    return float(np.sqrt(med / 2.0)) if med > 0 else 1.0


def check_sigma(sigma: float | None) -> float | None:
    if sigma is None:
        return None
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma <= 0:
        raise InvalidParameterError(f"sigma={sigma!r} must be a positive kernel bandwidth or None")
    return sigma


def needed_bootstraps(ert: float, window_size: int) -> int:
    """Fewest bootstrap trajectories for the online calibration (see :func:`ert_thresholds`).

    Each conditional quantile needs about ``ert`` surviving trajectories to be estimable;
    twice that keeps two expected exceedances per step after ``window_size`` steps.
    """
    return int(np.ceil(2.0 * ert / (1.0 - 1.0 / ert) ** window_size))


def ert_thresholds(trajectories: np.ndarray, ert: float) -> np.ndarray:
    """Per-step thresholds giving an expected run time ``ert`` (Cobb et al., 2022).

    ``trajectories`` is (bootstraps x steps) of stationary statistics for the first
    overlapping windows; step ``k``'s threshold is the ``1 - 1/ert`` quantile among the
    trajectories that stayed below every earlier threshold.
    """
    alive = np.ones(len(trajectories), dtype=bool)
    thresholds = np.empty(trajectories.shape[1])
    for step in range(trajectories.shape[1]):
        thresholds[step] = np.quantile(trajectories[alive, step], 1.0 - 1.0 / ert)
        alive &= trajectories[:, step] <= thresholds[step]
    return thresholds


def random_subsets(rng: np.random.Generator, n: int, size: int, count: int) -> np.ndarray:
    """``count`` random ordered subsets of ``range(n)`` of ``size`` each, as rows."""
    keys = rng.random((count, n))
    pick = np.argpartition(keys, size, axis=1)[:, :size]
    return np.take_along_axis(pick, np.argsort(np.take_along_axis(keys, pick, 1), 1), 1)


Stream = Callable[[np.random.Generator, int], np.ndarray]


def embedding_streams(constant: float | None, shift: float) -> tuple[Stream, Stream]:
    """Contract-example streams of 3-d float32 embeddings: standard normal (every entry
    ``constant`` when given), and the same shifted by ``shift`` in every dimension."""

    def stream(rng: np.random.Generator, n: int) -> np.ndarray:
        if constant is not None:
            return np.full((n, 3), constant, dtype=np.float32)
        return rng.normal(size=(n, 3)).astype(np.float32)

    def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
        return stream(rng, n) + shift

    return stream, shifted
