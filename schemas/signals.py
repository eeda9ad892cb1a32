"""Stored table of closed-window signals kept for people (SQLModel): pure data.

``window_signal`` holds, per model, version and segment, what a closed tumbling window
measured (counts, rates, latency quantiles, feedback) and what the detectors made of it
(each signal's score against its threshold), so the dashboard and the API chart history
without reading Kafka. Rows of ``resolution_s`` = the tumbling window (60 s by default) are
rolled up into hourly rows (``resolution_s`` = 3600) once older than
``retention.signals_days``, and hourly rows are dropped after
``retention.signal_rollups_days``: the table is bounded whatever the traffic.

``model_version`` and ``segment`` are ``"*"`` for the whole model (all versions, all
segments), as in the window records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import MAX_ID_CHARS, utcnow
from genmon.schemas.tables import UTCDateTime

#: The resolution of rolled-up rows, in seconds.
ROLLUP_RESOLUTION_S = 3600
#: ``model_version`` / ``segment`` of the series over everything.
ALL = "*"
MAX_SIGNAL_SEGMENT_CHARS = 512


class WindowSignal(SQLModel, table=True):
    """What one closed window of one (model, version, segment) measured and scored."""

    __tablename__ = "window_signal"
    __table_args__ = (
        sa.UniqueConstraint(
            "model_id",
            "model_version",
            "segment",
            "resolution_s",
            "window_start",
            name="uq_window_signal_series_window",
        ),
        sa.Index("ix_window_signal_model_id_window_start", "model_id", "window_start"),
        sa.Index("ix_window_signal_resolution_s_window_start", "resolution_s", "window_start"),
    )

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(max_length=MAX_ID_CHARS)
    model_version: str = Field(default=ALL, max_length=MAX_ID_CHARS)
    segment: str = Field(default=ALL, max_length=MAX_SIGNAL_SEGMENT_CHARS)
    resolution_s: int = Field(description="the window's length: tumbling, or the rollup's")
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    feedback: int = 0
    negative_feedback: int = 0
    negative_rate: float | None = None
    refusal_rate: float | None = None
    empty_rate: float | None = None
    scores: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=sa.JSON,
        description='per signal: {"score", "threshold", "detected", "value", "baseline", '
        '"detector"} of its judgement on this window',
    )
    recorded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
