"""ABRateDetector: canary / A/B non-inferiority on a rate with a Newcombe interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genmon.detectors import (
    ABRateDetector,
    InvalidParameterError,
    SegmentCounts,
    SegmentObservations,
    load_state,
)
from genmon.detectors._stats import compare_proportions, newcombe_interval


def versions(rng: np.random.Generator, n: int, v1: float, v2: float) -> list[SegmentCounts]:
    return [
        SegmentCounts("v1", int(rng.binomial(n, v1)), n),
        SegmentCounts("v2", int(rng.binomial(n, v2)), n),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_worse_candidate_is_detected_and_named(seed: int) -> None:
    rng = np.random.default_rng(seed)
    detector = ABRateDetector(baseline="v1", candidate="v2", signal="error", margin=0.01)
    results = [detector.update(versions(rng, 500, 0.02, 0.06)) for _ in range(3)]
    first = next(i for i, r in enumerate(results) if r.detected)
    assert first <= 2
    result = results[first]
    assert result.evidence.segment == "v2"
    assert result.effect_size == pytest.approx(result.evidence.value("difference"))
    assert 0.02 < result.effect_size < 0.07
    assert result.evidence.value("difference_ci_low") > 0.01
    assert any("v2 is worse on 'error'" in note for note in result.evidence.notes)


def test_equal_candidate_false_alarm_rate_at_or_below_alpha() -> None:
    alpha, n_trials = 0.05, 600
    batches = [versions(np.random.default_rng(seed), 2000, 0.1, 0.1) for seed in range(n_trials)]

    def alarm_rate(margin: float) -> float:
        return (
            sum(
                ABRateDetector(baseline="v1", candidate="v2", alpha=alpha, margin=margin)
                .update(batch)
                .detected
                for batch in batches
            )
            / n_trials
        )

    # margin 0 is a one-sided level-alpha test: its false-alarm rate is alpha itself, so
    # the seeded estimate gets two binomial standard errors.
    assert alarm_rate(0.0) <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / n_trials)
    # A non-inferiority margin leaves room for noise: far fewer false alarms.
    assert alarm_rate(0.01) <= alpha / 5


def test_margin_tolerates_small_regressions() -> None:
    batch = [SegmentCounts("v1", 10_000, 100_000), SegmentCounts("v2", 11_000, 100_000)]
    strict = ABRateDetector(baseline="v1", candidate="v2", margin=0.0).update(batch)
    tolerant = ABRateDetector(baseline="v1", candidate="v2", margin=0.02).update(batch)
    assert strict.detected and not tolerant.detected
    assert tolerant.evidence.segment == "v2"  # still says which one is worse
    assert tolerant.score == strict.score and tolerant.threshold == 0.02


def test_favourable_rate_worse_when_lower() -> None:
    batch = [SegmentCounts("v1", 700, 1000), SegmentCounts("v2", 600, 1000)]
    thumbs_up = ABRateDetector(
        baseline="v1", candidate="v2", signal="positive_feedback", higher_is_worse=False
    ).update(batch)
    assert thumbs_up.detected and thumbs_up.effect_size == pytest.approx(0.1)
    errors = ABRateDetector(baseline="v1", candidate="v2").update(batch)
    assert not errors.detected and errors.evidence.segment == "v1"


def test_evidence_matches_reference_statistics() -> None:
    result = ABRateDetector(baseline="v1", candidate="v2", alpha=0.05).update(
        [SegmentCounts("v1", 48, 800), SegmentCounts("v2", 70, 700)]
    )
    ci = newcombe_interval(70, 700, 48, 800, confidence=0.9)
    assert result.evidence.value("difference_ci_low") == pytest.approx(ci.low)
    assert result.evidence.value("difference_ci_high") == pytest.approx(ci.high)
    assert result.p_value == pytest.approx(compare_proportions(70, 700, 48, 800, "greater").p_value)
    (candidate,) = result.evidence.segments
    assert (candidate.segment, candidate.n, candidate.baseline_n) == ("v2", 700, 800)
    assert candidate.ratio == pytest.approx((70 / 700) / (48 / 800))
    json.dumps(result.to_dict())


def test_min_samples_other_versions_and_raw_events() -> None:
    detector = ABRateDetector(baseline="v1", candidate="v2", min_samples=100)
    early = detector.update([SegmentCounts("v1", 0, 50), SegmentCounts("v2", 50, 50)])
    assert not early.detected
    assert any("waiting for min_samples=100" in note for note in early.evidence.notes)
    labels = ["v1"] * 60 + ["v2"] * 60 + ["v3"] * 10
    outcomes = [0] * 60 + [1] * 60 + [1] * 10
    result = detector.update(SegmentObservations(labels, outcomes))
    assert result.detected and result.n_seen == 220
    assert "ignored versions: v3" in result.evidence.notes


def test_state_round_trip_and_parameter_errors() -> None:
    rng = np.random.default_rng(4)
    detector = ABRateDetector(baseline="v1", candidate="v2", n_windows=3)
    detector.update(versions(rng, 300, 0.1, 0.12))
    clone = load_state(json.dumps(detector.state_dict()))
    for _ in range(4):
        batch = versions(rng, 300, 0.1, 0.12)
        assert clone.update(batch) == detector.update(batch)
    with pytest.raises(InvalidParameterError, match="two different version names"):
        ABRateDetector(baseline="v1", candidate="v1")
    with pytest.raises(InvalidParameterError, match="alpha"):
        ABRateDetector(baseline="v1", candidate="v2", alpha=0.5)
    with pytest.raises(InvalidParameterError, match="margin"):
        ABRateDetector(baseline="v1", candidate="v2", margin=-0.1)
