"""Stored tables of the feedback loop (SQLModel): pure data, no engine, no session.

- ``registered_model``: a model genmon may retrain: its base weights, their fingerprint
  and the version serving now. Incidents on other models queue nothing ("not retrainable").
- ``model_alias``: movable pointers (``champion``, ``challenger``, ``previous``) to a
  model's versions; every move is one transaction and one ``<prefix>.models`` event.
- ``retrain_decision``: every trigger's outcome, enqueued or not, with the reason ("why
  did nothing retrain?"). Unique on the trigger, so a redelivered trigger is decided once.
- ``retrain_job_audit``: each state change of a job, by whom, under which lease epoch.

The job itself (``retrain_job``) and the versions (``model_version``) are in
:mod:`genmon.schemas.tables`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import MAX_ID_CHARS, utcnow
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


__all__ = [
    "DecisionOutcome",
    "ModelAliasRow",
    "RegisteredModel",
    "RetrainDecision",
    "RetrainJobAudit",
]
