"""bench/detection: the detection benchmark scores every configuration by the same rules.

The benchmark's verdicts (detected or not, how late, how many false pages) are only as
good as its scoring, so the rules are pinned here on tiny streams: an alarm before the
change is a false page, delays are seconds of event time and requests started since the
change, alarms within ten minutes are one page, warm-up and end-of-traffic alarms do not
count; the old fixed thresholds and River read the same request columns; genmon's pages
are read back from a real replay.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from pipeline_support import WINDOWS

from bench.detection import fixed, genmon_side, river_side
from bench.detection.scoring import (
    DEAD_TIME_S,
    Rate,
    Summary,
    false_pages,
    pages,
    quantile_with_misses,
    score,
)
from bench.detection.table import TableBuilder
from genmon.settings import Settings

T0 = 1_000_000.0


def test_an_alarm_before_the_change_is_false_and_the_first_after_is_the_detection() -> None:
    started = np.array([T0 + i for i in range(0, 200)], dtype=float)  # 1 request/s
    change = T0 + 100.0
    alarms = {"error_rate": [T0 + 40.0, T0 + 112.5], "ttft": [T0 + 105.0]}

    out = score(
        alarms,
        judged_from=T0,
        change_at=change,
        signals=("error_rate",),
        started=started,
    )

    assert out.false_pages == {"error_rate": 1}
    assert out.detected_at == T0 + 112.5
    assert out.delay_s == pytest.approx(12.5)  # seconds of event time, not of replay
    assert out.delay_events == 13  # requests started at T0+100 .. T0+112
    assert out.via == "page:error_rate"  # the ttft alarm is not this class's signal


def test_the_delay_in_seconds_of_traffic_starts_at_the_first_request_after_the_change() -> None:
    """A lull right after the change (no request for 80 s) is not the detector's delay:
    the delay of traffic counts from the first request that could show the change."""
    started = np.array([T0 + i for i in range(100)] + [T0 + 180.0 + i for i in range(50)])
    out = score(
        {"error_rate": [T0 + 183.0]},
        judged_from=T0,
        change_at=T0 + 100.0,
        signals=("error_rate",),
        started=started,
    )
    assert out.delay_s == pytest.approx(83.0)
    assert out.traffic_delay_s == pytest.approx(3.0)
    assert out.delay_events == 4
    summary = Summary()
    summary.add(out)
    summary.add(score({}, judged_from=T0, change_at=T0 + 100.0, signals=("error_rate",)))
    assert summary.quantile_traffic_s(0.5) == pytest.approx(3.0)
    assert math.isinf(summary.quantile_traffic_s(0.9))


def test_a_change_without_an_alarm_on_its_signals_is_missed() -> None:
    out = score({"ttft": [T0 + 50.0]}, judged_from=T0, change_at=T0 + 10.0, signals=("error_rate",))
    assert out.detected_at is None and out.delay_s is None and out.false_pages == {}


def test_a_finding_detects_when_no_page_follows_the_change() -> None:
    out = score(
        {"error_rate": [T0 + 5.0]},  # an incident opened before the change stays open
        judged_from=T0,
        change_at=T0 + 60.0,
        signals=("error_rate",),
        fallback={"error_rate": [T0 + 30.0, T0 + 75.0]},
    )
    assert out.false_pages == {"error_rate": 1}
    assert out.delay_s == pytest.approx(15.0) and out.via == "finding:error_rate"


def test_alarms_within_the_dead_time_are_one_page_and_the_chain_extends_it() -> None:
    step = DEAD_TIME_S - 1.0
    chained = [T0, T0 + step, T0 + 2 * step]  # each within 10 min of the one before
    assert pages(chained) == [T0]
    assert pages([T0, T0 + DEAD_TIME_S + 1.0]) == [T0, T0 + DEAD_TIME_S + 1.0]


def test_warm_up_and_end_of_traffic_alarms_are_not_false_pages() -> None:
    alarms = {"requests": [T0 + 10.0, T0 + 5_000.0], "error_rate": [T0 + 2_000.0]}
    assert false_pages(alarms, judged_from=T0 + 900.0, until=T0 + 3_600.0) == {"error_rate": 1}
    stationary = score(alarms, judged_from=T0 + 900.0, change_at=None, end=T0 + 3_600.0)
    assert stationary.false_pages == {"error_rate": 1} and stationary.detected_at is None


def test_delay_quantiles_count_a_miss_as_infinitely_late() -> None:
    assert quantile_with_misses([10.0, 20.0, 30.0], 3, 0.5) == 20.0
    assert quantile_with_misses([10.0], 3, 0.5) == math.inf
    summary = Summary()
    for delay in (5.0, None, 7.0):
        summary.add(
            score(
                {} if delay is None else {"s": [T0 + delay]},
                judged_from=T0,
                change_at=T0,
                signals=("s",),
            )
        )
    assert (summary.detected, summary.variants) == (2, 3)
    assert summary.quantile_s(0.5) == 7.0 and summary.quantile_s(0.9) == math.inf


def test_the_false_page_rate_has_a_poisson_upper_bound() -> None:
    none_in_a_week = Rate(0, 7 * 86_400.0)
    assert none_in_a_week.per_week == 0.0
    assert none_in_a_week.upper_per_week == pytest.approx(2.996, abs=1e-3)  # -ln(0.05)
    assert Rate(3, 86_400.0).per_week == pytest.approx(21.0)


def _inference(
    i: int,
    at: float,
    *,
    error: bool = False,
    latency_ms: float = 800.0,
    response: str = "Sure, here it is.",
) -> dict[str, Any]:
    started = datetime.fromtimestamp(at, UTC)
    return {
        "schema_version": 1,
        "request_id": f"r{i}",
        "model_id": "bot",
        "model_version": "v1",
        "started_at": started.isoformat(),
        "finished_at": (started + timedelta(milliseconds=latency_ms)).isoformat(),
        "prompt": f"question {i % 7}",
        "response": "" if error else response,
        "latency_ms": latency_ms,
        "time_to_first_token_ms": None if error else 200.0,
        "prompt_tokens": 12,
        "completion_tokens": 0 if error else 20,
        "status": "error" if error else "ok",
        "error_code": "429" if error else None,
        "finish_reason": None if error else "stop",
        "segment": {"app": "a"},
    }


def test_the_fixed_thresholds_judge_whole_windows_when_they_close() -> None:
    builder = TableBuilder(sample_rate=0.0, max_chars=100, seed=1)
    minute = 60.0 * math.floor(T0 / 60.0) + 60.0
    events = [_inference(i, minute + i * 2.0, error=i % 2 == 0) for i in range(30)]  # 50 %
    events += [_inference(100 + i, minute + 60.0 + i * 10.0, error=True) for i in range(5)]
    builder.add(events)
    table = builder.build()

    alarms = fixed.alarms(table)

    # the first window (30 requests, half failed) alarms when it closes: end + 10 s; the
    # second has 5 requests, below the 10 a window needs to be judged
    assert alarms["error_rate"] == [minute + 60.0 + fixed.LATENESS_S]
    assert alarms["empty_rate"] == alarms["error_rate"]  # the old aggregates' empties
    assert "latency_p99" not in alarms and "refusal_rate" not in alarms


def test_requests_are_read_with_genmons_refusal_and_error_definitions() -> None:
    builder = TableBuilder(sample_rate=1.0, max_chars=5, seed=1)
    builder.add(
        [
            _inference(0, T0, response="I'm sorry, but I can't help with that request."),
            _inference(1, T0 + 1.0, error=True),
            {"feedback_id": "f", "request_id": "r0", "created_at": "2026-01-01T00:00:00+00:00"},
        ]
    )
    table = builder.build()
    assert table.refusal.tolist() == [True, False] and table.error.tolist() == [False, True]
    assert table.arrival.tolist() == [T0 + 0.8, T0 + 1.8]  # logged when finished
    assert [text for _, text in table.sampled] == ["quest", "quest"]  # cut like genmon's


def test_river_is_fed_one_request_at_a_time_and_alarms_at_the_requests_arrival() -> None:
    rng = np.random.default_rng(3)
    n, change = 3_000, 2_000
    times = T0 + np.arange(n, dtype=float)
    flags = np.r_[rng.random(change) < 0.01, rng.random(n - change) < 0.6].astype(float)

    alarms = river_side.run(
        {"error_rate": (times, flags)},
        warm_end=T0 + 500.0,
        params=[river_side.Param("adwin", 1e-3), river_side.Param("ph", 0.5, 20.0)],
    )

    for key in ("adwin:delta=0.001", "ph:delta=0.5:threshold=20"):
        first = score(
            alarms[key], judged_from=T0 + 500.0, change_at=times[change], signals=("error_rate",)
        )
        assert first.false_pages == {}, key
        assert first.delay_s is not None and 0.0 <= first.delay_s < 50.0, key


def test_genmons_pages_are_read_back_from_a_replay_with_their_signal_and_time() -> None:
    settings = Settings()
    settings = settings.model_copy(
        update={
            "windows": settings.windows.model_copy(update=WINDOWS),
            "detectors": settings.detectors.model_copy(update={"baseline_warmup_windows": 3}),
        }
    )
    burst = T0 + 120.0
    events = [_inference(i, T0 + i * 0.1, error=T0 + i * 0.1 >= burst) for i in range(1_800)]
    events.sort(key=lambda e: e["finished_at"])

    run = genmon_side.replay([events], settings, embeddings=False, embedding_cache=None)

    first_page = min(run.pages["error_rate"])
    assert burst <= first_page < burst + 60.0
    assert min(run.findings["error_rate"]) >= burst
    out = score(
        run.pages,
        judged_from=T0 + 30.0,
        change_at=burst,
        signals=("error_rate",),
        fallback=run.findings,
    )
    assert out.delay_s == pytest.approx(first_page - burst) and out.via == "page:error_rate"
