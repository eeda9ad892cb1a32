"""Shared statistics for rate comparisons: confidence intervals, tests, multiple testing.

Pure functions on counts, no state. ``alternative`` always speaks about the first
group: ``"greater"`` tests whether ``x1/n1`` is above ``x2/n2``.

References
----------
- Wilson, E. B. (1927). Probable inference, the law of succession, and statistical
  inference. JASA 22(158), 209-212.
- Newcombe, R. G. (1998). Interval estimation for the difference between independent
  proportions: comparison of eleven methods. Statistics in Medicine 17, 873-890
  (method 10, the hybrid score interval, is :func:`newcombe_interval`).
- Fisher, R. A. (1935). The logic of inductive inference. JRSS 98(1), 39-82.
- Cochran, W. G. (1954). Some methods for strengthening the common chi-squared
  tests. Biometrics 10(4), 417-451 (the "expected count below 5" rule).
- Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. JRSS B
  57(1), 289-300.

>>> round(two_proportion_ztest(45, 100, 30, 100).p_value, 4)
0.0285
>>> ci = wilson_interval(81, 263)
>>> round(ci.low, 4), round(ci.high, 4)
(0.2553, 0.3662)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from genmon.detectors._base import Interval
from genmon.detectors.exceptions import InputError, InvalidParameterError

Alternative = Literal["two-sided", "greater", "less"]
ALTERNATIVES: tuple[str, ...] = ("two-sided", "greater", "less")

#: Cochran's rule: below this expected cell count the normal approximation is unreliable.
DEFAULT_FISHER_BELOW = 5.0


@dataclass(frozen=True, slots=True)
class ProportionTest:
    """Outcome of comparing two proportions: which test ran, its statistic and p-value."""

    test: str
    statistic: float
    p_value: float


@functools.lru_cache(maxsize=64)
def z_quantile(confidence: float) -> float:
    """The two-sided standard-normal critical value for ``confidence`` (0.95 -> 1.96)."""
    if not 0.0 < confidence < 1.0:
        raise InvalidParameterError(f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def _check_counts(successes: int, total: int) -> None:
    if total < 0 or successes < 0 or successes > total:
        raise InputError(f"counts {successes}/{total} are impossible; need 0 <= successes <= total")


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (no continuity correction).

    With no observations the interval is the whole of ``[0, 1]``.
    """
    _check_counts(successes, total)
    if total == 0:
        return Interval(0.0, 1.0)
    z = z_quantile(confidence)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # Clamp: the exact bounds at 0 and 1 can round a hair outside [0, 1].
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> Interval:
    """Newcombe's hybrid score interval for ``x1/n1 - x2/n2`` (Newcombe 1998, method 10)."""
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    ci1 = wilson_interval(x1, n1, confidence)
    ci2 = wilson_interval(x2, n2, confidence)
    diff = p1 - p2
    low = diff - math.sqrt((p1 - ci1.low) ** 2 + (ci2.high - p2) ** 2)
    high = diff + math.sqrt((ci1.high - p1) ** 2 + (p2 - ci2.low) ** 2)
    return Interval(max(-1.0, low), min(1.0, high))


def _normal_p(z: float, alternative: str) -> float:
    if alternative == "greater":
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    if alternative == "less":
        return 0.5 * math.erfc(-z / math.sqrt(2.0))
    return math.erfc(abs(z) / math.sqrt(2.0))


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise InvalidParameterError(f"alternative={alternative!r} is not one of {ALTERNATIVES}")


def two_proportion_ztest(
    x1: int,
    n1: int,
    x2: int,
    n2: int,
    alternative: Alternative = "two-sided",
    continuity: bool = False,
) -> ProportionTest:
    """Pooled two-proportion z-test of ``x1/n1`` against ``x2/n2``.

    ``continuity`` applies Yates' correction (the difference shrinks towards 0 by
    ``(1/n1 + 1/n2) / 2``; its square is Yates' chi-square). The normal approximation's
    upper tail is too light for skewed binomials (rates near 0 or 1); the correction
    keeps the one-sided false-alarm rate at or below the nominal level.
    A degenerate table (an empty group, or a pooled rate of 0 or 1) has no evidence
    of a difference: z = 0, p = 1.
    """
    _check_alternative(alternative)
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    if n1 == 0 or n2 == 0:
        return ProportionTest("two-proportion-z", 0.0, 1.0)
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0.0:
        return ProportionTest("two-proportion-z", 0.0, 1.0)
    diff = x1 / n1 - x2 / n2
    if continuity:
        diff = math.copysign(max(0.0, abs(diff) - (1 / n1 + 1 / n2) / 2), diff)
    z = diff / se
    return ProportionTest("two-proportion-z", z, _normal_p(z, alternative))


def fisher_exact_test(
    x1: int, n1: int, x2: int, n2: int, alternative: Alternative = "two-sided"
) -> ProportionTest:
    """Fisher's exact test on the 2x2 table ``[[x1, n1-x1], [x2, n2-x2]]``.

    The statistic is the sample odds ratio (``inf``/``nan`` when a cell is empty).
    """
    _check_alternative(alternative)
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    if n1 == 0 or n2 == 0:
        return ProportionTest("fisher-exact", math.nan, 1.0)
    result = stats.fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative=alternative)
    return ProportionTest("fisher-exact", float(result.statistic), float(result.pvalue))


def min_expected_count(x1: int, n1: int, x2: int, n2: int) -> float:
    """Smallest expected cell of the 2x2 table under independence (row * column / total)."""
    total = n1 + n2
    if total == 0:
        return 0.0
    successes = x1 + x2
    failures = total - successes
    return min(n * c for n in (n1, n2) for c in (successes, failures)) / total


def compare_proportions(
    x1: int,
    n1: int,
    x2: int,
    n2: int,
    alternative: Alternative = "two-sided",
    fisher_below: float = DEFAULT_FISHER_BELOW,
    continuity: bool = True,
) -> ProportionTest:
    """The z-test, or Fisher's exact test when any expected cell is below ``fisher_below``."""
    if min_expected_count(x1, n1, x2, n2) < fisher_below:
        return fisher_exact_test(x1, n1, x2, n2, alternative)
    return two_proportion_ztest(x1, n1, x2, n2, alternative, continuity)


def benjamini_hochberg(p_values: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order.

    Rejecting every hypothesis with ``q <= alpha`` controls the false discovery rate at
    ``alpha`` for independent (or positively dependent) tests.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return p
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise InputError("p-values must lie in [0, 1] and not be NaN")
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    # Step-up: each q is the smallest scaled p at or above its rank.
    monotone = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty_like(p)
    q[order] = np.minimum(monotone, 1.0)
    return q
