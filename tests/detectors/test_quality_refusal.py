"""Refusal markers and the refusal-rate detector."""

from __future__ import annotations

import numpy as np
import pytest

from genmon.detectors import InputError, RefusalRateDetector
from genmon.detectors.quality import is_refusal

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I’m sorry, I cannot provide instructions for that.",  # curly apostrophe
    "As an AI language model, I don't have opinions.",
    "No, I won't do that.",
    "**I cannot** assist with this request.",
    "Unfortunately, I am unable to share that information.",
]
ANSWERS = [
    "Sure! To kill a Python process, run `kill <pid>` or use `pkill -f name`.",
    "Here is a recipe. I cannot stress enough how important fresh basil is.",
    "The capital of France is Paris.",
    # An apology that opens a helpful answer: "^sorry" used to flag it; the merged list
    # only counts "Sorry, but ..." / "Sorry, I can't ..." as refusals.
    "Sorry for the confusion earlier" + "; " * 200 + "I apologize",
    "Nobody knows the exact number, but estimates range from 3 to 5 million.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_recognised(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_helpful_answers_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_refusal_rate_change_point_is_found_within_one_window() -> None:
    rng = np.random.default_rng(0)

    def window(rate: float, n: int) -> list[str]:
        return [REFUSALS[0] if u < rate else ANSWERS[2] for u in rng.random(n)]

    detector = RefusalRateDetector(reference_size=500, window_size=100, min_samples=30)
    before = [detector.update(window(0.05, 25)).detected for _ in range(40)]
    assert not any(before)
    # A new model version refuses 25% of the same traffic from here on.
    after = [detector.update(window(0.25, 25)) for _ in range(8)]
    first = next(i for i, r in enumerate(after) if r.detected)
    assert first <= 2  # within 75 items of the change
    assert after[first].p_value is not None and after[first].p_value <= 0.01
    assert after[-1].evidence.value("reference_rate") == pytest.approx(0.05, abs=0.03)


def test_stationary_rate_false_alarms_are_bounded_by_alpha() -> None:
    rng = np.random.default_rng(1)
    detector = RefusalRateDetector(baseline_rate=0.1, window_size=100, min_samples=100, alpha=0.01)
    # Non-overlapping windows: feed exactly one window per update.
    fired = sum(detector.update((rng.random(100) < 0.1).tolist()).detected for _ in range(500))
    assert fired <= 12  # the exact binomial test is conservative: <= 1% of 500 = 5 expected


def test_flags_and_texts_and_decrease_direction() -> None:
    detector = RefusalRateDetector(baseline_rate=0.5, min_samples=10, alternative="less")
    result = detector.update([True] * 1 + [False] * 19)
    assert result.detected and result.effect_size == pytest.approx(-0.45)
    with pytest.raises(InputError, match="0 or 1"):
        detector.update([2])
    with pytest.raises(InputError, match="texts"):
        detector.update([{"response": "x"}])


def test_constant_stream_never_alarms() -> None:
    detector = RefusalRateDetector(reference_size=50, min_samples=10)
    for _ in range(20):
        assert not detector.update([REFUSALS[1]] * 30).detected
