"""Stored tables of the periodic side and of data kept about people (SQLModel): pure data.

- ``scheduler_lease``: the one scheduler leader across processes. A process holds the
  lease until ``expires_at`` (database clock) and renews it; ``epoch`` is bumped by every
  change of holder, so a former leader's late write can be recognised.
- ``schedule_fire``: one row per (schedule, fire time). The unique key makes each tick's
  effect happen once, even with two leaders after a pause or clock skew.
- ``subject_opt_out``: data subjects who asked that their feedback never train a model;
  the dataset builder excludes them.
- ``erasure_audit``: each erasure or export by subject: who asked, when, what was
  removed (counts per place) and the model versions trained on that subject's data. It
  holds a hash of the subject id and never the erased content.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import MAX_ID_CHARS, utcnow
from genmon.schemas.tables import MAX_REASON_CHARS, UTCDateTime

#: The ``schedule_fire.schedule`` of the scheduler's drift-reference refresh: each row is a
#: request the detection workers honour at their next window (genmon.streams.detection.
#: reference_refresh); defined here because streams may not import the scheduler.
REFERENCE_REFRESH_SCHEDULE = "reference-refresh"


class SchedulerLease(SQLModel, table=True):
    """Who leads the scheduler now, until when."""

    __tablename__ = "scheduler_lease"

    name: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    holder: str = Field(max_length=MAX_ID_CHARS)
    epoch: int = Field(default=0, description="bumped at every change of holder")
    acquired_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class ScheduleFire(SQLModel, table=True):
    """One tick of one schedule, claimed once (its effect happens once)."""

    __tablename__ = "schedule_fire"
    __table_args__ = (
        sa.UniqueConstraint("schedule", "fire_time", name="uq_schedule_fire_schedule_fire_time"),
        sa.Index("ix_schedule_fire_fired_at", "fired_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    schedule: str = Field(max_length=MAX_ID_CHARS, description="schedule id, e.g. retrain:chat")
    fire_time: datetime = Field(sa_type=UTCDateTime, description="the tick's nominal time")
    fired_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    holder: str = Field(max_length=MAX_ID_CHARS, description="the leader that fired it")
    epoch: int = 0
    result: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class SubjectOptOut(SQLModel, table=True):
    """A data subject whose data must not train any model."""

    __tablename__ = "subject_opt_out"

    subject_id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    requested_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    note: str = Field(default="", max_length=MAX_REASON_CHARS)


class ErasureAudit(SQLModel, table=True):
    """One erasure or export request by data subject, without the content it concerned."""

    __tablename__ = "erasure_audit"
    __table_args__ = (sa.Index("ix_erasure_audit_subject_hash", "subject_hash"),)

    id: int | None = Field(default=None, primary_key=True)
    action: str = Field(max_length=32, description="erase or export")
    subject_hash: str = Field(max_length=MAX_ID_CHARS, description="sha256 of the subject id")
    requested_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    requested_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    counts: dict[str, Any] = Field(
        default_factory=dict, sa_type=sa.JSON, description="what was found or removed, by place"
    )
    model_versions: list[dict[str, Any]] = Field(
        default_factory=list, sa_type=sa.JSON, description="versions trained on the subject"
    )


__all__ = [
    "REFERENCE_REFRESH_SCHEDULE",
    "ErasureAudit",
    "ScheduleFire",
    "SchedulerLease",
    "SubjectOptOut",
]
