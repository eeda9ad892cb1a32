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
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableSet, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.transports import TPorTopicSet
from faust.types.tuples import ack_lock
from faust.web import Request, Response, View
from mode import ServiceT
from mode.utils.futures import notify

from genmon.settings import Settings, get_settings
from genmon.streams.exceptions import StreamError
from genmon.streams.ingest import IngestSinks, SourceMessage
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
BatchHandler = Callable[[Sequence[SourceMessage]], Awaitable[None]]

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
    pre_commit_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Awaited, in order, before every offset commit (:meth:`BatchingConsumer.force_commit`):
    a component that holds back state writes flushes them here, so the offsets committed
    never run ahead of the state written. The offsets are taken right after the last hook
    returns, with no await in between: a hook that awaits after it has flushed (for the
    broker's acks) must keep batches from being handled meanwhile, as the pipeline's lock
    does, or their acknowledged offsets would be committed ahead of their held state."""
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


class _InFlightBatch:
    """Stands for a batch being handled in the consumer's set of unacknowledged messages.

    Faust's ``wait_empty()`` (a rebalance's or shutdown's wait for work in progress) loops
    while that set is non-empty, drops members whose ``acked`` is true, and logs members'
    ``refcount``; it reads nothing else of them. One such object per batch holds the
    rebalance back until the batch is acknowledged, at the cost of a set insert and
    removal per batch instead of per message.
    """

    __slots__ = ("__weakref__", "acked", "refcount", "size", "topic")

    def __init__(self, topic: str, size: int) -> None:
        self.topic = topic
        self.size = size
        self.acked = False
        self.refcount = 1

    def __repr__(self) -> str:
        return f"<batch of {self.size} {self.topic} records in flight>"


class BatchingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, handing batch topics to their handler a fetch at a time.

    Faust delivers each message through the conductor, an ``Event``, a channel queue and
    the stream iterator, with a task or two per message: about 150 us of Python per
    message, a ceiling of ~6k events/s per worker before any genmon code runs. For topics
    in ``app.genmon.batch_handlers`` this loop instead takes the records of one fetch as
    aiokafka returns them (``ConsumerRecord``: topic, partition, offset, key, value,
    headers; no Faust ``Message`` is built) and awaits the handler once per
    ``worker.batch_size`` of them.

    Delivery stays at-least-once: while the handler runs, the batch counts as one pending
    message, so a rebalance's or shutdown's wait for pending messages waits for it; when
    it returns (or raises: the error is logged, as a crashed batch would crash again) the
    batch's offsets are acknowledged at once in Faust's own bookkeeping, so the periodic
    commit covers exactly the handled records. While a fetch's batches are handled, the
    next fetch is already under way in Faust's consumer thread (it unpacks records while
    the handlers run native code without the GIL). A fetch made while the flow was
    suspended for a rebalance, or before a rebalance that completed since, is dropped
    unacked; the partition's owner reads it again from the committed offset. Other
    topics take Faust's per-message path unchanged. Faust's sensors (its own monitor) do
    not see batch-topic messages; genmon's metrics count them.
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
        to_message = self._to_message
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        track_end_offset = self.app.monitor.track_tp_end_offset
        fetcher_stopped = fetcher._stopped.is_set  # type: ignore[attr-defined]
        prefetched: asyncio.Future[tuple[Any, Any, int, bool]] | None = None

        async def fetch() -> tuple[Any, Any, int, bool]:
            # What Faust's getmany() does, without a Message per record; the generation
            # and flow are read right after, as Faust's own loop does.
            records, active = await self._wait_next_records(1.0)
            return records, active, self.app.consumer_generation_id, self.flow_active

        try:
            while not (self._stopped.is_set() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if self.should_stop:
                    continue
                if prefetched is None:
                    records, active, generation, flowing = await fetch()
                else:
                    records, active, generation, flowing = await prefetched
                    prefetched = None
                if records is None or self.should_stop:
                    continue
                if not (flowing and self.flow_active) or (
                    self.app.consumer_generation_id != generation
                ):
                    try:
                        await self.perform_seek()  # a rebalance began during the fetch
                    except Exception as exc:
                        log.warning("could not seek back to the committed offsets: %r", exc)
                    continue
                batches: dict[str, list[tuple[TP, list[Any]]]] = {}
                others: dict[TP, list[Any]] = {}
                set_aside: dict[TP, int] = {}
                buffered = self._buffered_partitions
                for tp, tp_records in records.items():
                    if active is not None and tp not in active and tp not in buffered:
                        set_aside[tp] = tp_records[0].offset
                        continue
                    track_end_offset(tp, self.highwater(tp))
                    if tp.topic in handlers:
                        batches.setdefault(tp.topic, []).append((tp, tp_records))
                    else:
                        others[tp] = tp_records
                if set_aside:
                    await self._read_again(set_aside)
                if batches and not others:
                    # Fetch the next records while these are handled: Faust's consumer
                    # thread unpacks them while the handlers run native code without the
                    # GIL. The yield lets the fetch reach that thread before they start.
                    prefetched = asyncio.ensure_future(fetch())
                    await asyncio.sleep(0)
                for tp, record in self.scheduler.iterate(others):
                    if not self.flow_active or self.app.consumer_generation_id != generation:
                        break
                    offset = record.offset
                    last = read_offset[tp]
                    if last is not None and offset < last:
                        continue  # already read: the rule of Faust's own loop
                    if last and offset - last > 1 and acks_enabled_for(tp.topic):
                        await self._add_gap(tp, last + 1, offset)
                    await self._maybe_commit()
                    await self.wait_first(
                        callback(to_message(tp, record)), self.suspend_flow.wait()
                    )
                    read_offset[tp] = offset
                for topic, parts in batches.items():
                    if not await self._deliver_batches(
                        topic, handlers[topic], parts, batch_size, generation
                    ):
                        break
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
            if prefetched is not None:
                prefetched.cancel()
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _read_again(self, firsts: Mapping[TP, int]) -> None:
        """Seek partitions whose fetched records were set aside back to the first of them.

        Faust's active set is live: a partition paused between the fetch and this loop
        (recovery ending, a full buffer) has its records set aside, as Faust's own loop
        does. Without this seek they would be lost until the next rebalance, and for
        good where the group has no committed offset yet: recovery's seek to committed
        offsets then leaves the position where the fetch left it. (A worker restarted
        after SIGKILL, before its first commit, read nothing of the 1,200 events a test
        had sent.) Redelivered events are skipped by the pipeline's checkpointed offsets.
        """
        assigned = self.assignment()
        for tp, offset in firsts.items():
            if tp in assigned:
                await self.seek(tp, offset)
                # Faust's seek marks ``offset`` itself as read; it has not been.
                self._read_offset[tp] = offset - 1 if offset > 0 else None

    async def _deliver_batches(
        self,
        topic: str,
        handler: BatchHandler,
        parts: list[tuple[TP, list[Any]]],
        batch_size: int,
        generation: int,
    ) -> bool:
        """Hand the fetched records of ``topic`` to ``handler``, ``batch_size`` at a time.

        False when a rebalance began, with the rest left unacknowledged.
        """
        acks = self.app.topics.acks_enabled_for(topic)
        read_offset = self._read_offset
        chunk: list[Any] = []
        spans: list[tuple[TP, int, int]] = []
        for tp, records in parts:
            last = read_offset[tp]
            start, count = 0, len(records)
            if last is not None:
                while start < count and records[start].offset < last:
                    start += 1  # already read: the rule of Faust's own loop
            if start == count:
                continue
            first = records[start].offset
            if last and first - last > 1 and acks:
                await self._add_gap(tp, last + 1, first)
            while start < count:
                piece = records[start : start + batch_size - len(chunk)]
                start += len(piece)
                chunk += piece
                # Each span of a partition starts where its previous one ended, so offsets
                # without a record (transaction markers, compaction) between two records
                # are acknowledged with them, as a gap would be.
                spans.append((tp, first, piece[-1].offset))
                first = piece[-1].offset + 1
                if len(chunk) == batch_size:
                    if not await self._handle_batch(topic, handler, chunk, spans, acks, generation):
                        return False
                    chunk, spans = [], []
        if chunk:
            return await self._handle_batch(topic, handler, chunk, spans, acks, generation)
        return True

    async def _handle_batch(
        self,
        topic: str,
        handler: BatchHandler,
        records: list[Any],
        spans: list[tuple[TP, int, int]],
        acks: bool,
        generation: int,
    ) -> bool:
        """Hand ``records`` to ``handler`` and acknowledge ``spans`` (tp, first, last offset).

        False, with nothing handled, when a rebalance began since the fetch.
        """
        # Table writes queue changelog records in the producer buffer; as Faust's conductor
        # does before each message, let it drain below its limit first.
        await self.app.producer.buffer.wait_until_ebb()
        if not self.flow_active or self.app.consumer_generation_id != generation:
            return False  # rebalancing: not acked, so read again by the partition's owner
        # The batch is pending in Faust's eyes from here until acknowledged (see
        # _InFlightBatch); the set only holds it weakly, ``in_flight`` keeps it alive.
        unacked = cast("MutableSet[Any]", self._unacked_messages)
        in_flight = _InFlightBatch(topic, len(records))
        unacked.add(in_flight)
        try:
            try:
                await handler(records)
            except Exception:
                log.exception("handler of a %s batch of %d records failed", topic, len(records))
            if acks:
                self._ack_spans(spans)
        finally:
            # Also when cancelled (shutdown): unacknowledged, so read again after a restart.
            in_flight.acked = True
            unacked.discard(in_flight)
            notify(self._waiting_for_ack)
        if not self.suspend_flow.is_set():
            # Not after a revocation began: it has forgotten these partitions' positions.
            read_offset = self._read_offset
            for tp, _, last in spans:
                read_offset[tp] = last
        await self._maybe_commit()
        return True

    def _ack_spans(self, spans: Iterable[tuple[TP, int, int]]) -> None:
        """``Consumer.ack`` for every offset of each span, in bulk."""
        acked = 0
        with ack_lock:  # Faust's lock over this bookkeeping (see Consumer.ack)
            for tp, first, last in spans:
                committed = self._committed_offset[tp]
                if committed is not None and first < committed:
                    first = committed  # below the committed offset: Consumer.ack skips those
                if first > last:
                    continue
                offsets: Sequence[int] = range(first, last + 1)
                index = self._acked_index[tp]
                if not index.isdisjoint(offsets):  # redelivered after a seek
                    offsets = [offset for offset in offsets if offset not in index]
                index.update(offsets)
                self._acked[tp].extend(offsets)
                acked += len(offsets)
            self._n_acked += acked

    async def _maybe_commit(self) -> None:
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    async def force_commit(
        self, topics: TPorTopicSet | None = None, start_new_transaction: bool = True
    ) -> bool:
        """Run ``app.genmon.pre_commit_hooks``, then commit as Faust does.

        Every commit (periodic, every ``broker_commit_every`` acks, at shutdown, after a
        task error) comes through here. A hook waits for its own changelog writes (see
        :meth:`~genmon.streams.pipeline.TableStore.wait_sent`); Faust then takes the
        acknowledged offsets and flushes the producer before committing them.
        """
        context: WorkerContext | None = getattr(self.app, "genmon", None)
        for hook in context.pre_commit_hooks if context is not None else ():
            await hook()
        return await super().force_commit(topics, start_new_transaction=start_new_transaction)


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
        broker_commit_every=worker.commit_every,
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
