"""Unit tests of the pure aggregation core: sketch, quality signals, panes, window closing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from ddsketch import DDSketch
from pipeline_support import WINDOWS

from genmon.detectors.sketch import QuantileSketch
from genmon.schemas.events import FinishReason, InferenceEvent, InferenceStatus
from genmon.settings import Settings
from genmon.streams.windows.aggregates import aggregate_inferences, window_sketches
from genmon.streams.windows.plan import WindowPlan
from genmon.streams.windows.quality_signals import QualitySignals, detect_language
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.stats import WindowStats
from genmon.streams.windows.store import DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def inference(i: int, t_s: float, **kw) -> InferenceEvent:
    fields = {
        "request_id": f"r{i}",
        "model_id": "chat",
        "model_version": "v1",
        "latency_ms": 100.0,
        "response": "The answer is that the cat is here.",
        "started_at": T0 + timedelta(seconds=t_s),
    }
    fields.update(kw)
    return InferenceEvent(**fields)


def test_sketch_quantiles_within_relative_accuracy_of_exact_and_match_ddsketch():
    rng = np.random.default_rng(7)
    values = rng.lognormal(5.0, 1.0, 20_000)
    sketch = QuantileSketch(0.01)
    for chunk in np.array_split(values, 7):
        sketch.add_many(chunk)
    reference = DDSketch(0.01)
    for v in values:
        reference.add(float(v))
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q, method="lower"))
        got = sketch.quantile(q)
        assert abs(got - exact) / exact <= 0.011
        assert got == pytest.approx(reference.get_quantile_value(q), rel=1e-9)


def test_sketch_merge_and_json_round_trip_equal_one_big_sketch():
    a, b, whole = QuantileSketch(), QuantileSketch(), QuantileSketch()
    a.add_many([0.0, 1.0, 5.0])
    b.add_many([50.0, 500.0])
    whole.add_many([0.0, 1.0, 5.0, 50.0, 500.0])
    merged = QuantileSketch.from_state(json.loads(json.dumps(a.to_state())))
    merged.merge(b)
    assert merged.to_state() == whole.to_state()
    assert merged.quantile(0.0) == 0.0 and merged.quantile(1.0) == 500.0
    with pytest.raises(ValueError, match="relative accuracy"):
        a.merge(QuantileSketch(0.05))


def test_quality_signals_flags_empty_truncated_refusal_and_language():
    q = QualitySignals.default()
    assert q.of(inference(1, 0, response="   ")).empty
    assert q.of(inference(2, 0, finish_reason=FinishReason.LENGTH)).truncated
    assert q.of(inference(3, 0, status=InferenceStatus.TRUNCATED)).truncated
    assert q.of(inference(4, 0, response="Lo siento, pero no puedo hacer eso.")).refusal
    assert q.of(inference(5, 0, response="I\u2019m sorry, but I can\u2019t do that")).refusal
    assert not q.of(inference(6, 0, response="Sorry for the wait, here it is.")).refusal
    assert detect_language("Der Hund ist nicht in der Küche und das ist gut.") == "de"
    assert detect_language("Привет, как дела?") == "ru"
    assert detect_language("你好，世界") == "zh"
    assert detect_language("12345 !!!") == "none"


def test_refusal_phrase_file_is_validated(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("phrases: [oops]\n")
    with pytest.raises(ValueError, match="expected 'phrases:'"):
        QualitySignals.from_file(bad)
    good = tmp_path / "g.yaml"
    good.write_text("phrases:\n  xx: ['nope nope']\n")
    assert QualitySignals.from_file(good).is_refusal("well, NOPE NOPE.")


def test_batch_aggregate_counts_every_series_and_round_trips_json():
    events = [
        inference(
            i,
            i,
            segment={"locale": "fr" if i % 2 else "en"},
            latency_ms=float(10 * (i + 1)),
            prompt_tokens=i,
            completion_tokens=2 * i,
            status=InferenceStatus.ERROR if i == 3 else InferenceStatus.OK,
            error_code="E42" if i == 3 else None,
        )
        for i in range(10)
    ]
    acc = aggregate_inferences(list(enumerate(events)), 60_000, QualitySignals.default())
    by_segment = {k.segment: v for k, v in acc.items()}
    assert set(by_segment) == {"*", "locale=fr", "locale=en"}
    total = WindowStats.from_state(json.loads(json.dumps(by_segment["*"].to_state()))).summary()
    assert total["requests"] == 10 and total["errors"] == 1
    assert total["by_error_code"] == {"E42": 1}
    assert total["prompt_tokens"] == {"n": 10, "sum": 45, "mean": 4.5, "max": 9}
    assert total["latency_ms"]["p50"] == pytest.approx(50.0, rel=0.01)
    assert by_segment["locale=fr"].summary()["requests"] == 5


def test_window_plan_rejects_settings_that_cannot_work():
    with pytest.raises(ValueError, match="hopping_size_s"):
        WindowPlan(60, 30, 60, 0, 3600)
    with pytest.raises(ValueError, match="expires_s"):
        WindowPlan(60, 300, 60, 10, 100)


def make_core(clock, **windows):
    settings = Settings(windows={**WINDOWS, "allowed_lateness_s": 2, **windows})
    return WindowState(settings, DictStore(), clock=clock)


def test_windows_close_once_by_event_time_with_exact_counts_and_late_events_counted():
    now = [T0.timestamp() + 3600]
    core = make_core(lambda: now[0])
    # window [0,10): latencies 1..5 ; [10,20): 2 events, one error
    batch = [(i, inference(i, i, latency_ms=float(i + 1))) for i in range(5)]
    batch += [(5, inference(5, 11, status=InferenceStatus.ERROR)), (6, inference(6, 11.5))]
    assert core.on_inferences(0, batch).windows == []
    assert core.tick(0).windows == []  # watermark 11.5 s < end 10 s + lateness 2 s
    core.on_inferences(0, [(7, inference(7, 13))])
    closed = core.tick(0).windows
    assert sorted((w["kind"], w["start_ms"] - int(T0.timestamp() * 1000)) for w in closed) == [
        ("hopping", -10_000),
        ("tumbling", 0),
    ]
    tumbling = next(w for w in closed if w["kind"] == "tumbling")
    star = next(s for s in tumbling["series"] if s["segment"] == "*")
    # DDSketch ranks with q * (n - 1) and takes the lower value: p99 of 1..5 is 4, p50 is 3.
    assert star["requests"] == 5 and star["latency_ms"]["p99"] == pytest.approx(4.0, rel=0.01)
    assert star["latency_ms"]["p50"] == pytest.approx(3.0, rel=0.01)
    assert core.tick(0).windows == []  # emitted once
    # Tumbling [0,10) has closed: the event is late for every window, hopping [0,20) too,
    # or the tumbling record would miss it with no counter to say so.
    core.on_inferences(0, [(8, inference(8, 1))])
    assert core.counters.late_events == 1
    assert core.unaccounted() == 0
    core.on_inferences(0, [(9, inference(9, 35))])
    out = core.tick(0).windows
    got = {
        (w["kind"], w["start_ms"] - int(T0.timestamp() * 1000)): next(
            s for s in w["series"] if s["segment"] == "*"
        )["requests"]
        for w in out
    }
    assert got == {("tumbling", 10_000): 3, ("hopping", 0): 8, ("hopping", 10_000): 3}
    errors = next(
        s for s in next(w for w in out if w["kind"] == "tumbling")["series"] if s["segment"] == "*"
    )
    assert errors["errors"] == 1 and errors["error_rate"] == pytest.approx(1 / 3)
    core.on_inferences(0, [(10, inference(10, 2))])  # every window of pane 0 is closed
    assert core.counters.late_events == 2
    # Every accepted event is in exactly one tumbling window record.
    assert core.counters.windowed_events == 5 + 3
    assert core.unaccounted() == 0


def test_redelivered_offsets_are_skipped_and_state_survives_restore():
    now = [T0.timestamp() + 3600]
    core = make_core(lambda: now[0])
    core.on_inferences(3, [(i, inference(i, i)) for i in range(4)])
    again = WindowState(
        Settings(windows={**WINDOWS, "allowed_lateness_s": 2}),
        core.store,
        clock=lambda: now[0],
    )
    again.restore([3])
    again.on_inferences(3, [(i, inference(i, i)) for i in range(6)])  # 0-3 are redelivered
    assert again.counters.redelivered_skipped == 4
    again.on_inferences(3, [(6, inference(6, 30))])
    w = next(w for w in again.tick(3).windows if w["kind"] == "tumbling")
    assert next(s for s in w["series"] if s["segment"] == "*")["requests"] == 6


def test_idle_partition_advances_watermark_with_wall_clock_and_expires_panes():
    now = [T0.timestamp() + 3600]
    core = make_core(lambda: now[0], idle_timeout_s=1)
    core.on_inferences(0, [(0, inference(0, 0))])
    assert core.tick(0).windows == []
    now[0] += 30  # idle: the watermark moves 30 s
    kinds = sorted(w["kind"] for w in core.tick(0).windows)
    assert kinds == ["hopping", "hopping", "tumbling"]
    assert not any(k.split("\x1f")[1] == "P" for k in core.store.data)


def test_replay_after_a_crash_before_the_checkpoint_counts_each_event_once():
    now = [T0.timestamp() + 3600]
    settings = Settings(windows={**WINDOWS, "allowed_lateness_s": 2})
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    batch = [(i, inference(i, i, segment={"k": "a"})) for i in range(5)]
    core.on_inferences(1, batch, checkpoint=False)  # panes written, mark not: then a crash
    restarted = WindowState(settings, core.store, clock=lambda: now[0])
    restarted.restore([1])
    restarted.on_inferences(1, [*batch, (5, inference(5, 6, segment={"k": "a"}))])
    restarted.on_inferences(1, [(6, inference(6, 40))])
    window = next(w for w in restarted.tick(1).windows if w["kind"] == "tumbling")
    assert {s["segment"]: s["requests"] for s in window["series"]} == {"*": 6, "k=a": 6}


def test_each_model_has_its_own_clock_so_one_lagging_producer_is_not_late():
    now = [T0.timestamp() + 3600]
    core = make_core(lambda: now[0])
    core.on_inferences(0, [(0, inference(0, 30, model_id="ahead"))])
    core.on_inferences(0, [(1, inference(1, 1, model_id="behind"))])  # 29 s behind "ahead"
    assert core.counters.late_events == 0
    core.on_inferences(0, [(2, inference(2, 25, model_id="behind"))])
    closed = {(w["model_id"], w["kind"]) for w in core.tick(0).windows}
    assert ("behind", "tumbling") in closed
    core.on_inferences(0, [(3, inference(3, 2, model_id="behind"))])  # now it is late
    assert core.counters.late_events == 1


def _star(events: list[InferenceEvent], exemplars: int = 0) -> WindowStats:
    acc = aggregate_inferences(
        list(enumerate(events)), 60_000, QualitySignals.default(), exemplars=exemplars
    )
    return next(stats for key, stats in acc.items() if key.segment == "*")


def test_tpot_counts_answered_requests_with_two_tokens_and_a_first_token_in_time():
    timed = {"latency_ms": 120.0, "time_to_first_token_ms": 20.0}
    events = [
        inference(0, 0, completion_tokens=5, **timed),  # (120 - 20) / 4 = 25
        inference(1, 0, completion_tokens=3, latency_ms=60.0, time_to_first_token_ms=20.0),
        inference(2, 0, completion_tokens=1, **timed),  # one token: no time between tokens
        inference(3, 0, completion_tokens=5, latency_ms=10.0, time_to_first_token_ms=20.0),
        inference(4, 0, completion_tokens=5, latency_ms=120.0),  # no time to first token
        inference(5, 0, completion_tokens=5, status=InferenceStatus.TIMEOUT, **timed),
    ]
    stats = _star(events)
    tpot = stats.summary()["tpot_ms"]
    assert tpot["n"] == 2
    assert tpot["p50"] == pytest.approx(20.0, rel=0.01)
    assert (stats.tpot.sum, stats.tpot.max) == (45.0, 25.0)  # 25 + 20, exactly
    assert set(stats.summary()["latency_ms"]) >= {"p50", "p90", "p95", "p99"}
    state = json.loads(json.dumps(stats.to_state()))
    assert WindowStats.from_state(state).summary()["tpot_ms"] == tpot


def test_empty_and_refusal_rates_are_over_answered_requests_and_errors_count_once():
    error = InferenceStatus.ERROR
    events = [
        inference(0, 0, status=error, response=""),
        inference(1, 0, status=error, response="I'm sorry, but I can't help with that."),
        inference(2, 0, response=""),
        inference(3, 0, response="I'm sorry, but I can't help with that."),
        inference(4, 0),
        inference(5, 0),
    ]
    stats = _star(events, exemplars=8)
    summary = stats.summary()
    assert (summary["requests"], summary["errors"], summary["answered"]) == (6, 2, 4)
    assert (summary["empty"], summary["refusal"]) == (1, 1)
    assert summary["empty_rate"] == summary["refusal_rate"] == pytest.approx(1 / 4)
    assert summary["error_rate"] == pytest.approx(2 / 6)
    assert stats.exemplars is not None
    examples = {k: [e["request_id"] for e in v] for k, v in stats.exemplars.records().items()}
    assert examples["empty"] == ["r2"] and examples["refusal"] == ["r3"]
    assert sorted(examples["error"]) == ["r0", "r1"]
    only_errors = _star(events[:2]).summary()
    assert only_errors["answered"] == 0 and only_errors["empty"] == 0
    assert only_errors["empty_rate"] is None and only_errors["refusal_rate"] is None


def test_tumbling_all_traffic_series_carry_the_raw_sketches_and_nothing_else_does():
    now = [T0.timestamp() + 3600]
    core = make_core(lambda: now[0])
    timed = {"time_to_first_token_ms": 10.0, "completion_tokens": 3, "segment": {"k": "a"}}
    batch = [(i, inference(i, i, latency_ms=float(20 + i), **timed)) for i in range(5)]
    core.on_inferences(0, [*batch, (5, inference(5, 45))])
    closed = core.tick(0).windows
    tumbling = next(w for w in closed if w["kind"] == "tumbling")
    by_segment = {s["segment"]: s for s in tumbling["series"]}
    sketches = by_segment["*"]["sketches"]
    assert set(sketches) == {"latency_ms", "ttft_ms", "tpot_ms"}
    latency = QuantileSketch.from_state(json.loads(json.dumps(sketches["latency_ms"])))
    assert latency.count == 5 and latency.max == 24.0
    assert QuantileSketch.from_state(sketches["tpot_ms"]).count == 5
    assert latency.quantile(0.5) == by_segment["*"]["latency_ms"]["p50"]
    assert "sketches" not in by_segment["k=a"]
    hopping = [w for w in closed if w["kind"] == "hopping"]
    assert hopping and not any("sketches" in s for w in hopping for s in w["series"])


def test_window_sketches_go_to_the_busiest_versions_within_the_budget():
    series = {}
    # The busy version sorts last by name: it is chosen for its requests.
    for version, n in (("a-quiet", 2), ("z-busy", 9)):
        stats = WindowStats()
        for i in range(n):
            stats.add_inference(
                inference(i, 0, latency_ms=float(3**i)), False, False, False, 1, "en"
            )
        series[(version, "*")] = stats
        series[(version, "k=a")] = WindowStats()
    everything, used = window_sketches(series)
    assert set(everything) == {"z-busy", "a-quiet"}
    assert used >= len(json.dumps(everything))
    one = len(json.dumps(everything["z-busy"])) + 20
    some, used = window_sketches(series, budget=one)
    assert set(some) == {"z-busy"} and used <= one
    assert window_sketches(series, budget=10) == ({}, 0)
