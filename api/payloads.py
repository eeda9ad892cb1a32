"""What the JSON API answers and accepts (pydantic): the OpenAPI document is made of these.

Stored rows are shown through the schemas' ``...Public`` models where they exist
(:class:`~genmon.schemas.incidents.IncidentPublic`, ``RetrainJobPublic``,
``ModelVersionPublic``); what a row lacks (an incident's dashboard link, a model's
aliases) is added here. Every error answer is :class:`Problem` (``{"detail": "..."}``),
but 422, which is FastAPI's list of field errors (the routes raise theirs the same way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from genmon.schemas.events import (
    Identifier,
    IncidentStatus,
    ModelEvent,
    Reason,
    RetrainStatus,
    Severity,
    Text,
)
from genmon.schemas.incidents import IncidentPublic, Transition
from genmon.schemas.retrain import RetrainJobAudit
from genmon.schemas.tables import ModelVersionPublic, RetrainJobPublic

MAX_NOTE_CHARS = 4000
MAX_MATCHERS = 20


class Problem(BaseModel):
    """An error: what went wrong and what to do."""

    detail: str


# --- probes ------------------------------------------------------------------------------


class Health(BaseModel):
    status: str = Field(description="ok")


class Readiness(BaseModel):
    status: str = Field(description="ready, or not_ready")
    checks: dict[str, str] = Field(description="database and broker: ok, or why not")


# --- incidents ---------------------------------------------------------------------------


class Incident(IncidentPublic):
    """An incident as lists show it, with ``link``: its page on the dashboard."""

    link: str


class TransitionPublic(BaseModel):
    """One step of an incident's life."""

    model_config = ConfigDict(from_attributes=True)

    transition: Transition
    from_status: IncidentStatus | None
    to_status: IncidentStatus
    actor: str
    reason: str
    at: datetime


class IncidentDetail(Incident):
    """An incident with its evidence (redacted as ``notify.redact`` says), notes and
    timeline, oldest transition first."""

    timeline: list[TransitionPublic]


class IncidentPage(BaseModel):
    """One page of incidents, newest opened first."""

    items: list[Incident]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; none: end")


class ReasonBody(BaseModel):
    """Why, kept in the incident's timeline (or the job's audit trail)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "deploy rolled back"}]}
    )

    reason: Reason = ""


class NoteBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "checking the de segment"}]}
    )

    text: Text = Field(min_length=1, max_length=MAX_NOTE_CHARS)


class SeverityCounts(BaseModel):
    """Unresolved incidents by severity."""

    counts: dict[Severity, int]


# --- silences ----------------------------------------------------------------------------


class SilencePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    matchers: list[str]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    created_at: datetime
    active: bool = Field(description="in force now")


class SilenceCreate(BaseModel):
    """A silence from now for ``duration_s`` seconds of the incidents matching every
    matcher (``label OP value``, OP one of ``= != =~ !~``, e.g. ``model=chat``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"matchers": ['model="chat"'], "duration_s": 3600, "comment": "deploy"}]
        },
    )

    matchers: list[Reason] = Field(min_length=1, max_length=MAX_MATCHERS)
    duration_s: float = Field(7200.0, gt=0, le=366 * 86400)
    comment: Reason = ""


# --- findings ----------------------------------------------------------------------------


class FindingPublic(BaseModel):
    """A detector's finding that genmon applied to an incident (kept for
    ``retention.findings_days``): when, for which window, and the incident it fed."""

    dedup_key: str
    fingerprint: str
    seen_at: datetime
    window_end: datetime | None = Field(description="the window the finding judged")
    incident_id: str | None
    model_id: str | None
    detector: str | None
    signal: str | None
    segment: str | None
    link: str | None = Field(description="the incident's page on the dashboard")


class FindingPage(BaseModel):
    items: list[FindingPublic]


# --- window signals ----------------------------------------------------------------------


class SignalPoint(BaseModel):
    """What one closed window (or hourly rollup) measured and scored."""

    model_config = ConfigDict(from_attributes=True)

    resolution_s: int
    window_start: datetime
    window_end: datetime
    requests: int
    errors: int
    error_rate: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    feedback: int
    negative_feedback: int
    negative_rate: float | None
    refusal_rate: float | None
    empty_rate: float | None
    scores: dict[str, Any]


class SignalSeries(BaseModel):
    model_id: str
    version: str
    segment: str
    points: list[SignalPoint] = Field(description="oldest first")


# --- models ------------------------------------------------------------------------------


class Model(BaseModel):
    """A registered model: its base, the version serving, its aliases."""

    model_id: str
    base_uri: str
    base_fingerprint: str
    serving_version: str
    registered_by: str
    created_at: datetime
    updated_at: datetime
    aliases: dict[str, str] = Field(description="champion, challenger, previous -> version")
    versions: int
    open_incidents: int


class ModelDetail(Model):
    rollout: dict[str, Any] | None = Field(description="the rollout being watched, if any")
    lineage: list[ModelVersionPublic] = Field(
        description="every version, oldest first, with parent version, job, dataset, metrics"
    )


class PromoteBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "passed the gate"}]}
    )

    version: Identifier | None = Field(None, description="default: the challenger")
    reason: Reason = ""


class AliasMoves(BaseModel):
    """The alias moves one promotion or rollback made, and whether they were announced on
    ``<prefix>.models`` and to the webhooks (the move stands either way; run
    ``genmon models announce MODEL`` after a failed announcement)."""

    events: list[ModelEvent]
    announced: bool
    announce_failures: list[str]


# --- retrain jobs ------------------------------------------------------------------------


class JobAuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_status: str | None
    to_status: str
    actor: str
    reason: str
    at: datetime


class JobDetail(RetrainJobPublic):
    """A retrain job with who asked and approved, its error and audit trail."""

    requested_by: str
    approved_by: str | None
    context: dict[str, Any]
    audit: list[JobAuditPublic]


class JobCancelled(BaseModel):
    job_id: str
    status: RetrainStatus
    was: RetrainStatus


def job_audit(rows: list[RetrainJobAudit]) -> list[JobAuditPublic]:
    return [JobAuditPublic.model_validate(row) for row in rows]
