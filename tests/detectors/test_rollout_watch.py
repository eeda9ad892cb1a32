"""RolloutWatch and its mSPRT: anytime validity, planning, decisions, state, redelivery."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pytest

from bench.rollout.simulate import simulate_windows
from genmon.detectors._stats import compare_proportions
from genmon.detectors.exceptions import InvalidParameterError, StateError
from genmon.detectors.rollout import (
    DEFAULT_MIN_REGRESSION,
    WATCH_SIGNALS,
    RolloutWatch,
    WatchResult,
    always_valid_p,
    challenger_samples_needed,
    default_tau,
    mixture_boundary,
    watch_minutes_text,
)
from genmon.detectors.rollout.msprt import _log_mixture_ratio

SCENARIO: dict[str, Any] = {
    "rps": 200.0,
    "share": 0.10,
    "segment_share": 0.25,
    "base_rate": 0.10,
    "challenger_rate_in_segment": 0.10,
    "feedback_rate": 1.0,
    "feedback_delay_s": 30.0,
    "window_s": 10.0,
    "duration_s": 900.0,
}


def null_paths(
    rng: np.random.Generator, rate: float, per_look: int, looks: int, reps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative challenger and champion (9x the observations) events, equal rates."""
    xc = rng.binomial(per_look, rate, size=(reps, looks)).cumsum(axis=1)
    xb = rng.binomial(9 * per_look, rate, size=(reps, looks)).cumsum(axis=1)
    return xc, xb


def ever_below(
    xc: np.ndarray, xb: np.ndarray, per_look: int, alpha: float, tau: float, peek: bool = False
) -> float:
    """Share of paths whose p-value, looked at after every window, ever reaches alpha."""
    hits = 0
    for path_c, path_b in zip(xc, xb, strict=True):
        p = 1.0
        for look, (x_c, x_b) in enumerate(zip(path_c, path_b, strict=True), 1):
            n_c, n_b = per_look * look, 9 * per_look * look
            if n_c < 30:
                continue
            if peek:
                p = compare_proportions(int(x_c), n_c, int(x_b), n_b, "greater").p_value
            else:
                p = always_valid_p(int(x_c), n_c, int(x_b), n_b, tau, p)
            if p <= alpha:
                hits += 1
                break
    return hits / len(xc)


@pytest.mark.parametrize(
    ("rate", "per_look", "alpha"),
    [(0.10, 30, 0.05), (0.01, 20, 0.05), (0.01, 20, 0.005), (0.02, 5, 0.01)],
)
def test_msprt_is_anytime_valid_on_seeded_nulls(rate: float, per_look: int, alpha: float) -> None:
    reps = 1500
    xc, xb = null_paths(np.random.default_rng(17), rate, per_look, 80, reps)
    rejected = ever_below(xc, xb, per_look, alpha, default_tau(0.0, 0.02))
    # Looked at after each of 80 windows, still at most alpha (plus two standard errors).
    assert rejected <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / reps)


def test_a_fixed_test_looked_at_after_every_window_is_not() -> None:
    """The same seeded nulls with the fixed-horizon p-value: far above alpha (this is why
    the watch is sequential, and shows the check above can fail)."""
    xc, xb = null_paths(np.random.default_rng(17), 0.10, 30, 80, 400)
    assert ever_below(xc, xb, 30, 0.05, 0.02, peek=True) > 0.15


def test_p_value_is_a_running_minimum_and_tiny_tables_are_no_evidence() -> None:
    strong = always_valid_p(60, 300, 270, 2700, tau=0.05)
    assert strong < 1e-4
    # Later counts that look equal do not undo the evidence already seen.
    assert always_valid_p(300, 3000, 2700, 27000, 0.05, previous_p=strong) == strong
    assert always_valid_p(0, 0, 5, 100, 0.05) == 1.0
    assert always_valid_p(0, 50, 0, 450, 0.05) == 1.0  # no events at all
    assert always_valid_p(50, 50, 450, 450, 0.05) == 1.0  # only events
    assert always_valid_p(0, 50, 0, 450, 0.05, previous_p=0.2) == 0.2
    # The challenger better: no evidence of "worse" however large the sample.
    assert always_valid_p(100, 10_000, 9_000, 90_000, 0.05) == 1.0
    # One early event among few observations is not a regression.
    assert always_valid_p(1, 30, 0, 270, 0.02) > 0.05
    with pytest.raises(ValueError, match="tau"):
        always_valid_p(1, 30, 0, 270, 0.0)


@pytest.mark.parametrize(("variance", "tau", "alpha"), [(1e-4, 0.05, 0.05), (1e-6, 0.02, 1e-3)])
def test_mixture_boundary_is_where_the_ratio_reaches_one_over_alpha(
    variance: float, tau: float, alpha: float
) -> None:
    z = mixture_boundary(variance, tau, alpha)
    rho = tau * tau / (variance + tau * tau)
    assert _log_mixture_ratio(z, rho) == pytest.approx(math.log(1 / alpha), abs=1e-8)
    # Sequential costs: above the one-sided fixed-horizon quantile, growing with the sample.
    assert z > compare_z(alpha)
    assert mixture_boundary(variance / 100, tau, alpha) > z
    with pytest.raises(InvalidParameterError):
        mixture_boundary(0.0, tau, alpha)


def compare_z(alpha: float) -> float:
    from scipy import stats

    return float(stats.norm.isf(alpha))


def test_default_tau_is_the_smallest_regression_of_interest() -> None:
    assert default_tau(0.10, 0.05) == 0.05
    assert default_tau(0.98, 0.05) == pytest.approx(0.02)  # no larger increase possible
    with pytest.raises(InvalidParameterError):
        default_tau(0.1, 0.0)


def test_samples_needed_grows_with_strictness_and_shrinks_with_the_effect() -> None:
    def n(**kw: float) -> int:
        args = {"baseline_rate": 0.1, "min_regression": 0.05, "share": 0.1, "alpha": 0.05}
        args |= {"power": 0.8, "tau": 0.05, **kw}
        return challenger_samples_needed(**args)

    base = n()
    assert n(alpha=0.005) > base
    assert n(power=0.9) > base
    assert n(min_regression=0.1, tau=0.1) < base
    assert n(share=0.5) > base  # fewer champion observations per challenger one
    assert n(baseline_rate=0.01, min_regression=0.02, tau=0.02) > 0


@pytest.mark.parametrize(("rate", "delta", "alpha"), [(0.10, 0.05, 0.05), (0.01, 0.02, 0.005)])
def test_the_msprt_reaches_the_planned_power_at_the_planned_sample(
    rate: float, delta: float, alpha: float
) -> None:
    tau = default_tau(0.0, delta)
    needed = challenger_samples_needed(rate, delta, 0.1, alpha, 0.8, tau)
    per_look, reps = 30, 1000
    looks = math.ceil(needed / per_look)
    rng = np.random.default_rng(5)
    xc = rng.binomial(per_look, rate + delta, size=(reps, looks)).cumsum(axis=1)
    xb = rng.binomial(9 * per_look, rate, size=(reps, looks)).cumsum(axis=1)
    power = ever_below(xc, xb, per_look, alpha, tau)
    assert 0.8 - 2 * math.sqrt(0.16 / reps) <= power <= 0.97


def run(watch: RolloutWatch, records: list[dict[str, Any]]) -> WatchResult:
    result = None
    for record in records:
        result = watch.update(record)
        if result.decision != "watching":
            break
    assert result is not None
    return result


def test_a_regression_on_a_segment_is_rolled_back_with_its_evidence() -> None:
    records = simulate_windows(3, **{**SCENARIO, "challenger_rate_in_segment": 0.16})
    watch = RolloutWatch("v1", "v2")
    result = run(watch, records)
    assert result.decision == "regressed"
    assert result.planned_watch_s is not None
    assert 0 < result.elapsed_s < result.planned_watch_s
    worst = result.worst
    assert worst is not None and worst.flagged
    assert (worst.signal, worst.segment) == ("negative_feedback", "region=eu")
    assert worst.q_value is not None and worst.q_value <= 0.05
    assert worst.challenger_events / worst.challenger_n > worst.champion_events / worst.champion_n
    assert "Challenger v2 raised negative feedback on region=eu" in result.title
    assert "q=" in result.title and "of a planned" in result.title
    # Decided: later windows change nothing.
    assert watch.update(records[-1]) is result
    assert result.watch_from_ms == records[0]["start_ms"]
    json.dumps(result.to_json())
    assert WatchResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_an_equal_challenger_is_confirmed_at_its_planned_watch() -> None:
    records = simulate_windows(4, **{**SCENARIO, "challenger_rate_in_segment": 0.10})
    result = run(RolloutWatch("v1", "v2"), records)
    assert result.decision == "clean"
    assert result.planned_watch_s is not None
    # The plan is re-estimated after every window; clean is the first window past it.
    assert result.planned_watch_s <= result.elapsed_s < result.planned_watch_s + 30.0
    required = {(c.signal, c.segment) for c in result.comparisons if c.required}
    assert required == {(s, "*") for s in WATCH_SIGNALS} | {
        (s, seg)
        for s in ("negative_feedback", "refusal_rate", "error_rate")
        for seg in ("region=eu", "region=us")
    }
    assert all(
        c.needed_n and c.challenger_n >= c.needed_n for c in result.comparisons if c.required
    )
    assert not any(c.flagged for c in result.comparisons)
    assert result.title.startswith("Challenger v2 watched clean for")


def test_a_slower_challenger_is_caught_on_the_slow_rate() -> None:
    scenario = {**SCENARIO, "challenger_rate_in_segment": 0.10, "challenger_latency_factor": 1.6}
    result = run(RolloutWatch("v1", "v2"), simulate_windows(5, **scenario))
    assert result.decision == "regressed"
    assert result.worst is not None and result.worst.signal == "slow_rate"


def test_the_forecast_from_the_champion_alone_announces_about_the_planned_watch() -> None:
    before = simulate_windows(11, **{**SCENARIO, "share": 0.0, "duration_s": 300.0})
    watch = RolloutWatch("v1", "v2")
    forecast = watch.forecast(before[3:])
    result = run(watch, simulate_windows(12, **SCENARIO))
    assert result.decision == "clean"
    assert forecast is not None and result.planned_watch_s is not None
    # The plan adds the 30 s the first feedback takes; the rest is noise in the rates.
    assert 0.85 * forecast <= result.planned_watch_s - 30.0 <= 1.15 * forecast
    assert watch.forecast([]) is None
    silent = simulate_windows(11, **{**SCENARIO, "share": 0.0, "feedback_rate": 0.0})
    assert watch.forecast(silent) is None  # no feedback: the watch could not be planned


def test_watch_without_a_plan_ends_inconclusive_at_max_watch() -> None:
    scenario = {**SCENARIO, "challenger_rate_in_segment": 0.10, "feedback_rate": 0.0}
    records = simulate_windows(6, **{**scenario, "duration_s": 400.0})
    watch = RolloutWatch("v1", "v2", max_watch_s=300.0)
    result = run(watch, records)
    assert result.decision == "inconclusive"
    assert result.planned_watch_s is None
    assert "no estimate yet for negative feedback overall" in result.title
    # Leaving the unmeasured signal out of the watch gives it a plan and a verdict.
    unwatched = {k: v for k, v in DEFAULT_MIN_REGRESSION.items() if k != "negative_feedback"}
    assert run(RolloutWatch("v1", "v2", min_regression=unwatched), records).decision == "clean"


def test_a_challenger_that_never_serves_is_inconclusive_at_max_watch() -> None:
    records = [
        {"kind": "tumbling", "start_ms": i * 10_000, "end_ms": (i + 1) * 10_000, "series": []}
        for i in range(7)
    ]
    assert run(RolloutWatch("v1", "v2", max_watch_s=60.0), records).decision == "inconclusive"


def test_redelivered_hopping_and_other_versions_windows_are_ignored() -> None:
    records = simulate_windows(7, **{**SCENARIO, "duration_s": 60.0})
    once, again = RolloutWatch("v1", "v2"), RolloutWatch("v1", "v2")
    for record in records:
        once.update(record)
        again.update(record)
        again.update(copy.deepcopy(record))  # redelivered
        again.update({**record, "kind": "hopping"})
    again.update(records[2])  # an old one, late
    other = copy.deepcopy(records[-1])
    for series in other["series"]:
        series["model_version"] = "v3"
    other["end_ms"] += 10_000
    other["start_ms"] += 10_000
    result = again.update(other)
    expected = once.update({**other, "series": []})
    assert result.comparisons == expected.comparisons
    assert result.comparisons  # it did count the first windows
    assert result.elapsed_s == expected.elapsed_s


def test_state_round_trip_mid_watch_gives_the_same_future() -> None:
    records = simulate_windows(8, **{**SCENARIO, "challenger_rate_in_segment": 0.16})
    straight, resumed = RolloutWatch("v1", "v2", alpha=0.01), RolloutWatch("v1", "v2", alpha=0.01)
    for i, record in enumerate(records):
        expected = straight.update(record)
        got = resumed.update(record)
        assert got == expected
        if i % 3 == 1:  # saved to the database and read back, as the watcher does
            resumed = RolloutWatch.from_state(json.loads(json.dumps(resumed.to_state())))
        if expected.decision != "watching" and i > 30:
            break
    assert resumed.to_state()["params"]["alpha"] == 0.01
    with pytest.raises(StateError, match="start a new"):
        RolloutWatch.from_state({"version": 99})


def test_invalid_settings_say_what_to_choose() -> None:
    with pytest.raises(InvalidParameterError, match="min_regression"):
        RolloutWatch("v1", "v2", min_regression={"latency": 0.1})
    with pytest.raises(InvalidParameterError, match="share"):
        RolloutWatch("v1", "v2", share=1.0)
    with pytest.raises(InvalidParameterError):
        RolloutWatch("v1", "v1")


def test_segments_beyond_max_segments_are_noted_not_counted() -> None:
    records = simulate_windows(9, **{**SCENARIO, "duration_s": 60.0})
    result = None
    watch = RolloutWatch("v1", "v2", max_segments=1)
    for record in records:
        result = watch.update(record)
    assert result is not None
    assert {c.segment for c in result.comparisons} == {"*", "region=eu"}
    assert any("beyond max_segments" in note for note in result.notes)


def test_watch_minutes_text() -> None:
    assert watch_minutes_text(2400.0) == "watch about 40 minutes at current traffic"
    assert watch_minutes_text(50.0) == "watch about 1 minute at current traffic"
    assert watch_minutes_text(3 * 3600.0) == "watch about 3.0 hours at current traffic"
    assert "not known yet" in watch_minutes_text(None)
