"""Two-sample Cramér-von Mises drift test on a numeric signal."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import ContractExample, register
from genmon.detectors.drift._windowed import WindowedDrift, numeric_example


@register
class CramerVonMisesDrift(WindowedDrift):
    """Cramér-von Mises test of the last ``window_size`` values against a reference.

    Integrates the squared gap between the empirical CDFs, so it weighs the whole
    distribution (tails included) where KS looks at the single largest gap.
    ``score`` is ``-log10(p)`` against ``-log10(alpha)``; ``effect_size`` is the
    statistic T.

    >>> rng = np.random.default_rng(0)
    >>> d = CramerVonMisesDrift(rng.normal(size=300), window_size=100, min_samples=50)
    >>> d.update(rng.normal(size=100)).detected
    False
    >>> d.update(rng.normal(0.0, 3.0, size=100)).detected
    True

    References
    ----------
    - Anderson, T. W. (1962). On the distribution of the two-sample Cramér-von Mises
      criterion. Annals of Mathematical Statistics 33(3), 1148-1159.
    """

    name = "cvm_drift"

    def __init__(
        self, reference: Any, window_size: int = 500, min_samples: int = 30, alpha: float = 0.01
    ) -> None:
        self._set_alpha(alpha)
        self._init_window(reference, window_size, min_samples)

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        if np.ptp(self.reference) == 0 and np.ptp(window) == 0 and window[0] == self.reference[0]:
            # scipy divides by zero on two identical constant samples: no difference at all.
            return self._p_value_result(1.0, 0.0, "cramervonmises_2samp")
        result = stats.cramervonmises_2samp(self.reference, window, method="asymptotic")
        return self._p_value_result(result.pvalue, result.statistic, "cramervonmises_2samp")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return numeric_example(cls, constant, window_size=40, min_samples=20, alpha=0.001)
