"""Stored tables (SQLModel): retrain jobs, model versions and labelled examples.

Pure data, like the events: no engine, no session. ``genmon.db`` opens databases and
``genmon.schemas.migrations`` creates these tables; a test keeps the two in step.

Each family follows one pattern: ``XBase`` (fields a caller supplies), ``X`` (the
table), ``XCreate`` (input) and ``XPublic`` (what APIs and the CLI show).

>>> from genmon.schemas.tables import LabelledExampleCreate
>>> from genmon.schemas import InferenceEvent, FeedbackEvent
>>> inf = InferenceEvent(request_id="r1", model_id="chat", model_version="v1",
...                      prompt="2+2?", response="5", latency_ms=80.0)
>>> fb = FeedbackEvent(request_id="r1", model_id="chat", thumbs="down", correction="4")
>>> ex = LabelledExampleCreate.from_events(inf, fb)
>>> (ex.prompt, ex.response, ex.correction, ex.score)
('2+2?', '5', '4', 0.0)
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from genmon.schemas.events import (
    MAX_ID_CHARS,
    FeedbackEvent,
    InferenceEvent,
    RetrainRequest,
    RetrainStatus,
    new_id,
    utcnow,
)

MAX_URI_CHARS = 2048
MAX_LABEL_CHARS = 128
MAX_REASON_CHARS = 1024


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that refuses naive datetimes and always returns UTC.

    SQLite keeps no offset, so values come back naive there; they were stored as UTC,
    so UTC is attached again on the way out. PostgreSQL stores ``timestamptz``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def enum_column_type(enum: type[StrEnum], name: str) -> sa.Enum:
    """Stores a StrEnum by *value* as VARCHAR, so adding a member needs no type migration."""
    return sa.Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class ModelVersionStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


# --- retrain jobs -----------------------------------------------------------------------


class RetrainJobBase(SQLModel):
    model_id: str = Field(max_length=MAX_ID_CHARS)
    base_version: str = Field(max_length=MAX_ID_CHARS)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    incident_id: str | None = Field(
        default=None, max_length=MAX_ID_CHARS, description="incident that asked for the job"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, sa_type=sa.JSON, description="training hyperparameters"
    )


class RetrainJob(RetrainJobBase, table=True):
    """One fine-tuning run, from request to promotion, rejection or failure.

    The queue lives in this row: a worker claims it (``FOR UPDATE SKIP LOCKED``), holds a
    lease (``lease_owner``, ``lease_epoch``, ``lease_expires_at`` on the database clock) and
    makes every later write conditional on its epoch, so a worker that lost its lease can
    change nothing (:mod:`genmon.retrain.queue`).
    """

    __tablename__ = "retrain_job"
    __table_args__ = (
        sa.Index("ix_retrain_job_model_id_status", "model_id", "status"),
        sa.Index("ix_retrain_job_incident_id", "incident_id"),
        sa.Index("ix_retrain_job_created_at", "created_at"),
        sa.Index("ix_retrain_job_status_lease", "status", "lease_expires_at"),
        sa.UniqueConstraint("trigger_key", name="uq_retrain_job_trigger_key"),
    )

    job_id: str = Field(default_factory=new_id, primary_key=True, max_length=MAX_ID_CHARS)
    status: RetrainStatus = Field(
        default=RetrainStatus.QUEUED, sa_type=enum_column_type(RetrainStatus, "retrain_status")
    )
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    candidate_version: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    error: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    trigger: str = Field(default="manual", max_length=32, description="incident, volume, manual")
    trigger_key: str | None = Field(
        default=None, max_length=MAX_REASON_CHARS, description="what fired"
    )
    context: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    requested_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    approved_by: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    hold_reason: str | None = Field(
        default=None, max_length=MAX_REASON_CHARS, description="why a queued job waits"
    )
    attempts: int = Field(default=0, description="claims so far")
    max_attempts: int = Field(default=3, ge=1)
    lease_owner: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    lease_epoch: int = Field(default=0, description="bumped by every claim; fences writes")
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    progress: dict[str, Any] = Field(
        default_factory=dict, sa_type=sa.JSON, description="step, loss, examples/s, tokens/s"
    )
    checkpoint_uri: str | None = Field(default=None, max_length=MAX_URI_CHARS)
    checkpoint_step: int | None = None
    dataset_uri: str | None = Field(default=None, max_length=MAX_URI_CHARS)
    dataset_hash: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    artifact_uri: str | None = Field(default=None, max_length=MAX_URI_CHARS)
    verdict: dict[str, Any] = Field(
        default_factory=dict, sa_type=sa.JSON, description="the gate's decision and reasons"
    )
    device_seconds: float = Field(default=0.0, description="training time, for the budget")
    backend: str = Field(
        default="local", max_length=32, description="where it trains: local, ray, kubernetes"
    )
    remote_id: str | None = Field(
        default=None,
        max_length=MAX_ID_CHARS,
        description="the Ray submission id or Kubernetes Job name of a remote run",
    )


class RetrainJobCreate(RetrainJobBase):
    job_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    trigger: str = "manual"
    trigger_key: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    requested_by: str = "genmon"

    @classmethod
    def from_request(cls, request: RetrainRequest, **params: Any) -> RetrainJobCreate:
        """The job a :class:`RetrainRequest` asks for (same ``job_id``, so replays dedupe)."""
        return cls(
            job_id=request.job_id,
            model_id=request.model_id,
            base_version=request.base_version,
            reason=request.reason,
            incident_id=request.incident_id,
            trigger=request.trigger.value,
            trigger_key=request.trigger_key,
            context=dict(request.context),
            requested_by=request.requested_by,
            params={
                "min_examples": request.min_examples,
                "examples_since": (
                    request.examples_since.isoformat() if request.examples_since else None
                ),
                **params,
            },
        )


class RetrainJobPublic(RetrainJobBase):
    job_id: str
    status: RetrainStatus
    metrics: dict[str, Any]
    candidate_version: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    trigger: str
    trigger_key: str | None
    hold_reason: str | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_epoch: int
    progress: dict[str, Any]
    checkpoint_step: int | None
    dataset_hash: str | None
    artifact_uri: str | None
    verdict: dict[str, Any]
    backend: str
    remote_id: str | None


# --- model versions ---------------------------------------------------------------------


class ModelVersionBase(SQLModel):
    model_id: str = Field(max_length=MAX_ID_CHARS)
    version: str = Field(max_length=MAX_ID_CHARS)
    artifact_uri: str = Field(max_length=MAX_URI_CHARS, description="where the weights live")
    parent_version: str | None = Field(
        default=None, max_length=MAX_ID_CHARS, description="version this one was tuned from"
    )
    job_id: str | None = Field(
        default=None,
        foreign_key="retrain_job.job_id",
        ondelete="SET NULL",
        max_length=MAX_ID_CHARS,
        description="retrain job that produced it; none for versions registered by hand",
    )
    eval_metrics: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    base_uri: str | None = Field(
        default=None, max_length=MAX_URI_CHARS, description="the base weights the adapter is on"
    )
    base_fingerprint: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    dataset_hash: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    incident_ids: list[str] = Field(
        default_factory=list, sa_type=sa.JSON, description="incidents behind this version"
    )


class ModelVersion(ModelVersionBase, table=True):
    """A version of a model genmon knows about; at most one is active per model."""

    __tablename__ = "model_version"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "version", name="uq_model_version_model_id_version"),
        sa.Index("ix_model_version_model_id_status", "model_id", "status"),
        sa.Index("ix_model_version_job_id", "job_id"),
        # Promotion is "retire the old, activate the new" in one transaction; this
        # index makes a second concurrent promotion fail instead of leaving two active.
        sa.Index(
            "uq_model_version_one_active",
            "model_id",
            unique=True,
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    status: ModelVersionStatus = Field(
        default=ModelVersionStatus.CANDIDATE,
        sa_type=enum_column_type(ModelVersionStatus, "model_version_status"),
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    promoted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ModelVersionCreate(ModelVersionBase):
    pass


class ModelVersionPublic(ModelVersionBase):
    id: int
    status: ModelVersionStatus
    created_at: datetime
    promoted_at: datetime | None


# --- labelled examples ------------------------------------------------------------------


class LabelledExampleBase(SQLModel):
    request_id: str = Field(max_length=MAX_ID_CHARS)
    model_id: str = Field(max_length=MAX_ID_CHARS)
    model_version: str = Field(max_length=MAX_ID_CHARS)
    prompt: str = Field(default="", sa_type=sa.Text)
    response: str = Field(default="", sa_type=sa.Text)
    correction: str | None = Field(
        default=None, sa_type=sa.Text, description="what the response should have been"
    )
    score: float | None = Field(default=None, ge=0.0, le=1.0, description="0 = worst, 1 = best")
    label: str | None = Field(default=None, max_length=MAX_LABEL_CHARS)
    segment: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    subject_id: str | None = Field(
        default=None,
        max_length=MAX_ID_CHARS,
        description="pseudonymous data subject, so an erasure request can find the rows",
    )
    messages: list[dict[str, str]] | None = Field(
        default=None,
        sa_type=sa.JSON(none_as_null=True),
        description="the chat turns before the response ({role, content}), when it was a chat",
    )


class LabelledExample(LabelledExampleBase, table=True):
    """An inference joined with its feedback: training data for the retrain worker."""

    __tablename__ = "labelled_example"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "request_id", name="uq_labelled_example_model_id_request"),
        sa.Index("ix_labelled_example_model_id_created_at", "model_id", "created_at"),
        sa.Index("ix_labelled_example_subject_id", "subject_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class LabelledExampleCreate(LabelledExampleBase):
    @classmethod
    def from_events(
        cls, inference: InferenceEvent, feedback: FeedbackEvent
    ) -> LabelledExampleCreate:
        """Join one inference with its feedback (same ``request_id``)."""
        if (inference.request_id, inference.model_id) != (feedback.request_id, feedback.model_id):
            raise ValueError(
                f"feedback for {feedback.model_id}/{feedback.request_id} does not belong to "
                f"inference {inference.model_id}/{inference.request_id}"
            )
        return cls(
            request_id=inference.request_id,
            model_id=inference.model_id,
            model_version=inference.model_version,
            prompt=inference.prompt,
            response=inference.response,
            messages=None
            if inference.messages is None
            else [message.model_dump() for message in inference.messages],
            correction=feedback.correction,
            score=feedback.normalized_score,
            label=feedback.label,
            segment={**inference.segment, **feedback.segment},
            subject_id=inference.subject_id or feedback.subject_id,
        )


class LabelledExamplePublic(LabelledExampleBase):
    id: int
    created_at: datetime


__all__ = [
    "LabelledExample",
    "LabelledExampleBase",
    "LabelledExampleCreate",
    "LabelledExamplePublic",
    "ModelVersion",
    "ModelVersionBase",
    "ModelVersionCreate",
    "ModelVersionPublic",
    "ModelVersionStatus",
    "RetrainJob",
    "RetrainJobBase",
    "RetrainJobCreate",
    "RetrainJobPublic",
    "UTCDateTime",
    "enum_column_type",
]
