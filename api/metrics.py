"""The API process's Prometheus metrics, in a registry owned by one app.

:class:`ApiMetrics` lives on ``app.state.metrics`` (made by :func:`metrics_of` on first
use). Ingest routes count what they accept and refuse here; ``GET /metrics``
(:mod:`genmon.api.routes.metrics`, :meth:`ApiMetrics.render`) serves this registry
together with what it reads from the database and the broker, read at most once per
``api.metrics_cache_s`` (scrapes in between get the same reading):

=====================================  ==================================================
metric                                 what
=====================================  ==================================================
``genmon_api_ingest_accepted_total``   events accepted over HTTP (``rate()`` of it is the
                                       ingest rate), by ``kind`` and ``route``
``genmon_api_ingest_refused_total``    events refused, by ``kind`` and ``reason``
``genmon_api_broker_up``               1 when the broker answered the last reading, else
                                       0 (the broker metrics below are then left out)
``genmon_api_database_up``             the same for the database
``genmon_consumer_lag``                per genmon consumer group (the worker's
                                       ``worker.app_id`` and its ``-incidents``,
                                       ``-retrain``, ``-rollout`` groups) and topic:
                                       end offsets minus committed offsets, summed over
                                       the partitions it committed
``genmon_dead_letters``                records in ``<prefix>.deadletter`` (end offsets:
                                       every record written, still kept or not)
``genmon_detector_score``,             per model, version and signal: the score and the
``genmon_detector_threshold``,         threshold of the model's latest judged window
``genmon_detector_detected``           (``window_signal``, segment ``*``); at most
                                       :data:`MAX_SCORE_SERIES` series (the models with
                                       the most recent windows first)
``genmon_incidents_open``              open (not resolved) incidents by ``severity``
``genmon_notifications``               stored notifications by ``status``: ``dead`` are
                                       the webhook pages that failed for good
``genmon_delivery_attempts``           stored delivery attempts by ``outcome``: all but
                                       ``delivered`` are failed attempts
``genmon_retrain_jobs``                retraining jobs by ``state``
=====================================  ==================================================

Every label comes from a closed set (enums, genmon's groups and topics) except the
detector scores' ``model_id``/``model_version``/``signal``, which the cap bounds. The
database and broker readings are bounded in time (:data:`READ_TIMEOUT_S`): a scrape never
fails because either is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlmodel import Session, col, select

from genmon.schemas.events import IncidentStatus, RetrainStatus, Severity
from genmon.schemas.incidents import (
    DeliveryAttempt,
    Incident,
    Notification,
    NotificationStatus,
)
from genmon.schemas.signals import ALL, ROLLUP_RESOLUTION_S, WindowSignal
from genmon.schemas.tables import RetrainJob

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from genmon.settings import Settings

log = logging.getLogger(__name__)

#: Detector score series (model, version, signal) served at most.
MAX_SCORE_SERIES = 500
#: Models whose latest window is read for scores, at most (most recent first).
MAX_SCORE_MODELS = 100
#: Delivery-attempt outcomes served at most (the column is free text).
MAX_OUTCOMES = 20
#: How long one reading of the database or the broker may take.
READ_TIMEOUT_S = 3.0
#: Consumer groups genmon's processes use, as suffixes of ``worker.app_id``.
GROUP_SUFFIXES = ("", "-incidents", "-retrain", "-rollout")


@dataclass
class DatabaseReading:
    """What ``/metrics`` serves from the database."""

    incidents_open: dict[str, int] = field(default_factory=dict)
    notifications: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    scores: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    """(model, version, signal, {score, threshold, detected, ...})"""


@dataclass
class BrokerReading:
    """What ``/metrics`` serves from the broker."""

    lag: dict[tuple[str, str], int] = field(default_factory=dict)
    dead_letters: int = 0


@dataclass
class Reading:
    """One reading of both (``None``: that one did not answer)."""

    database: DatabaseReading | None = None
    broker: BrokerReading | None = None
    taken_at: float = 0.0


# -- the database ------------------------------------------------------------------------------
def read_database(engine: Engine) -> DatabaseReading:
    """Counts by state, and the latest detector scores (see the module)."""
    reading = DatabaseReading()
    with Session(engine) as session:

        def counts(column: Any, *where: Any) -> dict[str, int]:
            query = select(column, sa.func.count()).where(*where).group_by(column)
            return {_label(key): int(n) for key, n in session.exec(query)}

        reading.incidents_open = counts(
            col(Incident.severity), col(Incident.status) != IncidentStatus.RESOLVED
        )
        reading.notifications = counts(col(Notification.status))
        attempts = counts(col(DeliveryAttempt.outcome))
        reading.attempts = dict(sorted(attempts.items())[:MAX_OUTCOMES])
        reading.jobs = counts(col(RetrainJob.status))
        reading.scores = _latest_scores(session)
    for severity in Severity:
        reading.incidents_open.setdefault(severity.value, 0)
    for status in NotificationStatus:
        reading.notifications.setdefault(status.value, 0)
    for state in RetrainStatus:
        reading.jobs.setdefault(state.value, 0)
    return reading


def _label(value: Any) -> str:
    return str(getattr(value, "value", value))


def _latest_scores(session: Session) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Per model (the :data:`MAX_SCORE_MODELS` with the latest windows): each version's
    scores of its latest window at window resolution, whole traffic (segment ``*``)."""
    window_rows = sa.and_(
        col(WindowSignal.segment) == ALL,
        col(WindowSignal.resolution_s) < ROLLUP_RESOLUTION_S,
    )
    latest = (
        select(
            col(WindowSignal.model_id).label("model_id"),
            sa.func.max(col(WindowSignal.window_start)).label("start"),
        )
        .where(window_rows)
        .group_by(col(WindowSignal.model_id))
        .order_by(sa.func.max(col(WindowSignal.window_start)).desc())
        .limit(MAX_SCORE_MODELS)
        .subquery()
    )
    query = (
        select(WindowSignal.model_id, WindowSignal.model_version, WindowSignal.scores)
        .join(
            latest,
            sa.and_(
                col(WindowSignal.model_id) == latest.c.model_id,
                col(WindowSignal.window_start) == latest.c.start,
            ),
        )
        .where(window_rows)
        .order_by(
            latest.c.start.desc(), col(WindowSignal.model_id), col(WindowSignal.model_version)
        )
    )
    out: list[tuple[str, str, str, dict[str, Any]]] = []
    for model_id, version, scores in session.exec(query):
        for signal, judged in sorted((scores or {}).items()):
            if isinstance(judged, dict) and len(out) < MAX_SCORE_SERIES:
                out.append((model_id, version, signal, judged))
    return out


# -- the broker --------------------------------------------------------------------------------
def genmon_groups(settings: Settings) -> list[str]:
    return [f"{settings.worker.app_id}{suffix}" for suffix in GROUP_SUFFIXES]


def read_broker(settings: Settings) -> BrokerReading:
    """Consumer lag of genmon's groups and the dead letters' count (kafka-python's admin
    client with genmon's client settings; raises when the broker does not answer)."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.admin import OffsetSpec

    from genmon import kafka_config

    timeout_ms = int(READ_TIMEOUT_S * 1000)
    admin = KafkaAdminClient(
        **kafka_config.client_config(
            settings.kafka,
            client_id="genmon-api-metrics",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    )
    try:
        committed: dict[str, dict[Any, int]] = {}
        for group in genmon_groups(settings):
            offsets = admin.list_group_offsets(group).get(group, {})
            committed[group] = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
        deadletter = settings.topic("deadletter")
        described = admin.describe_topics([deadletter])
        dead_tps = [
            TopicPartition(deadletter, p["partition_index"])
            for topic in described
            if not topic.get("error_code")
            for p in topic.get("partitions", ())
        ]
        wanted = {tp for offsets in committed.values() for tp in offsets} | set(dead_tps)
        ends = (
            {
                tp: spec.offset
                for tp, spec in admin.list_partition_offsets(
                    {tp: OffsetSpec.LATEST for tp in wanted}
                ).items()
            }
            if wanted
            else {}
        )
    finally:
        admin.close()
    reading = BrokerReading(dead_letters=sum(ends.get(tp, 0) for tp in dead_tps))
    for group, offsets in committed.items():
        for tp, offset in offsets.items():
            if tp in ends:
                key = (group, tp.topic)
                reading.lag[key] = reading.lag.get(key, 0) + max(ends[tp] - offset, 0)
    return reading


# -- the collector -----------------------------------------------------------------------------
class StateCollector(Collector):
    """Serves the app's latest :class:`Reading` (set by :meth:`ApiMetrics.refresh`)."""

    def __init__(self) -> None:
        self.reading = Reading()

    def collect(self) -> Iterator[Metric]:
        reading = self.reading
        yield _gauge("genmon_api_broker_up", "1 when the broker answered /metrics' last reading",
                     value=float(reading.broker is not None))  # fmt: skip
        yield _gauge("genmon_api_database_up", "1 when the database answered /metrics' last "
                     "reading", value=float(reading.database is not None))  # fmt: skip
        if reading.broker is not None:
            lag = GaugeMetricFamily(
                "genmon_consumer_lag",
                "Records behind the end of each topic, per genmon consumer group (committed "
                "offsets)",
                labels=["group", "topic"],
            )
            for (group, topic), value in sorted(reading.broker.lag.items()):
                lag.add_metric([group, topic], value)
            yield lag
            dead = CounterMetricFamily(
                "genmon_dead_letters", "Records written to the dead-letter topic"
            )
            dead.add_metric([], reading.broker.dead_letters)
            yield dead
        if reading.database is not None:
            yield from _database_metrics(reading.database)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _by(name: str, documentation: str, label: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


def _database_metrics(db: DatabaseReading) -> Iterator[Metric]:
    yield _by("genmon_incidents_open", "Open incidents by severity", "severity", db.incidents_open)
    yield _by(
        "genmon_notifications",
        "Stored notifications by status (dead: failed for good)",
        "status",
        db.notifications,
    )
    yield _by(
        "genmon_delivery_attempts",
        "Stored delivery attempts by outcome (all but delivered failed)",
        "outcome",
        db.attempts,
    )
    yield _by("genmon_retrain_jobs", "Retraining jobs by state", "state", db.jobs)
    labels = ["model_id", "model_version", "signal"]
    families = {
        key: GaugeMetricFamily(f"genmon_detector_{key}", text, labels=labels)
        for key, text in (
            ("score", "The detector's score on the model's latest judged window"),
            ("threshold", "The threshold the score is compared with"),
            ("detected", "1 when the latest judged window fired"),
        )
    }
    for model_id, version, signal, judged in db.scores:
        for key, family in families.items():
            value = judged.get(key)
            if value is not None:
                family.add_metric([model_id, version, signal], float(value))
    yield from families.values()


# -- the app's metrics ---------------------------------------------------------------------------
class ApiMetrics:
    """Counters of one API app, and its state readings. A fresh registry per app keeps
    tests independent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ingest_accepted = Counter(
            "genmon_api_ingest_accepted",
            "Events accepted over HTTP and written to Kafka, by kind (inference, feedback) and "
            "route (json, otlp)",
            ["kind", "route"],
            registry=r,
        )
        self.ingest_refused = Counter(
            "genmon_api_ingest_refused",
            "Events refused over HTTP (never sent to Kafka), by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.state = StateCollector()
        r.register(self.state)
        self._refreshing = asyncio.Lock()

    async def refresh(self, engine: Engine, settings: Settings) -> Reading:
        """A new reading unless the last is younger than ``api.metrics_cache_s`` (one
        reading at a time: concurrent scrapes share it)."""
        async with self._refreshing:
            reading = self.state.reading
            if (
                reading.taken_at
                and time.monotonic() - reading.taken_at < settings.api.metrics_cache_s
            ):
                return reading
            database, broker = await asyncio.gather(
                _bounded(read_database, engine, what="database"),
                _bounded(read_broker, settings, what="broker"),
            )
            self.state.reading = Reading(database, broker, time.monotonic())
            return self.state.reading

    async def render(self, engine: Engine, settings: Settings) -> bytes:
        """The Prometheus text of this app (refreshing the reading if due)."""
        await self.refresh(engine, settings)
        return generate_latest(self.registry)


async def _bounded(read: Any, arg: Any, *, what: str) -> Any:
    """``read(arg)`` in a thread within :data:`READ_TIMEOUT_S` plus a margin; None when it
    fails or is late (a late thread is left to finish on its own)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(read, arg), READ_TIMEOUT_S + 2.0)
    except Exception as error:  # any failure: reported as down, said once per scrape
        log.warning("/metrics: the %s did not answer: %r", what, error)
        return None


def metrics_of(app: Any) -> ApiMetrics:
    """The app's metrics, made on first use."""
    metrics: ApiMetrics | None = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = ApiMetrics()
        app.state.metrics = metrics
    return metrics
