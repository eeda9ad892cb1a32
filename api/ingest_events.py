"""Validating what HTTP ingest received: the SDK's rules, and errors that name the event.

Pure (no FastAPI, no Kafka), shared by JSON ingest (:mod:`genmon.api.routes.ingest`) and
OTLP ingest (:mod:`genmon.api.routes.otlp`). An event passes exactly when
:class:`genmon.Monitor` would send it: chat turns give the prompt when none is given
(:mod:`genmon.chat`), texts longer than ``sdk.max_text_chars`` are cut, then the pydantic
model decides. Beyond the SDK, an event whose encoding is over ``MAX_EVENT_BYTES`` is
refused here, since the worker would dead-letter it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from genmon.chat import chat_fields
from genmon.schemas.codec import OVERSIZED, classify, encode
from genmon.schemas.events import MAX_EVENT_BYTES, FeedbackEvent, InferenceEvent

#: The pydantic model and the free-text fields the SDK cuts, per event kind.
MODELS: Final[dict[str, type[InferenceEvent] | type[FeedbackEvent]]] = {
    "inference": InferenceEvent,
    "feedback": FeedbackEvent,
}
TEXTS: Final = {"inference": ("prompt", "response"), "feedback": ("correction", "comment")}


@dataclass(frozen=True)
class EventError:
    """One refused event: where (``events[3].latency_ms``), why (a codec reason code)."""

    index: int
    loc: tuple[str | int, ...]
    message: str
    reason: str

    @property
    def where(self) -> str:
        field = ".".join(str(part) for part in self.loc)
        return f"events[{self.index}]" + (f".{field}" if field else "")

    def as_detail(self) -> dict[str, Any]:
        """FastAPI's shape of a field error, its message naming the event and the field."""
        return {
            "loc": ["body", "events", self.index, *self.loc],
            "msg": f"{self.where}: {self.message}",
            "type": self.reason,
        }


def prepared(kind: str, data: Any, max_text_chars: int) -> Any:
    """``data`` as the SDK would validate it: prompt from the chat turns, texts cut."""
    if not isinstance(data, Mapping):
        return data  # validation refuses it, naming the event
    fields: dict[str, Any] = dict(data)
    cut = False
    if kind == "inference":
        fields, cut = chat_fields(None, fields, max_text_chars)
    if cut or any(
        isinstance(fields.get(name), str) and len(fields[name]) > max_text_chars
        for name in TEXTS[kind]
    ):
        for name in TEXTS[kind]:
            if isinstance(fields.get(name), str):
                fields[name] = fields[name][:max_text_chars]
    return fields


def validate_one(
    kind: str, index: int, data: Any, max_text_chars: int
) -> tuple[BaseModel, bytes] | list[EventError]:
    """The event and its wire bytes, or every problem with it."""
    model = MODELS[kind]
    try:
        event = model.model_validate(prepared(kind, data, max_text_chars))
    except ValidationError as exc:
        return errors_of(exc, index)
    value = encode(event)
    if len(value) > MAX_EVENT_BYTES:
        message = (
            f"the event is {len(value)} bytes encoded, more than the {MAX_EVENT_BYTES} "
            "accepted; shorten prompt/response, messages or metadata"
        )
        return [EventError(index, (), message, OVERSIZED)]
    return event, value


def errors_of(exc: ValidationError, index: int) -> list[EventError]:
    """One :class:`EventError` per pydantic error, with the codec's reason code."""
    out = []
    for error in exc.errors(include_url=False):
        single = ValidationError.from_exception_data(exc.title, [error])  # type: ignore[list-item]
        reason, _ = classify(single)
        loc = tuple(part for part in error["loc"] if isinstance(part, str | int))
        out.append(EventError(index, loc, error["msg"], reason))
    return out


def validate_all(
    kind: str, items: list[Any], max_text_chars: int
) -> tuple[list[BaseModel], list[bytes], list[EventError]]:
    """Every event of a request: the valid ones with their bytes, and every error."""
    events: list[BaseModel] = []
    values: list[bytes] = []
    errors: list[EventError] = []
    for index, data in enumerate(items):
        outcome = validate_one(kind, index, data, max_text_chars)
        if isinstance(outcome, list):
            errors += outcome
        else:
            events.append(outcome[0])
            values.append(outcome[1])
    return events, values, errors
