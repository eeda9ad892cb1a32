"""The periodic side and data kept about people: the scheduler's leader lease and its
fires (unique per schedule and fire time), data-subject opt-outs, the erasure audit,
chat ``messages`` on labelled examples, and where a retrain job runs (``backend``,
``remote_id``).

Revision ID: 0006_governance
Revises: 0005_rollout
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_governance"
down_revision: str | None = "0005_rollout"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256
REASON = 1024
INCIDENT_ID = 32  # as in 0002_incidents


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scheduler_lease",
        sa.Column("name", sa.String(ID), nullable=False),
        sa.Column("holder", sa.String(ID), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("acquired_at", _tz(), nullable=False),
        sa.Column("expires_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_scheduler_lease"),
    )
    op.create_table(
        "schedule_fire",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("schedule", sa.String(ID), nullable=False),
        sa.Column("fire_time", _tz(), nullable=False),
        sa.Column("fired_at", _tz(), nullable=False),
        sa.Column("holder", sa.String(ID), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_fire"),
        sa.UniqueConstraint("schedule", "fire_time", name="uq_schedule_fire_schedule_fire_time"),
    )
    op.create_index("ix_schedule_fire_fired_at", "schedule_fire", ["fired_at"])
    op.create_table(
        "subject_opt_out",
        sa.Column("subject_id", sa.String(ID), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("requested_by", sa.String(ID), nullable=False),
        sa.Column("note", sa.String(REASON), nullable=False),
        sa.PrimaryKeyConstraint("subject_id", name="pk_subject_opt_out"),
    )
    op.create_table(
        "erasure_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("subject_hash", sa.String(ID), nullable=False),
        sa.Column("requested_by", sa.String(ID), nullable=False),
        sa.Column("requested_at", _tz(), nullable=False),
        sa.Column("finished_at", _tz(), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("model_versions", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_erasure_audit"),
    )
    op.create_index("ix_erasure_audit_subject_hash", "erasure_audit", ["subject_hash"])
    with op.batch_alter_table("labelled_example") as batch:
        batch.add_column(sa.Column("messages", sa.JSON(), nullable=True))
    with op.batch_alter_table("retrain_job") as batch:
        batch.add_column(
            sa.Column("backend", sa.String(32), nullable=False, server_default="local")
        )
        batch.add_column(sa.Column("remote_id", sa.String(ID), nullable=True))
    # The default only filled the rows already there; the model sets the value itself.
    with op.batch_alter_table("retrain_job") as batch:
        batch.alter_column("backend", server_default=None)
    # The scheduler's daily digest is a notification about no one incident.
    with op.batch_alter_table("notification") as batch:
        batch.alter_column("incident_id", existing_type=sa.String(INCIDENT_ID), nullable=True)


def downgrade() -> None:
    # Digests are the only notifications without an incident: they cannot stay.
    op.execute(
        "DELETE FROM delivery_attempt WHERE notification_id IN"
        " (SELECT id FROM notification WHERE incident_id IS NULL)"
    )
    op.execute("DELETE FROM notification WHERE incident_id IS NULL")
    with op.batch_alter_table("notification") as batch:
        batch.alter_column("incident_id", existing_type=sa.String(INCIDENT_ID), nullable=False)
    with op.batch_alter_table("retrain_job") as batch:
        batch.drop_column("remote_id")
        batch.drop_column("backend")
    with op.batch_alter_table("labelled_example") as batch:
        batch.drop_column("messages")
    op.drop_index("ix_erasure_audit_subject_hash", table_name="erasure_audit")
    op.drop_table("erasure_audit")
    op.drop_table("subject_opt_out")
    op.drop_index("ix_schedule_fire_fired_at", table_name="schedule_fire")
    op.drop_table("schedule_fire")
    op.drop_table("scheduler_lease")
