"""Stored tables of the feedback loop (SQLModel): pure data, no engine, no session.

- ``registered_model``: a model genmon may retrain: its base weights, their fingerprint
  and the version serving now. Incidents on other models queue nothing ("not retrainable").
- ``model_alias``: movable pointers (``champion``, ``challenger``, ``previous``) to a
  model's versions; every move is one transaction and one ``<prefix>.models`` event.
- ``retrain_decision``: every trigger's outcome, enqueued or not, with the reason ("why
  did nothing retrain?"). Unique on the trigger, so a redelivered trigger is decided once.
- ``retrain_job_audit``: each state change of a job, by whom, under which lease epoch.
- ``rollout``: a challenger on a share of traffic, watched against the champion, and the
  decision (confirmed, rolled back, cancelled, inconclusive) with its evidence. At most one
  rollout of a model is ``watching`` (a partial unique index, like ``model_version``'s one
  active row).

The job itself (``retrain_job``) and the versions (``model_version``) are in
:mod:`genmon.schemas.tables`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import MAX_ID_CHARS, RolloutStatus, new_id, utcnow
from genmon.schemas.tables import MAX_REASON_CHARS, MAX_URI_CHARS, UTCDateTime, enum_column_type


class DecisionOutcome(StrEnum):
    ENQUEUED = "enqueued"
    PENDING_APPROVAL = "pending_approval"
    REFUSED = "refused"
    IGNORED = "ignored"
    """No trigger of the policy matched (recorded so that "why not?" has an answer)."""


class RegisteredModel(SQLModel, table=True):
    """A model genmon may fine-tune: its base weights and the version serving now."""

    __tablename__ = "registered_model"

    model_id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    base_uri: str = Field(max_length=MAX_URI_CHARS, description="local path or HF cache id")
    base_fingerprint: str = Field(max_length=MAX_ID_CHARS, description="sha256 of the weights")
    serving_version: str = Field(max_length=MAX_ID_CHARS)
    registered_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelAliasRow(SQLModel, table=True):
    """Where one alias of one model points now."""

    __tablename__ = "model_alias"

    model_id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    alias: str = Field(primary_key=True, max_length=32)
    version: str = Field(max_length=MAX_ID_CHARS)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)


class RetrainDecision(SQLModel, table=True):
    """What genmon decided about one trigger, and why."""

    __tablename__ = "retrain_decision"
    __table_args__ = (
        sa.UniqueConstraint("trigger_key", name="uq_retrain_decision_trigger_key"),
        sa.Index("ix_retrain_decision_model_id_at", "model_id", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(max_length=MAX_ID_CHARS)
    trigger: str = Field(max_length=32)
    trigger_key: str = Field(max_length=MAX_REASON_CHARS)
    outcome: DecisionOutcome = Field(
        sa_type=enum_column_type(DecisionOutcome, "retrain_decision_outcome")
    )
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    job_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    incident_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RetrainJobAudit(SQLModel, table=True):
    """One state change of a retrain job (the audit trail)."""

    __tablename__ = "retrain_job_audit"
    __table_args__ = (sa.Index("ix_retrain_job_audit_job_id", "job_id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(max_length=MAX_ID_CHARS)
    from_status: str | None = Field(default=None, max_length=32)
    to_status: str = Field(max_length=32)
    actor: str = Field(max_length=MAX_ID_CHARS)
    lease_epoch: int = 0
    reason: str = Field(default="", sa_type=sa.Text)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


#: The rollouts still undecided; the partial unique index keeps one per model.
WATCHING_PREDICATE = "status = 'watching'"


class Rollout(SQLModel, table=True):
    """A challenger on ``share`` of a model's traffic, watched against the champion.

    ``state`` is the watch's own (``RolloutWatch.to_state()``, so a restarted watcher goes
    on where it stopped) and ``result`` its latest verdict (``WatchResult.to_json()``): the
    evidence a decision is recorded with. The alias moves and this row change in one
    transaction (:mod:`genmon.retrain.rollout`).
    """

    __tablename__ = "rollout"
    __table_args__ = (
        sa.Index("ix_rollout_model_id_started_at", "model_id", "started_at"),
        # Two watches of one model would split the same traffic twice; the second start
        # fails on this index instead.
        sa.Index(
            "uq_rollout_one_watching",
            "model_id",
            unique=True,
            sqlite_where=sa.text(WATCHING_PREDICATE),
            postgresql_where=sa.text(WATCHING_PREDICATE),
        ),
    )

    rollout_id: str = Field(default_factory=new_id, primary_key=True, max_length=MAX_ID_CHARS)
    model_id: str = Field(max_length=MAX_ID_CHARS)
    champion: str = Field(max_length=MAX_ID_CHARS, description="the version compared against")
    challenger: str = Field(max_length=MAX_ID_CHARS, description="the version on trial")
    share: float = Field(description="the challenger's share of traffic, 0 < share < 1")
    status: RolloutStatus = Field(
        default=RolloutStatus.WATCHING, sa_type=enum_column_type(RolloutStatus, "rollout_status")
    )
    job_id: str | None = Field(
        default=None, max_length=MAX_ID_CHARS, description="the retrain job; none: by hand"
    )
    started_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    watch_from_ms: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="event time of the first window watched"
    )
    planned_watch_s: float | None = None
    state: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    result: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decided_by: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    incident_finding_id: str | None = Field(
        default=None, max_length=MAX_ID_CHARS, description="the finding of a regression"
    )


__all__ = [
    "WATCHING_PREDICATE",
    "DecisionOutcome",
    "ModelAliasRow",
    "RegisteredModel",
    "RetrainDecision",
    "RetrainJobAudit",
    "Rollout",
]
