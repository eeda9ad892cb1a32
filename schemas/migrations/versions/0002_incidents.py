"""Incidents: incidents, their audit trail, silences, the notification outbox and its
delivery log, and the dedup keys of applied findings.

Revision ID: 0002_incidents
Revises: 0001_foundation
Create Date: 2026-11-29

The partial unique index ``uq_incident_open_fingerprint`` is what guarantees at most one
open incident per fingerprint; both SQLite (3.8+) and PostgreSQL support it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_incidents"
down_revision: str | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256
INCIDENT_ID = 32
FINGERPRINT = 64
DEDUP_KEY = 320
OPEN_PREDICATE = "status != 'resolved'"


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "incident",
        sa.Column("fingerprint", sa.String(FINGERPRINT), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("model_version", sa.String(ID), nullable=True),
        sa.Column("detector", sa.String(ID), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("signal", sa.String(ID), nullable=False),
        sa.Column("segment", sa.String(512), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(32), nullable=False),
        sa.Column("title", sa.String(512), nullable=False),
        sa.Column("runbook_url", sa.String(2048), nullable=True),
        sa.Column("remediation", sa.JSON(), nullable=False),
        sa.Column("id", sa.String(INCIDENT_ID), nullable=False),
        sa.Column("parent_id", sa.String(INCIDENT_ID), nullable=True),
        sa.Column("finding_count", sa.Integer(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("last_score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("effect_size", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("quiet_windows", sa.Integer(), nullable=False),
        sa.Column("reopen_count", sa.Integer(), nullable=False),
        sa.Column("flapping", sa.Boolean(), nullable=False),
        sa.Column("notify_seq", sa.Integer(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("chart", sa.JSON(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("first_seen_at", _tz(), nullable=False),
        sa.Column("last_seen_at", _tz(), nullable=False),
        sa.Column("last_detected_at", _tz(), nullable=False),
        sa.Column("opened_at", _tz(), nullable=False),
        sa.Column("acknowledged_at", _tz(), nullable=True),
        sa.Column("resolved_at", _tz(), nullable=True),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_incident"),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["incident.id"],
            name="fk_incident_parent_id_incident",
            ondelete="SET NULL",
        ),
    )
    op.create_index(
        "uq_incident_open_fingerprint",
        "incident",
        ["fingerprint"],
        unique=True,
        sqlite_where=sa.text(OPEN_PREDICATE),
        postgresql_where=sa.text(OPEN_PREDICATE),
    )
    op.create_index(
        "ix_incident_fingerprint_resolved_at", "incident", ["fingerprint", "resolved_at"]
    )
    op.create_index("ix_incident_model_id_status", "incident", ["model_id", "status"])
    op.create_index("ix_incident_parent_id", "incident", ["parent_id"])
    op.create_index("ix_incident_opened_at", "incident", ["opened_at"])

    op.create_table(
        "incident_transition",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.String(INCIDENT_ID), nullable=False),
        sa.Column("transition", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(32), nullable=True),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(ID), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_incident_transition"),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incident.id"],
            name="fk_incident_transition_incident_id_incident",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_incident_transition_incident_id_at", "incident_transition", ["incident_id", "at"]
    )

    op.create_table(
        "silence",
        sa.Column("id", sa.String(INCIDENT_ID), nullable=False),
        sa.Column("matchers", sa.JSON(), nullable=False),
        sa.Column("starts_at", _tz(), nullable=False),
        sa.Column("ends_at", _tz(), nullable=False),
        sa.Column("created_by", sa.String(ID), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_silence"),
    )
    op.create_index("ix_silence_ends_at", "silence", ["ends_at"])

    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.String(INCIDENT_ID), nullable=False),
        sa.Column("destination", sa.String(ID), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(DEDUP_KEY), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("silenced_by", sa.String(INCIDENT_ID), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("next_attempt_at", _tz(), nullable=False),
        sa.Column("lease_until", _tz(), nullable=True),
        sa.Column("delivered_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_notification"),
        sa.UniqueConstraint("idempotency_key", name="uq_notification_idempotency_key"),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incident.id"],
            name="fk_notification_incident_id_incident",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_notification_status_next_attempt_at", "notification", ["status", "next_attempt_at"]
    )
    op.create_index(
        "ix_notification_incident_id_destination",
        "notification",
        ["incident_id", "destination", "id"],
    )

    op.create_table(
        "delivery_attempt",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempt"),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notification.id"],
            name="fk_delivery_attempt_notification_id_notification",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_delivery_attempt_notification_id", "delivery_attempt", ["notification_id"])

    op.create_table(
        "finding_seen",
        sa.Column("dedup_key", sa.String(DEDUP_KEY), nullable=False),
        sa.Column("fingerprint", sa.String(FINGERPRINT), nullable=False),
        sa.Column("seen_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("dedup_key", name="pk_finding_seen"),
    )
    op.create_index("ix_finding_seen_seen_at", "finding_seen", ["seen_at"])


def downgrade() -> None:
    op.drop_table("finding_seen")
    op.drop_table("delivery_attempt")
    op.drop_table("notification")
    op.drop_table("silence")
    op.drop_table("incident_transition")
    op.drop_table("incident")
