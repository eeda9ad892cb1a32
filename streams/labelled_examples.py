"""Labelled examples: inference and feedback joined by the pipeline, stored for retraining.

Each joined pair becomes one ``labelled_example`` row, inserted with ``ON CONFLICT DO
NOTHING`` on ``(model_id, request_id)``: a redelivered row never duplicates one, later
feedback never overwrites the first, and so an insert may be repeated until it succeeds.
No row is dropped silently (:class:`LabelledExampleSink`):

- a batch's rows go to the database in one statement, in a thread, within
  ``feedback.examples_write_timeout_s``;
- on a *transient* error (the database down, restarting, overloaded, refusing the login,
  not migrated yet: :func:`is_transient`), or that timeout, the rows go to
  ``<prefix>.examples-retry`` (JSON records of up to :data:`RETRY_RECORD_BYTES`, key =
  model id) and the sink waits for the broker's ack. Only then does the pipeline
  checkpoint the batch, so the examples are durable before the join state that made them
  is. Aggregates and detection go on meanwhile, and nothing waits in memory beyond the
  batch at hand. After a transient error the database is left alone for a backoff
  (``feedback.examples_retry_initial_s`` doubling up to ``examples_retry_max_s``): rows go
  straight to the topic, so batches do not each wait on a dead database;
- the retry agent (:func:`install_retry_agent`) reads that topic and inserts each record's
  rows with the same backoff, acknowledging a record only once every row in it is stored
  or rejected: a crash reads it again, which the idempotent insert makes harmless. When a
  rebalance begins it hands the rows still waiting back to the topic, so the rebalance
  does not wait for the database;
- a *permanent* error (the database refuses a row: SQLSTATE class 22, 23 or 54, such as a
  NUL byte or a too long id; a value the driver cannot encode) splits the statement in
  halves until each refused row is alone (:func:`store_examples`): the other rows are
  stored, and each refused one is counted, logged with its reason and dead-lettered to
  ``<prefix>.deadletter`` (reason :data:`REJECTED`, the row as JSON in the payload);
- without a retry topic (a sink outside a worker) the rows are retried in place, with the
  backoff, until stored: the caller waits (backpressure; the pipeline lock then also holds
  back the pre-commit flush, so no offset is committed past them).

The pipeline's metrics (:class:`~genmon.streams.pipeline_metrics.PipelineMetrics`):
``genmon_join_examples_written_total`` (new rows, exact: counted from ``RETURNING``),
``genmon_join_examples_pending`` (rows held in memory waiting for the database),
``genmon_join_examples_deferred_total`` (rows handed to the retry topic),
``genmon_join_examples_failed_total`` (rows that can never be stored) and
``genmon_join_example_errors_total{kind}`` (insert statements that failed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genmon.exceptions import DatabaseError
from genmon.schemas.codec import dead_letter, encode

if TYPE_CHECKING:
    from faust.types import TopicT

    from genmon.settings import FeedbackSettings, Settings
    from genmon.streams.app import GenmonApp
    from genmon.streams.pipeline_metrics import PipelineMetrics

log = logging.getLogger(__name__)

#: Kind of the internal topic where labelled examples wait for the database.
RETRY_KIND = "examples-retry"
#: Dead-letter reason of a row the database refuses for good.
REJECTED = "labelled_example_rejected"
#: Dead-letter reason of a retry record that holds no rows.
UNREADABLE = "labelled_example_unreadable"
#: Encoded rows per retry record, at most (a single larger row gets a record of its own):
#: well below Kafka's default 1 MiB message limit.
RETRY_RECORD_BYTES = 256 * 1024
#: SQLSTATE classes that blame the statement's rows (data exception, integrity constraint
#: violation, program limit exceeded: splitting the statement isolates the row, or cures a
#: statement too large); every other error the database reports is about the database and
#: heals by waiting (an operator may have to act: a missing table, a revoked grant).
_ROW_SQLSTATE_CLASSES = ("22", "23", "54")
#: How often a retry waiting for the database looks for a rebalance.
_WAIT_STEP_S = 0.25


# -- the database side (runs in a thread) ---------------------------------------------------
def insert_examples(engine: Any, rows: list[dict[str, Any]]) -> int:
    """Insert ``labelled_example`` rows in one statement; existing (model, request) are kept.

    Returns how many rows were new, read from ``RETURNING``: the driver's rowcount of a
    multi-row insert is not reliable (psycopg reported 0 while thousands were written).
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from genmon.db import session_scope
    from genmon.schemas.tables import LabelledExample

    table = LabelledExample.__table__
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["model_id", "request_id"])
        .returning(table.c.id)
    )
    with session_scope(engine) as session:
        return len(session.execute(statement, rows).all())


def is_transient(error: BaseException) -> bool:
    """Whether waiting may cure ``error``: then the rows wait, else the row is at fault.

    The row is blamed only where the database says so (SQLSTATE class 22, 23 or 54, or
    SQLAlchemy's ``DataError``/``IntegrityError``) or where it cannot even be sent (a value
    the driver cannot encode, which raises before any database is involved). A database
    that is unreachable, restarting, out of resources, refusing the login or missing the
    table heals by waiting or by an operator, and dead-lettering rows for it would lose
    them by the thousand.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(error, DatabaseError):  # session_scope's wrapping, or make_engine's
        if error.__cause__ is None:
            return True
        error = error.__cause__
    if isinstance(error, (sa_exc.DataError, sa_exc.IntegrityError)):
        return False
    if isinstance(error, sa_exc.DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None)
        if sqlstate:
            return str(sqlstate)[:2] not in _ROW_SQLSTATE_CLASSES
        # No SQLSTATE: a client-side error. Connection failures are operational (psycopg's
        # "connection refused", SQLite's "database is locked"); binding errors are the row's.
        return bool(error.connection_invalidated) or isinstance(error, sa_exc.OperationalError)
    return isinstance(error, (OSError, TimeoutError))


def describe(error: BaseException) -> str:
    """A short reason for a log line or dead letter: the driver's message without the SQL
    and parameters SQLAlchemy appends (they would repeat whole prompts)."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}"[:500]


@dataclass
class StoreResult:
    """What :func:`store_examples` did with a list of rows (indexes into it)."""

    inserted: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """Rows the database refuses for good, with the reason."""
    waiting: list[int] = field(default_factory=list)
    """Rows not stored because the database is unavailable (in order)."""
    transient: BaseException | None = None
    """The error that left rows waiting."""
    refused_statements: int = 0
    """Multi-row statements that failed on a refused row (and were split)."""


def store_examples(engine: Any, rows: Sequence[dict[str, Any]]) -> StoreResult:
    """Insert ``rows``, isolating the rows the database refuses; stop at a transient error.

    A failed statement stores nothing, so on a permanent error it is split in halves and
    each half tried again, until the refused rows are alone: one bad row among n costs
    about 2 log2(n) statements instead of n, and every other row is stored. At the first
    transient error the rows not yet stored are left ``waiting``.
    """
    result = StoreResult()
    spans = [(0, len(rows))]
    while spans:
        low, high = spans.pop()  # ascending: halves are pushed upper first
        if result.transient is not None:
            result.waiting.extend(range(low, high))
            continue
        try:
            result.inserted += insert_examples(engine, list(rows[low:high]))
        except Exception as error:
            if is_transient(error):
                result.transient = error
                result.waiting.extend(range(low, high))
            elif high - low == 1:
                result.rejected.append((low, describe(error)))
            else:
                result.refused_statements += 1
                middle = (low + high) // 2
                spans += [(middle, high), (low, middle)]
    return result


# -- waiting --------------------------------------------------------------------------------
class Backoff:
    """Exponential backoff: ``initial`` doubling per failure up to ``maximum``, jittered so
    that workers do not all return to a recovering database at once."""

    def __init__(
        self, initial: float, maximum: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.initial, self.maximum, self.clock = initial, maximum, clock
        self.delay = 0.0
        self.until = 0.0

    def failed(self) -> float:
        """Count a failure; returns the wait until the next try."""
        self.delay = min(self.maximum, self.delay * 2 if self.delay else self.initial)
        wait = self.delay * (0.75 + random.random() / 4)
        self.until = self.clock() + wait
        return wait

    def succeeded(self) -> None:
        self.delay = self.until = 0.0

    def remaining(self) -> float:
        return max(self.until - self.clock(), 0.0)


@dataclass(frozen=True)
class Origin:
    """Where rows came from, for their dead letters: the source topic and partition of
    the batch that joined them (``offset`` -1: a row joins two events) or the retry record
    holding them (its offset and bytes)."""

    topic: str
    partition: int
    offset: int = -1
    payload: bytes | None = None


Entry = tuple[dict[str, Any], Origin]


# -- the sink -------------------------------------------------------------------------------
class LabelledExampleSink:
    """Stores the pipeline's labelled examples; see the module docstring for the paths.

    ``retry_topic`` is ``<prefix>.examples-retry`` (None: retry in place) and
    ``deadletter`` the dead-letter topic (None: refused rows are only counted and logged).
    The engine is made on first use unless one is given.
    """

    def __init__(
        self,
        database_url: str,
        metrics: PipelineMetrics,
        settings: FeedbackSettings,
        *,
        retry_topic: TopicT | None = None,
        deadletter: TopicT | None = None,
        max_payload_bytes: int = 65536,
        engine: Any = None,
    ) -> None:
        self.database_url = database_url
        self.metrics = metrics
        self.settings = settings
        self.retry_topic = retry_topic
        self.deadletter = deadletter
        self.max_payload_bytes = max_payload_bytes
        self._engine: Any = engine
        #: When the database may be tried again (shared by the sink and the retry agent).
        self.database = Backoff(settings.examples_retry_initial_s, settings.examples_retry_max_s)
        #: An insert that outlived ``examples_write_timeout_s``, still running in its thread.
        self._probe: asyncio.Future[StoreResult] | None = None

    # -- the pipeline's path --------------------------------------------------------------
    async def write(self, rows: list[dict[str, Any]], topic: str, partition: int) -> None:
        """Store the rows joined from one partition's batch of ``topic``.

        Returns once each row is in the database, acknowledged by the broker in the retry
        topic, or rejected for good (counted, logged, dead-lettered); until then it retries
        with backoff. It raises nothing but cancellation: the caller checkpoints the batch
        after it, and a row it dropped would be lost.
        """
        if not rows:
            return
        origin = Origin(topic, partition)
        with self._pending(len(rows)):
            waiting = await self._try_store([(row, origin) for row in rows])
            kafka = self._backoff()
            while waiting:
                if self.retry_topic is None:
                    await self._wait_for_database(lambda: False)
                else:
                    waiting = await self._defer(waiting)
                    if not waiting:
                        return
                    await asyncio.sleep(kafka.failed())
                waiting = await self._try_store(waiting)

    # -- the retry agent's path -----------------------------------------------------------
    async def retry(self, message: Any, rebalancing: Callable[[], bool]) -> None:
        """Store the rows of one ``<prefix>.examples-retry`` record (a Kafka message).

        Returns when each row is stored or rejected, or, once ``rebalancing()`` turns true
        while rows wait for the database, when those rows are back in the topic; the caller
        then acknowledges the record. A record that holds no rows is dead-lettered.
        """
        origin = Origin(message.topic, message.partition, message.offset, message.value)
        try:
            rows = decode_rows(message.value)
        except ValueError as error:
            self.metrics.examples_failed.inc()
            log.error("retry record %s:%d holds no rows (%s)", origin.topic, origin.offset, error)
            await self._dead_letter([(None, origin, UNREADABLE, str(error))])
            return
        with self._pending(len(rows)):
            waiting = await self._try_store([(row, origin) for row in rows])
            kafka = self._backoff()
            while waiting:
                if await self._wait_for_database(rebalancing):
                    waiting = await self._defer(waiting)
                    if not waiting:
                        return
                    await asyncio.sleep(kafka.failed())
                waiting = await self._try_store(waiting)

    async def _wait_for_database(self, rebalancing: Callable[[], bool]) -> bool:
        """Sleep until the database may be tried again; True, early, when a rebalance began."""
        while True:
            if rebalancing():
                return True
            remaining = self.database.remaining()
            if remaining <= 0 and self._probe is None:
                return False
            await asyncio.sleep(min(remaining, _WAIT_STEP_S) if remaining > 0 else _WAIT_STEP_S)

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.examples_retry_initial_s, self.settings.examples_retry_max_s)

    # -- shared steps ---------------------------------------------------------------------
    async def _try_store(self, entries: list[Entry]) -> list[Entry]:
        """One try at the database (unless it is in backoff); returns the entries that wait."""
        if self._probe is not None or self.database.remaining() > 0:
            return entries
        result = await self._attempt([row for row, _ in entries])
        if result is None:
            return entries
        self.metrics.examples.inc(result.inserted)
        self.metrics.example_errors.labels("permanent").inc(
            result.refused_statements + len(result.rejected)
        )
        if result.transient is None:
            self.database.succeeded()
        else:
            self._database_failed(describe(result.transient), len(result.waiting))
        await self._reject([(entries[i], reason) for i, reason in result.rejected])
        return [entries[i] for i in result.waiting]

    async def _attempt(self, rows: list[dict[str, Any]]) -> StoreResult | None:
        """:func:`store_examples` in a thread; None when it outlives the write timeout.

        The thread cannot be stopped: it is left to finish (its new rows still count) and
        the database is not tried again before it has. The rows meanwhile go on waiting
        (to the retry topic); storing them again later adds nothing.
        """
        task = asyncio.ensure_future(asyncio.to_thread(self._store_sync, rows))
        timeout = self.settings.examples_write_timeout_s
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            self._adopt(task)  # shutting down: its new rows still count
            raise
        if task in done:
            return task.result()
        self._adopt(task)
        self._database_failed(f"no answer within {timeout:g} s", len(rows))
        return None

    def _adopt(self, task: asyncio.Future[StoreResult]) -> None:
        self._probe = task
        task.add_done_callback(self._probe_done)

    def _probe_done(self, task: asyncio.Future[StoreResult]) -> None:
        self._probe = None
        if not task.cancelled() and task.exception() is None:
            self.metrics.examples.inc(task.result().inserted)

    def _store_sync(self, rows: list[dict[str, Any]]) -> StoreResult:
        from genmon.db import make_engine

        try:
            if self._engine is None:
                self._engine = make_engine(self.database_url)
        except DatabaseError as error:
            return StoreResult(waiting=list(range(len(rows))), transient=error)
        return store_examples(self._engine, rows)

    def _database_failed(self, reason: str, waiting: int) -> None:
        wait = self.database.failed()
        self.metrics.example_errors.labels("transient").inc()
        log.warning(
            "%d labelled examples wait for the database (%s); next try in %.1f s",
            waiting,
            reason,
            wait,
        )

    async def _defer(self, entries: list[Entry]) -> list[Entry]:
        """Hand rows to the retry topic and wait for the broker; returns the rows that still
        wait (none, unless the broker failed).

        A row that cannot be encoded as JSON can never be stored either: rejected.
        """
        assert self.retry_topic is not None
        records, unencodable = retry_records([row for row, _ in entries])
        if unencodable:
            await self._reject([(entries[i], reason) for i, reason in unencodable])
            refused = {i for i, _ in unencodable}
            entries = [entry for i, entry in enumerate(entries) if i not in refused]
        try:
            acks = [await self.retry_topic.send(key=key, value=value) for key, value, _ in records]
            await asyncio.gather(*acks)
        except Exception as error:
            log.error(
                "could not hand %d labelled examples to the retry topic: %r", len(entries), error
            )
            return entries
        self.metrics.examples_deferred.inc(len(entries))
        return []

    async def _reject(self, refused: list[tuple[Entry, str]]) -> None:
        """Count, log and dead-letter rows that can never be stored."""
        if not refused:
            return
        for (row, _), reason in refused:
            log.error(
                "labelled example %s/%s cannot be stored (%s): dead-lettered",
                row.get("model_id"),
                row.get("request_id"),
                reason,
            )
        self.metrics.examples_failed.inc(len(refused))
        await self._dead_letter(
            [(row, origin, REJECTED, reason) for (row, origin), reason in refused]
        )

    async def _dead_letter(
        self, items: list[tuple[dict[str, Any] | None, Origin, str, str]]
    ) -> None:
        """Write dead letters (``row`` None: the whole record) and wait for the broker."""
        if self.deadletter is None:
            return
        try:
            acks = []
            for row, origin, reason, error in items:
                record = dead_letter(
                    _row_bytes(row) if row is not None else origin.payload,
                    reason=reason,
                    error=error,
                    source_topic=origin.topic,
                    partition=origin.partition,
                    offset=origin.offset,
                    max_payload_bytes=self.max_payload_bytes,
                )
                key = str(row["model_id"]).encode() if row and "model_id" in row else None
                acks.append(await self.deadletter.send(key=key, value=encode(record)))
            await asyncio.gather(*acks)
        except Exception as error:
            log.error("could not dead-letter %d labelled examples: %r", len(items), error)

    @contextmanager
    def _pending(self, count: int) -> Iterator[None]:
        self.metrics.examples_pending.inc(count)
        try:
            yield
        finally:
            self.metrics.examples_pending.dec(count)


# -- retry records --------------------------------------------------------------------------
def retry_records(
    rows: list[dict[str, Any]],
) -> tuple[list[tuple[bytes, bytes, int]], list[tuple[int, str]]]:
    """``rows`` as retry records ``(key, value, row count)`` of up to
    :data:`RETRY_RECORD_BYTES`, keyed by the first row's model id; and the indexes of rows
    that cannot be encoded, with the reason."""
    records: list[tuple[bytes, bytes, int]] = []
    refused: list[tuple[int, str]] = []
    chunk: list[bytes] = []
    size = 0
    key = b""

    def close() -> None:
        if chunk:
            records.append((key, b'{"rows":[' + b",".join(chunk) + b"]}", len(chunk)))

    for index, row in enumerate(rows):
        try:
            encoded = json.dumps(row, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            refused.append((index, f"{type(error).__name__}: {error}"))
            continue
        if chunk and size + len(encoded) > RETRY_RECORD_BYTES:
            close()
            chunk, size = [], 0
        if not chunk:
            key = str(row.get("model_id", "")).encode()
        chunk.append(encoded)
        size += len(encoded) + 1
    close()
    return records, refused


def decode_rows(value: bytes | None) -> list[dict[str, Any]]:
    """The rows of a retry record; ValueError when it holds none."""
    try:
        rows = json.loads(value or b"")["rows"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"not a retry record: {type(error).__name__}: {error}") from error
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("not a retry record: 'rows' is not a list of objects")
    return rows


def _row_bytes(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, default=repr).encode()


# -- Faust wiring ---------------------------------------------------------------------------
def retry_topic(app: GenmonApp, settings: Settings) -> TopicT:
    """The internal ``<prefix>.examples-retry`` topic, keyed by model id."""
    return app.topic(
        settings.topic(RETRY_KIND),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.partitions,
        retention=settings.kafka.retention_ms / 1000.0,
        internal=True,
    )


def make_sink(app: GenmonApp, settings: Settings, metrics: PipelineMetrics) -> LabelledExampleSink:
    """The worker's sink: retry topic and dead letters on ``app``'s topics."""
    return LabelledExampleSink(
        settings.database.url,
        metrics,
        settings.feedback,
        retry_topic=retry_topic(app, settings),
        deadletter=app.genmon.topics.deadletter,
        max_payload_bytes=settings.worker.dlq_max_payload_bytes,
    )


def install_retry_agent(app: GenmonApp, sink: LabelledExampleSink) -> None:
    """The agent storing the rows of ``<prefix>.examples-retry``, one record at a time.

    Acknowledged by hand (``noack``), after the record's rows are stored, rejected or
    handed back: a record whose retry is cancelled (shutdown) stays unacknowledged, so its
    offset is not committed and it is read again.
    """
    assert sink.retry_topic is not None

    def rebalancing() -> bool:
        return bool(app.rebalancing)

    async def store_retried_examples(stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            await sink.retry(event.message, rebalancing)
            await manual.ack(event)

    app.agent(sink.retry_topic, name="genmon.pipeline.examples-retry")(store_retried_examples)
