"""The Faust app of ``genmon worker``, built by :func:`create_app` (no import-time app).

Extension points for the streaming pipeline:

* an *installer* is a function ``install(app: GenmonApp) -> None`` that adds agents,
  tables, timers, sinks or web views; :data:`DEFAULT_INSTALLERS` lists the ones
  ``genmon worker`` runs, as ``"module:function"`` strings imported on use;
* ``app.genmon`` (:class:`WorkerContext`) holds the settings, the declared topics,
  the metrics and the ingest sinks every installer shares;
* ``app.genmon.batch_handlers`` maps a topic name to a coroutine taking a list of
  Kafka messages: :class:`~genmon.streams.faust_consumer.BatchingConsumer` hands it each
  fetched batch of that topic directly, skipping Faust's per-message conductor/stream
  path (the topic must still have an agent, which subscribes it, and no other reader).

>>> from genmon.settings import Settings
>>> app = create_app(Settings(), installers=())
>>> sorted(app.genmon.topics)
['deadletter', 'feedback', 'findings', 'incidents', 'inference', 'retrain']
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import faust
from faust.web import Request, Response, View

from genmon import kafka_config
from genmon.logs import install_on_worker
from genmon.settings import Settings, get_settings
from genmon.streams.exceptions import StreamError
from genmon.streams.faust_consumer import BatchHandler, GenmonTransport
from genmon.streams.ingest import IngestSinks
from genmon.streams.metrics import PROMETHEUS_CONTENT_TYPE, WorkerMetrics
from genmon.streams.topics import GenmonTopics, declare_topics

if TYPE_CHECKING:
    from genmon.streams.ingest import Ingestor

log = logging.getLogger(__name__)

#: Cyclic-GC thresholds of a worker process. Its state (panes, join entries) is many small
#: long-lived containers, and with Python's default (700, 10, 10) the collector re-scans
#: them so often that it took ~30 % of the pipeline's time; a young generation of 20,000
#: allocations bounds uncollected cyclic garbage just the same.
WORKER_GC_THRESHOLDS = (20_000, 20, 10)

Installer = Callable[["GenmonApp"], None]

#: Installers ``genmon worker`` applies, in order: ingest first, then the pipeline.
DEFAULT_INSTALLERS: tuple[str, ...] = (
    "genmon.streams.ingest:install",
    "genmon.streams.pipeline:install",
    "genmon.streams.embedding.stage:install",
    "genmon.streams.incident_agent:install",
)


@dataclass
class WorkerContext:
    """What the installers of one app share."""

    settings: Settings
    topics: GenmonTopics
    metrics: WorkerMetrics
    sinks: IngestSinks = field(default_factory=IngestSinks)
    ingestor: Ingestor | None = None
    batch_handlers: dict[str, BatchHandler] = field(default_factory=dict)
    """Topic name -> handler of its fetched batches (see
    :class:`~genmon.streams.faust_consumer.BatchingConsumer`)."""
    pre_commit_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Awaited, in order, before every offset commit
    (:meth:`~genmon.streams.faust_consumer.BatchingConsumer.force_commit`): a component
    that holds back state writes flushes them here, so the offsets committed never run
    ahead of the state written. The offsets are taken right after the last hook
    returns, with no await in between: a hook that awaits after it has flushed (for the
    broker's acks) must keep batches from being handled meanwhile, as the pipeline's lock
    does, or their acknowledged offsets would be committed ahead of their held state."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Objects an installer publishes for later installers or tests, by name."""


class GenmonApp(faust.App):
    """A Faust app carrying genmon's shared worker context as ``app.genmon``."""

    genmon: WorkerContext

    def _new_transport(self) -> GenmonTransport:
        return _DurableTransport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        # Faust creates only the last level of its data directory.
        self.conf.datadir.parent.mkdir(parents=True, exist_ok=True)
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
        await super().on_first_start()


class _DurableTransport(GenmonTransport):
    """Faust's transport, creating the topics Faust declares itself (table changelogs, the
    assignor's leader topic, repartitions) with ``kafka.min_insync_replicas`` too; Faust
    has a setting for their replication factor only (``topic_replication_factor``)."""

    async def _create_topic(self, *args: Any, **kwargs: Any) -> None:
        app = cast(GenmonApp, self.app)
        durability = kafka_config.topic_configs(app.genmon.settings.kafka)
        kwargs["config"] = {**durability, **(kwargs.get("config") or {})}
        await super()._create_topic(*args, **kwargs)


def create_app(
    settings: Settings | None = None,
    *,
    installers: Iterable[Installer | str] | None = None,
) -> GenmonApp:
    """Build the worker app: broker, store, web server, topics, then the installers."""
    settings = settings or get_settings()
    worker = settings.worker
    app = GenmonApp(
        worker.app_id,
        # broker, broker_credentials (TLS, SASL), topic_replication_factor, producer_acks.
        **kafka_config.faust_options(settings.kafka),
        store=worker.store,
        datadir=str(settings.home / "worker" / "{conf.name}"),
        web_port=worker.web_port,
        web_bind=worker.web_host,
        web_host=worker.web_host,
        topic_partitions=settings.kafka.partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=worker.commit_every,
        broker_commit_interval=worker.commit_interval_s,
        broker_session_timeout=worker.session_timeout_s,
        broker_heartbeat_interval=worker.heartbeat_interval_s,
        # Faust refuses a session timeout above the request timeout (90 s by default).
        broker_request_timeout=max(90.0, worker.session_timeout_s),
        autodiscover=False,
    )
    app.genmon = WorkerContext(
        settings=settings, topics=declare_topics(app, settings), metrics=WorkerMetrics()
    )
    _add_views(app)
    for installer in DEFAULT_INSTALLERS if installers is None else installers:
        _resolve(installer)(app)
    return app


def _add_views(app: GenmonApp) -> None:
    metrics = app.genmon.metrics

    @app.page("/metrics")
    async def prometheus(self: View, request: Request) -> Response:
        return self.bytes(
            metrics.prometheus_text(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    @app.page("/stats")
    async def stats(self: View, request: Request) -> Response:
        return self.json(metrics.snapshot())


def _resolve(installer: Installer | str) -> Installer:
    if callable(installer):
        return installer
    module_name, _, attribute = installer.partition(":")
    try:
        found: Installer = getattr(importlib.import_module(module_name), attribute or "install")
    except (ImportError, AttributeError) as exc:
        raise StreamError(
            f"cannot load worker installer {installer!r} ({exc}); "
            "give it as 'package.module:function'"
        ) from exc
    return found


def run_worker(settings: Settings | None = None, *, loglevel: str | None = None) -> None:
    """Create the topics if needed, build the app and run it until a signal stops it."""
    from genmon.detectors.calibration.plan import load_plan
    from genmon.infra.kafka import KafkaBroker

    settings = settings or get_settings()
    load_plan(settings)  # a malformed detector plan stops the worker here, before anything
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel or settings.worker.loglevel)
    install_on_worker(worker, settings)  # one line per interval for repeated connection errors
    worker.execute_from_commandline()
