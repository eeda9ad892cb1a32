"""The feedback loop: registered models, aliases, retrain decisions, the job queue's lease
and progress columns on ``retrain_job``, lineage columns on ``model_version``, and the
job audit trail.

Revision ID: 0004_feedback_loop
Revises: 0003_destination_health
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004_feedback_loop"
down_revision: str | None = "0003_destination_health"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256
URI = 2048
REASON = 1024


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


#: (name, type, server default or None): the defaults fill the rows that exist already.
JOB_COLUMNS: list[tuple[str, Any, str | None]] = [
    ("trigger", sa.String(32), "manual"),
    ("trigger_key", sa.String(REASON), None),
    ("context", sa.JSON(), "{}"),
    ("requested_by", sa.String(ID), "genmon"),
    ("approved_by", sa.String(ID), None),
    ("hold_reason", sa.String(REASON), None),
    ("attempts", sa.Integer(), "0"),
    ("max_attempts", sa.Integer(), "3"),
    ("lease_owner", sa.String(ID), None),
    ("lease_epoch", sa.Integer(), "0"),
    ("lease_expires_at", _tz(), None),
    ("heartbeat_at", _tz(), None),
    ("progress", sa.JSON(), "{}"),
    ("checkpoint_uri", sa.String(URI), None),
    ("checkpoint_step", sa.Integer(), None),
    ("dataset_uri", sa.String(URI), None),
    ("dataset_hash", sa.String(ID), None),
    ("artifact_uri", sa.String(URI), None),
    ("verdict", sa.JSON(), "{}"),
    ("device_seconds", sa.Float(), "0"),
]
VERSION_COLUMNS: list[tuple[str, Any, str | None]] = [
    ("base_uri", sa.String(URI), None),
    ("base_fingerprint", sa.String(ID), None),
    ("dataset_hash", sa.String(ID), None),
    ("incident_ids", sa.JSON(), "[]"),
]


def _column(name: str, type_: Any, default: str | None) -> sa.Column:
    return sa.Column(name, type_, nullable=default is None, server_default=default)


def upgrade() -> None:
    with op.batch_alter_table("retrain_job") as batch:
        for spec in JOB_COLUMNS:
            batch.add_column(_column(*spec))
        batch.create_unique_constraint("uq_retrain_job_trigger_key", ["trigger_key"])
        batch.create_index("ix_retrain_job_status_lease", ["status", "lease_expires_at"])
    with op.batch_alter_table("model_version") as batch:
        for spec in VERSION_COLUMNS:
            batch.add_column(_column(*spec))
    # The defaults only filled the rows already there; the models set values themselves.
    for table, specs in (("retrain_job", JOB_COLUMNS), ("model_version", VERSION_COLUMNS)):
        with op.batch_alter_table(table) as batch:
            for name, _type, default in specs:
                if default is not None:
                    batch.alter_column(name, server_default=None)
    op.create_table(
        "registered_model",
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("base_uri", sa.String(URI), nullable=False),
        sa.Column("base_fingerprint", sa.String(ID), nullable=False),
        sa.Column("serving_version", sa.String(ID), nullable=False),
        sa.Column("registered_by", sa.String(ID), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("model_id", name="pk_registered_model"),
    )
    op.create_table(
        "model_alias",
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("version", sa.String(ID), nullable=False),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.Column("updated_by", sa.String(ID), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "alias", name="pk_model_alias"),
    )
    op.create_table(
        "retrain_decision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("trigger_key", sa.String(REASON), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(REASON), nullable=False),
        sa.Column("job_id", sa.String(ID), nullable=True),
        sa.Column("incident_id", sa.String(ID), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_retrain_decision"),
        sa.UniqueConstraint("trigger_key", name="uq_retrain_decision_trigger_key"),
    )
    op.create_index("ix_retrain_decision_model_id_at", "retrain_decision", ["model_id", "at"])
    op.create_table(
        "retrain_job_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(ID), nullable=False),
        sa.Column("from_status", sa.String(32), nullable=True),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(ID), nullable=False),
        sa.Column("lease_epoch", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_retrain_job_audit"),
    )
    op.create_index("ix_retrain_job_audit_job_id", "retrain_job_audit", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_retrain_job_audit_job_id", table_name="retrain_job_audit")
    op.drop_table("retrain_job_audit")
    op.drop_index("ix_retrain_decision_model_id_at", table_name="retrain_decision")
    op.drop_table("retrain_decision")
    op.drop_table("model_alias")
    op.drop_table("registered_model")
    with op.batch_alter_table("model_version") as batch:
        for name, _type, _default in reversed(VERSION_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("retrain_job") as batch:
        batch.drop_index("ix_retrain_job_status_lease")
        batch.drop_constraint("uq_retrain_job_trigger_key", type_="unique")
        for name, _type, _default in reversed(JOB_COLUMNS):
            batch.drop_column(name)
