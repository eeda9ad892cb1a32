"""Memory bounds of the window state: segment cardinality and forgotten models' join entries."""

from __future__ import annotations

import doctest
import json
from datetime import UTC, datetime, timedelta

import pytest
from pipeline_support import WINDOWS
from prometheus_client import CollectorRegistry

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.pipeline_metrics import PipelineMetrics
from genmon.streams.windows import segment_cap
from genmon.streams.windows.join import record_entries
from genmon.streams.windows.segment_cap import OVERFLOW_VALUE, SERIES_BUDGET_BYTES
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import SEP, DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0.timestamp() + 3600
#: Kafka's default largest message (message.max.bytes).
KAFKA_MAX_MESSAGE_BYTES = 1024 * 1024


def inference(i: int, t_s: float, segment: dict[str, str], model: str = "chat") -> InferenceEvent:
    return InferenceEvent(
        request_id=f"r{i}",
        model_id=model,
        model_version="v1",
        latency_ms=10.0 + i % 7,
        response="Here is the answer.",
        segment=segment,
        started_at=T0 + timedelta(seconds=t_s),
    )


def feedback(i: int, t_s: float, model: str = "chat", score: float = 0.0) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=f"f{i}",
        request_id=f"r{i}",
        model_id=model,
        score=score,
        created_at=T0 + timedelta(seconds=t_s),
    )


def make_core(store: DictStore | None = None, **windows: float) -> WindowState:
    settings = Settings(windows={**WINDOWS, **windows})
    return WindowState(settings, store or DictStore(), clock=lambda: NOW)


def series_of(window: dict) -> dict[str, dict]:
    return {s["segment"]: s for s in window["series"]}


def user_series(window: dict) -> dict[str, dict]:
    return {k: s for k, s in series_of(window).items() if k.startswith("user=")}


def test_ten_thousand_user_ids_keep_records_small_and_counts_exact() -> None:
    core = make_core()
    events = [
        inference(i, i / 2000, {"user": f"u{i}", "locale": "fr" if i % 2 else "en"})
        for i in range(10_000)
    ]
    for start in range(0, 10_000, 1000):  # batches, as the worker hands them over
        core.on_inferences(0, [(i, events[i]) for i in range(start, start + 1000)])
    # The stored panes are bounded, not just the records: 100 users and the overflow.
    assert len([k for k in core.store.data if f"{SEP}user=" in k]) == 101
    # Feedback joined to a capped user and to an overflowed one.
    core.on_feedback(0, [(0, feedback(5, 6)), (1, feedback(9_000, 6))])
    core.on_inferences(0, [(10_000, inference(10_000, 40, {}))])
    windows = core.tick(0).windows
    t0_ms = int(T0.timestamp() * 1000)
    tumbling = next(w for w in windows if w["kind"] == "tumbling" and w["start_ms"] == t0_ms)
    # Every window covering the first pane has the same capped shape.
    for window in [w for w in windows if len(w["series"]) > 2]:
        users = user_series(window)
        assert len(users) == 101  # windows.max_segment_values (100) plus the overflow series
        assert sum(s["requests"] for s in users.values()) == 10_000
        assert users[f"user={OVERFLOW_VALUE}"]["requests"] == 9_900
        assert series_of(window)["*"]["requests"] == 10_000
        assert series_of(window)["locale=fr"]["requests"] == 5_000
        assert window["segment_overflow"] == {"user": {"requests": 9_900, "feedback": 1}}
        assert len(json.dumps(window)) < 150_000
    users = user_series(tumbling)
    assert users["user=u5"]["feedback"]["n"] == 1  # the first 100 users are kept as such
    assert users[f"user={OVERFLOW_VALUE}"]["feedback"]["n"] == 1
    assert core.counters.segment_overflow == 9_900 + 1
    registry = CollectorRegistry()
    PipelineMetrics(registry).sync(core)
    assert registry.get_sample_value("genmon_pipeline_segment_overflow_total") == 9_901


def test_the_stored_panes_hold_at_most_the_cap_and_the_cap_survives_a_restart() -> None:
    store = DictStore()
    core = make_core(store, max_segment_values=3)
    core.on_inferences(0, [(i, inference(i, i, {"user": f"u{i}"})) for i in range(6)])

    def pane_users() -> set[str]:
        return {k.split(SEP)[4] for k in store.data if f"{SEP}P{SEP}" in k and "user=" in k}

    assert pane_users() == {"user=u0", "user=u1", "user=u2", f"user={OVERFLOW_VALUE}"}
    restarted = make_core(store, max_segment_values=3)
    restarted.restore([0])
    # u1 still holds a slot; u9 finds the cap full, also after the restart.
    restarted.on_inferences(0, [(6, inference(6, 7, {"user": "u1"}))])
    restarted.on_inferences(0, [(7, inference(7, 8, {"user": "u9"}))])
    assert pane_users() == {"user=u0", "user=u1", "user=u2", f"user={OVERFLOW_VALUE}"}
    assert restarted.counters.segment_overflow == 1
    # Once the panes holding the values are dropped (their windows closed), slots free up.
    restarted.on_inferences(0, [(8, inference(8, 100, {}))])
    restarted.tick(0)
    restarted.on_inferences(0, [(9, inference(9, 101, {"user": "u9"}))])
    assert pane_users() == {"user=u9"}


def test_a_window_with_many_wide_attributes_is_folded_to_fit_with_counts_kept() -> None:
    core = make_core()
    attributes = [f"a{k:02d}" for k in range(30)]
    # 30 attributes x 100 values each: 3001 series at the cap, ~4 MB as a record.
    batch = [
        (i, inference(i, i / 100, {name: f"value-{name}-{i}" for name in attributes}))
        for i in range(100)
    ]
    core.on_inferences(0, batch)
    assert core.counters.segment_overflow == 0
    core.on_inferences(0, [(100, inference(100, 40, {}))])
    tumbling = next(w for w in core.tick(0).windows if w["kind"] == "tumbling")
    encoded = json.dumps(tumbling)
    assert len(encoded) < KAFKA_MAX_MESSAGE_BYTES
    assert len(json.dumps(tumbling["series"])) < SERIES_BUDGET_BYTES
    series = series_of(tumbling)
    for name in attributes:
        mine = [s for segment, s in series.items() if segment.startswith(f"{name}=")]
        assert sum(s["requests"] for s in mine) == 100  # folded, not lost
    assert core.counters.segment_folded > 1000
    noted = tumbling["segment_overflow"]
    assert noted and set(noted) <= set(attributes)
    for name, counts in noted.items():
        assert counts["requests"] == series[f"{name}={OVERFLOW_VALUE}"]["requests"] > 0


def test_segment_cap_doctest() -> None:
    assert doctest.testmod(segment_cap).failed == 0


# -- forgetting idle models ------------------------------------------------------------------


def stored_join_keys(store: DictStore) -> list[str]:
    return [
        key
        for record_key, record in store.data.items()
        if record_key.split(SEP)[1] == "S"
        for key in record_entries(record)
    ]


@pytest.mark.usefixtures("join_tables")
def test_a_forgotten_model_leaves_no_expired_join_entry_for_a_restart_to_restore() -> None:
    now = [NOW]
    settings = Settings(
        windows={
            "tumbling_s": 10,
            "hopping_size_s": 10,
            "hopping_step_s": 10,
            "allowed_lateness_s": 1,
            "idle_timeout_s": 1,
            "expires_s": 60,
        },
        feedback={"join_ttl_s": 30},
    )
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    # One batch, one segment record: "old"'s waiting feedback next to "busy"'s.
    core.on_feedback(0, [(0, feedback(1, 0, model="old")), (1, feedback(2, 0, model="busy"))])
    assert {k.split(SEP)[0] for k in stored_join_keys(core.store)} == {"old", "busy"}
    for step in range(1, 6):
        now[0] += 20
        # "busy" keeps sending feedback, so its clock never idles and its entry stays.
        core.on_feedback(0, [(1 + step, feedback(100 + step, 0, model="busy"))])
        core.tick(0)
    # "old" idled: its watermark passed the TTL (its feedback orphaned, once) and then,
    # without events for windows.expires_s, the model was forgotten.
    assert core.counters.orphaned == 1
    assert "old" not in core.store.data[f"0{SEP}M"]["models"]
    assert not any(k.startswith(f"old{SEP}") for k in stored_join_keys(core.store))

    store = DictStore()
    store.data = dict(core.store.data)
    restarted = WindowState(settings, store, clock=lambda: now[0])
    restarted.restore([0])
    assert restarted.pending_feedback == core.pending_feedback == 6  # busy's, none of old's
    assert restarted.join_entries == core.join_entries
