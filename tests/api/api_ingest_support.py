"""The API in a uvicorn thread on a free port, with an ingest token, for the ingest tests
(not a test module)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from api_support import uvicorn_thread
from fastapi import FastAPI
from incident_support import migrated_engine, sqlite_url
from kafka import KafkaConsumer, TopicPartition

from genmon.api.app import create_app
from genmon.api.tokens import create_token
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.access import Scope
from genmon.settings import Settings


@dataclass
class RunningApi:
    url: str
    token: str
    settings: Settings
    app: FastAPI

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def topic_settings(kafka_settings: Settings, prefix: str, **api: object) -> Settings:
    """The shared broker with topics of their own (created), ``api`` fields overridden."""
    kafka = kafka_settings.kafka.model_copy(update={"topic_prefix": prefix})
    settings = kafka_settings.model_copy(
        update={"kafka": kafka, "api": kafka_settings.api.model_copy(update=api)}
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    return settings


@contextmanager
def running_api(
    settings: Settings, tmp_path: Path, port: int, scopes: tuple[Scope, ...] = (Scope.INGEST,)
) -> Iterator[RunningApi]:
    """The app served on 127.0.0.1:``port`` (SQLite database, a token with ``scopes``)."""
    engine = migrated_engine(sqlite_url(tmp_path))
    _, token = create_token(engine, "ingest-test", list(scopes))
    app = create_app(settings, engine)
    try:
        with uvicorn_thread(app, port) as url:
            yield RunningApi(url, token, settings, app)
    finally:
        engine.dispose()


def end_offsets(settings: Settings, *kinds: str) -> dict[TopicPartition, int]:
    """The end offset of every partition of ``kinds``' topics."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        partitions = [
            TopicPartition(settings.topic(kind), partition)
            for kind in kinds
            for partition in sorted(consumer.partitions_for_topic(settings.topic(kind)) or ())
        ]
        return dict(consumer.end_offsets(partitions))
    finally:
        consumer.close()
