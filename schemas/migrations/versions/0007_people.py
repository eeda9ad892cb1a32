"""genmon for people: API tokens (hashed, scoped), the API's audit of writes, and the
closed-window signals kept for charts (per model, version, segment and resolution).

Revision ID: 0007_people
Revises: 0006_governance
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_people"
down_revision: str | None = "0006_governance"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 256
TOKEN_ID = 32
TOKEN_HASH = 64
PATH = 2048
SEGMENT = 512


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_token",
        sa.Column("id", sa.String(TOKEN_ID), nullable=False),
        sa.Column("name", sa.String(ID), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("secret_hash", sa.String(TOKEN_HASH), nullable=False),
        sa.Column("created_by", sa.String(ID), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("expires_at", _tz(), nullable=True),
        sa.Column("last_used_at", _tz(), nullable=True),
        sa.Column("revoked_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_token"),
        sa.UniqueConstraint("name", name="uq_api_token_name"),
    )
    op.create_table(
        "api_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.Column("token_name", sa.String(ID), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(PATH), nullable=False),
        sa.Column("action", sa.String(ID), nullable=False),
        sa.Column("target", sa.String(ID), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_audit"),
    )
    op.create_index("ix_api_audit_at", "api_audit", ["at"])
    op.create_table(
        "window_signal",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("model_version", sa.String(ID), nullable=False),
        sa.Column("segment", sa.String(SEGMENT), nullable=False),
        sa.Column("resolution_s", sa.Integer(), nullable=False),
        sa.Column("window_start", _tz(), nullable=False),
        sa.Column("window_end", _tz(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("error_rate", sa.Float(), nullable=True),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("latency_p99_ms", sa.Float(), nullable=True),
        sa.Column("feedback", sa.Integer(), nullable=False),
        sa.Column("negative_feedback", sa.Integer(), nullable=False),
        sa.Column("negative_rate", sa.Float(), nullable=True),
        sa.Column("refusal_rate", sa.Float(), nullable=True),
        sa.Column("empty_rate", sa.Float(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("recorded_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_window_signal"),
        sa.UniqueConstraint(
            "model_id",
            "model_version",
            "segment",
            "resolution_s",
            "window_start",
            name="uq_window_signal_series_window",
        ),
    )
    op.create_index(
        "ix_window_signal_model_id_window_start", "window_signal", ["model_id", "window_start"]
    )
    op.create_index(
        "ix_window_signal_resolution_s_window_start",
        "window_signal",
        ["resolution_s", "window_start"],
    )


def downgrade() -> None:
    op.drop_index("ix_window_signal_resolution_s_window_start", table_name="window_signal")
    op.drop_index("ix_window_signal_model_id_window_start", table_name="window_signal")
    op.drop_table("window_signal")
    op.drop_index("ix_api_audit_at", table_name="api_audit")
    op.drop_table("api_audit")
    op.drop_table("api_token")
