"""Unit tests of the feedback join (pure core): order, redelivery, TTL and orphans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.windows.join import record_entries
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

pytestmark = pytest.mark.usefixtures("join_tables")

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def inf(rid: str, t_s: float, **kw) -> InferenceEvent:
    return InferenceEvent(
        request_id=rid,
        model_id="chat",
        model_version="v2",
        latency_ms=10.0,
        prompt="p" * 50,
        response="r" * 50,
        started_at=T0 + timedelta(seconds=t_s),
        **kw,
    )


def fb(rid: str, t_s: float, fid: str, **kw) -> FeedbackEvent:
    kw.setdefault("thumbs", "down")
    return FeedbackEvent(
        feedback_id=fid,
        request_id=rid,
        model_id="chat",
        created_at=T0 + timedelta(seconds=t_s),
        **kw,
    )


def make_core(now):
    settings = Settings(
        windows={
            "tumbling_s": 10,
            "hopping_size_s": 10,
            "hopping_step_s": 10,
            "allowed_lateness_s": 1,
            "idle_timeout_s": 1000,
        },
        feedback={"join_ttl_s": 30, "join_max_text_chars": 20},
    )
    return WindowState(settings, DictStore(), clock=lambda: now[0])


def test_feedback_before_and_after_inference_joins_once_each_and_redelivery_is_ignored():
    now = [T0.timestamp() + 3600]
    core = make_core(now)
    assert core.on_feedback(0, [(0, fb("early", 1, "f1", score=0.9))]).examples == []
    assert core.pending_feedback == 1
    out = core.on_inferences(
        0, [(0, inf("early", 2, segment={"tier": "free"})), (1, inf("late", 3))]
    )
    assert [row["request_id"] for row in out.examples] == ["early"]
    row = out.examples[0]
    assert row["score"] == 0.9 and row["model_version"] == "v2" and len(row["prompt"]) == 20
    assert core.pending_feedback == 0
    out = core.on_feedback(0, [(1, fb("late", 5, "f2")), (2, fb("late", 5, "f2"))])
    assert [row["request_id"] for row in out.examples] == ["late"]  # f2 twice -> one join
    assert core.counters.joined == 2
    core.on_inferences(0, [(2, inf("x", 15))])
    window = next(w for w in core.tick(0).windows if w["kind"] == "tumbling")
    by_seg = {s["segment"]: s["feedback"] for s in window["series"]}
    assert by_seg["*"]["n"] == 2 and by_seg["*"]["negative"] == 1
    assert by_seg["*"]["mean_score"] == 0.45
    assert by_seg["tier=free"] == {
        "n": 1,
        "positive": 1,
        "negative": 0,
        "negative_rate": 0.0,
        "mean_score": 0.9,
    }


def test_unjoined_feedback_is_orphaned_after_the_ttl_and_entries_are_dropped():
    now = [T0.timestamp() + 3600]
    core = make_core(now)
    core.on_feedback(0, [(0, fb("ghost", 1, "g1")), (1, fb("ghost", 2, "g2"))])
    core.on_inferences(0, [(0, inf("solo", 1))])
    core.on_inferences(0, [(1, inf("tick", 31))])  # watermark 31 s: ghost expires at 32 s
    core.tick(0)
    assert core.counters.orphaned == 0 and core.pending_feedback == 1
    core.on_inferences(0, [(2, inf("tick2", 40))])
    core.tick(0)
    assert core.counters.orphaned == 2 and core.pending_feedback == 0
    stored = [key for value in segments(core).values() for key in record_entries(value)]
    assert sorted(key.split("\x1f")[-1] for key in stored) == ["tick", "tick2"]


def segments(core: WindowState) -> dict[str, dict]:
    return {k: v for k, v in core.store.data.items() if k.split("\x1f")[1] == "S"}


def test_join_state_survives_a_restart_and_segments_are_compacted():
    now = [T0.timestamp() + 3600]
    core = make_core(now)
    core.on_feedback(0, [(0, fb("a", 1, "fa"))])
    core.on_inferences(0, [(i, inf(f"r{i}", 1)) for i in range(50)])
    core.on_feedback(0, [(1, fb(f"r{i}", 2, f"f{i}")) for i in range(50)])
    assert len(segments(core)) == 2  # the first batches' segments are fully superseded
    restarted = WindowState(
        Settings(
            windows={
                "tumbling_s": 10,
                "hopping_size_s": 10,
                "hopping_step_s": 10,
                "allowed_lateness_s": 1,
                "idle_timeout_s": 1000,
            },
            feedback={"join_ttl_s": 30, "join_max_text_chars": 20},
        ),
        core.store,
        clock=lambda: now[0],
    )
    restarted.restore([0])
    assert restarted.pending_feedback == 1
    out = restarted.on_inferences(0, [(50, inf("a", 3))])
    assert [row["request_id"] for row in out.examples] == ["a"]
    again = restarted.on_feedback(0, [(2, fb("r7", 2, "f7"))])  # already joined before restart
    assert again.examples == []


def test_labelled_examples_are_inserted_once_per_model_and_request(tmp_path):
    import sqlalchemy as sa

    from genmon.db import make_engine, upgrade
    from genmon.streams.labelled_examples import insert_examples

    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    now = [T0.timestamp() + 3600]
    core = make_core(now)
    core.on_inferences(0, [(0, inf("a", 1)), (1, inf("b", 1))])
    rows = core.on_feedback(0, [(0, fb("a", 2, "fa")), (1, fb("b", 2, "fb", score=1.0))]).examples
    insert_examples(engine, rows)
    insert_examples(engine, rows)  # redelivered batch
    insert_examples(engine, [{**rows[0], "score": 0.5, "label": "other"}])  # later feedback
    with engine.connect() as conn:
        got = conn.execute(
            sa.text("select request_id, score from labelled_example order by request_id")
        ).all()
    assert got == [("a", 0.0), ("b", 1.0)]
