"""Foundation: retrain jobs, model versions, labelled examples.

Revision ID: 0001_foundation
Revises:
Create Date: 2026-11-29

Hand-written on purpose: migrations are the contract with existing databases and must
not change when the models do. ``tests/test_db_migrations.py`` fails if the models and
the migrations drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_foundation"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "retrain_job",
        sa.Column("job_id", sa.String(ID), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("base_version", sa.String(ID), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("incident_id", sa.String(ID), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("candidate_version", sa.String(ID), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("started_at", _tz(), nullable=True),
        sa.Column("finished_at", _tz(), nullable=True),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_retrain_job"),
    )
    op.create_index("ix_retrain_job_model_id_status", "retrain_job", ["model_id", "status"])
    op.create_index("ix_retrain_job_incident_id", "retrain_job", ["incident_id"])
    op.create_index("ix_retrain_job_created_at", "retrain_job", ["created_at"])

    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("version", sa.String(ID), nullable=False),
        sa.Column("artifact_uri", sa.String(2048), nullable=False),
        sa.Column("parent_version", sa.String(ID), nullable=True),
        sa.Column("job_id", sa.String(ID), nullable=True),
        sa.Column("eval_metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("promoted_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_model_version"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_version_model_id_version"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["retrain_job.job_id"],
            name="fk_model_version_job_id_retrain_job",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_model_version_model_id_status", "model_version", ["model_id", "status"])
    op.create_index("ix_model_version_job_id", "model_version", ["job_id"])
    op.create_index(
        "uq_model_version_one_active",
        "model_version",
        ["model_id"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "labelled_example",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(ID), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("model_version", sa.String(ID), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("label", sa.String(128), nullable=True),
        sa.Column("segment", sa.JSON(), nullable=False),
        sa.Column("subject_id", sa.String(ID), nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labelled_example"),
        sa.UniqueConstraint("model_id", "request_id", name="uq_labelled_example_model_id_request"),
    )
    op.create_index(
        "ix_labelled_example_model_id_created_at", "labelled_example", ["model_id", "created_at"]
    )
    op.create_index("ix_labelled_example_subject_id", "labelled_example", ["subject_id"])


def downgrade() -> None:
    op.drop_table("labelled_example")
    op.drop_table("model_version")
    op.drop_table("retrain_job")
