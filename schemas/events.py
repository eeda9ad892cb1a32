"""Versioned wire events (pydantic v2). Pure data: no Kafka, no database.

Producers in other languages get the same contract from ``genmon schemas export``.

>>> from genmon.schemas import InferenceEvent
>>> e = InferenceEvent(request_id="r1", model_id="chat", model_version="v1",
...                    prompt="hi", response="hello", latency_ms=120.0)
>>> InferenceEvent.model_validate_json(e.model_dump_json()).request_id
'r1'
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

#: The wire version every event carries; readers reject versions they do not know.
SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

MAX_TEXT_CHARS = 32_768
MAX_ID_CHARS = 256
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_METADATA_KEYS = 64
MAX_EVENT_BYTES = 256 * 1024

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]


def _check_attributes(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} segment attributes, got {len(value)}")
    for key, item in value.items():
        if not 0 < len(key) <= MAX_ATTRIBUTE_KEY_CHARS:
            raise ValueError(
                f"attribute key {key[:20]!r} must be 1-{MAX_ATTRIBUTE_KEY_CHARS} chars"
            )
        if len(item) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise ValueError(f"attribute {key!r} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} chars")
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
            "propertyNames": {"minLength": 1, "maxLength": MAX_ATTRIBUTE_KEY_CHARS},
            "additionalProperties": {"type": "string", "maxLength": MAX_ATTRIBUTE_VALUE_CHARS},
        }
    ),
]
Metadata = Annotated[
    dict[str, Any],
    AfterValidator(_check_metadata),
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
    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    schema_version: Literal[1] = SCHEMA_VERSION


class InferenceEvent(_Event):
    """One model call, as the serving service saw it."""

    request_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    model_version: Identifier = "unknown"
    started_at: AwareDatetime = Field(default_factory=utcnow)
    finished_at: AwareDatetime | None = None
    prompt: Text = ""
    response: Text = ""
    latency_ms: float = Field(ge=0, le=86_400_000)
    time_to_first_token_ms: float | None = Field(None, ge=0, le=86_400_000)
    prompt_tokens: int | None = Field(None, ge=0, le=10_000_000)
    completion_tokens: int | None = Field(None, ge=0, le=10_000_000)
    status: InferenceStatus = InferenceStatus.OK
    error_code: Annotated[str, StringConstraints(max_length=128)] | None = None
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
    label: Annotated[str, StringConstraints(max_length=128)] | None = None
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
    segment: Annotated[str, StringConstraints(max_length=512)] | None = None
    window_start: AwareDatetime | None = None
    window_end: AwareDatetime | None = None
    score: float
    threshold: float
    detected: bool
    p_value: float | None = None
    effect_size: float | None = None
    n_seen: int = 0
    evidence: dict[str, Any] = Field(default_factory=dict)
    emitted_at: AwareDatetime = Field(default_factory=utcnow)
    severity: Severity | None = Field(
        None,
        description=(
            "how bad, as the detector judged it from effect size and confidence; unset: the"
            " incident manager derives it from score/threshold and effect-size bands"
        ),
    )
    title: Annotated[str, StringConstraints(max_length=512)] | None = Field(
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
    title: Annotated[str, StringConstraints(max_length=512)]
    transition: Identifier = Field(description="opened, updated, acknowledged, resolved, reopened")
    actor: Identifier = "genmon"
    at: AwareDatetime = Field(default_factory=utcnow)


class RetrainRequest(_Event):
    """Ask the retrain worker to fine-tune ``model_id`` on its labelled examples."""

    job_id: Identifier = Field(default_factory=new_id)
    model_id: Identifier
    base_version: Identifier
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""
    incident_id: Identifier | None = None
    examples_since: AwareDatetime | None = None
    min_examples: int = Field(100, ge=1)
    requested_at: AwareDatetime = Field(default_factory=utcnow)


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
    "deadletter": DeadLetter,
}
