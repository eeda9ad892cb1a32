"""Chi-square drift test on a categorical signal."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import ContractExample, register
from genmon.detectors.drift._windowed import WindowedDrift, categorical_example, read_categories


@register
class ChiSquareDrift(WindowedDrift):
    """Chi-square test of homogeneity: window category counts against the reference's.

    Categories unseen in the reference get their own column. ``score`` is
    ``-log10(p)`` against ``-log10(alpha)``; ``effect_size`` is Cramér's V (0 = same
    mix, 1 = disjoint). Expected counts below 5 make the p-value approximate; keep
    ``min_samples`` well above 5 x the number of categories.

    >>> d = ChiSquareDrift(["ok"] * 80 + ["refusal"] * 20, window_size=100, min_samples=50)
    >>> d.update(["ok"] * 78 + ["refusal"] * 22).detected
    False
    >>> d.update(["ok"] * 50 + ["refusal"] * 50).detected
    True

    References
    ----------
    - Cochran, W. G. (1954). Some methods for strengthening the common chi-squared
      tests. Biometrics 10(4), 417-451.
    - Cramér, H. (1946). Mathematical Methods of Statistics. Princeton, p. 282.
    """

    name = "chi_square_drift"

    def __init__(
        self, reference: Any, window_size: int = 500, min_samples: int = 50, alpha: float = 0.01
    ) -> None:
        self._set_alpha(alpha)
        self._init_window(reference, window_size, min_samples)

    def _read(self, values: Any, what: str) -> np.ndarray:
        return read_categories(values, what)

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        categories, codes = np.unique(np.concatenate([self.reference, window]), return_inverse=True)
        n_ref = len(self.reference)
        table = np.stack(
            [
                np.bincount(codes[:n_ref], minlength=len(categories)),
                np.bincount(codes[n_ref:], minlength=len(categories)),
            ]
        )
        if len(categories) == 1:
            return self._p_value_result(1.0, 0.0, "chi2_contingency")
        result = stats.chi2_contingency(table, correction=False)
        cramers_v = float(np.sqrt(result.statistic / table.sum()))
        return self._p_value_result(result.pvalue, cramers_v, "chi2_contingency")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return categorical_example(cls, constant, window_size=60, min_samples=40, alpha=0.001)
