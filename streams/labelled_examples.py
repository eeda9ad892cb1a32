"""Labelled examples: inference and feedback joined by the pipeline, stored for retraining.

Each joined pair becomes one ``labelled_example`` row. A batch's rows go in one
statement with ``ON CONFLICT DO NOTHING`` on ``(model_id, request_id)``, so a redelivered
batch never duplicates a row and later feedback never overwrites the first. The worker
inserts off the event loop (:class:`LabelledExampleSink`) and a failed insert is counted
and logged, never raised: losing examples must not stop the aggregates.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genmon.streams.pipeline_metrics import PipelineMetrics

log = logging.getLogger(__name__)


def insert_examples(engine: Any, rows: list[dict[str, Any]]) -> int:
    """Insert ``labelled_example`` rows in one statement; existing (model, request) are kept.

    Returns how many rows were new where the driver reports it (SQLite, PostgreSQL).
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from genmon.db import session_scope
    from genmon.schemas.tables import LabelledExample

    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(LabelledExample.__table__).on_conflict_do_nothing(
        index_elements=["model_id", "request_id"]
    )
    with session_scope(engine) as session:
        result = session.execute(statement, rows)
        return max(int(getattr(result, "rowcount", 0) or 0), 0)


class LabelledExampleSink:
    """Inserts a batch's labelled examples in a thread; the engine is made on first use."""

    def __init__(self, database_url: str, metrics: PipelineMetrics) -> None:
        self.database_url = database_url
        self.metrics = metrics
        self._engine: Any = None

    async def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            inserted = await asyncio.to_thread(self._insert, rows)
        except Exception:
            self.metrics.example_errors.inc()
            log.exception("could not store %d labelled examples", len(rows))
            return
        self.metrics.examples.inc(inserted)

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        from genmon.db import make_engine

        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return insert_examples(self._engine, rows)
