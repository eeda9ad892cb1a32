"""Shared statistics (genmon.detectors._stats) against published values and scipy."""

from __future__ import annotations

import doctest
import importlib
import math
from itertools import product

import numpy as np
import pytest
from scipy import stats

from genmon.detectors import InputError, InvalidParameterError
from genmon.detectors._stats import (
    benjamini_hochberg,
    compare_proportions,
    fisher_exact_test,
    min_expected_count,
    newcombe_interval,
    two_proportion_ztest,
    wilson_interval,
    z_quantile,
)


# Newcombe (1998a), Stat Med 17:857-872, Table I, method 3 (Wilson score, no correction).
@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_1998_table(x: int, n: int, low: float, high: float) -> None:
    ci = wilson_interval(x, n)
    assert (round(ci.low, 4), round(ci.high, 4)) == (low, high)


def test_wilson_bounds_invert_the_score_test() -> None:
    z = z_quantile(0.95)
    for x, n in [(3, 10), (17, 40), (99, 100), (1, 7)]:
        ci = wilson_interval(x, n)
        p = x / n
        for bound in (ci.low, ci.high):
            if 0.0 < bound < 1.0:
                score = abs(p - bound) / math.sqrt(bound * (1 - bound) / n)
                assert score == pytest.approx(z, rel=1e-9)


def test_wilson_without_data_is_the_unit_interval() -> None:
    ci = wilson_interval(0, 0)
    assert (ci.low, ci.high) == (0.0, 1.0)


# Newcombe (1998b), Stat Med 17:873-890, Table II, method 10.
@pytest.mark.parametrize(
    ("counts", "low", "high"),
    [
        ((56, 70, 48, 80), 0.0524, 0.3339),
        ((9, 10, 3, 10), 0.1705, 0.8090),
        ((5, 56, 0, 29), -0.0381, 0.1926),
        ((0, 10, 0, 20), -0.1611, 0.2775),
        ((10, 10, 0, 20), 0.6791, 1.0),
    ],
)
def test_newcombe_matches_published_table(
    counts: tuple[int, int, int, int], low: float, high: float
) -> None:
    ci = newcombe_interval(*counts)
    assert (round(ci.low, 4), round(ci.high, 4)) == (low, high)


def test_ztest_matches_hand_computation() -> None:
    # pooled p = 0.375, se = sqrt(0.375 * 0.625 * (1/100 + 1/100))
    z = 0.15 / math.sqrt(0.375 * 0.625 * 0.02)
    result = two_proportion_ztest(45, 100, 30, 100)
    assert result.statistic == pytest.approx(z, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-12)
    assert result.p_value == pytest.approx(0.02846, abs=1e-5)
    assert two_proportion_ztest(45, 100, 30, 100, "greater").p_value == pytest.approx(
        result.p_value / 2
    )
    assert two_proportion_ztest(45, 100, 30, 100, "less").p_value == pytest.approx(
        1 - result.p_value / 2
    )


def test_ztest_squared_equals_uncorrected_chi_square_of_scipy() -> None:
    for x1, n1, x2, n2 in [(45, 100, 30, 100), (7, 50, 19, 60), (300, 1000, 270, 900)]:
        table = [[x1, n1 - x1], [x2, n2 - x2]]
        chi2 = stats.chi2_contingency(table, correction=False)
        result = two_proportion_ztest(x1, n1, x2, n2)
        assert result.statistic**2 == pytest.approx(chi2.statistic, rel=1e-9)
        assert result.p_value == pytest.approx(chi2.pvalue, rel=1e-9)


def test_continuity_corrected_ztest_squared_equals_yates_chi_square_of_scipy() -> None:
    for x1, n1, x2, n2 in [(45, 100, 30, 100), (7, 50, 19, 60), (300, 1000, 270, 900)]:
        yates = stats.chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=True)
        result = two_proportion_ztest(x1, n1, x2, n2, continuity=True)
        assert result.statistic**2 == pytest.approx(yates.statistic, rel=1e-9)
        assert result.p_value == pytest.approx(yates.pvalue, rel=1e-9)
    assert compare_proportions(45, 100, 30, 100).p_value == pytest.approx(
        two_proportion_ztest(45, 100, 30, 100, continuity=True).p_value
    )


def test_ztest_degenerate_tables_have_no_evidence() -> None:
    assert two_proportion_ztest(0, 10, 0, 20).p_value == 1.0
    assert two_proportion_ztest(5, 5, 0, 0).p_value == 1.0


def test_fisher_matches_hand_hypergeometric_and_scipy() -> None:
    # Lady tasting tea: [[3, 1], [1, 3]]; P(X >= 3) = (16 + 1) / 70.
    assert fisher_exact_test(3, 4, 1, 4, "greater").p_value == pytest.approx(17 / 70)
    assert fisher_exact_test(3, 4, 1, 4).p_value == pytest.approx(34 / 70)
    for (x1, x2), alternative in product([(0, 3), (2, 9), (5, 1)], ("two-sided", "less")):
        ref = stats.fisher_exact([[x1, 12 - x1], [x2, 15 - x2]], alternative=alternative)
        assert fisher_exact_test(x1, 12, x2, 15, alternative).p_value == pytest.approx(ref.pvalue)


def test_min_expected_count_and_test_choice() -> None:
    # row totals 20/80, column totals 10/90, N = 100: smallest expected = 20 * 10 / 100
    assert min_expected_count(4, 20, 6, 80) == pytest.approx(2.0)
    assert compare_proportions(4, 20, 6, 80).test == "fisher-exact"
    assert compare_proportions(40, 200, 60, 800).test == "two-proportion-z"
    assert compare_proportions(40, 200, 60, 800, fisher_below=100).test == "fisher-exact"


def test_benjamini_hochberg_against_hand_values_and_scipy() -> None:
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    # Benjamini & Hochberg (1995), section 4: 15 p-values, 4 rejected at 0.05.
    p = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459]
    p += [0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.000]
    q = benjamini_hochberg(p)
    assert int((q <= 0.05).sum()) == 4
    np.testing.assert_allclose(q, stats.false_discovery_control(p, method="bh"))
    assert benjamini_hochberg([]).size == 0


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(InputError, match="0 <= successes <= total"):
        wilson_interval(5, 3)
    with pytest.raises(InputError, match="p-values"):
        benjamini_hochberg([0.5, 1.5])
    with pytest.raises(InvalidParameterError, match="alternative"):
        two_proportion_ztest(1, 2, 1, 2, "bigger")
    with pytest.raises(InvalidParameterError, match="confidence"):
        z_quantile(1.0)


@pytest.mark.parametrize(
    "module",
    [
        "genmon.detectors._stats",
        "genmon.detectors.bias.segment_rate",
        "genmon.detectors.bias.equal_opportunity",
        "genmon.detectors.bias.ab_rate",
        "genmon.detectors.bias.ab_latency",
        "genmon.detectors.error_analysis",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0
    assert result.failed == 0
