"""Base of the report-style drift tests: a fixed reference against a bounded current window.

Each ``update(batch)`` appends the batch to a window holding the last ``window_size``
observations (older ones fall out, so memory is bounded) and, once ``min_samples``
are in the window, tests the window against the reference. Subclasses say how to read
the reference and batches and what test to run.
"""

from __future__ import annotations

import abc
import inspect
import math
from typing import Any

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    _to_jsonable,
    check_param,
)
from genmon.detectors.drift._common import (
    as_matrix,
    decode_array,
    embedding_streams,
    encode_array,
)
from genmon.detectors.exceptions import InputError, InvalidParameterError

_INVALID = ({"window_size": 1}, {"min_samples": 1}, {"reference": [1.0]})


class WindowedDrift(Detector):
    """Reference-vs-window drift test; subclasses implement ``_prepare`` and ``_test``."""

    kind = DetectorKind.DRIFT
    # Set by the subclasses: a p-value test has ``alpha`` (see _set_alpha), a distance
    # has ``threshold``.
    alpha: float
    threshold: float

    def _init_window(self, reference: Any, window_size: int, min_samples: int) -> None:
        self.window_size = int(window_size)
        check_param("window_size", self.window_size, low=2)
        self.min_samples = int(min_samples)
        check_param("min_samples", self.min_samples, low=2, high=self.window_size)
        try:
            self.reference = self._read(decode_array(reference), "reference")
        except InputError as exc:
            raise InvalidParameterError(str(exc)) from exc
        if len(self.reference) < 2:
            raise InvalidParameterError("reference needs at least 2 observations")
        self._prepare()
        self.reset()

    def _set_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)
        check_param("alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)

    def _read(self, values: Any, what: str) -> np.ndarray:
        """Numeric 1-D observations by default; embedding and categorical tests override."""
        try:
            array = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError) as exc:
            raise InputError(f"{what} must be numbers: {exc}") from exc
        if array.size == 0:
            raise InputError(f"{what} is empty")
        if not np.isfinite(array).all():
            raise InputError(f"{what} contains NaN or infinite values; drop or impute them first")
        return array

    def _prepare(self) -> None:
        """Precompute whatever the test needs from the reference."""

    @abc.abstractmethod
    def _test(self, window: np.ndarray) -> dict[str, Any]:
        """Test ``window`` against the reference; return ``DetectorResult`` fields."""

    def get_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for pname in inspect.signature(type(self).__init__).parameters:
            if pname == "reference":
                ref = self.reference
                params[pname] = encode_array(ref) if ref.dtype.kind == "f" else ref.tolist()
            elif pname != "self":
                params[pname] = _to_jsonable(getattr(self, pname))
        return params

    def _p_value_result(self, p_value: float, statistic: float, test: str) -> dict[str, Any]:
        """Fields for a p-value test: score ``-log10(p)`` against ``-log10(alpha)``."""
        p = max(float(p_value), 1e-300)
        return {
            "score": -math.log10(p),
            "threshold": -math.log10(self.alpha),
            "detected": bool(p < self.alpha),
            "p_value": float(p_value),
            "effect_size": float(statistic),
            "evidence": Evidence(test=test, values=(("statistic", float(statistic)),)),
        }

    def _distance_result(self, distance: float, evidence: Evidence) -> dict[str, Any]:
        """Fields for a distance rather than a test: it fires above ``threshold``."""
        return {
            "score": distance,
            "threshold": self.threshold,
            "detected": bool(distance > self.threshold),
            "effect_size": distance,
            "evidence": evidence,
        }

    def reset(self) -> None:
        self._window = self.reference[:0].copy()
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        values = self._read(batch, f"{type(self).__name__} batch")
        self._n_seen += len(values)
        self._window = np.concatenate([self._window, values])[-self.window_size :]
        if len(self._window) < self.min_samples:
            return self._result(
                score=float("nan"), threshold=float("nan"), detected=False, n_seen=self._n_seen
            )
        return self._result(n_seen=self._n_seen, **self._test(self._window))

    def _get_state(self) -> dict[str, Any]:
        window = self._window
        return {
            "window": encode_array(window) if window.dtype.kind == "f" else window.tolist(),
            "n_seen": self._n_seen,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        window = decode_array(state["window"])
        self._window = window.astype(self.reference.dtype) if window.size else self.reference[:0]
        self._n_seen = int(state["n_seen"])


class EmbeddingDrift(WindowedDrift):
    """A windowed test on embeddings: each batch is an n x d matrix as wide as the reference."""

    def _read(self, values: Any, what: str) -> np.ndarray:
        reference = getattr(self, "reference", None)  # absent while the reference is read
        return as_matrix(values, None if reference is None else reference.shape[1], what)


def numeric_example(cls: Any, constant: float | None, **params: Any) -> ContractExample:
    """A contract example for the numeric window tests (normal reference, +3 sigma shift)."""

    def stream(rng: np.random.Generator, n: int) -> np.ndarray:
        if constant is not None:
            return np.full(n, float(constant))
        return rng.normal(size=n)

    def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.normal(3.0, 1.0, size=n) + (0.0 if constant is None else float(constant))

    reference = stream(np.random.default_rng(1), 200)
    return ContractExample(
        cls(reference, **params), stream, shifted, params["min_samples"], _INVALID
    )


def read_categories(values: Any, what: str) -> np.ndarray:
    """Categorical observations as an object array of strings (one string is one value)."""
    array = np.asarray(values, dtype=object).ravel()
    if array.size == 0:
        raise InputError(f"{what} is empty")
    return np.array([str(v) for v in array.tolist()], dtype=object)


def categorical_example(cls: Any, constant: float | None, **params: Any) -> ContractExample:
    """A contract example for categorical tests: a uniform mix of 4 labels, then one label."""
    labels = np.array(["a", "b", "c", "d"], dtype=object)

    def stream(rng: np.random.Generator, n: int) -> np.ndarray:
        if constant is not None:
            return np.full(n, f"c{constant!r}", dtype=object)
        return labels[rng.integers(0, 4, size=n)]

    def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, "e", dtype=object)

    reference = stream(np.random.default_rng(1), 200)
    return ContractExample(
        cls(reference, **params), stream, shifted, params["min_samples"], _INVALID
    )


def embedding_example(cls: Any, constant: float | None, **params: Any) -> ContractExample:
    """A contract example for embedding tests: 3-d standard normal, then a +2 shift."""
    stream, shifted = embedding_streams(constant, 2.0)
    reference = stream(np.random.default_rng(1), 100)
    return ContractExample(
        cls(reference, **params), stream, shifted, params["min_samples"], _INVALID
    )
