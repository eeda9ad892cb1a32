"""Ingest without a broker: reason codes, dead-letter records, sequence checks, sinks, stats."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from genmon.exceptions import SchemaError
from genmon.schemas import codec
from genmon.schemas.events import MAX_EVENT_BYTES, DeadLetter, FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.app import GenmonApp, create_app
from genmon.streams.exceptions import StreamError
from genmon.streams.ingest import SOURCE_POSITIONS, Ingestor, IngestSinks, SequenceTracker
from genmon.streams.metrics import WorkerMetrics

VALID = {"model_id": "chat", "latency_ms": 12.5, "prompt": "hi", "response": "hello"}


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


BAD_MESSAGES: dict[str, list[bytes | None]] = {
    "empty_payload": [b"", b"  \n", None],
    "oversized": [
        _json(**{**VALID, "prompt": "x" * 40_000}),
        _json(**{**VALID, "metadata": {"blob": "y" * (MAX_EVENT_BYTES + 1)}}),
    ],
    "not_utf8": [b"\xff\xfe\x00garbage", '{"model_id": "é"}'.encode("latin-1")],
    "bad_json": [b'{"model_id": "chat", ', b"model_id=chat", b"{'a': 1}"],
    "not_an_object": [b"[1, 2]", b'"text"', b"42", b"null"],
    "unknown_schema_version": [
        _json(**VALID, schema_version=2),
        _json(**VALID, schema_version="1"),
    ],
    "missing_field": [_json(model_id="chat"), _json(latency_ms=1.0)],
    "wrong_type": [
        _json(**{**VALID, "latency_ms": "fast"}),
        _json(**{**VALID, "segment": ["a"]}),
        _json(**{**VALID, "started_at": "yesterday"}),
    ],
    "unknown_field": [_json(**VALID, temperature=0.7)],
    "invalid_value": [
        _json(**{**VALID, "latency_ms": -1}),
        _json(**{**VALID, "status": "exploded"}),
        _json(**{**VALID, "started_at": "2024-01-01T00:00:00"}),
        _json(**{**VALID, "model_id": "m", "segment": {f"k{i}": "v" for i in range(40)}}),
    ],
}


def test_reason_list_is_documented_and_complete() -> None:
    assert set(BAD_MESSAGES) == set(codec.REASONS)
    for reason in codec.REASONS:
        assert f"``{reason}``" in (codec.__doc__ or "")


@pytest.mark.parametrize(
    ("reason", "raw"),
    [(reason, raw) for reason, raws in BAD_MESSAGES.items() for raw in raws],
)
def test_decode_classifies_each_bad_message(reason: str, raw: bytes | None) -> None:
    with pytest.raises(SchemaError) as caught:
        codec.decode(raw, InferenceEvent)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_decode_accepts_a_valid_message_and_round_trips() -> None:
    event = InferenceEvent(**VALID)
    assert codec.decode(codec.encode(event), InferenceEvent) == event


def test_most_fundamental_reason_wins_and_every_problem_is_listed() -> None:
    raw = _json(latency_ms="fast", status="exploded")  # model_id missing too
    with pytest.raises(SchemaError) as caught:
        codec.decode(raw, InferenceEvent)
    assert caught.value.reason == "missing_field"
    assert "model_id" in str(caught.value)
    assert "latency_ms" in str(caught.value)
    assert "status" in str(caught.value)


def test_dead_letter_keeps_bytes_up_to_the_limit() -> None:
    raw = b"\x00\xff" * 100
    kept = codec.dead_letter(
        raw,
        reason="bad_json",
        error="e",
        source_topic="t",
        partition=2,
        offset=7,
        max_payload_bytes=1000,
    )
    cut = codec.dead_letter(
        raw,
        reason="bad_json",
        error="e",
        source_topic="t",
        partition=2,
        offset=7,
        max_payload_bytes=50,
    )
    assert base64.b64decode(kept.payload_b64) == raw
    assert (kept.payload_size, kept.payload_truncated) == (200, False)
    assert base64.b64decode(cut.payload_b64) == raw[:50]
    assert (cut.payload_size, cut.payload_truncated) == (200, True)
    assert DeadLetter.model_validate_json(codec.encode(cut)) == cut


def test_sequence_tracker_counts_gaps_reorders_and_duplicates() -> None:
    tracker = SequenceTracker()
    seen = [tracker.observe("t", 0, b"p1", b"m", seq) for seq in (5, 6, 9, 8, 9, 10)]
    assert [check.missing for check in seen] == [0, 0, 2, 0, 0, 0]
    assert [check.out_of_order for check in seen] == [False, False, False, True, False, False]
    assert [check.duplicate for check in seen] == [False, False, False, False, True, False]
    # Another producer, model or topic has its own sequence.
    assert tracker.observe("t", 0, b"p2", b"m", 0).missing == 0
    assert tracker.observe("t", 0, b"p1", b"other", 0).missing == 0
    assert tracker.observe("u", 0, b"p1", b"m", 0).missing == 0


def test_sequence_tracker_memory_is_bounded_and_revoked_partitions_are_forgotten() -> None:
    from faust.types import TP

    tracker = SequenceTracker(max_entries=10)
    for producer in range(50):
        tracker.observe("t", producer % 2, str(producer).encode(), b"m", 0)
    assert len(tracker) == 10
    tracker.forget({TP("t", 0)})
    assert len(tracker) == 5
    # A forgotten key starts afresh: no gap is invented.
    assert tracker.observe("t", 0, b"48", b"m", 7).missing == 0


@dataclass
class Message:
    """A Kafka message as the ingest agent sees it (the fields of ``faust.types.Message``)."""

    value: bytes | None
    offset: int
    key: bytes | None = b"chat"
    topic: str = "genmon.inference"
    partition: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def _sdk_message(offset: int, seq: int, producer: bytes = b"p1") -> Message:
    return Message(
        codec.encode(InferenceEvent(**VALID)),
        offset,
        headers=[(codec.HEADER_PRODUCER, producer), (codec.HEADER_SEQ, str(seq).encode())],
    )


@pytest.fixture
def app() -> GenmonApp:
    return create_app(
        Settings.model_validate({"worker": {"dlq_max_payload_bytes": 16}}), installers=()
    )


def test_validate_splits_a_batch_and_counts_by_topic_and_reason(app: GenmonApp) -> None:
    ingestor = Ingestor(app)
    messages = [
        Message(_json(**VALID), 0),
        Message(b"{nope", 1, key=b"k1"),
        Message(_json(**VALID), 2, topic="other", partition=3),
        Message(b"", 3, key=None),
        Message(_json(**VALID, schema_version=9), 4, partition=1),
    ]
    batch = ingestor.validate(InferenceEvent, messages)

    assert [event.model_id for event in batch.valid] == ["chat", "chat"]
    assert [(key, record.reason, record.partition, record.offset)
            for key, record in batch.dead] == [
        (b"k1", "bad_json", 0, 1), (None, "empty_payload", 0, 3),
        (b"chat", "unknown_schema_version", 1, 4),
    ]  # fmt: skip
    long_payload = batch.dead[2][1]
    assert long_payload.payload_truncated and len(base64.b64decode(long_payload.payload_b64)) == 16
    stats = app.genmon.metrics.snapshot()["ingest"]
    assert stats["valid"] == 2 and stats["invalid"] == 3
    assert stats["valid_by_topic"] == {"genmon.inference": 1, "other": 1}
    assert stats["invalid_by_reason"] == {
        "bad_json": 1, "empty_payload": 1, "unknown_schema_version": 1,
    }  # fmt: skip


def test_validate_counts_sequence_gaps_and_reorders(app: GenmonApp) -> None:
    ingestor = Ingestor(app)
    seqs = [0, 1, 2, 5, 4, 6, 6, 7]  # 3 lost, 4 late, 6 twice
    ingestor.validate(InferenceEvent, [_sdk_message(i, seq) for i, seq in enumerate(seqs)])
    ingestor.validate(InferenceEvent, [Message(_json(**VALID), 99)])  # no headers: not tracked
    stats = app.genmon.metrics.snapshot()["ingest"]
    assert (stats["gaps"], stats["out_of_order"], stats["duplicates"]) == (2, 1, 1)


def test_sinks_get_each_batch_once_and_a_failing_sink_is_contained(app: GenmonApp) -> None:
    sinks: IngestSinks = app.genmon.sinks
    received: list[list[str]] = []

    async def broken(events: list[InferenceEvent]) -> None:
        raise RuntimeError("bug in a sink")

    @sinks.add_inference_sink
    async def collect(events: list[InferenceEvent]) -> None:
        received.append([event.request_id for event in events])

    sinks.add_inference_sink(broken, name="broken")
    sinks.add_inference_sink(collect, name="collect-again")
    feedback: list[FeedbackEvent] = []

    async def take_feedback(events: list[FeedbackEvent]) -> None:
        feedback.extend(events)

    sinks.add_feedback_sink(take_feedback)
    events = [InferenceEvent(**VALID) for _ in range(3)]
    metrics: WorkerMetrics = app.genmon.metrics

    asyncio.run(sinks.deliver_inference(events, metrics))
    asyncio.run(sinks.deliver_inference([], metrics))

    ids = [event.request_id for event in events]
    assert received == [ids, ids]
    assert feedback == []
    assert sinks.names("inference")[1:] == ["broken", "collect-again"]
    assert metrics.snapshot()["ingest"]["sink_errors"] == 1


def test_stats_snapshot_is_json_and_matches_prometheus_text(app: GenmonApp) -> None:
    metrics: WorkerMetrics = app.genmon.metrics
    metrics.ingest_valid.labels("genmon.inference").inc(3)
    metrics.ingest_invalid.labels("genmon.inference", "bad_json").inc()
    snapshot = json.loads(json.dumps(metrics.snapshot()))
    assert snapshot["metrics"]["genmon_ingest_valid_total"] == {"topic=genmon.inference": 3}
    text = metrics.prometheus_text().decode()
    assert 'genmon_ingest_valid_total{topic="genmon.inference"} 3.0' in text
    assert 'genmon_ingest_invalid_total{reason="bad_json",topic="genmon.inference"} 1.0' in text


def test_apps_have_their_own_metrics_and_topics_follow_the_prefix() -> None:
    first = create_app(Settings.model_validate({"kafka": {"topic_prefix": "a"}}), installers=())
    second = create_app(
        Settings.model_validate({"kafka": {"topic_prefix": "b"}}),
        installers=["genmon.streams.ingest:install"],
    )
    first.genmon.metrics.ingest_valid.labels("x").inc()
    assert second.genmon.metrics.snapshot()["ingest"]["valid"] == 0
    assert first.genmon.topics.inference.get_topic_name() == "a.inference"
    assert second.genmon.topics["deadletter"].get_topic_name() == "b.deadletter"
    assert sorted(second.agents) == ["genmon.ingest.feedback", "genmon.ingest.inference"]
    assert second.genmon.ingestor is not None


def test_an_installer_that_cannot_be_found_says_how_to_name_it() -> None:
    with pytest.raises(StreamError, match=r"package\.module:function"):
        create_app(
            Settings.model_validate({}), installers=["genmon.streams.ingest:no_such_function"]
        )


def test_sinks_see_the_source_position_of_each_event(app: GenmonApp) -> None:
    seen: list[tuple[list[str], Any]] = []

    async def sink(events: list[InferenceEvent]) -> None:
        seen.append(([event.model_id for event in events], SOURCE_POSITIONS.get()))

    app.genmon.sinks.add_inference_sink(sink)
    messages = [
        Message(_json(**{**VALID, "model_id": "a"}), 10, partition=1),
        Message(_json(**{**VALID, "model_id": "b"}), 4, partition=3),
        Message(_json(**{**VALID, "model_id": "c"}), 11, partition=1),
    ]
    asyncio.run(Ingestor(app).handle_inference(messages))
    assert seen == [(["a", "b", "c"], [(1, 10), (3, 4), (1, 11)])]
    assert SOURCE_POSITIONS.get() is None


def test_native_batches_count_like_the_python_path_and_keep_message_order(
    app: GenmonApp,
) -> None:
    """The native decoder defers some messages (no request_id: its default is generated,
    a number in a string, invalid ones): the counters, dead letters, sequence checks and
    the order sinks see are those of the pydantic path."""
    native_ingestor = Ingestor(app)
    assert native_ingestor.decoder is not None
    python_app = create_app(
        Settings.model_validate({"worker": {"dlq_max_payload_bytes": 16, "native_ingest": False}}),
        installers=(),
    )
    python_ingestor = Ingestor(python_app)
    assert python_ingestor.decoder is None
    started = '"started_at": "2026-11-29T10:00:00Z"'
    values = [
        _json(**VALID, request_id="a", started_at="2026-11-29T10:00:00Z"),  # read natively
        _json(**VALID),  # deferred (no request_id, no started_at), valid
        b'{"model_id": "chat", "latency_ms": "12", "request_id": "c", ' + started.encode() + b"}",
        b"{nope",
        _json(**VALID, request_id="e", started_at="2026-11-29T10:00:01Z"),
    ]
    seqs = [0, 1, 3, 2, 3]  # 1 lost, 1 late, 1 twice

    def messages() -> list[Message]:
        return [
            Message(
                value,
                10 + i,
                partition=i % 2,
                headers=[(codec.HEADER_PRODUCER, b"p"), (codec.HEADER_SEQ, str(seq).encode())],
            )
            for i, (value, seq) in enumerate(zip(values, seqs, strict=True))
        ]

    native_batch, native_dead = native_ingestor.validate_inferences(messages())
    python_batch, python_dead = python_ingestor.validate_inferences(messages())
    assert native_batch.native is not None and python_batch.native is None
    assert native_batch.native.deferred == [1, 2, 3]
    ids = [e.request_id for e in native_batch.events]
    assert ids[0] == "a" and ids[2:] == ["c", "e"]
    assert [(e.model_id, e.latency_ms) for e in native_batch.events] == [
        (e.model_id, e.latency_ms) for e in python_batch.events
    ]
    assert native_batch.positions == python_batch.positions == [(0, 10), (1, 11), (0, 12), (0, 14)]
    assert (
        [record.reason for _, record in native_dead]
        == [record.reason for _, record in python_dead]
        == ["bad_json"]
    )
    assert app.genmon.metrics.snapshot()["ingest"] == python_app.genmon.metrics.snapshot()["ingest"]
    stats = app.genmon.metrics.snapshot()["ingest"]
    assert (stats["valid"], stats["invalid"]) == (4, 1)
    assert (stats["gaps"], stats["out_of_order"], stats["duplicates"]) == (1, 1, 1)


def test_without_the_native_module_the_worker_says_so_once_and_takes_the_python_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from genmon.streams import native

    def started() -> tuple[GenmonApp, list[str]]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="genmon.streams.ingest"):
            app = create_app(Settings(), installers=["genmon.streams.ingest:install"])
        return app, [r.getMessage() for r in caplog.records if "genmon-native" in r.getMessage()]

    app, said = started()
    assert app.genmon.ingestor is not None and app.genmon.ingestor.decoder is not None
    assert said == []
    monkeypatch.setattr(native, "_native", None)
    app, said = started()
    assert app.genmon.ingestor is not None and app.genmon.ingestor.decoder is None
    assert len(said) == 1 and "pip install" in said[0]
