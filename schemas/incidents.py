"""Stored tables of the incident pipeline (SQLModel): pure data, no engine, no session.

- ``incident``: one row per problem. A problem is a *fingerprint* (see
  :attr:`genmon.schemas.Finding.fingerprint`: sha256 of model id, detector, signal and
  segment). A partial unique index on ``fingerprint WHERE status != 'resolved'`` makes
  "at most one open incident per fingerprint" a database fact, on SQLite and PostgreSQL.
- ``incident_transition``: the audit trail (who or what, when, why).
- ``silence``: Alertmanager-style matchers with a start and an end; they suppress
  notifications, never incidents.
- ``notification``: the transactional outbox, written in the incident's transaction: pages
  for the configured destinations, and every transition for the incidents topic (rows of
  the reserved destination :data:`INCIDENTS_TOPIC_DESTINATION`); also the scheduler's
  daily digest, a row of event ``digest`` about no one incident (``incident_id`` null).
- ``delivery_attempt``: the delivery log of each notification.
- ``destination_state``: failing and paused destinations, shared by the dispatchers.
- ``finding_seen``: dedup keys of findings already applied, pruned after a retention.

>>> from genmon.schemas.incidents import IncidentCreate
>>> IncidentCreate(fingerprint="f" * 32, model_id="chat", detector="adwin", kind="drift",
...                signal="latency_ms", title="t").status
<IncidentStatus.OPEN: 'open'>
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import (
    MAX_ID_CHARS,
    FindingKind,
    IncidentStatus,
    Severity,
    new_id,
    utcnow,
)
from genmon.schemas.tables import UTCDateTime, enum_column_type

FINGERPRINT_CHARS = 64
INCIDENT_ID_CHARS = 32
DEDUP_KEY_CHARS = 320
MAX_TITLE_CHARS = 512
MAX_URL_CHARS = 2048
MAX_SEGMENT_CHARS = 512

#: The partial index's predicate; kept in one place so model and migration agree.
OPEN_PREDICATE = "status != 'resolved'"
#: Destination of the outbox rows that carry incident transitions to ``<prefix>.incidents``
#: (the dispatcher resolves the prefix from its own settings); no configured destination
#: may take this name.
INCIDENTS_TOPIC_DESTINATION = "kafka:incidents"


class NotificationEvent(StrEnum):
    """What a notification tells a destination."""

    TRIGGER = "trigger"
    UPDATE = "update"
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    TRANSITION = "transition"
    """An :class:`~genmon.schemas.IncidentEvent` for the incidents topic, never a page."""
    DIGEST = "digest"
    """The scheduler's daily digest (``genmon.scheduler.digest``): about no one incident
    (``incident_id`` is null), never silenced, for webhook and Slack destinations only."""


#: Events that announce an incident to a destination; the others follow an announcement.
ANNOUNCEMENTS = frozenset({NotificationEvent.TRIGGER, NotificationEvent.UPDATE})


class NotificationStatus(StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DEAD = "dead"
    SUPPRESSED = "suppressed"
    SUPERSEDED = "superseded"
    """Not sent: a later notification of the same incident and destination replaces it
    (see :mod:`genmon.incidents.ordering`)."""


class Transition(StrEnum):
    OPENED = "opened"
    UPDATED = "updated"
    ESCALATED = "escalated"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    REOPENED = "reopened"
    NOTED = "noted"


# --- incidents ---------------------------------------------------------------------------


class IncidentBase(SQLModel):
    fingerprint: str = Field(max_length=FINGERPRINT_CHARS)
    model_id: str = Field(max_length=MAX_ID_CHARS)
    model_version: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    detector: str = Field(max_length=MAX_ID_CHARS)
    kind: FindingKind = Field(sa_type=enum_column_type(FindingKind, "finding_kind"))
    signal: str = Field(max_length=MAX_ID_CHARS)
    segment: str | None = Field(default=None, max_length=MAX_SEGMENT_CHARS)
    status: IncidentStatus = Field(
        default=IncidentStatus.OPEN, sa_type=enum_column_type(IncidentStatus, "incident_status")
    )
    severity: Severity = Field(
        default=Severity.WARNING, sa_type=enum_column_type(Severity, "severity")
    )
    title: str = Field(max_length=MAX_TITLE_CHARS)
    runbook_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    remediation: list[str] = Field(default_factory=list, sa_type=sa.JSON)


class Incident(IncidentBase, table=True):
    """One problem of one model, from first finding to resolution (and reopenings)."""

    __tablename__ = "incident"
    __table_args__ = (
        sa.Index(
            "uq_incident_open_fingerprint",
            "fingerprint",
            unique=True,
            sqlite_where=sa.text(OPEN_PREDICATE),
            postgresql_where=sa.text(OPEN_PREDICATE),
        ),
        sa.Index("ix_incident_fingerprint_resolved_at", "fingerprint", "resolved_at"),
        sa.Index("ix_incident_model_id_status", "model_id", "status"),
        sa.Index("ix_incident_parent_id", "parent_id"),
        sa.Index("ix_incident_opened_at", "opened_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=INCIDENT_ID_CHARS)
    parent_id: str | None = Field(
        default=None,
        foreign_key="incident.id",
        ondelete="SET NULL",
        max_length=INCIDENT_ID_CHARS,
        description=(
            "an open incident of the same model this one is related to (linked when it opened;"
            " each pages on its own)"
        ),
    )
    finding_count: int = 0
    peak_score: float = 0.0
    last_score: float = 0.0
    threshold: float = 0.0
    effect_size: float | None = None
    p_value: float | None = None
    quiet_windows: int = Field(default=0, description="clear windows in a row")
    reopen_count: int = 0
    flapping: bool = False
    notify_seq: int = Field(default=0, description="notifications queued so far, for ordering")
    evidence: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    chart: list[dict[str, Any]] = Field(
        default_factory=list, sa_type=sa.JSON, description="recent {at, score, detected} points"
    )
    notes: str = Field(default="", sa_type=sa.Text)
    first_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_detected_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    opened_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    acknowledged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class IncidentCreate(IncidentBase):
    pass


class IncidentPublic(IncidentBase):
    id: str
    parent_id: str | None
    finding_count: int
    peak_score: float
    last_score: float
    threshold: float
    effect_size: float | None
    p_value: float | None
    quiet_windows: int
    reopen_count: int
    flapping: bool
    evidence: dict[str, Any]
    chart: list[dict[str, Any]]
    notes: str
    first_seen_at: datetime
    last_seen_at: datetime
    opened_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    updated_at: datetime


class IncidentTransition(SQLModel, table=True):
    """One step of an incident's life: who or what moved it, when and why."""

    __tablename__ = "incident_transition"
    __table_args__ = (sa.Index("ix_incident_transition_incident_id_at", "incident_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    incident_id: str = Field(
        foreign_key="incident.id", ondelete="CASCADE", max_length=INCIDENT_ID_CHARS
    )
    transition: Transition = Field(sa_type=enum_column_type(Transition, "incident_transition"))
    from_status: IncidentStatus | None = Field(
        default=None, sa_type=enum_column_type(IncidentStatus, "incident_status")
    )
    to_status: IncidentStatus = Field(sa_type=enum_column_type(IncidentStatus, "incident_status"))
    actor: str = Field(max_length=MAX_ID_CHARS)
    reason: str = Field(default="", sa_type=sa.Text)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --- silences ----------------------------------------------------------------------------


class Silence(SQLModel, table=True):
    """Suppresses notifications of incidents whose labels match every matcher."""

    __tablename__ = "silence"
    __table_args__ = (sa.Index("ix_silence_ends_at", "ends_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=INCIDENT_ID_CHARS)
    matchers: list[str] = Field(
        sa_type=sa.JSON, description='label matchers, e.g. ["model=chat", "severity!=critical"]'
    )
    starts_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ends_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=MAX_ID_CHARS)
    comment: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --- the outbox --------------------------------------------------------------------------


class Notification(SQLModel, table=True):
    """One message for one destination, queued in the incident change's own transaction."""

    __tablename__ = "notification"
    __table_args__ = (
        sa.UniqueConstraint("idempotency_key", name="uq_notification_idempotency_key"),
        sa.Index("ix_notification_status_next_attempt_at", "status", "next_attempt_at"),
        sa.Index("ix_notification_incident_id_destination", "incident_id", "destination", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    incident_id: str | None = Field(
        default=None,
        foreign_key="incident.id",
        ondelete="CASCADE",
        max_length=INCIDENT_ID_CHARS,
        description="null for a notification about no one incident (the daily digest)",
    )
    destination: str = Field(max_length=MAX_ID_CHARS)
    event: NotificationEvent = Field(
        sa_type=enum_column_type(NotificationEvent, "notification_event")
    )
    idempotency_key: str = Field(max_length=DEDUP_KEY_CHARS)
    status: NotificationStatus = Field(
        default=NotificationStatus.PENDING,
        sa_type=enum_column_type(NotificationStatus, "notification_status"),
    )
    attempts: int = 0
    payload: dict[str, Any] = Field(
        default_factory=dict, sa_type=sa.JSON, description="incident snapshot, already redacted"
    )
    silenced_by: str | None = Field(default=None, max_length=INCIDENT_ID_CHARS)
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    last_status_code: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    requeued_at: datetime | None = Field(
        default=None,
        sa_type=UTCDateTime,
        description="when `genmon notify retry` requeued it: its retry horizon starts again",
    )


class DestinationState(SQLModel, table=True):
    """How one destination fares, shared by every dispatcher: failing, paused, probed.

    No row (or zero failures) is a healthy destination. ``paused_until`` set means paused:
    its notifications wait, and one probe may go out at that time.
    """

    __tablename__ = "destination_state"

    destination: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    consecutive_failures: int = 0
    probe_failures: int = 0
    """Probes failed since the pause began: the exponent of the next probe's backoff."""
    failing_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paused_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeliveryAttempt(SQLModel, table=True):
    """The delivery log: one row per HTTP attempt of one notification."""

    __tablename__ = "delivery_attempt"
    __table_args__ = (sa.Index("ix_delivery_attempt_notification_id", "notification_id"),)

    id: int | None = Field(default=None, primary_key=True)
    notification_id: int = Field(foreign_key="notification.id", ondelete="CASCADE")
    attempt: int
    outcome: str = Field(max_length=32, description="delivered, retry, dead, rate_limited")
    status_code: int | None = None
    error: str | None = Field(default=None, sa_type=sa.Text)
    duration_ms: float = 0.0
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --- finding dedup -----------------------------------------------------------------------


class FindingSeen(SQLModel, table=True):
    """A finding already applied; a replay with the same key changes nothing."""

    __tablename__ = "finding_seen"
    __table_args__ = (sa.Index("ix_finding_seen_seen_at", "seen_at"),)

    dedup_key: str = Field(primary_key=True, max_length=DEDUP_KEY_CHARS)
    fingerprint: str = Field(max_length=FINGERPRINT_CHARS)
    seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


INCIDENT_TABLES = (
    Incident,
    IncidentTransition,
    Silence,
    Notification,
    DeliveryAttempt,
    FindingSeen,
)
