"""The wire events: what they accept, what they refuse, JSON round-trips, and the JSON Schema
files `genmon schemas export` writes for producers in other languages."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from genmon.cli import main
from genmon.exceptions import ConfigurationError
from genmon.schema_export import INDEX_FILE, event_json_schema, schema_id
from genmon.schemas.events import (
    EVENT_MODELS,
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_ID_CHARS,
    MAX_MESSAGES,
    MAX_METADATA_KEYS,
    MAX_TEXT_CHARS,
    SCHEMA_VERSION,
    ChatMessage,
    DeadLetter,
    FeedbackEvent,
    Finding,
    FindingKind,
    IncidentEvent,
    IncidentStatus,
    InferenceEvent,
    InferenceStatus,
    ModelAlias,
    ModelEvent,
    RetrainRequest,
    Severity,
    Thumbs,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def sample_events() -> dict[str, BaseModel]:
    """One valid event per topic kind, with the optional fields filled in."""
    return {
        "inference": InferenceEvent(
            request_id="r1",
            model_id="chat",
            model_version="v3",
            started_at=T0,
            finished_at=T0 + timedelta(seconds=1),
            prompt="What is 2+2?",
            response="4",
            messages=[
                ChatMessage(role="system", content="Answer with a number."),
                ChatMessage(role="user", content="What is 2+2?"),
            ],
            latency_ms=1000.0,
            time_to_first_token_ms=120.5,
            prompt_tokens=6,
            completion_tokens=1,
            status=InferenceStatus.OK,
            segment={"locale": "en-GB", "tier": "free"},
            subject_id="user-7f3a",
            metadata={"trace": {"id": "abc", "sampled": True}, "temperature": 0.2},
        ),
        "feedback": FeedbackEvent(
            request_id="r1", model_id="chat", created_at=T0, thumbs=Thumbs.DOWN, comment="wrong"
        ),
        "findings": Finding(
            model_id="chat",
            detector="ks",
            kind=FindingKind.DRIFT,
            signal="latency_ms",
            segment="locale=en-GB",
            window_start=T0,
            window_end=T0 + timedelta(minutes=1),
            score=0.4,
            threshold=0.2,
            detected=True,
            p_value=0.001,
            n_seen=512,
            evidence={"reference_mean": 120.0},
            severity=Severity.ERROR,
            title="latency p95 2.4 s, baseline 0.6 s, chat, locale=en-GB",
        ),
        "incidents": IncidentEvent(
            incident_id="i1",
            fingerprint="f" * 32,
            model_id="chat",
            status=IncidentStatus.OPEN,
            severity=Severity.WARNING,
            title="latency drift on chat",
            transition="opened",
        ),
        "retrain": RetrainRequest(
            model_id="chat", base_version="v3", reason="drift", examples_since=T0
        ),
        "models": ModelEvent(
            model_id="chat",
            alias=ModelAlias.CHAMPION,
            version="v4",
            previous_version="v3",
            artifact_uri="file:///artifacts/chat/v4/adapter",
            base_uri="/models/base",
            action="promoted",
            at=T0,
        ),
        "deadletter": DeadLetter(
            reason="invalid",
            error="latency_ms: field required",
            source_topic="genmon.inference",
            partition=0,
            offset=42,
            payload_b64="e30=",
            payload_size=2,
            payload_truncated=False,
        ),
    }


def valid_inference(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "r1",
        "model_id": "chat",
        "started_at": "2026-05-01T12:00:00+00:00",
        "prompt": "hi",
        "response": "hello",
        "latency_ms": 12.5,
    }
    base.update(changes)
    return base


def test_there_is_a_sample_for_every_event_kind() -> None:
    assert set(sample_events()) == set(EVENT_MODELS)
    for kind, event in sample_events().items():
        assert isinstance(event, EVENT_MODELS[kind])


@pytest.mark.parametrize("kind", sorted(EVENT_MODELS))
def test_valid_events_round_trip_through_json(kind: str) -> None:
    event = sample_events()[kind]
    model = EVENT_MODELS[kind]
    assert model.model_validate_json(event.model_dump_json()) == event


def test_limits_at_the_edge_are_accepted() -> None:
    event = InferenceEvent.model_validate(
        valid_inference(
            request_id="r" * MAX_ID_CHARS,
            prompt="p" * MAX_TEXT_CHARS,
            segment={
                f"{i:0{MAX_ATTRIBUTE_KEY_CHARS}d}": "v" * MAX_ATTRIBUTE_VALUE_CHARS
                for i in range(MAX_ATTRIBUTES)
            },
            metadata={f"k{i}": i for i in range(MAX_METADATA_KEYS)},
            messages=[{"role": "tool", "content": "t" * MAX_TEXT_CHARS}]
            + [{"role": "user", "content": ""}] * (MAX_MESSAGES - 1),
        )
    )
    assert len(event.segment) == MAX_ATTRIBUTES
    assert event.messages is not None and len(event.messages) == MAX_MESSAGES


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "p" * (MAX_TEXT_CHARS + 1)}, "at most 32768 characters"),
        ({"response": "r" * (MAX_TEXT_CHARS + 1)}, "at most 32768 characters"),
        ({"request_id": "r" * (MAX_ID_CHARS + 1)}, "at most 256 characters"),
        ({"model_id": ""}, "at least 1 character"),
        ({"segment": {f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}}, "at most 32 segment"),
        ({"segment": {"k" * (MAX_ATTRIBUTE_KEY_CHARS + 1): "v"}}, "must be 1-64 chars"),
        ({"segment": {"": "v"}}, "must be 1-64 chars"),
        ({"segment": {"k": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)}}, "longer than 256"),
        ({"segment": {"k": 3}}, "valid string"),
        ({"metadata": {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}}, "at most 64 metadata"),
        ({"schema_version": 2}, "Input should be 1"),
        ({"latency_ms": "fast"}, "valid number"),
        ({"latency_ms": -1.0}, "greater than or equal to 0"),
        ({"prompt": 123}, "valid string"),
        ({"prompt_tokens": 1.5}, "valid integer"),
        ({"status": "exploded"}, "Input should be 'ok'"),
        ({"started_at": "2026-05-01T12:00:00"}, "timezone"),
        ({"finished_at": "2026-05-01T11:59:59+00:00"}, "finished_at is before started_at"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
        (
            {"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)},
            "messages\n  List should have at most 256 items",
        ),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role\n  Input should be"),
        (
            {"messages": [{"role": "user", "content": "c" * (MAX_TEXT_CHARS + 1)}]},
            "messages.0.content\n  String should have at most 32768 characters",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content\n  Field required"),
        ({"messages": [{"role": "user", "content": None}]}, "valid string"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "Extra inputs"),
        ({"messages": {"role": "user", "content": "x"}}, "valid array"),
    ],
)
def test_inference_limits_are_enforced(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InferenceEvent.model_validate_json(json.dumps(valid_inference(**changes)))


def test_too_many_messages_are_oversized_and_the_byte_limit_still_holds() -> None:
    from genmon.exceptions import SchemaError
    from genmon.schemas import codec

    many = valid_inference(messages=[{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1))
    with pytest.raises(SchemaError) as refused:
        codec.decode(json.dumps(many).encode(), InferenceEvent)
    assert refused.value.reason == codec.OVERSIZED
    # Each turn within its limits, but the message beyond the event's byte limit.
    big = valid_inference(messages=[{"role": "user", "content": "x" * MAX_TEXT_CHARS}] * 9)
    with pytest.raises(SchemaError, match="more than the 262144 accepted") as refused:
        codec.decode(json.dumps(big).encode(), InferenceEvent)
    assert refused.value.reason == codec.OVERSIZED


def test_a_labelled_example_keeps_the_chat_of_its_inference() -> None:
    from genmon.schemas.tables import LabelledExampleCreate

    chat = sample_events()["inference"]
    feedback = FeedbackEvent(request_id="r1", model_id="chat", correction="four")
    assert isinstance(chat, InferenceEvent)
    assert LabelledExampleCreate.from_events(chat, feedback).messages == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    plain = chat.model_copy(update={"messages": None})
    assert LabelledExampleCreate.from_events(plain, feedback).messages is None


def test_timezone_naive_datetime_objects_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        FeedbackEvent(request_id="r", model_id="m", score=1.0, created_at=datetime(2026, 1, 1))


def test_feedback_must_say_something() -> None:
    with pytest.raises(ValidationError, match="at least one of score, thumbs"):
        FeedbackEvent(request_id="r", model_id="m")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        FeedbackEvent(request_id="r", model_id="m", score=1.5)
    assert FeedbackEvent(request_id="r", model_id="m", label="toxic").normalized_score is None
    assert FeedbackEvent(request_id="r", model_id="m", thumbs="up").normalized_score == 1.0


def test_events_are_immutable() -> None:
    event = InferenceEvent.model_validate(valid_inference())
    with pytest.raises(ValidationError, match="frozen"):
        event.prompt = "changed"


def test_finding_fingerprint_ignores_the_window_and_dedup_key_does_not() -> None:
    finding = sample_events()["findings"]
    assert isinstance(finding, Finding)
    later = finding.model_copy(update={"window_end": T0 + timedelta(minutes=2), "score": 0.9})
    assert later.fingerprint == finding.fingerprint
    assert later.dedup_key != finding.dedup_key
    other_segment = finding.model_copy(update={"segment": "locale=fr"})
    assert other_segment.fingerprint != finding.fingerprint


def test_finding_severity_and_title_are_optional_and_not_part_of_its_identity() -> None:
    finding = sample_events()["findings"]
    assert isinstance(finding, Finding)
    document = json.loads(finding.model_dump_json(exclude={"severity", "title"}))
    bare = Finding.model_validate(document)  # what producers sent before these fields
    assert bare.severity is None and bare.title is None
    assert (bare.fingerprint, bare.dedup_key) == (finding.fingerprint, finding.dedup_key)
    # The same key as before the fields existed: open incidents keep matching their findings.
    key = "\x1f".join(["chat", "ks", "latency_ms", "locale=en-GB"]).encode()
    assert finding.fingerprint == hashlib.sha256(key).hexdigest()[:32]
    assert finding.dedup_key == f"{finding.fingerprint}:{(T0 + timedelta(minutes=1)).isoformat()}"


def finding_document(**changes: Any) -> dict[str, Any]:
    document = json.loads(sample_events()["findings"].model_dump_json())
    document.update(changes)
    return dict(document)


# --- properties -------------------------------------------------------------------------

#: Identifiers never hold NUL (the worker refuses them; see test_storable_text.py).
key_chars = st.characters(codec="utf-8", exclude_characters="\x00")
ids = st.text(key_chars, min_size=1, max_size=40)
texts = st.text(max_size=300)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    offsets,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


chat_messages = st.builds(
    ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=texts
)


@st.composite
def inference_events(draw: st.DrawFn) -> InferenceEvent:
    started = draw(aware)
    took = draw(st.none() | st.timedeltas(timedelta(0), timedelta(hours=1)))
    return InferenceEvent(
        request_id=draw(ids),
        model_id=draw(ids),
        model_version=draw(ids),
        started_at=started,
        finished_at=None if took is None else started + took,
        prompt=draw(texts),
        response=draw(texts),
        messages=draw(st.none() | st.lists(chat_messages, max_size=4)),
        latency_ms=draw(st.floats(0, 86_400_000, allow_nan=False)),
        time_to_first_token_ms=draw(st.none() | st.floats(0, 86_400_000, allow_nan=False)),
        prompt_tokens=draw(st.none() | st.integers(0, 10_000_000)),
        completion_tokens=draw(st.none() | st.integers(0, 10_000_000)),
        status=draw(st.sampled_from(InferenceStatus)),
        error_code=draw(st.none() | st.text(key_chars, max_size=128)),
        segment=draw(
            st.dictionaries(
                st.text(key_chars, min_size=1, max_size=MAX_ATTRIBUTE_KEY_CHARS),
                st.text(key_chars, max_size=MAX_ATTRIBUTE_VALUE_CHARS),
                max_size=MAX_ATTRIBUTES,
            )
        ),
        subject_id=draw(st.none() | ids),
        metadata=draw(st.dictionaries(st.text(max_size=20), json_values, max_size=8)),
    )


@settings(max_examples=150, deadline=None)
@given(inference_events())
def test_any_valid_inference_event_survives_json(event: InferenceEvent) -> None:
    assert InferenceEvent.model_validate_json(event.model_dump_json()) == event


INFERENCE_VALIDATOR = jsonschema.Draft202012Validator(
    event_json_schema("inference"), format_checker=jsonschema.FormatChecker()
)


@settings(max_examples=100, deadline=None)
@given(inference_events())
def test_any_valid_inference_event_satisfies_the_exported_schema(event: InferenceEvent) -> None:
    INFERENCE_VALIDATOR.validate(json.loads(event.model_dump_json()))


# --- exported JSON Schema ---------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas") / "nested"
    result = CliRunner().invoke(main, ["schemas", "export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == len(EVENT_MODELS) + 1
    return out


def load(out: Path, kind: str) -> dict[str, Any]:
    return dict(json.loads((out / f"{kind}.schema.json").read_text(encoding="utf-8")))


def validator(out: Path, kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        load(out, kind), format_checker=jsonschema.FormatChecker()
    )


def test_index_lists_every_kind_with_its_file_and_id(exported: Path) -> None:
    index = json.loads((exported / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["schema_version"] == SCHEMA_VERSION
    assert [entry["kind"] for entry in index["schemas"]] == list(EVENT_MODELS)
    for entry in index["schemas"]:
        schema = load(exported, entry["kind"])
        assert (exported / entry["file"]).is_file()
        assert entry["$id"] == schema["$id"] == schema_id(entry["kind"])
        assert entry["title"] == schema["title"] == EVENT_MODELS[entry["kind"]].__name__


@pytest.mark.parametrize("kind", list(EVENT_MODELS))
def test_each_file_is_a_valid_2020_12_schema_that_accepts_a_real_event(
    exported: Path, kind: str
) -> None:
    schema = load(exported, kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["description"]
    jsonschema.Draft202012Validator.check_schema(schema)
    event = sample_events()[kind]
    validator(exported, kind).validate(json.loads(event.model_dump_json()))


def inference(**changes: Any) -> dict[str, Any]:
    event = json.loads(sample_events()["inference"].model_dump_json())
    event.update(changes)
    return dict(event)


@pytest.mark.parametrize(
    ("kind", "document"),
    [
        ("inference", inference(schema_version=2)),
        ("inference", inference(latency_ms="fast")),
        ("inference", inference(started_at="2026-05-01T12:00:00")),
        ("inference", inference(prompt="p" * 32_769)),
        ("inference", inference(segment={f"k{i}": "v" for i in range(33)})),
        ("inference", inference(segment={"k" * 65: "v"})),
        ("inference", inference(segment={"k": "v" * 257})),
        ("inference", inference(metadata={f"k{i}": i for i in range(65)})),
        ("inference", inference(messages=[{"role": "user", "content": "x"}] * 257)),
        ("inference", inference(messages=[{"role": "bot", "content": "x"}])),
        ("inference", inference(messages=[{"role": "user", "content": "x", "name": "n"}])),
        ("inference", inference(messages=[{"role": "user", "content": "x" * 32_769}])),
        ("inference", inference(colour="blue")),
        ("inference", {key: value for key, value in inference().items() if key != "model_id"}),
        ("feedback", {"request_id": "r1", "model_id": "chat"}),
        ("feedback", {"request_id": "r1", "model_id": "chat", "score": None}),
        ("feedback", {"request_id": "r1", "model_id": "chat", "thumbs": "sideways"}),
        ("findings", finding_document(severity="fatal")),
        ("findings", finding_document(title="t" * 513)),
    ],
)
def test_exported_schema_refuses_what_the_worker_refuses(
    exported: Path, kind: str, document: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        EVENT_MODELS[kind].model_validate(document)
    assert list(validator(exported, kind).iter_errors(document)), document


def test_feedback_with_one_field_passes_the_exported_schema(exported: Path) -> None:
    document = {"request_id": "r1", "model_id": "chat", "label": "toxic"}
    validator(exported, "feedback").validate(document)


def test_unknown_kind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="choose one of"):
        event_json_schema("telemetry")


def test_export_to_an_unwritable_place_fails_with_a_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["schemas", "export", "--out", str(blocker / "sub")])
    assert result.exit_code == 1
    assert "choose a writable folder with --out" in result.output


@pytest.mark.parametrize(
    "module", ["genmon.schemas.events", "genmon.schemas.tables", "genmon.schema_export"]
)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0
    assert result.failed == 0
