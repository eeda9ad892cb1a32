"""Wasserstein (earth mover's) distance drift on a numeric signal."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import ContractExample, Evidence, check_param, register
from genmon.detectors.drift._windowed import WindowedDrift, numeric_example


@register
class WassersteinDrift(WindowedDrift):
    """Wasserstein-1 distance between the window and the reference, in reference std units.

    A distance, not a test: it fires when the scaled distance exceeds ``threshold``.
    In std units a pure mean shift of ``delta`` standard deviations scores ``delta``,
    which makes the threshold easy to choose; sampling noise alone scores about
    ``1 / sqrt(min(window, reference))``. ``effect_size`` equals ``score``.

    >>> rng = np.random.default_rng(0)
    >>> d = WassersteinDrift(rng.normal(size=500), window_size=200, threshold=0.25)
    >>> d.update(rng.normal(size=200)).detected
    False
    >>> d.update(rng.normal(0.5, 1.0, size=200)).detected
    True

    References
    ----------
    - Ramdas, A., García Trillos, N., Cuturi, M. (2017). On Wasserstein two-sample
      testing and related families of nonparametric tests. Entropy 19(2), 47.
    """

    name = "wasserstein_drift"

    def __init__(
        self,
        reference: Any,
        window_size: int = 500,
        min_samples: int = 30,
        threshold: float = 0.2,
    ) -> None:
        self.threshold = float(threshold)
        check_param("threshold", self.threshold, low=0.0, low_open=True)
        self._init_window(reference, window_size, min_samples)

    def _prepare(self) -> None:
        std = float(np.std(self.reference))
        self._scale = std if std > 0 else 1.0  # a constant reference: distances in raw units

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        distance = stats.wasserstein_distance(self.reference, window) / self._scale
        evidence = Evidence(test="wasserstein", values=(("scale", self._scale),))
        return self._distance_result(distance, evidence)

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return numeric_example(cls, constant, window_size=40, min_samples=20, threshold=0.8)
