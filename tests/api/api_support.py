"""Helpers shared by the JSON API's tests (not a test module): a migrated PostgreSQL
schema seeded with incidents, findings, a silence, a registered model with versions,
retrain jobs and window signals; tokens of each scope; the app served by uvicorn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from incident_support import finding, migrated_engine, postgres_schema_url, settings_with
from sqlalchemy.engine import Engine

from genmon.api.app import create_app
from genmon.api.tokens import create_token
from genmon.db import session_scope, table_metadata
from genmon.incidents.manager import IncidentManager
from genmon.infra.kafka import KafkaBroker
from genmon.retrain.registry import create_version, move_alias, promote
from genmon.schemas.access import Scope
from genmon.schemas.events import ModelAlias, RetrainStatus, utcnow
from genmon.schemas.incidents import Silence
from genmon.schemas.retrain import RegisteredModel
from genmon.schemas.signals import ALL, WindowSignal
from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings

MODEL = "api-chat"


@dataclass
class Seeded:
    """What :func:`seed` stored, for tests to aim at."""

    incidents: list[str] = field(default_factory=list)
    open_incident: str = ""
    resolved_incident: str = ""
    pending_job: str = ""
    queued_job: str = ""
    silence: str = ""
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class Served:
    settings: Settings
    engine: Engine
    app: FastAPI
    seeded: Seeded


def api_settings(database_url: str, kafka: Settings, prefix: str) -> Settings:
    """Test settings: this database, the real broker with topics of their own under
    ``prefix`` (created; ingest and model announcements land there), no incident events."""
    base = settings_with()
    settings = base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": database_url}),
            "kafka": kafka.kafka.model_copy(update={"topic_prefix": prefix}),
        }
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    return settings


def seed(engine: Engine, settings: Settings) -> Seeded:
    """Incidents (open, acknowledged, resolved, with notes), findings, a silence, a model
    with champion and challenger, retrain jobs, window signals, and one token per scope."""
    seeded = Seeded()
    manager = IncidentManager(engine, settings)
    signals = [
        ("negative_rate", None),
        ("error_rate", "locale=de"),
        ("latency_ms", None),
        ("refusal_rate", None),
        ("empty_rate", "locale=fr"),
    ]
    for n, (signal, segment) in enumerate(signals):
        outcome = manager.process(
            finding(n, model_id=MODEL, signal=signal, segment=segment, evidence={"n": n})
        )
        assert outcome.incident_id is not None
        seeded.incidents.append(outcome.incident_id)
    # The oldest resolved, the next acknowledged, the newest (first listed) open.
    manager.resolve(seeded.incidents[0], "alice")
    manager.acknowledge(seeded.incidents[1], "alice")
    manager.add_note(seeded.incidents[-1], "alice", "looking")
    seeded.resolved_incident, seeded.open_incident = seeded.incidents[0], seeded.incidents[-1]

    now = utcnow()
    with session_scope(engine) as session:
        session.add(
            RegisteredModel(
                model_id=MODEL,
                base_uri="/models/base",
                base_fingerprint="f" * 64,
                serving_version="v1",
            )
        )
        pending = RetrainJob(
            model_id=MODEL,
            base_version="v1",
            status=RetrainStatus.PENDING_APPROVAL,
            reason="seeded",
            requested_by="alice",
        )
        queued = RetrainJob(model_id=MODEL, base_version="v1", reason="seeded")
        session.add_all([pending, queued])
        silence = Silence(
            matchers=[f'model="{MODEL}"'], ends_at=now + timedelta(hours=1), created_by="alice"
        )
        session.add(silence)
        for minute in range(5):
            start = now - timedelta(minutes=10 - minute)
            session.add(
                WindowSignal(
                    model_id=MODEL,
                    model_version=ALL,
                    segment=ALL,
                    resolution_s=60,
                    window_start=start,
                    window_end=start + timedelta(minutes=1),
                    requests=100,
                    errors=minute,
                    error_rate=minute / 100,
                    latency_p95_ms=120.0 + minute,
                    scores={"latency_ms": {"score": 0.5, "threshold": 1.0, "detected": False}},
                )
            )
    seeded.pending_job, seeded.queued_job, seeded.silence = (
        pending.job_id,
        queued.job_id,
        silence.id,
    )
    create_version(engine, MODEL, "v1", "/models/base", None)
    promote(engine, MODEL, "v1", "alice")
    create_version(engine, MODEL, "v2", "/models/v2", "v1", metrics={"loss": 0.5})
    move_alias(engine, MODEL, ModelAlias.CHALLENGER, "v2", "alice")

    for scope in Scope:
        _, text = create_token(engine, f"tok-{scope.value}", [scope])
        seeded.tokens[scope.value] = text
    return seeded


@contextmanager
def seeded_app(postgres_url: str, kafka_settings: Settings, prefix: str) -> Iterator[Served]:
    """The app over a fresh migrated, seeded schema (dropped afterwards)."""
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        settings = api_settings(url, kafka_settings, prefix)
        try:
            seeded = seed(engine, settings)
            yield Served(settings, engine, create_app(settings, engine), seeded)
        finally:
            engine.dispose()


@contextmanager
def uvicorn_thread(app: FastAPI, port: int) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1:``port`` in a thread; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            # an open event stream (the dashboard's /events) must not hold up the stop
            timeout_graceful_shutdown=5,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class DatabaseSnapshot:
    """Every genmon table's rows, kept in memory, to put the database back as it was.

    Schemathesis' stateful phase draws each step's input from earlier responses: when
    earlier examples changed the database (a silence expired, an incident resolved), the
    same choices draw differently and Hypothesis stops with ``FlakyStrategyDefinition``.
    Restoring the seeded rows before each scenario makes every scenario start alike.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tables = table_metadata().sorted_tables
        with engine.connect() as connection:
            self.rows = {
                table.name: _parents_first(
                    table, [dict(row._mapping) for row in connection.execute(table.select())]
                )
                for table in self.tables
            }

    def restore(self) -> None:
        with self.engine.begin() as connection:
            for table in reversed(self.tables):
                connection.execute(table.delete())
            for table in self.tables:
                if self.rows[table.name]:
                    connection.execute(table.insert(), self.rows[table.name])


def _parents_first(table: sa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` ordered so that a row a self-referencing foreign key points to comes first
    (``incident.parent_id``): inserted in this order, every reference finds its row."""
    own = [
        (fk.parent.name, fk.column.name) for fk in table.foreign_keys if fk.column.table is table
    ]
    if not own:
        return rows
    placed: list[dict[str, Any]] = []
    known: set[tuple[str, Any]] = set()
    waiting = list(rows)
    while waiting:
        ready = [
            row
            for row in waiting
            if all(row[column] is None or (target, row[column]) in known for column, target in own)
        ]
        assert ready, f"{table.name}: rows refer to one another in a cycle"
        for row in ready:
            placed.append(row)
            known.update((target, row[target]) for _, target in own)
        waiting = [row for row in waiting if row not in ready]
    return placed
