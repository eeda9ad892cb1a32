"""Text the database can store: NUL and lone surrogates are refused in identifiers and
replaced by U+FFFD in free text, on the wire, in the SDK and in the exported JSON Schema."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from genmon import Monitor
from genmon.exceptions import SchemaError
from genmon.schema_export import event_json_schema
from genmon.schemas import codec
from genmon.schemas.events import (
    FeedbackEvent,
    Finding,
    IncidentEvent,
    InferenceEvent,
    RetrainRequest,
)

INFERENCE = {"request_id": "r1", "model_id": "chat", "latency_ms": 5.0}
FEEDBACK = {"request_id": "r1", "model_id": "chat", "score": 0.5}
FINDING = {
    "model_id": "chat",
    "detector": "ks",
    "kind": "drift",
    "signal": "latency_ms",
    "score": 1.0,
    "threshold": 0.5,
    "detected": True,
}
INCIDENT = {
    "incident_id": "i1",
    "fingerprint": "f" * 32,
    "model_id": "chat",
    "status": "open",
    "severity": "error",
    "title": "t",
    "transition": "opened",
}
RETRAIN = {"model_id": "chat", "base_version": "v1"}

#: How a producer's JSON spells each unstorable code point.
NUL, LONE_HIGH, LONE_LOW = "\\u0000", "\\ud800", "\\udfff"


def _wire(base: dict[str, Any], field: str, value: Any) -> bytes:
    """``base`` with ``field`` set, ``@`` in its strings written as a raw JSON escape."""
    text = json.dumps({**base, field: value})
    return text.replace("@", "{}").encode()


IDENTIFIERS: list[tuple[type[BaseModel], dict[str, Any], str, Any]] = [
    (InferenceEvent, INFERENCE, "model_id", "chat@"),
    (InferenceEvent, INFERENCE, "request_id", "@r1"),
    (InferenceEvent, INFERENCE, "model_version", "v@"),
    (InferenceEvent, INFERENCE, "subject_id", "s@"),
    (InferenceEvent, INFERENCE, "error_code", "E@"),
    (InferenceEvent, INFERENCE, "segment", {"locale@": "de"}),
    (InferenceEvent, INFERENCE, "segment", {"locale": "d@e"}),
    (FeedbackEvent, FEEDBACK, "model_id", "@"),
    (FeedbackEvent, FEEDBACK, "request_id", "r@"),
    (FeedbackEvent, FEEDBACK, "feedback_id", "f@"),
    (FeedbackEvent, FEEDBACK, "label", "toxic@"),
    (FeedbackEvent, FEEDBACK, "segment", {"tier": "@"}),
    (Finding, FINDING, "model_id", "chat@"),
    (Finding, FINDING, "detector", "ks@"),
    (Finding, FINDING, "signal", "@"),
    (Finding, FINDING, "segment", "locale=@"),
    (IncidentEvent, INCIDENT, "model_id", "@"),
    (IncidentEvent, INCIDENT, "incident_id", "@"),
    (RetrainRequest, RETRAIN, "base_version", "v@"),
]


@pytest.mark.parametrize("escape", [NUL, LONE_HIGH, LONE_LOW])
@pytest.mark.parametrize(("model", "base", "field", "value"), IDENTIFIERS)
def test_identifiers_holding_nul_or_a_lone_surrogate_are_refused_naming_the_field(
    model: type[BaseModel], base: dict[str, Any], field: str, value: Any, escape: str
) -> None:
    raw = _wire(base, field, value).replace(b"{}", escape.encode())
    sanitized: list[str] = []
    with pytest.raises(SchemaError) as refused:
        codec.decode(raw, model, sanitized=sanitized)
    assert refused.value.reason == codec.INVALID_VALUE
    assert str(refused.value).startswith(f"{field}: ")
    assert "PostgreSQL text cannot store" in str(refused.value)
    assert sanitized == []


FREE_TEXT: list[tuple[type[BaseModel], dict[str, Any], str, Any]] = [
    (InferenceEvent, INFERENCE, "prompt", "a@b"),
    (InferenceEvent, INFERENCE, "response", "@"),
    (InferenceEvent, INFERENCE, "metadata", {"k@": ["v@", {"x": "@"}]}),
    (FeedbackEvent, FEEDBACK, "correction", "better@"),
    (FeedbackEvent, FEEDBACK, "comment", "@"),
    (Finding, FINDING, "title", "t@"),
    (Finding, FINDING, "evidence", {"examples": [{"prompt@": "p@"}]}),
    (IncidentEvent, INCIDENT, "title", "@"),
    (RetrainRequest, RETRAIN, "reason", "drift@"),
]


@pytest.mark.parametrize("escape", [NUL, LONE_HIGH, LONE_LOW])
@pytest.mark.parametrize(("model", "base", "field", "value"), FREE_TEXT)
def test_free_text_has_nul_and_lone_surrogates_replaced_and_counted(
    model: type[BaseModel], base: dict[str, Any], field: str, value: Any, escape: str
) -> None:
    raw = _wire(base, field, value).replace(b"{}", escape.encode())
    sanitized: list[str] = []
    event = codec.decode(raw, model, sanitized=sanitized)
    assert sanitized == [field]
    expected = json.loads(json.dumps(value).replace("@", "\\ufffd"))
    assert getattr(event, field) == expected
    # What the database gets is plain UTF-8 without NUL.
    assert b"\\u0000" not in codec.encode(event)
    assert codec.decode(codec.encode(event), model) == event


@pytest.mark.parametrize("escape", [NUL, LONE_HIGH, LONE_LOW])
def test_chat_message_content_is_free_text(escape: str) -> None:
    turns = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a@b"}]
    raw = _wire(INFERENCE, "messages", turns).replace(b"{}", escape.encode())
    sanitized: list[str] = []
    event = codec.decode(raw, InferenceEvent, sanitized=sanitized)
    assert sanitized == ["content"]
    assert event.messages is not None
    assert [m.content for m in event.messages] == ["be kind", "a\ufffdb"]
    assert codec.decode(codec.encode(event), InferenceEvent) == event
    python = InferenceEvent(**INFERENCE, messages=[{"role": "user", "content": "\x00\ud800"}])
    assert python.messages is not None and python.messages[0].content == "\ufffd\ufffd"


def test_surrogate_pairs_and_escaped_backslashes_are_left_alone() -> None:
    raw = _wire(INFERENCE, "prompt", "@ \\ud800 \\u0000").replace(b"{}", b"\\ud83d\\ude00")
    sanitized: list[str] = []
    event = codec.decode(raw, InferenceEvent, sanitized=sanitized)
    assert event.prompt == "\U0001f600 \\ud800 \\u0000" and sanitized == []


def test_python_strings_follow_the_same_rule() -> None:
    event = InferenceEvent(model_id="chat", latency_ms=1, prompt="a\x00b\ud83d", response="\udc00")
    assert (event.prompt, event.response) == ("a\ufffdb\ufffd", "\ufffd")
    with pytest.raises(ValueError, match=r"model_id\n.*lone surrogate \(U\+D800\)"):
        InferenceEvent(model_id="chat\ud800", latency_ms=1)


def test_dead_letters_hold_no_nul_even_when_a_refused_key_did() -> None:
    raw = _wire(INFERENCE, "segment", {"k@": 5}).replace(b"{}", NUL.encode())
    with pytest.raises(SchemaError) as refused:
        codec.decode(raw, InferenceEvent)
    letter = codec.dead_letter(
        raw,
        reason=refused.value.reason,
        error=str(refused.value),
        source_topic="genmon.inference",
        partition=0,
        offset=1,
        max_payload_bytes=1024,
    )
    assert "\x00" not in letter.error and "segment" in letter.error
    assert b"\\u0000" not in codec.encode(letter)


def test_the_exported_schema_refuses_nul_in_identifiers_only() -> None:
    validator = jsonschema.Draft202012Validator(event_json_schema("inference"))
    document = {**INFERENCE, "started_at": "2026-05-01T12:00:00Z"}
    assert not list(validator.iter_errors({**document, "prompt": "a\x00b"}))
    for changes in (
        {"model_id": "chat\x00"},
        {"segment": {"k\x00": "v"}},
        {"segment": {"k": "v\x00"}},
        {"error_code": "\x00"},
    ):
        assert list(validator.iter_errors({**document, **changes})), changes


@pytest.fixture
def offline(free_port: Callable[[], int]) -> Iterator[Monitor]:
    """A monitor pointed at a port where no broker listens."""
    monitor = Monitor(f"127.0.0.1:{free_port()}")
    yield monitor
    monitor.close(timeout=0)


def test_the_sdk_refuses_and_replaces_as_the_worker_does(offline: Monitor) -> None:
    assert offline.log_inference(model_id="chat", latency_ms=1, prompt="a\x00", response="\ud800")
    assert offline.log_feedback(request_id="r", model_id="chat", comment="\x00", thumbs="up")
    for fields in ({"model_id": "chat\x00"}, {"model_id": "chat\udfff"}):
        with pytest.raises(SchemaError, match=r"^invalid InferenceEvent: model_id: ") as refused:
            offline.log_inference(latency_ms=1, **fields)
        assert refused.value.reason == codec.INVALID_VALUE
    assert (offline.stats.buffered, offline.stats.invalid) == (2, 2)
