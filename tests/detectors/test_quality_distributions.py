"""Length shift, relevance drift and language change: window distributions vs a reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from genmon.detectors import (
    Detector,
    InputError,
    LanguageShiftDetector,
    LengthShiftDetector,
    RelevanceDetector,
)
from genmon.detectors.quality import detect_script, pair_similarity


def _first_detection(detector: Detector, batches: list[Any]) -> int:
    for i, batch in enumerate(batches):
        if detector.update(batch).detected:
            return i
    return -1


def test_length_drop_is_found_within_a_window_and_not_before() -> None:
    rng = np.random.default_rng(0)
    detector = LengthShiftDetector(reference_size=400, window_size=100, min_samples=50)
    stable = [rng.lognormal(np.log(150), 0.5, 25) for _ in range(40)]
    assert _first_detection(detector, stable) == -1
    shorter = [rng.lognormal(np.log(90), 0.5, 25) for _ in range(8)]
    assert 0 <= _first_detection(detector, shorter) <= 3


def test_length_from_texts_and_small_changes_are_ignored() -> None:
    rng = np.random.default_rng(1)
    detector = LengthShiftDetector(reference_size=2000, window_size=2000, min_samples=100)
    detector.update(rng.poisson(100, 2000))
    result = detector.update(rng.poisson(104, 2000))  # significant by KS, but only +4%
    assert result.p_value is not None and result.p_value < 0.01
    assert not result.detected
    texts = LengthShiftDetector(reference_size=2, window_size=2, min_samples=2)
    texts.update(["one two three", "four five"])
    assert texts.update(["a " * 40, "b " * 50]).evidence.value("median") == 45.0
    with pytest.raises(InputError, match="lengths"):
        texts.update([{"x": 1}])


def test_false_alarm_rate_of_length_windows() -> None:
    rng = np.random.default_rng(2)
    detector = LengthShiftDetector(
        reference_size=500, window_size=100, min_samples=100, min_relative_change=0.0
    )
    detector.update(rng.poisson(120, 500))
    fired = sum(detector.update(rng.poisson(120, 100)).detected for _ in range(300))
    assert fired <= 9  # alpha = 1% of 300 windows is 3


def test_relevance_drop_is_detected_from_embedding_pairs() -> None:
    rng = np.random.default_rng(3)
    prompts = rng.normal(size=(1000, 24))
    answers = prompts + rng.normal(scale=0.9, size=(1000, 24))
    detector = RelevanceDetector(reference_size=400, window_size=100, min_samples=50)
    assert (
        _first_detection(
            detector, [(prompts[i : i + 50], answers[i : i + 50]) for i in range(0, 1000, 50)]
        )
        == -1
    )
    # A retrieval bug: answers now follow the wrong prompt (shuffled pairing).
    off = [(prompts[i : i + 50], answers[::-1][i : i + 50]) for i in range(0, 300, 50)]
    assert 0 <= _first_detection(detector, off) <= 2


def test_relevance_rise_is_not_an_alarm_by_default() -> None:
    rng = np.random.default_rng(4)
    detector = RelevanceDetector(reference_size=200, window_size=100, min_samples=50)
    detector.update(np.clip(rng.normal(0.4, 0.1, 200), -1, 1))
    assert not detector.update(np.clip(rng.normal(0.8, 0.1, 100), -1, 1)).detected
    with pytest.raises(InputError, match="cosines"):
        detector.update([1.5])


def test_pair_similarity_shapes() -> None:
    assert pair_similarity([[0.0, 0.0]], [[1.0, 0.0]]).tolist() == [0.0]
    with pytest.raises(InputError, match="same shape"):
        pair_similarity(np.ones((2, 3)), np.ones((3, 3)))


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("How do I transfer money?", "latin"),
        ("¿Cómo transfiero dinero?", "latin"),
        ("Как перевести деньги?", "cyrillic"),
        ("كيف أحول المال؟", "arabic"),
        ("お金を送金するにはどうすればいいですか", "japanese"),
        ("如何转账？", "han"),
        ("송금은 어떻게 하나요?", "korean"),
        ("पैसे कैसे भेजें?", "devanagari"),
        ("😀 123", "none"),
    ],
)
def test_detect_script(text: str, script: str) -> None:
    assert detect_script(text) == script


def test_stream_turning_japanese_is_detected_quickly() -> None:
    rng = np.random.default_rng(5)
    english = ["Where is my card?", "How do I pay my bill?", "Reset my password"]
    detector = LanguageShiftDetector(reference_size=300, window_size=100, min_samples=50)
    stationary = [[english[i] for i in rng.integers(0, 3, 25)] for _ in range(30)]
    assert _first_detection(detector, stationary) == -1
    mixed = [
        ["カードはどこですか" if u < 0.3 else "Where is my card?" for u in rng.random(25)]
        for _ in range(6)
    ]
    assert 0 <= _first_detection(detector, mixed) <= 2
    result = detector.update(mixed[0])
    assert result.evidence.value("share:japanese") > 0.1
    assert result.evidence.value("reference_share:japanese") == 0.0


def test_language_labels_stationary_mix_rarely_alarms() -> None:
    rng = np.random.default_rng(6)
    labels = np.array(["en", "fr", "de"])
    probs = [0.7, 0.2, 0.1]
    detector = LanguageShiftDetector(
        reference_size=1000, window_size=200, min_samples=200, labels=True
    )
    detector.update(labels[rng.choice(3, 1000, p=probs)].tolist())
    fired = sum(
        detector.update(labels[rng.choice(3, 200, p=probs)].tolist()).detected for _ in range(200)
    )
    assert fired <= 6


def test_relevance_false_alarm_rate_on_a_stationary_stream() -> None:
    rng = np.random.default_rng(7)
    detector = RelevanceDetector(reference_size=500, window_size=100, min_samples=100, min_drop=0.0)
    detector.update(np.clip(rng.normal(0.5, 0.15, 500), -1, 1))
    fired = sum(
        detector.update(np.clip(rng.normal(0.5, 0.15, 100), -1, 1)).detected for _ in range(300)
    )
    assert fired <= 9  # one-sided alpha = 1% of 300 windows is 3
