"""Population Stability Index drift on a numeric or categorical signal."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, Evidence, check_param, register
from genmon.detectors.drift._windowed import WindowedDrift, numeric_example, read_categories


@register
class PSIDrift(WindowedDrift):
    """Population Stability Index between the window and the reference.

    ``PSI = sum((c - r) * ln(c / r))`` over bins, where ``r`` and ``c`` are the
    reference and window shares. Numeric signals use ``n_bins`` reference quantile
    bins; with ``categorical=True`` each reference category is a bin plus one for
    unseen categories. Shares are floored at ``epsilon`` so empty bins stay finite.
    Rule of thumb: below 0.1 stable, 0.1-0.25 moderate, above 0.25 a major shift.
    Sampling noise alone gives about ``(bins - 1) * (1/window + 1/reference)``, so
    small windows with many bins need a higher threshold.
    ``evidence.values`` holds the largest single-bin contribution.

    >>> rng = np.random.default_rng(0)
    >>> d = PSIDrift(rng.normal(size=1000), window_size=500, threshold=0.2)
    >>> d.update(rng.normal(size=500)).detected
    False
    >>> d.update(rng.normal(1.0, 1.0, size=500)).detected
    True
    >>> c = PSIDrift(["a"] * 50 + ["b"] * 50, categorical=True, window_size=100)
    >>> round(c.update(["a"] * 90 + ["b"] * 10).score, 3)
    0.879

    References
    ----------
    - Yurdakul, B. (2018). Statistical properties of population stability index.
      PhD dissertation, Western Michigan University.
    """

    name = "psi_drift"

    def __init__(
        self,
        reference: Any,
        window_size: int = 500,
        min_samples: int = 30,
        threshold: float = 0.2,
        n_bins: int = 10,
        categorical: bool = False,
        epsilon: float = 1e-4,
    ) -> None:
        self.threshold = float(threshold)
        check_param("threshold", self.threshold, low=0.0, low_open=True)
        self.n_bins = int(n_bins)
        check_param("n_bins", self.n_bins, low=2)
        self.categorical = bool(categorical)
        self.epsilon = float(epsilon)
        check_param("epsilon", self.epsilon, low=0.0, high=0.1, low_open=True)
        self._init_window(reference, window_size, min_samples)

    def _read(self, values: Any, what: str) -> np.ndarray:
        if self.categorical:
            return read_categories(values, what)
        return super()._read(values, what)

    def _prepare(self) -> None:
        if self.categorical:
            self._categories = np.array(sorted(set(self.reference.tolist())), dtype=object)
        else:
            inner = np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]
            self._edges = np.unique(np.quantile(self.reference, inner))
        self._ref_share = self._shares(self.reference)

    def _shares(self, values: np.ndarray) -> np.ndarray:
        if self.categorical:
            lookup = {c: i for i, c in enumerate(self._categories.tolist())}
            other = len(lookup)
            bins = np.fromiter((lookup.get(v, other) for v in values.tolist()), dtype=np.intp)
            counts = np.bincount(bins, minlength=other + 1)
        else:
            bins = np.searchsorted(self._edges, values, side="right")
            counts = np.bincount(bins, minlength=len(self._edges) + 1)
        return np.maximum(counts / len(values), self.epsilon)

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        current = self._shares(window)
        terms = (current - self._ref_share) * np.log(current / self._ref_share)
        psi = float(terms.sum())
        return self._distance_result(
            psi, Evidence(test="psi", values=(("largest_bin_term", float(terms.max())),))
        )

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return numeric_example(cls, constant, window_size=100, min_samples=50, n_bins=5)
