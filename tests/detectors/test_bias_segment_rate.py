"""SegmentRateBiasDetector: per-segment rate gaps with z/Fisher tests, BH and effect gates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genmon.detectors import (
    DetectorResult,
    InputError,
    InvalidParameterError,
    SegmentCounts,
    SegmentObservations,
    SegmentRateBiasDetector,
    load_state,
)
from genmon.detectors._stats import benjamini_hochberg

SEGMENTS = ("en", "de", "fr", "es", "it")


def window(rng: np.random.Generator, rates: dict[str, float], n: int) -> list[SegmentCounts]:
    return [SegmentCounts(s, int(rng.binomial(n, r)), n) for s, r in rates.items()]


@pytest.mark.parametrize("seed", range(5))
def test_refusal_jump_in_one_segment_is_detected_within_two_windows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    detector = SegmentRateBiasDetector(signal="refusal", n_windows=6)
    change_at = 15
    for t in range(30):
        rates = {s: 0.05 for s in SEGMENTS}
        if t >= change_at:
            rates["fr"] = 0.15
        result = detector.update(window(rng, rates, 400))
        flagged = [s.segment for s in result.evidence.segments if s.flagged]
        if t < change_at:
            assert not result.detected, f"false alarm at window {t}"
        elif result.detected:
            break
    assert result.detected
    assert t - change_at <= 1
    assert flagged == ["fr"]
    assert result.evidence.segment == "fr"
    assert result.score >= result.threshold


def test_flag_clears_once_the_bad_windows_leave_the_ring() -> None:
    rng = np.random.default_rng(7)
    detector = SegmentRateBiasDetector(n_windows=3)
    for _ in range(4):
        result = detector.update(window(rng, {"a": 0.05, "b": 0.05, "c": 0.3}, 500))
        assert result.evidence.segment == "c"
    for _ in range(3):
        result = detector.update(window(rng, dict.fromkeys("abc", 0.05), 500))
    c = next(s for s in result.evidence.segments if s.segment == "c")
    assert c.n == 1500 and c.rate < 0.1  # only the three clean windows remain
    assert not c.flagged


def test_stationary_streams_false_alarm_rate_at_or_below_alpha() -> None:
    alpha = 0.05
    rates = {f"s{i}": 0.1 for i in range(8)}
    # Without the effect gate the decision is the BH test alone; under "all segments
    # equal" its family-wise error rate is alpha (not less), so the seeded estimate gets
    # two binomial standard errors. One-window rings make the windows independent.
    pure_test = SegmentRateBiasDetector(
        alpha=alpha, n_windows=1, min_difference=0.0, effect_rule="difference"
    )
    n_trials = 600
    alarms = sum(
        pure_test.update(window(np.random.default_rng(seed), rates, 300)).detected
        for seed in range(n_trials)
    )
    assert alarms / n_trials <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / n_trials)
    # With the default effect gate, noise on large segments cannot reach the four-fifths
    # bound: the false-alarm rate is far below alpha.
    gated = SegmentRateBiasDetector(alpha=alpha, n_windows=1)
    alarms = sum(
        gated.update(window(np.random.default_rng(seed), rates, 2000)).detected
        for seed in range(300)
    )
    assert alarms / 300 <= alpha / 5


def test_small_segments_are_skipped_never_flagged_until_they_reach_min_samples() -> None:
    detector = SegmentRateBiasDetector(min_samples=100)
    batch = [
        SegmentCounts("big", 50, 1000),
        SegmentCounts("other", 55, 1000),
        SegmentCounts("tiny", 20, 20),
    ]
    for _ in range(4):
        result = detector.update(batch)
        assert not result.detected
        assert [s.segment for s in result.evidence.segments] == ["big", "other"]
    # The fifth window of 20 requests brings "tiny" to min_samples: tested and flagged.
    result = detector.update(batch)
    assert [s.segment for s in result.evidence.segments if s.flagged] == ["tiny"]


def test_notes_list_skipped_segments() -> None:
    result = SegmentRateBiasDetector(min_samples=100).update(
        [
            SegmentCounts("big", 50, 1000),
            SegmentCounts("other", 55, 1000),
            SegmentCounts("tiny", 20, 20),
        ]
    )
    assert "skipped below min_samples=100: tiny (n=20, rest n=2000)" in result.evidence.notes


def test_fisher_is_used_when_expected_counts_are_small() -> None:
    result = SegmentRateBiasDetector(min_samples=50).update(
        [SegmentCounts("rare", 3, 60), SegmentCounts("rest", 10, 2000)]
    )
    by_name = {s.segment: s for s in result.evidence.segments}
    assert by_name["rare"].test == "fisher-exact"
    assert result.detected and result.evidence.segment == "rare"
    big = SegmentRateBiasDetector(min_samples=50).update(
        [SegmentCounts("a", 100, 1000), SegmentCounts("b", 120, 1000)]
    )
    assert {s.test for s in big.evidence.segments} == {"two-proportion-z"}


def _flagged(detector: SegmentRateBiasDetector, seg_events: int, rest_events: int) -> bool:
    result = detector.update(
        [SegmentCounts("seg", seg_events, 100_000), SegmentCounts("rest", rest_events, 100_000)]
    )
    return {s.segment: s.flagged for s in result.evidence.segments}["seg"]


def test_four_fifths_rule_for_favourable_rates_is_strict_at_the_bound() -> None:
    def make() -> SegmentRateBiasDetector:
        return SegmentRateBiasDetector(direction="lower", effect_rule="ratio", n_windows=1)

    assert not _flagged(make(), 40_000, 50_000)  # ratio exactly 0.8: not adverse
    assert _flagged(make(), 39_900, 50_000)  # 0.798 < 0.8
    assert not _flagged(make(), 60_000, 50_000)  # favoured, not harmed


def test_mirror_rule_for_harmful_rates_flags_above_one_point_two_five() -> None:
    def make() -> SegmentRateBiasDetector:
        return SegmentRateBiasDetector(direction="higher", effect_rule="ratio", n_windows=1)

    assert not _flagged(make(), 12_500, 10_000)  # ratio exactly 1.25
    assert _flagged(make(), 12_600, 10_000)
    assert not _flagged(make(), 5_000, 10_000)  # lower refusal rate is not harm
    both = SegmentRateBiasDetector(direction="both", effect_rule="ratio", n_windows=1)
    assert _flagged(both, 5_000, 10_000)


def test_effect_rules_combine_difference_and_ratio() -> None:
    # 1% vs 2%: ratio 2 passes, difference 0.01 < 0.05 fails.
    assert _flagged(SegmentRateBiasDetector(effect_rule="either"), 2_000, 1_000)
    assert not _flagged(SegmentRateBiasDetector(effect_rule="both"), 2_000, 1_000)
    assert not _flagged(SegmentRateBiasDetector(effect_rule="difference"), 2_000, 1_000)
    # 50% vs 56%: difference 0.06 passes, ratio 1.12 fails.
    assert _flagged(SegmentRateBiasDetector(effect_rule="difference"), 56_000, 50_000)
    assert not _flagged(SegmentRateBiasDetector(effect_rule="ratio"), 56_000, 50_000)


def test_overall_baseline_reports_effect_against_the_whole_population() -> None:
    batch = [
        SegmentCounts("a", 300, 1000),
        SegmentCounts("b", 100, 1000),
        SegmentCounts("c", 100, 1000),
    ]
    rest = SegmentRateBiasDetector(baseline="rest").update(batch)
    overall = SegmentRateBiasDetector(baseline="overall").update(batch)
    a_rest = next(s for s in rest.evidence.segments if s.segment == "a")
    a_all = next(s for s in overall.evidence.segments if s.segment == "a")
    assert (a_rest.baseline_rate, a_rest.baseline_n) == (0.1, 2000)
    assert a_all.baseline_rate == pytest.approx(500 / 3000) and a_all.baseline_n == 3000
    assert a_all.ratio == pytest.approx(0.3 / (500 / 3000))
    assert a_rest.p_value == a_all.p_value  # the test is segment-vs-rest either way


def test_evidence_carries_rates_cis_and_bh_q_values() -> None:
    rng = np.random.default_rng(3)
    result = SegmentRateBiasDetector().update(
        window(rng, {"a": 0.1, "b": 0.12, "c": 0.2, "d": 0.1}, 800)
    )
    segments = result.evidence.segments
    q = benjamini_hochberg([s.p_value for s in segments])
    assert [s.q_value for s in segments] == pytest.approx(q.tolist())
    assert result.p_value == pytest.approx(q.min())
    for s in segments:
        assert s.rate_ci.low <= s.rate <= s.rate_ci.high
        assert s.baseline_ci.low <= s.baseline_rate <= s.baseline_ci.high
        assert s.difference == pytest.approx(s.rate - s.baseline_rate)
    assert result.detected == (result.score >= result.threshold)
    json.dumps(result.to_dict())


def test_segment_cap_evicts_least_recently_seen_and_keeps_population_exact() -> None:
    detector = SegmentRateBiasDetector(max_segments=3, min_samples=10)
    detector.update([SegmentCounts("a", 1, 100), SegmentCounts("b", 1, 100)])
    detector.update([SegmentCounts("c", 1, 100), SegmentCounts("a", 1, 100)])
    result = detector.update([SegmentCounts("d", 1, 100)])
    assert "evicted by max_segments=3 (least recent): b" in result.evidence.notes
    assert result.evidence.value("n_tracked") == 3.0
    seg_d = next(s for s in result.evidence.segments if s.segment == "d")
    assert seg_d.baseline_n == 400  # the rest still counts the evicted segment "b"


def test_untested_counts_are_in_the_rest_but_never_tested() -> None:
    def last(bucket: str) -> DetectorResult:
        detector = SegmentRateBiasDetector(min_samples=50)
        batch = [SegmentCounts("en", 20, 400), SegmentCounts("fr", 80, 400)]
        if bucket != "dropped":
            batch.append(SegmentCounts("other", 350, 500, tested=bucket == "tested"))
        for _ in range(2):
            result = detector.update(batch)
        return result

    result = last("untested")
    assert [s.segment for s in result.evidence.segments] == ["en", "fr"]
    fr = result.evidence.segments[1]
    assert fr.baseline_n == 2 * (400 + 500) and fr.baseline_rate == (20 + 350) / 900
    assert not result.detected  # fr (20%) is better than the rest, bucket (70%) included
    assert result.n_seen == 2 * 1300
    assert "in the population, not tested (this window): other (n=500)" in result.evidence.notes
    # Tested, the bucket would page; dropped, fr would be compared with en alone and page.
    assert last("tested").evidence.segment == "other"
    assert last("dropped").evidence.segment == "fr"
    restored = load_state(json.loads(json.dumps(SegmentRateBiasDetector().state_dict())))
    assert restored.update([SegmentCounts("x", 1, 10, tested=False)]).n_seen == 10


def test_raw_observations_match_aggregated_counts() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice(["x", "y", "z"], 3000)
    outcomes = (rng.random(3000) < np.where(labels == "z", 0.3, 0.1)).astype(int)
    raw = SegmentRateBiasDetector().update(SegmentObservations(labels.tolist(), outcomes))
    counts = [
        SegmentCounts(s, int(outcomes[labels == s].sum()), int((labels == s).sum()))
        for s in ("x", "y", "z")
    ]
    agg = SegmentRateBiasDetector().update(counts)
    key = sorted
    assert key(raw.evidence.segments, key=lambda s: s.segment) == key(
        agg.evidence.segments, key=lambda s: s.segment
    )
    assert raw.detected and raw.evidence.segment == "z"


def test_state_round_trips_through_json_and_reset_equals_new() -> None:
    rng = np.random.default_rng(5)
    batches = [window(rng, {"a": 0.05, "b": 0.05, "c": 0.1}, 300) for _ in range(6)]
    detector = SegmentRateBiasDetector(n_windows=4)
    for batch in batches[:3]:
        detector.update(batch)
    clone = load_state(json.dumps(detector.state_dict()))
    for batch in batches[3:]:
        assert clone.update(batch) == detector.update(batch)
    detector.reset()
    fresh = SegmentRateBiasDetector(n_windows=4)
    assert detector.update(batches[0]) == fresh.update(batches[0])


def test_bad_inputs_and_parameters_raise_clear_errors() -> None:
    with pytest.raises(InputError, match="0 <= events <= total"):
        SegmentCounts("a", 5, 3)
    with pytest.raises(InputError, match="non-empty string"):
        SegmentObservations(["a", None], [0, 1]).to_counts()
    with pytest.raises(InputError, match="0/1"):
        SegmentObservations(["a", "b"], [0, 2]).to_counts()
    with pytest.raises(InputError, match="one entry per segment label"):
        SegmentRateBiasDetector().update(SegmentObservations(["a", "b"], [0]))
    with pytest.raises(InputError, match="SegmentCounts"):
        SegmentRateBiasDetector().update([("a", 1, 2)])
    for bad in (
        {"alpha": 0.0},
        {"direction": "up"},
        {"baseline": "median"},
        {"effect_rule": "any"},
        {"ratio_threshold": 1.5},
        {"n_windows": 0},
        {"signal": ""},
    ):
        with pytest.raises(InvalidParameterError):
            SegmentRateBiasDetector(**bad)


def test_empty_window_advances_the_ring() -> None:
    detector = SegmentRateBiasDetector(n_windows=2)
    assert detector.update([SegmentCounts("a", 90, 100), SegmentCounts("b", 5, 100)]).detected
    detector.update([])
    result = detector.update([])
    assert not result.detected and result.evidence.segments == ()
