"""The incident agent of ``genmon worker``: findings topic -> incidents -> outbox -> delivery.

:func:`install` (an installer for :func:`genmon.streams.app.create_app`) adds

- an agent on ``settings.topic("findings")`` that applies each finding with
  :class:`~genmon.incidents.manager.IncidentManager` (idempotent, so Kafka's
  at-least-once redelivery after a restart or rebalance changes nothing). A finding
  that does not parse is dead-lettered with its reason; while the database is
  unreachable the agent retries with backoff instead of acknowledging, so no finding is
  lost;
- the outbox dispatcher as a task of the worker, when ``notify.run_in_worker`` is set
  (otherwise run ``genmon notify dispatch`` as its own process). It delivers the pages
  and publishes the incident transitions to ``settings.topic("incidents")``, those made
  here and those made elsewhere (``genmon incidents ack|resolve``) alike;
- an hourly timer forgetting dedup keys older than ``incidents.finding_dedup_retention_s``.

The database is migrated to the newest revision when the worker starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from genmon import db
from genmon.exceptions import ConfigurationError, DatabaseError, SchemaError
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager, Outcome
from genmon.logs import install_on_worker
from genmon.schemas.codec import dead_letter, decode, encode
from genmon.schemas.events import DeadLetter, Finding
from genmon.settings import Settings

if TYPE_CHECKING:
    from faust import Stream
    from sqlalchemy.engine import Engine

    from genmon.streams.app import GenmonApp

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0
#: Reason code of a finding that parsed but could not be applied (a bug, not bad input).
APPLY_FAILED = "incident_apply_failed"


@dataclass
class IncidentRuntime:
    """What the incident installer runs inside a worker (``app.genmon.extras["incidents"]``)."""

    settings: Settings
    engine: Engine | None = None
    manager: IncidentManager | None = None
    dispatcher: Dispatcher | None = None
    findings: Counter | None = None
    registry: CollectorRegistry | None = None
    """The worker's metrics, where the dispatcher's watchdog counts its heartbeats."""
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> None:
        """Migrate the database and build the manager and dispatcher (once)."""
        async with self._starting:
            if self.manager is not None:
                return
            url = self.settings.database.url
            await asyncio.to_thread(db.upgrade, url)
            self.engine = db.make_engine(url)
            self.dispatcher = Dispatcher(self.engine, self.settings, registry=self.registry)
            self.manager = IncidentManager(self.engine, self.settings)

    def apply(self, findings: Sequence[Finding]) -> list[Outcome]:
        assert self.manager is not None
        outcomes = self.manager.process_many(findings)
        if self.findings is not None:
            for outcome in outcomes:
                self.findings.labels(outcome.action).inc()
        return outcomes


def install(app: GenmonApp) -> None:
    """Installer for ``create_app``: ``"genmon.streams.incident_agent:install"``.

    Skipped when ``incidents.run_in_worker`` is off: ``genmon worker --role incidents``
    then runs the incident path in a process of its own (:func:`run_incidents_worker`).
    """
    if app.genmon.settings.incidents.run_in_worker:
        install_incidents(app, app.genmon.settings)


def install_role(app: GenmonApp) -> None:
    """Installer of ``genmon worker --role incidents``: only the incident path."""
    install_incidents(app, app.genmon.settings)


def incidents_role_settings(settings: Settings) -> Settings:
    """An ``--role incidents`` worker is its own consumer group: ``<app_id>-incidents``."""
    worker = settings.worker.model_copy(update={"app_id": f"{settings.worker.app_id}-incidents"})
    return settings.model_copy(update={"worker": worker})


def run_incidents_worker(settings: Settings, *, loglevel: str | None = None) -> None:
    """``genmon worker --role incidents``: findings -> incidents -> pages, nothing else.

    The detector pipeline shares a main worker's process (and the GIL) with the incident
    agent; under load that delays pages (BENCHMARKS.md), so on-call paths can run apart.
    """
    import faust

    from genmon.infra.kafka import KafkaBroker
    from genmon.streams.app import create_app

    if settings.incidents.run_in_worker:
        # Both would apply every finding (in different groups): the database dedups, but
        # the work would be done twice and the main worker keeps the latency problem.
        raise ConfigurationError(
            "genmon worker --role incidents needs incidents.run_in_worker=false, for this "
            "worker and the main workers alike: set GENMON_INCIDENTS__RUN_IN_WORKER=false"
        )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    app = create_app(incidents_role_settings(settings), installers=(install_role,))
    worker = faust.Worker(app, loglevel=loglevel or settings.worker.loglevel)
    install_on_worker(worker, settings)
    worker.execute_from_commandline()


def install_incidents(app: GenmonApp, settings: Settings) -> IncidentRuntime:
    """Register the incident agent, the dispatcher task and the pruning timer on ``app``."""
    runtime = IncidentRuntime(settings, registry=app.genmon.metrics.registry)
    runtime.findings = Counter(
        "genmon_incident_findings",
        "Findings applied to incidents, by what they did",
        ["action"],
        registry=app.genmon.metrics.registry,
    )
    app.genmon.extras["incidents"] = runtime
    deadletter = app.genmon.topics.deadletter
    size, within = settings.incidents.batch_size, settings.incidents.batch_within_s

    async def send_dead_letters(dead: list[tuple[bytes | None, DeadLetter]]) -> None:
        for key, record in dead:
            await deadletter.send(key=key, value=encode(record))

    async def apply_with_retry(findings: list[Finding]) -> None:
        # The database being down must not acknowledge findings: keep retrying, which
        # holds the partition (and its offsets) until the database is back.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DatabaseError),
            wait=wait_exponential_jitter(initial=0.5, max=30.0),
            before_sleep=before_sleep_log(log, logging.WARNING),
        ):
            with attempt:
                await asyncio.to_thread(runtime.apply, findings)

    async def incidents_agent(stream: Stream[bytes]) -> None:
        await runtime.start()
        async for events in stream.take_events(size, within=within):
            pairs: list[tuple[Finding, Any]] = []
            dead: list[tuple[bytes | None, DeadLetter]] = []
            for event in events:
                message = event.message
                try:
                    pairs.append((decode(message.value, Finding), message))
                except SchemaError as exc:
                    dead.append((message.key, _dead(message, exc.reason, str(exc), settings)))
            findings = [finding for finding, _ in pairs]
            await send_dead_letters(dead)
            try:
                await apply_with_retry(findings)
            except Exception:
                # Not the database: apply one by one so one poisonous finding is
                # dead-lettered with its reason and the others still count.
                log.exception("applying a batch of %d findings failed", len(findings))
                for finding, message in pairs:
                    try:
                        await asyncio.to_thread(runtime.apply, [finding])
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                        record = _dead(message, APPLY_FAILED, error, settings)
                        await send_dead_letters([(message.key, record)])
                        log.error("finding %s dead-lettered: %s", finding.dedup_key, error)
            if runtime.dispatcher is not None:
                runtime.dispatcher.wake()

    app.agent(app.genmon.topics.findings, name="genmon.incidents")(incidents_agent)

    if settings.notify.run_in_worker:

        @app.task
        async def dispatch_notifications() -> None:
            await runtime.start()
            assert runtime.dispatcher is not None
            await runtime.dispatcher.run()

    @app.timer(interval=PRUNE_INTERVAL_S)
    async def prune_finding_keys() -> None:
        if runtime.manager is not None:
            removed = await asyncio.to_thread(runtime.manager.prune_seen)
            log.info("forgot %d finding dedup keys past retention", removed)

    return runtime


def _dead(message: Any, reason: str, error: str, settings: Settings) -> DeadLetter:
    return dead_letter(
        message.value,
        reason=reason,
        error=error,
        source_topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        max_payload_bytes=settings.worker.dlq_max_payload_bytes,
    )
