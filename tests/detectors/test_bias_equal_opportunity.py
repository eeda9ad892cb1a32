"""EqualOpportunityDetector: TPR (and FPR, equalized odds) gaps across segments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genmon.detectors import (
    ConfusionCounts,
    EqualOpportunityDetector,
    InputError,
    LabeledObservations,
    load_state,
)


def labelled(
    rng: np.random.Generator, n: int, tpr: dict[str, float], fpr: dict[str, float]
) -> LabeledObservations:
    segments = np.array(sorted(tpr))
    labels = rng.choice(segments, n)
    actual = (rng.random(n) < 0.5).astype(int)
    p_positive = np.where(
        actual == 1,
        np.vectorize(tpr.__getitem__)(labels),
        np.vectorize(fpr.__getitem__)(labels),
    )
    predicted = (rng.random(n) < p_positive).astype(int)
    return LabeledObservations(labels.tolist(), predicted, actual)


def test_raw_observations_become_confusion_counts() -> None:
    obs = LabeledObservations(
        ["a", "a", "a", "a", "b", "b"], predicted=[1, 0, 1, 0, 1, 1], actual=[1, 1, 0, 0, 1, 0]
    )
    assert obs.to_confusion() == [
        ConfusionCounts("a", tp=1, fn=1, fp=1, tn=1),
        ConfusionCounts("b", tp=1, fn=0, fp=1, tn=0),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_tpr_drop_in_one_segment_is_detected_within_two_windows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    detector = EqualOpportunityDetector(n_windows=5)
    fpr = dict.fromkeys("abcd", 0.1)
    change_at = 10
    for t in range(25):
        tpr = dict.fromkeys("abcd", 0.9)
        if t >= change_at:
            tpr["c"] = 0.6
        result = detector.update(labelled(rng, 1600, tpr, fpr))
        if t < change_at:
            assert not result.detected, f"false alarm at window {t}"
        elif result.detected:
            break
    assert result.detected and t - change_at <= 1
    assert [s.segment for s in result.evidence.segments if s.flagged] == ["tpr:c"]
    flagged = result.evidence.segments[[s.segment for s in result.evidence.segments].index("tpr:c")]
    assert flagged.rate < flagged.baseline_rate


def test_fpr_gap_needs_equalized_odds() -> None:
    rng = np.random.default_rng(11)
    tpr = dict.fromkeys("abc", 0.85)
    fpr = {"a": 0.3, "b": 0.3, "c": 0.05}
    batch = labelled(rng, 6000, tpr, fpr)
    opportunity = EqualOpportunityDetector().update(batch)
    odds = EqualOpportunityDetector(equalized_odds=True).update(batch)
    assert not opportunity.detected
    assert {s.segment[:4] for s in opportunity.evidence.segments} == {"tpr:"}
    assert odds.detected and odds.evidence.segment == "fpr:c"
    assert len(odds.evidence.segments) == 6  # one BH family over both rates


def test_equal_rates_false_alarm_rate_at_or_below_alpha() -> None:
    alpha = 0.05
    detector = EqualOpportunityDetector(alpha=alpha, equalized_odds=True, n_windows=1)
    tpr, fpr = dict.fromkeys("abcd", 0.8), dict.fromkeys("abcd", 0.1)
    n_trials = 200
    alarms = sum(
        detector.update(labelled(np.random.default_rng(seed), 4000, tpr, fpr)).detected
        for seed in range(n_trials)
    )
    assert alarms / n_trials <= alpha


def test_min_samples_counts_only_the_conditioning_class() -> None:
    # 200 requests but only 20 actual positives: the TPR test is skipped.
    batch = [
        ConfusionCounts("small", tp=0, fn=20, fp=0, tn=180),
        ConfusionCounts("big", tp=900, fn=100, fp=50, tn=950),
    ]
    result = EqualOpportunityDetector(min_samples=50).update(batch)
    assert not result.detected
    assert "tpr:small (n=20" in result.evidence.notes[0]


def test_state_round_trip_and_input_errors() -> None:
    rng = np.random.default_rng(2)
    tpr, fpr = {"a": 0.9, "b": 0.7}, {"a": 0.1, "b": 0.1}
    batches = [labelled(rng, 800, tpr, fpr) for _ in range(4)]
    detector = EqualOpportunityDetector(equalized_odds=True, n_windows=3)
    detector.update(batches[0])
    clone = load_state(json.loads(json.dumps(detector.state_dict())))
    for batch in batches[1:]:
        assert clone.update(batch) == detector.update(batch)
    with pytest.raises(InputError, match="confusion counts must be >= 0"):
        ConfusionCounts("a", -1, 0, 0, 0)
    with pytest.raises(InputError, match="LabeledObservations"):
        detector.update("a,b,c")
    with pytest.raises(InputError, match="0/1"):
        detector.update(LabeledObservations(["a"], [2], [1]))
