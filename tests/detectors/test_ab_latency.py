"""ABLatencyDetector: Mann-Whitney U non-inferiority on latency, p50/p99 evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from genmon.detectors import ABLatencyDetector, InputError, LatencyObservations, load_state


def latencies(
    rng: np.random.Generator, n: int, slowdown: float, mean_log: float = 5.0
) -> LatencyObservations:
    base = rng.lognormal(mean_log, 0.4, n)
    cand = rng.lognormal(mean_log, 0.4, n) * slowdown
    return LatencyObservations(["v1"] * n + ["v2"] * n, np.concatenate([base, cand]))


@pytest.mark.parametrize("seed", range(3))
def test_slower_candidate_is_detected_with_quantile_evidence(seed: int) -> None:
    batch = latencies(np.random.default_rng(seed), 300, slowdown=1.3)
    result = ABLatencyDetector(baseline="v1", candidate="v2", margin=0.05).update(batch)
    assert result.detected and result.evidence.segment == "v2"
    lat = np.asarray(batch.latencies_ms)
    base, cand = lat[:300], lat[300:]
    values = dict(result.evidence.values)
    assert values["baseline_p50"] == pytest.approx(np.quantile(base, 0.5))
    assert values["candidate_p99"] == pytest.approx(np.quantile(cand, 0.99))
    assert values["p50_ratio_ci_low"] <= values["p50_ratio"] <= values["p50_ratio_ci_high"]
    assert values["p50_ratio_ci_low"] > 1.0
    u = stats.mannwhitneyu(cand, base * 1.05, alternative="greater")
    assert result.p_value == pytest.approx(u.pvalue)
    assert result.effect_size > 0.6  # P(candidate slower)


def test_equal_latency_false_alarm_rate_at_or_below_alpha() -> None:
    alpha, n_trials = 0.05, 400
    batches = [latencies(np.random.default_rng(seed), 200, 1.0) for seed in range(n_trials)]

    def alarm_rate(margin: float) -> float:
        return (
            sum(
                ABLatencyDetector(
                    baseline="v1", candidate="v2", alpha=alpha, margin=margin, n_bootstrap=0
                )
                .update(batch)
                .detected
                for batch in batches
            )
            / n_trials
        )

    # margin 0: Mann-Whitney has size alpha, so the seeded estimate gets two binomial
    # standard errors; a 5% margin leaves room for noise.
    assert alarm_rate(0.0) <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / n_trials)
    assert alarm_rate(0.05) <= alpha / 5


def test_margin_tolerates_a_small_slowdown() -> None:
    batch = latencies(np.random.default_rng(9), 2000, slowdown=1.05)
    strict = ABLatencyDetector(baseline="v1", candidate="v2").update(batch)
    tolerant = ABLatencyDetector(baseline="v1", candidate="v2", margin=0.15).update(batch)
    assert strict.detected and not tolerant.detected


def test_only_the_latest_max_samples_are_compared() -> None:
    rng = np.random.default_rng(5)
    detector = ABLatencyDetector(baseline="v1", candidate="v2", max_samples=200, n_bootstrap=0)
    assert detector.update(latencies(rng, 200, slowdown=2.0)).detected
    # A fixed candidate replaces every slow sample: the comparison follows it.
    result = detector.update(latencies(rng, 200, slowdown=1.0))
    assert not result.detected
    assert result.n_seen == 800


def test_bootstrap_is_deterministic_with_the_seed() -> None:
    batch = latencies(np.random.default_rng(1), 150, slowdown=1.1)
    a = ABLatencyDetector(baseline="v1", candidate="v2", seed=3).update(batch)
    b = ABLatencyDetector(baseline="v1", candidate="v2", seed=3).update(batch)
    c = ABLatencyDetector(baseline="v1", candidate="v2", seed=4).update(batch)
    assert a == b
    assert a.evidence.value("p99_ratio_ci_low") != c.evidence.value("p99_ratio_ci_low")


def test_warm_up_state_round_trip_and_input_errors() -> None:
    rng = np.random.default_rng(2)
    detector = ABLatencyDetector(baseline="v1", candidate="v2", min_samples=50)
    early = detector.update(latencies(rng, 20, slowdown=3.0))
    assert not early.detected and early.p_value is None
    clone = load_state(json.dumps(detector.state_dict()))
    batch = latencies(rng, 60, slowdown=3.0)
    assert clone.update(batch) == detector.update(batch)
    with pytest.raises(InputError, match="finite and >= 0"):
        detector.update(LatencyObservations(["v1"], [-1.0]))
    with pytest.raises(InputError, match="one value per version"):
        detector.update(LatencyObservations(["v1", "v2"], [1.0]))
    with pytest.raises(InputError, match="LatencyObservations"):
        detector.update([1.0, 2.0])
