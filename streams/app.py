"""The Faust app of ``genmon worker``, built by :func:`create_app` (no import-time app).

Extension points for the streaming pipeline:

* an *installer* is a function ``install(app: GenmonApp) -> None`` that adds agents,
  tables, timers, sinks or web views; :data:`DEFAULT_INSTALLERS` lists the ones
  ``genmon worker`` runs, as ``"module:function"`` strings imported on use;
* ``app.genmon`` (:class:`WorkerContext`) holds the settings, the declared topics,
  the metrics and the ingest sinks every installer shares;
* ``app.genmon.batch_handlers`` maps a topic name to a coroutine taking a list of
  Kafka messages: :class:`BatchingConsumer` hands it each fetched batch of that topic
  directly, skipping Faust's per-message conductor/stream path (the topic must still
  have an agent, which subscribes it, and no other reader).

>>> from genmon.settings import Settings
>>> app = create_app(Settings(), installers=())
>>> sorted(app.genmon.topics)
['deadletter', 'feedback', 'findings', 'incidents', 'inference', 'retrain']
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.web import Request, Response, View
from mode import ServiceT

from genmon.settings import Settings, get_settings
from genmon.streams.exceptions import StreamError
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
BatchHandler = Callable[[Sequence[Message]], Awaitable[None]]

#: Installers ``genmon worker`` applies, in order: ingest first, then the pipeline.
DEFAULT_INSTALLERS: tuple[str, ...] = (
    "genmon.streams.ingest:install",
    "genmon.streams.pipeline:install",
    "genmon.streams.embedding:install",
    "genmon.streams.incidents.agent:install",
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
    """Topic name -> handler of its fetched batches (see :class:`BatchingConsumer`)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Objects an installer publishes for later installers or tests, by name."""


#: How long the broker may hold a fetch that finds no new data. Faust asks for 1.5 s; a
#: fetch that covers only idle partitions (say, the feedback topic while the inference
#: partitions' records were being handled) then delays the next fetch of the busy ones by
#: that much, and the worker idles in 1.5 s steps.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by start() (no public setter)
        return consumer


class BatchingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, handing batch topics to their handler a fetch at a time.

    Faust delivers each message through the conductor, an ``Event``, a channel queue and
    the stream iterator, with a task or two per message: about 150 us of Python per
    message, a ceiling of ~6k events/s per worker before any genmon code runs. For topics
    in ``app.genmon.batch_handlers`` this loop instead collects the messages of one
    ``getmany`` and awaits the handler once per ``worker.batch_size`` of them.

    Delivery stays at-least-once: the messages are tracked as unacked before the handler
    runs and acknowledged after it returns (or raises: the error is logged, as a crashed
    batch would crash again), so commits and a rebalance's wait for pending messages see
    them like stream events. A batch fetched while the flow was suspended for a rebalance
    is dropped unacked; the partition's next owner reads it again from the committed
    offset. Other topics take Faust's per-message path unchanged. Faust's sensors (its own
    monitor) do not see batch-topic messages; genmon's metrics count them.
    """

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
        context: WorkerContext | None = getattr(self.app, "genmon", None)
        handlers: Mapping[str, BatchHandler] = context.batch_handlers if context else {}
        if context is None or not handlers:
            await super()._drain_messages(fetcher)
            return
        batch_size = context.settings.worker.batch_size
        callback = self.callback
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        fetcher_stopped = fetcher._stopped.is_set  # type: ignore[attr-defined]
        try:
            while not (self._stopped.is_set() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if self.should_stop:
                    continue
                batches: dict[str, list[Message]] = {}
                seen: dict[TP, int] = {}
                async for tp, message in self.getmany(timeout=1.0):
                    offset = message.offset
                    last = seen.get(tp, read_offset[tp])
                    if last is not None and offset < last:
                        continue  # already read: the rule of Faust's own loop
                    if last and offset - last > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, last + 1, offset)
                    handler = handlers.get(tp.topic)
                    if handler is None:
                        await self._maybe_commit()
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                        read_offset[tp] = offset
                    else:
                        batches.setdefault(tp.topic, []).append(message)
                        seen[tp] = offset
                for topic, messages in batches.items():
                    for start in range(0, len(messages), batch_size):
                        chunk = messages[start : start + batch_size]
                        await self._handle_batch(topic, handlers[topic], chunk)
                if not self.suspend_flow.is_set():
                    read_offset.update(seen)
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _handle_batch(
        self, topic: str, handler: BatchHandler, messages: list[Message]
    ) -> None:
        if self.suspend_flow.is_set():
            return  # rebalancing: not acked, so read again by the partition's owner
        # Table writes queue changelog records in the producer buffer; as Faust's conductor
        # does before each message, let it drain below its limit first.
        await self.app.producer.buffer.wait_until_ebb()
        unacked = self._unacked_messages
        for message in messages:
            unacked.add(message)
        try:
            await handler(messages)
        except Exception:
            log.exception("handler of a %s batch of %d messages failed", topic, len(messages))
        ack = self.ack
        for message in messages:
            ack(message)
        await self._maybe_commit()

    async def _maybe_commit(self) -> None:
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()


class GenmonTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchingConsumer`."""

    Consumer = BatchingConsumer


class GenmonApp(faust.App):
    """A Faust app carrying genmon's shared worker context as ``app.genmon``."""

    genmon: WorkerContext

    def _new_transport(self) -> GenmonTransport:
        return GenmonTransport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        # Faust creates only the last level of its data directory.
        self.conf.datadir.parent.mkdir(parents=True, exist_ok=True)
        gc.set_threshold(*WORKER_GC_THRESHOLDS)
        await super().on_first_start()


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
        broker=[
            f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")
        ],
        store=worker.store,
        datadir=str(settings.home / "worker" / "{conf.name}"),
        web_port=worker.web_port,
        web_bind=worker.web_host,
        web_host=worker.web_host,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
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
    from genmon.infra.kafka import KafkaBroker

    settings = settings or get_settings()
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel or settings.worker.loglevel)
    worker.execute_from_commandline()
