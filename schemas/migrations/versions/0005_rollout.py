"""Safe rollout: the ``rollout`` table (a challenger on a share of traffic, its watch and
the decision), with at most one ``watching`` rollout per model.

Revision ID: 0005_rollout
Revises: 0004_feedback_loop
Create Date: 2026-12-14
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_rollout"
down_revision: str | None = "0004_feedback_loop"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256
REASON = 1024
WATCHING = "status = 'watching'"


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("rollout_id", sa.String(ID), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("champion", sa.String(ID), nullable=False),
        sa.Column("challenger", sa.String(ID), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(ID), nullable=True),
        sa.Column("started_by", sa.String(ID), nullable=False),
        sa.Column("started_at", _tz(), nullable=False),
        sa.Column("watch_from_ms", sa.BigInteger(), nullable=True),
        sa.Column("planned_watch_s", sa.Float(), nullable=True),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("decided_at", _tz(), nullable=True),
        sa.Column("decided_by", sa.String(ID), nullable=True),
        sa.Column("reason", sa.String(REASON), nullable=False),
        sa.Column("incident_finding_id", sa.String(ID), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", name="pk_rollout"),
    )
    op.create_index("ix_rollout_model_id_started_at", "rollout", ["model_id", "started_at"])
    op.create_index(
        "uq_rollout_one_watching",
        "rollout",
        ["model_id"],
        unique=True,
        sqlite_where=sa.text(WATCHING),
        postgresql_where=sa.text(WATCHING),
    )


def downgrade() -> None:
    op.drop_index("uq_rollout_one_watching", table_name="rollout")
    op.drop_index("ix_rollout_model_id_started_at", table_name="rollout")
    op.drop_table("rollout")
