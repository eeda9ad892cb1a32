"""``GET /metrics`` of the API: Prometheus text whose values are what the database and the
broker hold (consumer lag of genmon's group, dead letters, detector scores, incidents,
webhook failures, jobs), cached for ``api.metrics_cache_s``, and a broker that is down
reported as ``genmon_api_broker_up 0`` instead of a failed scrape."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from incident_support import migrated_engine, postgres_schema_url
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from genmon.api.app import create_app
from genmon.api.metrics import MAX_SCORE_SERIES, metrics_of
from genmon.db import session_scope
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import IncidentStatus, RetrainStatus, Severity, utcnow
from genmon.schemas.incidents import (
    DeliveryAttempt,
    Incident,
    Notification,
    NotificationEvent,
    NotificationStatus,
)
from genmon.schemas.signals import ALL, WindowSignal
from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings

pytestmark = pytest.mark.postgres

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine
        engine.dispose()


def settings_for(engine: Engine, bootstrap: str, name: str, cache_s: float = 60.0) -> Settings:
    return Settings.model_validate(
        {
            "database": {"url": engine.url.render_as_string(hide_password=False)},
            "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": name},
            "worker": {"app_id": name},
            "api": {"metrics_cache_s": cache_s},
        }
    )


def scrape(app: Any) -> Samples:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def incident(name: str, severity: Severity, status: IncidentStatus) -> Incident:
    return Incident(
        id=name,
        fingerprint=name.ljust(32, "0"),
        model_id="chat",
        detector="rate_cusum",
        kind="quality",
        signal="error_rate",
        title=name,
        severity=severity,
        status=status,
    )


def seed(engine: Engine) -> None:
    now = utcnow()
    with session_scope(engine) as session:
        session.add_all(
            [
                incident("i1", Severity.WARNING, IncidentStatus.OPEN),
                incident("i2", Severity.WARNING, IncidentStatus.ACKNOWLEDGED),
                incident("i3", Severity.CRITICAL, IncidentStatus.OPEN),
                incident("i4", Severity.CRITICAL, IncidentStatus.RESOLVED),
            ]
        )
        session.flush()
        for n, status in enumerate(
            (NotificationStatus.DEAD, NotificationStatus.DEAD, NotificationStatus.DELIVERED)
        ):
            note = Notification(
                incident_id="i1",
                destination="hook",
                event=NotificationEvent.TRIGGER,
                idempotency_key=f"k{n}",
                status=status,
            )
            session.add(note)
            session.flush()
            outcomes = ["retry", "dead"] if status == NotificationStatus.DEAD else ["delivered"]
            for attempt, outcome in enumerate(outcomes):
                session.add(
                    DeliveryAttempt(notification_id=note.id, attempt=attempt, outcome=outcome)
                )
        session.add_all(
            [
                RetrainJob(model_id="chat", base_version="v1", reason="t"),
                RetrainJob(model_id="chat", base_version="v1", reason="t"),
                RetrainJob(
                    model_id="chat", base_version="v1", reason="t", status=RetrainStatus.FAILED
                ),
            ]
        )
        judged = {"score": 7.5, "threshold": 5.0, "detected": True, "detector": "rate_cusum"}
        for minutes, scores in ((2, {"error_rate": {**judged, "score": 1.0}}), (1, {})):
            start = now - timedelta(minutes=minutes)
            for version, segment, extra in (
                ("v1", ALL, {"error_rate": judged, "latency": {**judged, "detected": False}}),
                ("v1", "lang=en", {"error_rate": {**judged, "score": 99.0}}),
            ):
                session.add(
                    WindowSignal(
                        model_id="chat",
                        model_version=version,
                        segment=segment,
                        resolution_s=60,
                        window_start=start,
                        window_end=start + timedelta(minutes=1),
                        scores=scores or extra,
                    )
                )


def broker_state(bootstrap: str, settings: Settings) -> None:
    """3 dead letters; the worker's group committed 2 of 5 inference records."""
    KafkaBroker(settings).ensure_topics(bootstrap)
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for n in range(3):
        producer.send(settings.topic("deadletter"), key=b"m", value=b"dead %d" % n)
    inference = TopicPartition(settings.topic("inference"), 0)
    for _ in range(5):
        producer.send(inference.topic, value=b"x", partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings.worker.app_id, enable_auto_commit=False
    )
    try:
        from kafka.structs import OffsetAndMetadata

        consumer.commit({inference: OffsetAndMetadata(2, "", -1)})
    finally:
        consumer.close()


@pytest.mark.kafka
def test_metrics_serve_what_the_database_and_the_broker_hold(
    engine: Engine, kafka_settings: Settings, unique_name: str
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    settings = settings_for(engine, bootstrap, unique_name)
    seed(engine)
    broker_state(bootstrap, settings)
    app = create_app(settings, engine)
    metrics_of(app).ingest_accepted.labels("inference", "json").inc(42)

    samples = scrape(app)
    assert value(samples, "genmon_api_ingest_accepted_total", kind="inference", route="json") == 42
    assert value(samples, "genmon_api_broker_up") == 1
    assert value(samples, "genmon_api_database_up") == 1
    lag = {labels: v for (name, labels), v in samples.items() if name == "genmon_consumer_lag"}
    assert lag == {(("group", unique_name), ("topic", settings.topic("inference"))): 3.0}
    assert value(samples, "genmon_dead_letters_total") == 3
    assert value(samples, "genmon_incidents_open", severity="warning") == 2
    assert value(samples, "genmon_incidents_open", severity="critical") == 1
    assert value(samples, "genmon_incidents_open", severity="info") == 0
    assert value(samples, "genmon_notifications", status="dead") == 2
    assert value(samples, "genmon_notifications", status="delivered") == 1
    assert value(samples, "genmon_delivery_attempts", outcome="retry") == 2
    assert value(samples, "genmon_delivery_attempts", outcome="dead") == 2
    assert value(samples, "genmon_retrain_jobs", state="queued") == 2
    assert value(samples, "genmon_retrain_jobs", state="failed") == 1
    assert value(samples, "genmon_retrain_jobs", state="running") == 0
    # The latest window's whole-traffic scores only (not the older window, not a segment).
    series = {"model_id": "chat", "model_version": "v1"}
    assert value(samples, "genmon_detector_score", **series, signal="error_rate") == 7.5
    assert value(samples, "genmon_detector_threshold", **series, signal="error_rate") == 5.0
    assert value(samples, "genmon_detector_detected", **series, signal="error_rate") == 1
    assert value(samples, "genmon_detector_detected", **series, signal="latency") == 0
    scores = [k for k in samples if k[0] == "genmon_detector_score"]
    assert len(scores) == 2 <= MAX_SCORE_SERIES

    # Cached for api.metrics_cache_s: a new incident shows only once the reading is stale.
    with session_scope(engine) as session:
        session.add(incident("i5", Severity.CRITICAL, IncidentStatus.OPEN))
    assert value(scrape(app), "genmon_incidents_open", severity="critical") == 1
    app.state.settings = settings_for(engine, bootstrap, unique_name, cache_s=0)
    assert value(scrape(app), "genmon_incidents_open", severity="critical") == 2


def test_a_broker_that_is_down_is_reported_not_failed(
    engine: Engine, free_port: Any, unique_name: str
) -> None:
    settings = settings_for(engine, f"127.0.0.1:{free_port()}", unique_name)
    seed(engine)
    samples = scrape(create_app(settings, engine))
    assert value(samples, "genmon_api_broker_up") == 0
    assert not any(name == "genmon_consumer_lag" for name, _ in samples)
    assert value(samples, "genmon_incidents_open", severity="warning") == 2
