"""Two-sample Kolmogorov-Smirnov drift test on a numeric signal."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import ContractExample, register
from genmon.detectors.drift._windowed import WindowedDrift, numeric_example


@register
class KSDrift(WindowedDrift):
    """Kolmogorov-Smirnov test of the last ``window_size`` values against a reference.

    ``score`` is ``-log10(p)`` against ``threshold = -log10(alpha)``; ``effect_size`` is
    the KS statistic (largest gap between the two empirical CDFs, in [0, 1]). Nothing
    fires before ``min_samples`` values are in the window. Sensitive to any change of
    distribution, most of all near the median.

    >>> rng = np.random.default_rng(0)
    >>> d = KSDrift(rng.normal(size=500), window_size=200, min_samples=50)
    >>> d.update(rng.normal(size=200)).detected
    False
    >>> d.update(rng.normal(1.0, 1.0, size=200)).detected
    True

    References
    ----------
    - Massey, F. J. (1951). The Kolmogorov-Smirnov test for goodness of fit. JASA 46, 68-78.
    """

    name = "ks_drift"

    def __init__(
        self, reference: Any, window_size: int = 500, min_samples: int = 30, alpha: float = 0.01
    ) -> None:
        self._set_alpha(alpha)
        self._init_window(reference, window_size, min_samples)

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        result = stats.ks_2samp(self.reference, window)
        return self._p_value_result(result.pvalue, result.statistic, "ks_2samp")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return numeric_example(cls, constant, window_size=40, min_samples=20, alpha=0.001)
