"""Destination health and requeues: table ``destination_state`` (failing, paused and
probed destinations, shared by every dispatcher) and ``notification.requeued_at`` (a
requeued notification's retry horizon starts again there).

Revision ID: 0003_destination_health
Revises: 0002_incidents
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_destination_health"
down_revision: str | None = "0002_incidents"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.add_column(sa.Column("requeued_at", _tz(), nullable=True))
    op.create_table(
        "destination_state",
        sa.Column("destination", sa.String(ID), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("probe_failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", _tz(), nullable=True),
        sa.Column("paused_until", _tz(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("destination", name="pk_destination_state"),
    )


def downgrade() -> None:
    op.drop_table("destination_state")
    with op.batch_alter_table("notification") as batch:
        batch.drop_column("requeued_at")
