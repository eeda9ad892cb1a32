"""Versioned wire events (pydantic v2). Pure data: no Kafka, no database.

Producers in other languages get the same contract from ``genmon schemas export``.

**Text the database can store.** PostgreSQL ``text`` cannot hold NUL (U+0000), and a lone
UTF-16 surrogate (U+D800-U+DFFF: a JSON ``\\ud800`` escape without its pair, or a Python
string cut inside one) has no UTF-8 form at all. Both pass JSON parsing, so validation
decides them, the same way for the SDK, the worker's pydantic path and its native decoder:

- *identifiers* (ids, versions, ``detector``, ``signal``, finding ``segment``, segment
  attribute keys and values, ``error_code``, ``label``: anything grouped, joined or keyed
  on) holding one are **refused**: ``invalid_value``, and the error names the field;
- *free text* (``prompt``, ``response``, the ``content`` of chat ``messages``,
  ``correction``, ``comment``, titles, ``reason``, and every string, keys included, in
  ``metadata`` and ``evidence``) has each one **replaced** by U+FFFD. Validation with a
  ``context`` holding a list under :data:`SANITIZED` appends the name of each field it
  changed (the worker counts such events, ``genmon_ingest_sanitized_total``).

>>> InferenceEvent(model_id="chat", latency_ms=1.0, prompt="a\\x00b").prompt
'a\ufffdb'

>>> from genmon.schemas import InferenceEvent
>>> e = InferenceEvent(request_id="r1", model_id="chat", model_version="v1",
...                    prompt="hi", response="hello", latency_ms=120.0)
>>> InferenceEvent.model_validate_json(e.model_dump_json()).request_id
'r1'
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

#: The wire version every event carries; readers reject versions they do not know.
SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

MAX_TEXT_CHARS = 32_768
MAX_ID_CHARS = 256
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_METADATA_KEYS = 64
#: Chat turns an inference event may carry (``messages``); the byte limit bounds them too.
MAX_MESSAGES = 256
MAX_EVENT_BYTES = 256 * 1024

#: Code points PostgreSQL ``text`` cannot store: NUL and the UTF-16 surrogates.
UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT_CHARACTER: Final = "\ufffd"
#: Validation context key: a list receiving the name of each free-text field changed.
SANITIZED: Final = "genmon_sanitized"
#: Validation context key: ``False`` when the codec saw that the JSON cannot hold NUL (it
#: has no ``\\u0000`` escape), so the checks below are skipped: they cost more than the
#: rest of validating an event with a long prompt.
MAY_HOLD_NUL: Final = "genmon_may_hold_nul"
#: Validation context key: set by the codec when it read lone surrogate escapes as NUL.
LONE_SURROGATES: Final = "genmon_lone_surrogates"
#: The exported JSON Schema's word for "no NUL" (surrogates cannot be said portably: an
#: ECMA-262 class without the ``u`` flag would also refuse every valid surrogate pair).
_NO_NUL_PATTERN: Final = "^[^\\u0000]*$"


def storable_text(value: str) -> str:
    """``value`` with each NUL and lone surrogate replaced by U+FFFD."""
    return UNSTORABLE.sub(REPLACEMENT_CHARACTER, value)


def _checks(info: ValidationInfo) -> bool:
    """Whether this input may hold NUL or surrogates at all."""
    context = info.context
    return not isinstance(context, dict) or context.get(MAY_HOLD_NUL) is not False


def _holds_unstorable(value: str, info: ValidationInfo) -> bool:
    # JSON text cannot carry a lone surrogate (the parser refuses it, the codec reads it
    # as NUL), and an ASCII string holds none: the costly scan is for Python strings only.
    if "\x00" in value:
        return True
    return info.mode == "python" and not value.isascii() and UNSTORABLE.search(value) is not None


def _unstorable(value: str, info: ValidationInfo) -> str | None:
    """Why ``value`` cannot be an identifier, or ``None`` when it can."""
    if not _holds_unstorable(value, info):
        return None
    match = UNSTORABLE.search(value)
    assert match is not None
    char = match.group()
    if char != "\x00":
        what = f"a lone surrogate (U+{ord(char):04X})"
    elif isinstance(info.context, dict) and info.context.get(LONE_SURROGATES):
        what = "NUL (U+0000) or a lone surrogate escape (\\ud800-\\udfff)"
    else:
        what = "NUL (U+0000)"
    return (
        f"holds {what} at character {match.start()}, which PostgreSQL text cannot store;"
        " identifiers must not (free text has it replaced by U+FFFD)"
    )


def _check_identifier(value: Any, info: ValidationInfo) -> Any:
    # Before pydantic's own str check, which would refuse a lone surrogate as "unable to
    # parse raw data as a unicode string", without saying what is wrong.
    if isinstance(value, str) and _checks(info):
        why = _unstorable(value, info)
        if why is not None:
            raise ValueError(why)
    return value


def _note_sanitized(info: ValidationInfo) -> None:
    """Tell a caller that passed a :data:`SANITIZED` list that ``info``'s field changed."""
    context = info.context
    noted = context.get(SANITIZED) if isinstance(context, dict) else None
    if isinstance(noted, list):
        noted.append(info.field_name or "?")


def _clean_text(value: Any, info: ValidationInfo) -> Any:
    # Before pydantic's own str check, which refuses lone surrogates.
    if not isinstance(value, str) or not _checks(info) or not _holds_unstorable(value, info):
        return value
    _note_sanitized(info)
    return storable_text(value)


def _json_unstorable(value: Any, info: ValidationInfo) -> bool:
    """Whether a JSON-like value holds an unstorable code point in any string or key."""
    if isinstance(value, str):
        return _holds_unstorable(value, info)
    if isinstance(value, dict):
        for key, item in value.items():
            if _json_unstorable(key, info) or _json_unstorable(item, info):
                return True
    elif isinstance(value, list | tuple):
        for item in value:
            if _json_unstorable(item, info):
                return True
    return False


def _json_storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {_json_storable(k): _json_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_storable(item) for item in value]
    return value


def _clean_json(value: Any, info: ValidationInfo) -> Any:
    """Free-form JSON (metadata, evidence) is free text, keys included."""
    if not value or not isinstance(value, dict) or not _checks(info):
        return value
    if not _json_unstorable(value, info):
        return value
    _note_sanitized(info)
    return _json_storable(value)


class _NoNul:
    """Says "no NUL" in the exported JSON Schema of an identifier."""

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["pattern"] = _NO_NUL_PATTERN
        return out


#: Strings grouped, joined or keyed on: NUL and lone surrogates are refused.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS),
    BeforeValidator(_check_identifier),
    _NoNul(),
]
#: A short code (``error_code``, ``label``): may be empty.
Code = Annotated[
    str, StringConstraints(max_length=128), BeforeValidator(_check_identifier), _NoNul()
]
FindingSegment = Annotated[
    str, StringConstraints(max_length=512), BeforeValidator(_check_identifier), _NoNul()
]
#: Free text: NUL and lone surrogates become U+FFFD.
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS), BeforeValidator(_clean_text)]
Title = Annotated[str, StringConstraints(max_length=512), BeforeValidator(_clean_text)]
Reason = Annotated[str, StringConstraints(max_length=1024), BeforeValidator(_clean_text)]
#: Free-form JSON (``evidence``): every string in it is free text.
FreeJson = Annotated[dict[str, Any], BeforeValidator(_clean_json)]


def _check_attributes(value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    if len(value) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} segment attributes, got {len(value)}")
    for key, item in value.items():
        if not 0 < len(key) <= MAX_ATTRIBUTE_KEY_CHARS:
            raise ValueError(
                f"attribute key {key[:20]!r} must be 1-{MAX_ATTRIBUTE_KEY_CHARS} chars"
            )
        if len(item) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise ValueError(f"attribute {key!r} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} chars")
    if value and _checks(info):
        for key, item in value.items():
            for what, text in (("key", key), ("value", item)):
                why = _unstorable(text, info)
                if why is not None:
                    raise ValueError(f"attribute {what} {text[:20]!r} {why}")
    return value


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys, got {len(value)}")
    return value


#: Segment attributes (locale, user group, ...): a bounded map of short strings.
#: The JSON Schema keywords repeat the validators' limits for producers in other languages.
Attributes = Annotated[
    dict[str, str],
    AfterValidator(_check_attributes),
    Field(
        json_schema_extra={
            "maxProperties": MAX_ATTRIBUTES,
            "propertyNames": {
                "minLength": 1,
                "maxLength": MAX_ATTRIBUTE_KEY_CHARS,
                "pattern": _NO_NUL_PATTERN,
            },
            "additionalProperties": {
                "type": "string",
                "maxLength": MAX_ATTRIBUTE_VALUE_CHARS,
                "pattern": _NO_NUL_PATTERN,
            },
        }
    ),
]
Metadata = Annotated[
    dict[str, Any],
    AfterValidator(_check_metadata),
    BeforeValidator(_clean_json),
    Field(json_schema_extra={"maxProperties": MAX_METADATA_KEYS}),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class InferenceStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CONTENT_FILTERED = "content_filtered"
    TRUNCATED = "truncated"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    OTHER = "other"


class Thumbs(StrEnum):
    UP = "up"
    DOWN = "down"


class FindingKind(StrEnum):
    DRIFT = "drift"
    BIAS = "bias"
    ANOMALY = "anomaly"
    QUALITY = "quality"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class IncidentStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class RetrainStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"


class TriggerKind(StrEnum):
    """What asked for a retraining job."""

    INCIDENT = "incident"
    VOLUME = "volume"
    MANUAL = "manual"
    SCHEDULE = "schedule"


class ModelAlias(StrEnum):
    """Movable pointers to a model's versions (MLflow-style aliases, not fixed stages)."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    PREVIOUS = "previous"


class RolloutStatus(StrEnum):
    """Where a rollout (a challenger on a share of traffic, watched) stands.

    ``watching`` is the only open state; every other one is a decision, made once.
    """

    WATCHING = "watching"
    CONFIRMED = "confirmed"
    """The watch ended clean: the challenger became the champion."""
    ROLLED_BACK = "rolled_back"
    """The challenger regressed (or a person stopped it): it serves nothing any more."""
    CANCELLED = "cancelled"
    """Replaced by a newer challenger, or the aliases were moved by hand."""
    INCONCLUSIVE = "inconclusive"
    """The longest watch ran out before the planned length was reached."""


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    schema_version: Literal[1] = SCHEMA_VERSION


class ChatMessage(BaseModel):
    """One chat turn sent to the model: ``content`` is free text, as ``prompt`` is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class InferenceEvent(_Event):
    """One model call, as the serving service saw it.

    A chat call carries its turns in ``messages`` (the response stays in ``response``);
    ``prompt`` is still what the detectors read and embed: the SDK sets it to the last
    user turn when it is not given, and other producers should do the same.
    """

    request_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    model_version: Identifier = "unknown"
    started_at: AwareDatetime = Field(default_factory=utcnow)
    finished_at: AwareDatetime | None = None
    prompt: Text = ""
    response: Text = ""
    messages: list[ChatMessage] | None = Field(
        None,
        max_length=MAX_MESSAGES,
        description="the chat turns sent to the model, before the response",
    )
    latency_ms: float = Field(ge=0, le=86_400_000)
    time_to_first_token_ms: float | None = Field(None, ge=0, le=86_400_000)
    prompt_tokens: int | None = Field(None, ge=0, le=10_000_000)
    completion_tokens: int | None = Field(None, ge=0, le=10_000_000)
    status: InferenceStatus = InferenceStatus.OK
    error_code: Code | None = None
    finish_reason: FinishReason | None = None
    segment: Attributes = Field(default_factory=dict)
    subject_id: Identifier | None = Field(
        None, description="pseudonymous data-subject id, so the subject's records can be erased"
    )
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _times_in_order(self) -> InferenceEvent:
        if self.finished_at is not None and self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        return self


class FeedbackEvent(_Event):
    """A user's judgement of one response, joined to its inference by ``request_id``."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                for name in ("score", "thumbs", "label", "correction", "comment")
            ]
        }
    )

    feedback_id: Identifier = Field(default_factory=new_id)
    request_id: Identifier
    model_id: Identifier
    created_at: AwareDatetime = Field(default_factory=utcnow)
    score: float | None = Field(None, ge=0.0, le=1.0, description="0 = worst, 1 = best")
    thumbs: Thumbs | None = None
    label: Code | None = None
    correction: Text | None = None
    comment: Text | None = None
    segment: Attributes = Field(default_factory=dict)
    subject_id: Identifier | None = None

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackEvent:
        if (self.score, self.thumbs, self.label, self.correction, self.comment) == (None,) * 5:
            raise ValueError(
                "feedback needs at least one of score, thumbs, label, correction, comment"
            )
        return self

    @property
    def normalized_score(self) -> float | None:
        """Score in [0, 1]: the score, else thumbs up = 1 and down = 0."""
        if self.score is not None:
            return self.score
        if self.thumbs is not None:
            return 1.0 if self.thumbs is Thumbs.UP else 0.0
        return None


class Finding(_Event):
    """A detector's verdict on one window or batch of one model."""

    finding_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    model_version: Identifier | None = None
    detector: Identifier
    kind: FindingKind
    signal: Identifier = Field(description="what was measured: latency_p99, embedding, ...")
    segment: FindingSegment | None = None
    window_start: AwareDatetime | None = None
    window_end: AwareDatetime | None = None
    score: float
    threshold: float
    detected: bool
    p_value: float | None = None
    effect_size: float | None = None
    n_seen: int = 0
    evidence: FreeJson = Field(default_factory=dict)
    emitted_at: AwareDatetime = Field(default_factory=utcnow)
    severity: Severity | None = Field(
        None,
        description=(
            "how bad, as the detector judged it from effect size and confidence; unset: the"
            " incident manager derives it from score/threshold and effect-size bands"
        ),
    )
    title: Title | None = Field(
        None,
        description=(
            "what happened, with numbers (e.g. 'TTFT p95 2.4 s, baseline 0.6 s, support-bot"
            " v3, locale=de'); unset: the incident manager names model, detector and signal"
        ),
    )

    @property
    def fingerprint(self) -> str:
        """One problem = one fingerprint: model, detector, signal and segment."""
        key = "\x1f".join([self.model_id, self.detector, self.signal, self.segment or ""])
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def dedup_key(self) -> str:
        """Same finding re-emitted (after a rebalance or restart) -> same key."""
        window = self.window_end.isoformat() if self.window_end else self.finding_id
        return f"{self.fingerprint}:{window}"


class IncidentEvent(_Event):
    """A change in an incident's life, published for other consumers.

    Published at least once: a consumer drops repeats by ``event_id``.
    """

    event_id: Identifier = Field(
        default_factory=new_id, description="the same for every delivery of one transition"
    )
    incident_id: Identifier
    fingerprint: Identifier
    model_id: Identifier
    status: IncidentStatus
    severity: Severity
    title: Title
    transition: Identifier = Field(description="opened, updated, acknowledged, resolved, reopened")
    actor: Identifier = "genmon"
    at: AwareDatetime = Field(default_factory=utcnow)


class RetrainRequest(_Event):
    """Ask the retrain worker to fine-tune ``model_id`` on its labelled examples.

    ``job_id`` is derived from ``trigger_key`` (see :func:`job_id_for`), so a redelivered
    finding, a replayed request or two workers racing name the same job.
    """

    job_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    base_version: Identifier
    reason: Reason = ""
    incident_id: Identifier | None = None
    examples_since: AwareDatetime | None = None
    min_examples: int = Field(100, ge=1)
    requested_at: AwareDatetime = Field(default_factory=utcnow)
    trigger: TriggerKind = TriggerKind.MANUAL
    trigger_key: Identifier | None = Field(
        None, description="what fired: incident:<id>:<episode>, volume:<model>:<mark>, ..."
    )
    context: FreeJson = Field(
        default_factory=dict, description="the incident's kind, detector, signal, segment, ..."
    )
    requested_by: Identifier = "genmon"


def job_id_for(trigger_key: str) -> str:
    """The retrain job a trigger names: the same trigger always gives the same id."""
    return hashlib.sha256(f"retrain\x1f{trigger_key}".encode()).hexdigest()[:32]


class ModelEvent(_Event):
    """An alias of a model moved (published on ``<prefix>.models``, keyed by model).

    Serving code follows these (``genmon models follow``, :meth:`genmon.Monitor.follow`):
    it loads ``artifact_uri`` (an adapter on ``base_uri``) and logs ``version`` in its
    inference events. Published at least once: drop repeats by ``event_id``.
    """

    event_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    alias: ModelAlias
    version: Identifier | None = Field(description="what the alias points to now; none: unset")
    previous_version: Identifier | None = None
    artifact_uri: Reason | None = None
    base_uri: Reason | None = None
    action: Identifier = Field(description="registered, promoted, challenger, rolled_back, ...")
    reason: Reason = ""
    traffic_share: float | None = Field(None, ge=0.0, le=1.0)
    actor: Identifier = "genmon"
    at: AwareDatetime = Field(default_factory=utcnow)


class DeadLetter(BaseModel):
    """A message the worker could not accept, with why and where it came from."""

    model_config = ConfigDict(frozen=True)

    reason: str
    error: str
    source_topic: str
    partition: int
    offset: int
    payload_b64: str = Field(description="original bytes, base64, cut at the configured limit")
    payload_size: int
    payload_truncated: bool
    received_at: AwareDatetime = Field(default_factory=utcnow)


#: Event models by the topic kind that carries them.
EVENT_MODELS: dict[str, type[BaseModel]] = {
    "inference": InferenceEvent,
    "feedback": FeedbackEvent,
    "findings": Finding,
    "incidents": IncidentEvent,
    "retrain": RetrainRequest,
    "models": ModelEvent,
    "deadletter": DeadLetter,
}
