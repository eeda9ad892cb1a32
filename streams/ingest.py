"""Ingest agents: validate raw inference/feedback messages, dead-letter the bad ones.

Each topic is read in batches: in ``genmon worker`` the app's
:class:`~genmon.streams.faust_consumer.BatchingConsumer` hands each fetched batch (at most
``settings.worker.batch_size`` messages) straight to the handler; on Faust's own consumer
the agents below take batches (``batch_size`` within ``settings.worker.batch_within_s``)
from their streams. Per batch:

1. decodes every message with :func:`genmon.schemas.codec.decode`; a message that
   fails becomes a :class:`~genmon.schemas.events.DeadLetter` (reason code, error
   text, source topic/partition/offset, original bytes) keyed by the source key.
   Inference batches go through the native decoder first (:mod:`genmon.streams.native`,
   ``worker.native_ingest``), which reads most events without building pydantic objects
   and leaves every other message to ``decode``: same events, same dead letters;
   then counts each message once, at the end of the batch: ``genmon_ingest_valid_total``
   or ``genmon_ingest_invalid_total`` (one per dead letter, by reason), and
   ``genmon_ingest_sanitized_total`` for valid ones whose free text held NUL or lone
   surrogates (replaced by U+FFFD; see :mod:`genmon.schemas.events`);
2. follows the SDK's ``genmon-producer``/``genmon-seq`` headers to count events
   lost (``gaps``), arriving late (``out_of_order``) or twice (``duplicates``);
3. writes the dead letters, then waits for the broker to accept them, so a batch is
   acknowledged only after its rejects are safe;
4. hands the valid events, as one list, to each registered sink in order (a sink
   registered with :meth:`IngestSinks.add_inference_batch_sink` gets the
   :class:`InferenceBatch` instead, natively decoded events included).

Sinks are the extension point of the streaming pipeline::

    def install_pipeline(app: GenmonApp) -> None:
        async def count_latency(events: list[InferenceEvent]) -> None: ...
        app.genmon.sinks.add_inference_sink(count_latency)

While a sink runs, :data:`SOURCE_POSITIONS` holds the source ``(partition, offset)`` of
each event in its list. A sink must not mutate the list. A sink that raises is logged and counted
(``genmon_sink_errors_total``); the other sinks still run and the worker goes on.
Nothing in a batch is awaited per event except the in-memory hand-over of dead
letters to the Kafka producer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

from genmon.exceptions import SchemaError
from genmon.schemas.codec import HEADER_PRODUCER, HEADER_SEQ, dead_letter, decode, encode
from genmon.schemas.events import MAX_EVENT_BYTES, DeadLetter, FeedbackEvent, InferenceEvent
from genmon.streams.metrics import WorkerMetrics
from genmon.streams.topics import INPUT_KINDS

if TYPE_CHECKING:
    from faust import Stream
    from faust.types import TP

    import genmon_native as _native
    from genmon.settings import Settings
    from genmon.streams.app import GenmonApp

log = logging.getLogger(__name__)

#: Header on a dead-letter record repeating its reason, for consumers that filter on it.
HEADER_REASON = "genmon-reason"

#: While sinks run: ``(partition, offset)`` of each delivered event, aligned with the list
#: (the streaming pipeline keys its state by source partition and skips redelivered offsets).
SOURCE_POSITIONS: contextvars.ContextVar[list[tuple[int, int]] | None] = contextvars.ContextVar(
    "genmon_source_positions", default=None
)

E = TypeVar("E", InferenceEvent, FeedbackEvent)
InferenceSink = Callable[[list[InferenceEvent]], Awaitable[None]]
FeedbackSink = Callable[[list[FeedbackEvent]], Awaitable[None]]


class SourceMessage(Protocol):
    """What ingest reads of a Kafka message (an aiokafka ``ConsumerRecord`` or a
    ``faust.types.Message`` fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...


@dataclass
class _Registered(Generic[E]):
    name: str
    sink: Callable[[Any], Awaitable[None]]
    #: Takes the whole :class:`InferenceBatch` instead of a list of events.
    batch: bool = False


class InferenceBatch:
    """The valid inference events of one fetched batch.

    Decoded by the native fast path (``native``, a ``genmon_native.Batch``,
    see :mod:`genmon.streams.native`) or by pydantic (``native`` is ``None``). A sink
    added with :meth:`IngestSinks.add_inference_batch_sink` gets this object; other sinks
    get :attr:`events`, built (with pydantic, once) only when such a sink exists.
    """

    def __init__(
        self,
        native: _native.Batch | None,
        events: list[InferenceEvent] | None = None,
        positions: list[tuple[int, int]] | None = None,
        *,
        canonical_of: list[int] | None = None,
    ) -> None:
        self.native = native
        self._events = events
        self._positions = positions
        #: Message index of each value added to ``native`` in canonical form (a deferred
        #: message that was valid), so :attr:`events` keeps message order.
        self._canonical_of = canonical_of or []

    def __len__(self) -> int:
        return len(self.native) if self.native is not None else len(self._events or [])

    @property
    def events(self) -> list[InferenceEvent]:
        """The events, in message order."""
        if self._events is None:
            native = self.native
            assert native is not None
            accepted = native.accepted()
            if self._canonical_of:
                # Canonical values are numbered after the batch's messages.
                first, canonical_of = len(native.deferred) + len(native), self._canonical_of
                first -= len(canonical_of)
                accepted.sort(
                    key=lambda item: item[0] if item[0] < first else canonical_of[item[0] - first]
                )
            self._events = [
                InferenceEvent.model_validate_json(native.raw(index)) for index, _, _ in accepted
            ]
            self._positions = [(partition, offset) for _, partition, offset in accepted]
        return self._events

    @property
    def positions(self) -> list[tuple[int, int]]:
        """Source ``(partition, offset)`` of each of :attr:`events`."""
        self.events  # noqa: B018 - builds both lists
        assert self._positions is not None
        return self._positions

    def partitions(self) -> list[int]:
        """Source partitions with events, ascending."""
        if self.native is not None:
            return list(self.native.partitions())
        return sorted({partition for partition, _ in self.positions})

    def items(self, partition: int) -> list[tuple[int | None, InferenceEvent]]:
        """``(offset, event)`` of ``partition``'s events."""
        return [
            (offset, event)
            for (p, offset), event in zip(self.positions, self.events, strict=True)
            if p == partition
        ]


class IngestSinks:
    """Who receives each batch of valid events."""

    def __init__(self) -> None:
        self._inference: list[_Registered[InferenceEvent]] = []
        self._feedback: list[_Registered[FeedbackEvent]] = []

    def add_inference_sink(self, sink: InferenceSink, *, name: str | None = None) -> InferenceSink:
        """Call ``await sink(events)`` once per batch of valid inferences. Usable as decorator."""
        self._inference.append(_Registered(name or _name_of(sink), sink))
        return sink

    def add_inference_batch_sink(
        self, sink: Callable[[InferenceBatch], Awaitable[None]], *, name: str | None = None
    ) -> None:
        """Call ``await sink(batch)`` with each :class:`InferenceBatch` (no pydantic events
        are built for it)."""
        self._inference.append(_Registered(name or _name_of(sink), sink, batch=True))

    def add_feedback_sink(self, sink: FeedbackSink, *, name: str | None = None) -> FeedbackSink:
        """Call ``await sink(events)`` once per batch of valid feedback. Usable as decorator."""
        self._feedback.append(_Registered(name or _name_of(sink), sink))
        return sink

    def names(self, kind: str) -> list[str]:
        """Names of the sinks of ``kind`` ("inference" or "feedback"), in call order."""
        registered = self._inference if kind == "inference" else self._feedback
        return [entry.name for entry in registered]

    async def deliver_inference(self, events: list[InferenceEvent], metrics: WorkerMetrics) -> None:
        await _deliver("inference", self._inference, events, metrics)

    async def deliver_inference_batch(self, batch: InferenceBatch, metrics: WorkerMetrics) -> None:
        """Hand ``batch`` to batch sinks and its events (and positions) to the others."""
        if not len(batch):
            return
        for entry in self._inference:
            if entry.batch:
                await _deliver("inference", [entry], batch, metrics)
                continue
            token = SOURCE_POSITIONS.set(batch.positions)
            try:
                await _deliver("inference", [entry], batch.events, metrics)
            finally:
                SOURCE_POSITIONS.reset(token)

    async def deliver_feedback(self, events: list[FeedbackEvent], metrics: WorkerMetrics) -> None:
        await _deliver("feedback", self._feedback, events, metrics)


async def _deliver(
    kind: str, registered: Sequence[_Registered[E]], events: Any, metrics: WorkerMetrics
) -> None:
    if not len(events):
        return
    for entry in registered:
        try:
            await entry.sink(events)
        except Exception:
            metrics.sink_errors.labels(kind, entry.name).inc()
            log.exception(
                "ingest sink %s failed on a batch of %d %s events", entry.name, len(events), kind
            )


def _name_of(sink: Callable[..., Any]) -> str:
    return getattr(sink, "__qualname__", None) or repr(sink)


class SequenceCheck(NamedTuple):
    """What one event's producer sequence number says about delivery."""

    missing: int = 0
    out_of_order: bool = False
    duplicate: bool = False


class SequenceTracker:
    """Last sequence number per (topic, producer, model key), in a bounded LRU.

    The first number seen for a key is taken as the start (the worker may join a
    stream in the middle). A producer that falls out of the LRU starts afresh.

    >>> tracker = SequenceTracker()
    >>> [tracker.observe("t", 0, b"p", b"m", seq).missing for seq in (0, 1, 4)]
    [0, 0, 2]
    >>> tracker.observe("t", 0, b"p", b"m", 3).out_of_order
    True
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[str, bytes, bytes], tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def observe(
        self, topic: str, partition: int, producer: bytes, key: bytes, seq: int
    ) -> SequenceCheck:
        entry = (topic, producer, key)
        previous = self._last.get(entry)
        if previous is None:
            self._last[entry] = (seq, partition)
            if len(self._last) > self.max_entries:
                self._last.popitem(last=False)
            return SequenceCheck()
        self._last.move_to_end(entry)
        last = previous[0]
        if seq == last:
            return SequenceCheck(duplicate=True)
        if seq < last:
            return SequenceCheck(out_of_order=True)
        self._last[entry] = (seq, partition)
        return SequenceCheck(missing=seq - last - 1)

    def forget(self, partitions: Iterable[TP]) -> None:
        """Drop what was learnt from ``partitions`` (after they moved to another worker)."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for entry in [e for e, (_, p) in self._last.items() if (e[0], p) in gone]:
            del self._last[entry]


@dataclass
class Tally:
    """What one batch adds to the ingest counters, applied once by :meth:`Ingestor.count`:
    each message is valid or invalid exactly once, and each invalid one is a dead letter."""

    valid: Counter[str] = field(default_factory=Counter)
    invalid: Counter[tuple[str, str]] = field(default_factory=Counter)
    sanitized: Counter[str] = field(default_factory=Counter)


@dataclass
class BatchResult(Generic[E]):
    """Outcome of validating one batch.

    ``positions[i]`` is the source ``(partition, offset)`` of ``valid[i]``; ``dead`` pairs
    each dead letter with the key of the message it replaces.
    """

    valid: list[E]
    dead: list[tuple[bytes | None, DeadLetter]]
    positions: list[tuple[int, int]]
    tally: Tally = field(default_factory=Tally)


class Ingestor:
    """Validation, dead-lettering and sequence checks shared by both ingest agents."""

    def __init__(self, app: GenmonApp) -> None:
        self.settings = app.genmon.settings
        self.metrics = app.genmon.metrics
        self.sinks = app.genmon.sinks
        self.deadletter = app.genmon.topics.deadletter
        self.sequences = SequenceTracker()
        self.decoder: _native.Decoder | None = None
        if self.settings.worker.native_ingest:
            from genmon.streams import native
            from genmon.streams.windows.quality_signals import QualitySignals

            quality = QualitySignals.from_file(self.settings.windows.refusal_phrases_file)
            self.decoder = native.decoder_for(quality)
            if self.decoder is None:
                log.warning(
                    "genmon-native is not installed: ingest takes the Python path (same"
                    " results, several times the CPU per event); install it with"
                    " `pip install 'genmon[native]'` (from a checkout: `pip install"
                    " ./streams/native-rs`), or set GENMON_WORKER__NATIVE_INGEST=false"
                )

    def validate(
        self, model: type[E], messages: Sequence[SourceMessage], *, sequences: bool = True
    ) -> BatchResult[E]:
        """Decode a batch and update the counters (the sequence counters only with
        ``sequences``); no I/O."""
        if sequences:
            self._count_sequences(messages)
        result = self._decode(model, messages)
        self.count(result.tally)
        return result

    def _decode(self, model: type[E], messages: Sequence[SourceMessage]) -> BatchResult[E]:
        """Decode a batch into events and dead letters, tallied but not yet counted."""
        result: BatchResult[E] = BatchResult([], [], [])
        tally = result.tally
        max_payload = self.settings.worker.dlq_max_payload_bytes
        sanitized: list[str] = []
        for message in messages:
            topic = message.topic
            try:
                event = decode(message.value, model, sanitized=sanitized)
            except SchemaError as exc:
                tally.invalid[(topic, exc.reason)] += 1
                record = dead_letter(
                    message.value,
                    reason=exc.reason,
                    error=str(exc),
                    source_topic=topic,
                    partition=message.partition,
                    offset=message.offset,
                    max_payload_bytes=max_payload,
                )
                result.dead.append((message.key, record))
                continue
            if sanitized:
                tally.sanitized[topic] += 1
                sanitized.clear()
            result.valid.append(event)
            result.positions.append((message.partition, message.offset))
            tally.valid[topic] += 1
        return result

    def count(self, tally: Tally) -> None:
        """Add one batch's tally to the counters; called once per batch."""
        metrics = self.metrics
        for topic, count in tally.valid.items():
            if count:
                metrics.ingest_valid.labels(topic).inc(count)
        for (topic, reason), count in tally.invalid.items():
            metrics.ingest_invalid.labels(topic, reason).inc(count)
        for topic, count in tally.sanitized.items():
            metrics.ingest_sanitized.labels(topic).inc(count)

    def validate_inferences(
        self, messages: Sequence[SourceMessage]
    ) -> tuple[InferenceBatch, list[tuple[bytes | None, DeadLetter]]]:
        """:meth:`validate` for inferences, through the native decoder when there is one.

        Messages the decoder defers go through :func:`~genmon.schemas.codec.decode` as in
        :meth:`validate`: rejects become dead letters, valid ones join the batch in their
        canonical JSON. Should the decoder refuse a canonical form too (a valid event it
        does not read: a year outside 1970-2200, metadata nested deeper than it follows), the
        whole batch takes the Python path instead. Either way the counters are updated
        once, at the end, from the outcome returned.
        """
        decoder = self.decoder
        if decoder is None:
            result = self.validate(InferenceEvent, messages)
            return InferenceBatch(None, result.valid, result.positions), result.dead
        values = [message.value for message in messages]
        partitions = [message.partition for message in messages]
        offsets = [message.offset for message in messages]
        batch = decoder.decode(values, partitions, offsets, MAX_EVENT_BYTES)
        self._count_sequences(messages)  # in message order, before any deferred one
        deferred = [messages[i] for i in batch.deferred]
        deferred_index = {(messages[i].partition, messages[i].offset): i for i in batch.deferred}
        result = self._decode(InferenceEvent, deferred)
        if result.valid:
            again = decoder.extend(
                batch,
                [event.model_dump_json().encode() for event in result.valid],
                [partition for partition, _ in result.positions],
                [offset for _, offset in result.positions],
                MAX_EVENT_BYTES,
            )
            if again:
                log.info("native decoder refused %d canonical events", len(again))
                result = self.validate(InferenceEvent, messages, sequences=False)
                return InferenceBatch(None, result.valid, result.positions), result.dead
        # The natively read messages are valid, never sanitized (the decoder defers those).
        result.tally.valid.update(message.topic for message in messages)
        result.tally.valid.subtract(message.topic for message in deferred)
        self.count(result.tally)
        canonical_of = [deferred_index[position] for position in result.positions]
        return InferenceBatch(batch, canonical_of=canonical_of), result.dead

    def _count_sequences(self, messages: Sequence[SourceMessage]) -> None:
        """Follow the producers' sequence headers, in message order, into the counters."""
        gaps: Counter[str] = Counter()
        late: Counter[str] = Counter()
        twice: Counter[str] = Counter()
        for message in messages:
            if not message.headers:
                continue
            check = self._check_sequence(message)
            if check is not None:
                topic = message.topic
                gaps[topic] += check.missing
                late[topic] += check.out_of_order
                twice[topic] += check.duplicate
        metrics = self.metrics
        for counter, metric in (
            (gaps, metrics.sequence_gaps),
            (late, metrics.out_of_order),
            (twice, metrics.duplicates),
        ):
            for topic, count in counter.items():
                if count:
                    metric.labels(topic).inc(count)

    def _check_sequence(self, message: SourceMessage) -> SequenceCheck | None:
        producer, seq = _producer_headers(message.headers)
        if producer is None or seq is None:
            return None
        return self.sequences.observe(
            message.topic, message.partition, producer, message.key or b"", seq
        )

    async def send_dead_letters(self, dead: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        """Write dead letters and wait until the broker has them; count failures."""
        if not dead:
            return
        try:
            pending = [
                await self.deadletter.send(
                    key=key,
                    value=encode(record),
                    headers=[(HEADER_REASON, record.reason.encode())],
                )
                for key, record in dead
            ]
            results = await asyncio.gather(*pending, return_exceptions=True)
        except Exception as exc:
            self.metrics.deadletter_failed.inc(len(dead))
            log.error("could not write %d dead letters: %r", len(dead), exc)
            return
        failures = [result for result in results if isinstance(result, BaseException)]
        self.metrics.deadletter_sent.inc(len(results) - len(failures))
        if failures:
            self.metrics.deadletter_failed.inc(len(failures))
            log.error("could not write %d dead letters: %r", len(failures), failures[0])

    async def handle_inference(self, messages: Sequence[SourceMessage]) -> None:
        started = time.perf_counter()
        batch, dead = self.validate_inferences(messages)
        await self.send_dead_letters(dead)
        await self.sinks.deliver_inference_batch(batch, self.metrics)
        self.metrics.batch_seconds.labels("inference").observe(time.perf_counter() - started)

    async def handle_feedback(self, messages: Sequence[SourceMessage]) -> None:
        started = time.perf_counter()
        batch = self.validate(FeedbackEvent, messages)
        await self.send_dead_letters(batch.dead)
        token = SOURCE_POSITIONS.set(batch.positions)
        try:
            await self.sinks.deliver_feedback(batch.valid, self.metrics)
        finally:
            SOURCE_POSITIONS.reset(token)
        self.metrics.batch_seconds.labels("feedback").observe(time.perf_counter() - started)


def _producer_headers(headers: Any) -> tuple[bytes | None, int | None]:
    if not headers:
        return None, None
    items = headers.items() if isinstance(headers, Mapping) else headers
    producer = seq = None
    for name, value in items:
        if name == HEADER_PRODUCER:
            producer = value
        elif name == HEADER_SEQ:
            try:
                seq = int(value)
            except (TypeError, ValueError):
                return None, None
    return producer, seq


def install(app: GenmonApp) -> None:
    """Register the inference and feedback ingest agents on ``app``."""
    ingestor = Ingestor(app)
    app.genmon.ingestor = ingestor
    handlers = {"inference": ingestor.handle_inference, "feedback": ingestor.handle_feedback}
    for kind in INPUT_KINDS:
        topic = app.genmon.topics[kind]
        # The agent subscribes the topic (and serves apps on Faust's own consumer);
        # genmon's BatchingConsumer hands it whole fetched batches instead.
        agent = _batch_agent(kind, handlers[kind], app.genmon.settings)
        app.agent(topic, name=f"genmon.ingest.{kind}")(agent)
        app.genmon.batch_handlers[topic.get_topic_name()] = handlers[kind]

    @app.on_partitions_revoked.connect
    async def forget_sequences(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        ingestor.sequences.forget(revoked)


def _batch_agent(
    kind: str, handle: Callable[[Sequence[SourceMessage]], Awaitable[None]], settings: Settings
) -> Callable[[Stream[bytes]], Awaitable[None]]:
    size, within = settings.worker.batch_size, settings.worker.batch_within_s

    async def agent(stream: Stream[bytes]) -> None:
        async for events in stream.take_events(size, within=within):
            try:
                await handle([event.message for event in events])
            except Exception:
                # Acknowledge anyway: a batch that crashed the agent would crash it again.
                log.exception("ingest of a %s batch of %d failed", kind, len(events))

    agent.__name__ = agent.__qualname__ = f"ingest_{kind}"
    return agent
