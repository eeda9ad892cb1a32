"""Reference-vs-window drift tests: change points, false-alarm rates, evidence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from genmon.detectors import (
    ChiSquareDrift,
    CramerVonMisesDrift,
    Detector,
    EmbeddingKSDrift,
    InputError,
    KSDrift,
    MMDDrift,
    PSIDrift,
    WassersteinDrift,
)

LABELS = np.array(["billing", "travel", "cooking", "weather"], dtype=object)


def _numeric(rng: np.random.Generator, n: int, shift: bool) -> np.ndarray:
    return rng.normal(0.8 if shift else 0.0, 1.0, size=n)


def _categorical(rng: np.random.Generator, n: int, shift: bool) -> np.ndarray:
    return LABELS[rng.choice(4, size=n, p=[0.55, 0.15, 0.15, 0.15] if shift else None)]


def _embedding(rng: np.random.Generator, n: int, shift: bool) -> np.ndarray:
    x = rng.normal(size=(n, 8))
    if shift:
        x[:, :2] += 0.8
    return x


# (name, factory(reference, window, alpha), stream generator, whether it is a p-value test)
CASES: list[tuple[str, Callable[[Any, int, float], Detector], Callable[..., Any], bool]] = [
    ("ks", lambda r, w, a: KSDrift(r, window_size=w, alpha=a), _numeric, True),
    ("cvm", lambda r, w, a: CramerVonMisesDrift(r, window_size=w, alpha=a), _numeric, True),
    (
        "wasserstein",
        lambda r, w, a: WassersteinDrift(r, window_size=w, threshold=0.3),
        _numeric,
        False,
    ),
    ("psi", lambda r, w, a: PSIDrift(r, window_size=w, threshold=0.2), _numeric, False),
    (
        "psi_categorical",
        lambda r, w, a: PSIDrift(r, window_size=w, threshold=0.1, categorical=True),
        _categorical,
        False,
    ),
    ("chi_square", lambda r, w, a: ChiSquareDrift(r, window_size=w, alpha=a), _categorical, True),
    ("embedding_ks", lambda r, w, a: EmbeddingKSDrift(r, window_size=w, alpha=a), _embedding, True),
    (
        "mmd",
        # 1 / alpha permutations at least: 0.01 keeps the test fast.
        lambda r, w, a: MMDDrift(r, window_size=w, alpha=max(a, 0.01), n_permutations=100),
        _embedding,
        True,
    ),
]


@pytest.mark.parametrize(("name", "make", "gen", "is_test"), CASES, ids=[c[0] for c in CASES])
def test_known_change_point_detected_within_one_window(name, make, gen, is_test) -> None:
    # Overlapping windows are tested every 50 values: a strict alpha keeps the 20
    # pre-change tests quiet.
    rng = np.random.default_rng(17)
    window, batch, change = 200, 50, 1000
    detector = make(gen(rng, 1000, False), window, 0.001)
    first_alarm = None
    for start in range(0, 2000, batch):
        result = detector.update(gen(rng, batch, start >= change))
        if result.detected and first_alarm is None:
            first_alarm = start + batch
    assert first_alarm is not None, f"{name} never detected the shift"
    assert first_alarm > change, f"{name} false alarm before the change"
    assert first_alarm - change <= window, f"{name} delay {first_alarm - change} > {window}"


@pytest.mark.parametrize(("name", "make", "gen", "is_test"), CASES, ids=[c[0] for c in CASES])
def test_false_alarm_rate_on_stationary_stream(name, make, gen, is_test) -> None:
    # Disjoint windows (batch == window) make the tests independent given the reference.
    rng = np.random.default_rng(23)
    level = 0.05
    window, n_tests = (100, 200) if is_test else (400, 100)
    detector = make(gen(rng, 500, False), window, level)
    alarms = sum(detector.update(gen(rng, window, False)).detected for _ in range(n_tests))
    if not is_test:
        assert alarms <= 2, f"{name}: {alarms} alarms on {n_tests} stationary windows"
    else:
        # Binomial(200, level) upper tail at ~3.5 sd; conditional on one reference the
        # per-test rate varies a little, hence the margin.
        bound = n_tests * level + 3.5 * np.sqrt(n_tests * level * (1 - level))
        assert alarms <= bound, f"{name}: {alarms} alarms, bound {bound:.0f}"


def test_embedding_ks_names_the_drifted_dimensions() -> None:
    rng = np.random.default_rng(3)
    detector = EmbeddingKSDrift(rng.normal(size=(1000, 64)), window_size=400, alpha=0.01)
    window = rng.normal(size=(400, 64))
    window[:, [5, 40]] += 0.5
    result = detector.update(window)
    assert result.detected
    assert result.evidence.dimensions == (5, 40)
    assert result.evidence.value("drifted_dimensions") == 2


def test_chi_square_counts_unseen_categories() -> None:
    detector = ChiSquareDrift(["ok"] * 90 + ["refusal"] * 10, window_size=100, alpha=0.01)
    result = detector.update(["ok"] * 70 + ["error"] * 30)
    assert result.detected and result.effect_size > 0.3


def test_window_is_bounded_and_warmup_respected() -> None:
    detector = KSDrift(np.arange(100.0), window_size=50, min_samples=20)
    result = detector.update(np.full(19, 1000.0))
    assert not result.detected and np.isnan(result.score)
    assert detector.update(np.full(1, 1000.0)).detected
    detector.update(np.arange(500.0))
    assert len(detector.state_dict()["state"]["window"]["b64"]) <= 4 * 50 * 8 / 3 + 4


def test_bad_batches_raise_input_error() -> None:
    with pytest.raises(InputError, match="NaN"):
        KSDrift(np.arange(10.0)).update([1.0, float("nan")])
    with pytest.raises(InputError, match="dimensions"):
        MMDDrift(np.zeros((20, 3)) + np.arange(3)).update(np.zeros((5, 4)))
    with pytest.raises(InputError, match="numbers"):
        WassersteinDrift(np.arange(10.0)).update(["a", "b"])
