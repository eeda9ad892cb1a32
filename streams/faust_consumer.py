"""Faust's private consumer internals that genmon overrides, in this one module.

genmon's ingest runs ~150 us per message faster than Faust's per-message path by reading
each fetch in batches (:class:`BatchingConsumer`), and holds offset commits back until
its state is written (:meth:`BatchingConsumer.force_commit`). Both reach into private
parts of faust-streaming's aiokafka driver and of aiokafka: the methods overridden and
the attributes read are listed in :data:`FAUST_PRIVATE_INTERFACE`.
``tests/streams/test_faust_consumer.py`` checks each against the installed Faust and
aiokafka, and the source of every Faust method whose logic the batch loop repeats, so
that an upgrade that changes one fails loudly, naming what to review, instead of losing
or repeating events at run time. pyproject.toml bounds both packages above for the same
reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableSet, Sequence
from typing import TYPE_CHECKING, Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.transports import TPorTopicSet
from faust.types.tuples import ack_lock
from mode import ServiceT
from mode.utils.futures import notify

if TYPE_CHECKING:
    from genmon.streams.app import WorkerContext
    from genmon.streams.ingest import SourceMessage

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence["SourceMessage"]], Awaitable[None]]

#: The private methods genmon overrides or calls and the private attributes it reads or
#: writes, per class: ``(module, class, names)``. Checked by tests/streams/test_faust_consumer.py.
FAUST_PRIVATE_INTERFACE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "faust.transport.drivers.aiokafka",
        "Consumer",
        (
            "_new_consumer_thread",
            "_drain_messages",
            "_wait_next_records",
            "_to_message",
            "_add_gap",
            "_read_offset",
            "_thread",
            "_buffered_partitions",
            "_unacked_messages",
            "_waiting_for_ack",
            "_committed_offset",
            "_acked_index",
            "_acked",
            "_n_acked",
            "_commit_every",
            "perform_seek",
            "force_commit",
        ),
    ),
    (
        "faust.transport.drivers.aiokafka",
        "AIOKafkaConsumerThread",
        ("_create_worker_consumer", "_ensure_consumer"),
    ),
    ("aiokafka.consumer.consumer", "AIOKafkaConsumer", ("_fetch_max_wait_ms", "_subscription")),
)

#: The Faust methods whose logic :class:`BatchingConsumer` repeats or wraps, with the first
#: 16 hex digits of the SHA-256 of their source (``inspect.cleandoc(inspect.getsource())``)
#: in faust-streaming 0.15.3, the version last reviewed. When Faust changes one, read the
#: new code against the override named here, then record its new digest.
REVIEWED_FAUST_SOURCES: dict[str, tuple[str, str]] = {
    "Consumer._drain_messages": ("d29d37519f2ddf3a", "BatchingConsumer._drain_messages"),
    "Consumer.getmany": ("f9b455bd1175994a", "BatchingConsumer._drain_messages (fetch)"),
    "Consumer.ack": ("79cb6eb079360d46", "BatchingConsumer._ack_spans"),
    "Consumer.force_commit": ("60c36b6e648808c3", "BatchingConsumer.force_commit"),
    "Consumer._wait_next_records": ("920120740535d0bc", "BatchingConsumer._drain_messages"),
    "AIOKafkaConsumerThread._create_worker_consumer": (
        "df784c24f01ee3a8",
        "_ConsumerThread._create_worker_consumer",
    ),
}

#: How long the broker may hold a fetch that finds no new data. Faust asks for 1.5 s; a
#: fetch that covers only idle partitions (say, the feedback topic while the inference
#: partitions' records were being handled) then delays the next fetch of the busy ones by
#: that much, and the worker idles in 1.5 s steps.
FETCH_MAX_WAIT_MS = 100


def read_position(consumer: Any, tp: TP) -> int | None:
    """The offset of the last record of ``tp`` the consumer has read, if any (Faust keeps
    it privately; the pipeline's lag gauge reads it through here)."""
    position: int | None = consumer._read_offset.get(tp)
    return position


def fetch_progress(consumer: Any, tp: TP) -> tuple[int, float, int | None] | None:
    """``(highwater, fetched_at, handled)`` of ``tp``: the broker's end offset and the wall
    time (s) of the last fetch response for it, and the last offset this worker has
    handled (``None`` before its first batch); ``None`` before the first fetch response
    or when the partition is not assigned here.

    aiokafka updates the highwater and its timestamp on every fetch response, records or
    not, so a stale timestamp means the broker has not answered (the pipeline's idle
    clock stops then; see ``Pipeline._caught_up``). The handled offset is Faust's read
    offset, which :class:`BatchingConsumer` sets once a batch's handler has returned (the
    fetch position would count records fetched and still waiting).
    """
    aiokafka_consumer = consumer._thread._ensure_consumer()
    state = aiokafka_consumer._subscription.subscription.assignment.state_value(tp)
    if state is None or state.highwater is None or state.timestamp is None:
        return None
    return int(state.highwater), state.timestamp / 1000, read_position(consumer, tp)


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
        :meth:`~genmon.streams.table_store.TableStore.wait_sent`); Faust then takes the
        acknowledged offsets and flushes the producer before committing them.
        """
        context: WorkerContext | None = getattr(self.app, "genmon", None)
        for hook in context.pre_commit_hooks if context is not None else ():
            await hook()
        return await super().force_commit(topics, start_new_transaction=start_new_transaction)


class GenmonTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchingConsumer`."""

    Consumer = BatchingConsumer
