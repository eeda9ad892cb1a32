"""Window signals kept for people: each judged window's summary, published and stored.

The dashboard and the API chart a model's history without reading Kafka: table
``window_signal`` (:class:`~genmon.schemas.signals.WindowSignal`) holds, per model,
version and segment, what each closed tumbling window measured and what the detectors
made of it. Two halves, decoupled by the ``<prefix>.signals`` topic:

- **publishing** (the detector agent, :meth:`genmon.streams.pipeline.Pipeline.on_window`):
  while the runner judges a window, its judgements (:class:`SignalPoint`, the runner's
  ``points`` hook) are collected; the window's series summaries and those scores become
  one compact record (:func:`signal_record`, JSON, key = model id), at most
  :data:`MAX_SERIES` series and :data:`MAX_RECORD_BYTES`. :class:`SignalPublisher` sends
  it in the background: detection never waits on it, and a send that fails is counted and
  logged (once per ``worker.log_repeat_interval_s``, :mod:`genmon.logs`), never raised.
  The signals are for charts; findings go their own, acknowledged way.
- **recording** (:func:`install_recorder`): an agent on the topic upserts each poll's
  records in one statement (``INSERT ... ON CONFLICT (model_id, model_version, segment,
  resolution_s, window_start) DO UPDATE``, PostgreSQL and SQLite alike), so a redelivered
  record writes the same row once. While the database is unavailable it retries with
  backoff and acknowledges nothing, so no offset is committed past an unstored record;
  the worker's other agents go on meanwhile. A record the database refuses for good (or
  that does not parse) is counted and logged, then skipped.

``worker.record_signals`` (default on) switches both off. Metrics on the worker's
registry: ``genmon_signals_published_total``, ``genmon_signals_publish_failed_total``,
``genmon_signals_rows_stored_total``, ``genmon_signals_store_errors_total{kind}``
(``transient``: waited for; ``permanent``/``unreadable``: skipped).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from genmon.schemas.events import MAX_ID_CHARS
from genmon.schemas.signals import MAX_SIGNAL_SEGMENT_CHARS
from genmon.streams.detection.points import SignalPoint
from genmon.streams.labelled_examples import Backoff, describe, is_transient

if TYPE_CHECKING:
    from faust.types import TopicT
    from sqlalchemy.engine import Engine

    from genmon.settings import Settings
    from genmon.streams.app import GenmonApp
    from genmon.streams.detection.runner import DetectorRunner

log = logging.getLogger(__name__)

#: Kind of the internal topic (``settings.topic(SIGNALS_KIND)``).
SIGNALS_KIND = "signals"
#: Series per record, at most: every version's ``"*"`` series first, then the busiest
#: segments. The window record folds segments to its own budget already; this bounds the
#: table's rows per window whatever that budget becomes.
MAX_SERIES = 256
#: Encoded bytes per record, at most (well below Kafka's default 1 MiB message limit):
#: the quietest segment series go first when a record would be larger.
MAX_RECORD_BYTES = 256 * 1024
#: Background sends in flight, at most: beyond it a record is dropped (and counted), so a
#: broker that does not answer never makes the detector agent hold memory without bound.
MAX_IN_FLIGHT = 256
#: How long one background send may wait for the broker.
SEND_TIMEOUT_S = 30.0
#: Unique key of ``window_signal`` (the upsert's conflict target).
KEY_COLUMNS = ("model_id", "model_version", "segment", "resolution_s", "window_start")
#: The summary fields a record's series carry, as the table names them.
SUMMARY_FIELDS = (
    "requests",
    "errors",
    "error_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "feedback",
    "negative_feedback",
    "negative_rate",
    "refusal_rate",
    "empty_rate",
)
_ALL = "*"


# -- the record ------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    """A JSON-safe float: None for missing, NaN or infinite values."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def series_summary(series: dict[str, Any]) -> dict[str, Any]:
    """The table's summary fields of one window-record series
    (:meth:`~genmon.streams.windows.stats.WindowStats.summary`)."""
    latency = series.get("latency_ms") or {}
    feedback = series.get("feedback") or {}
    return {
        "requests": int(series.get("requests") or 0),
        "errors": int(series.get("errors") or 0),
        "error_rate": _finite(series.get("error_rate")),
        "latency_p50_ms": _finite(latency.get("p50")),
        "latency_p95_ms": _finite(latency.get("p95")),
        "latency_p99_ms": _finite(latency.get("p99")),
        "feedback": int(feedback.get("n") or 0),
        "negative_feedback": int(feedback.get("negative") or 0),
        "negative_rate": _finite(feedback.get("negative_rate")),
        "refusal_rate": _finite(series.get("refusal_rate")),
        "empty_rate": _finite(series.get("empty_rate")),
    }


def point_score(point: SignalPoint) -> dict[str, Any]:
    """What ``window_signal.scores`` keeps of one judgement."""
    return {
        "score": _finite(point.score),
        "threshold": _finite(point.threshold),
        "detected": bool(point.detected),
        "value": _finite(point.value),
        "baseline": _finite(point.baseline),
        "detector": point.detector,
    }


def signal_record(window: dict[str, Any], points: Sequence[SignalPoint]) -> dict[str, Any]:
    """The ``<prefix>.signals`` record of one judged tumbling ``window``.

    ``{"model_id", "window_start", "window_end", "start_ms", "end_ms", "resolution_s",
    "series": [{"model_version", "segment", <SUMMARY_FIELDS>, "scores": {signal: {...}}}]}``.
    Each point (early looks excluded) is attached to its ``(version, segment)`` series; a
    point whose series the window does not carry (a signal judged over a series the record
    folded away) gets a series with zero counts. Two detectors judging one signal keep both,
    the second as ``"<signal>:<detector>"``.
    """
    model_id = window["model_id"]
    start, end = int(window["start_ms"]), int(window["end_ms"])
    by_series: dict[tuple[str, str], dict[str, Any]] = {}
    for series in window.get("series", ()):
        key = (str(series["model_version"]), str(series["segment"]))
        by_series[key] = {
            "model_version": key[0],
            "segment": key[1],
            **series_summary(series),
            "scores": {},
        }
    for point in points:
        if point.early or point.model_id != model_id or point.at_ms != end:
            continue
        key = (point.version, point.segment)
        entry = by_series.get(key)
        if entry is None:
            entry = by_series[key] = {
                "model_version": key[0],
                "segment": key[1],
                **series_summary({}),
                "scores": {},
            }
        name = point.signal
        if name in entry["scores"] and entry["scores"][name]["detector"] != point.detector:
            name = f"{point.signal}:{point.detector}"
        entry["scores"][name] = point_score(point)
    kept = bounded(list(by_series.values()))
    return {
        "model_id": model_id,
        "window_start": window["window_start"],
        "window_end": window["window_end"],
        "start_ms": start,
        "end_ms": end,
        "resolution_s": max(round((end - start) / 1000), 1),
        "series": kept,
    }


def bounded(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``series`` within :data:`MAX_SERIES` and :data:`MAX_RECORD_BYTES`: the ``"*"``
    series first, then segments by requests; the rest are left out of the record."""

    def rank(entry: dict[str, Any]) -> tuple[int, int, int, str, str]:
        return (
            entry["segment"] != _ALL,
            entry["model_version"] != _ALL,
            -int(entry["requests"]),
            entry["model_version"],
            entry["segment"],
        )

    ordered = sorted(series, key=rank)[:MAX_SERIES]
    kept, size = [], 512  # the record's other fields
    for entry in ordered:
        size += len(json.dumps(entry)) + 1
        if size > MAX_RECORD_BYTES:
            break
        kept.append(entry)
    return kept


# -- publishing --------------------------------------------------------------------------------
class SignalMetrics:
    """The signal path's counters, on the worker's registry."""

    def __init__(self, registry: Any) -> None:
        self.published = Counter(
            "genmon_signals_published", "Window signal records sent", registry=registry
        )
        self.publish_failed = Counter(
            "genmon_signals_publish_failed",
            "Window signal records not sent (broker failed or too many in flight)",
            registry=registry,
        )
        self.rows = Counter(
            "genmon_signals_rows_stored",
            "window_signal rows written (inserted or updated)",
            registry=registry,
        )
        self.store_errors = Counter(
            "genmon_signals_store_errors",
            "Signal upserts that failed, by kind (transient: retried; permanent, unreadable: "
            "the record skipped)",
            ["kind"],
            registry=registry,
        )


@contextmanager
def collecting(runner: DetectorRunner) -> Iterator[list[SignalPoint]]:
    """The runner's judgements while the block runs (its ``points`` hook, restored after;
    a hook already set still gets every point)."""
    points: list[SignalPoint] = []
    previous = runner.points

    def collect(point: SignalPoint) -> None:
        points.append(point)
        if previous is not None:
            previous(point)

    runner.points = collect
    try:
        yield points
    finally:
        runner.points = previous


def newly_judged(
    before: dict[str, Any] | None, after: dict[str, Any], window: dict[str, Any]
) -> bool:
    """Whether the runner judged ``window`` now (not already applied, and the kind it
    judges): only then is there a signal record to publish."""
    end, kind = int(window["end_ms"]), window["kind"]
    last_before = ((before or {}).get("last_end") or {}).get(kind)
    return (after.get("last_end") or {}).get(kind) == end and last_before != end


class SignalPublisher:
    """Sends signal records to ``<prefix>.signals`` in the background (never raises)."""

    def __init__(self, topic: TopicT, metrics: SignalMetrics) -> None:
        self.topic, self.metrics = topic, metrics
        self._tasks: set[asyncio.Future[None]] = set()

    def publish(self, record: dict[str, Any]) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.metrics.publish_failed.inc()
            log.warning(
                "window signals of %s dropped: %d sends wait for the broker",
                record["model_id"],
                len(self._tasks),
            )
            return
        task = asyncio.ensure_future(self._send(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, record: dict[str, Any]) -> None:
        async def send() -> None:
            ack = await self.topic.send(
                key=str(record["model_id"]).encode(), value=json.dumps(record).encode()
            )
            await ack

        try:
            await asyncio.wait_for(send(), SEND_TIMEOUT_S)
        except Exception as error:
            self.metrics.publish_failed.inc()
            # Reads like a connection error: genmon.logs limits it to one line per interval.
            log.warning("could not send window signals to the broker: %r", error)
            return
        self.metrics.published.inc()

    async def drain(self) -> None:
        """Wait for the sends in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# -- recording ---------------------------------------------------------------------------------
def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``window_signal`` rows of one record; ValueError when it is not one."""
    try:
        start = datetime.fromisoformat(record["window_start"])
        end = datetime.fromisoformat(record["window_end"])
        base = {
            "model_id": str(record["model_id"])[:MAX_ID_CHARS],
            "resolution_s": int(record["resolution_s"]),
            "window_start": start,
            "window_end": end,
        }
        rows = []
        for series in record["series"]:
            summary = series_summary(_as_window_series(series))
            rows.append(
                {
                    **base,
                    "model_version": str(series["model_version"])[:MAX_ID_CHARS],
                    "segment": str(series["segment"])[:MAX_SIGNAL_SEGMENT_CHARS],
                    **summary,
                    "scores": dict(series.get("scores") or {}),
                }
            )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"not a signal record: {type(error).__name__}: {error}") from error
    return rows


def _as_window_series(series: dict[str, Any]) -> dict[str, Any]:
    """A record series in the window-record shape :func:`series_summary` reads."""
    return {
        **series,
        "latency_ms": {
            "p50": series.get("latency_p50_ms"),
            "p95": series.get("latency_p95_ms"),
            "p99": series.get("latency_p99_ms"),
        },
        "feedback": {
            "n": series.get("feedback"),
            "negative": series.get("negative_feedback"),
            "negative_rate": series.get("negative_rate"),
        },
    }


def upsert_signals(engine: Engine, rows: list[dict[str, Any]]) -> int:
    """Insert or update ``window_signal`` rows in one statement; returns the rows written.

    The same key twice in ``rows`` (a record redelivered within one poll) keeps the last:
    PostgreSQL refuses to update one row twice in a statement.
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from genmon.db import session_scope
    from genmon.schemas.events import utcnow
    from genmon.schemas.signals import WindowSignal

    if not rows:
        return 0
    unique = list({tuple(row[c] for c in KEY_COLUMNS): row for row in rows}.values())
    now = utcnow()
    unique = [{**row, "recorded_at": now} for row in unique]
    table = WindowSignal.__table__
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(table)
    updated = {
        column: statement.excluded[column]
        for column in (*SUMMARY_FIELDS, "window_end", "scores", "recorded_at")
    }
    statement = statement.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_=updated)
    with session_scope(engine) as session:
        session.execute(statement, unique)
    return len(unique)


class SignalRecorder:
    """Stores signal records; waits out a database that is unavailable (see module)."""

    def __init__(
        self,
        database_url: str,
        metrics: SignalMetrics,
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        engine: Engine | None = None,
    ) -> None:
        self.database_url = database_url
        self.metrics = metrics
        self.backoff = Backoff(initial_s, max_s)
        self._engine = engine

    async def store(self, values: Sequence[bytes | None]) -> int:
        """Store the records of one poll (raw message values); returns the rows written.

        Returns only once every readable record is stored or refused for good: while the
        database is unavailable it sleeps with backoff and tries again.
        """
        rows: list[list[dict[str, Any]]] = []
        for value in values:
            try:
                rows.append(record_rows(json.loads(value or b"")))
            except ValueError as error:
                self.metrics.store_errors.labels("unreadable").inc()
                log.error("signal record skipped: %s", error)
        flat = [row for record in rows for row in record]
        while True:
            try:
                written = await asyncio.to_thread(self._upsert, flat)
            except Exception as error:
                if is_transient(error):
                    wait = self.backoff.failed()
                    self.metrics.store_errors.labels("transient").inc()
                    log.warning(
                        "%d window signals wait for the database (%s); next try in %.1f s",
                        len(flat),
                        describe(error),
                        wait,
                    )
                    await asyncio.sleep(wait)
                    continue
                written = await self._one_by_one(rows, error)
            self.backoff.succeeded()
            self.metrics.rows.inc(written)
            return written

    async def _one_by_one(self, rows: list[list[dict[str, Any]]], error: BaseException) -> int:
        """After a refused statement: each record alone, skipping those refused for good
        (a transient error on the way is waited out as in :meth:`store`)."""
        log.warning(
            "a batch of window signals was refused (%s): one record at a time", describe(error)
        )
        written = 0
        for record in rows:
            while True:
                try:
                    written += await asyncio.to_thread(self._upsert, record)
                except Exception as failure:
                    if is_transient(failure):
                        self.metrics.store_errors.labels("transient").inc()
                        await asyncio.sleep(self.backoff.failed())
                        continue
                    self.metrics.store_errors.labels("permanent").inc()
                    log.error(
                        "window signals of %s skipped: %s",
                        record[0]["model_id"] if record else "?",
                        describe(failure),
                    )
                break
        return written

    def _upsert(self, rows: list[dict[str, Any]]) -> int:
        from genmon.db import make_engine

        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return upsert_signals(self._engine, rows)


# -- Faust wiring --------------------------------------------------------------------------------
def signals_topic(app: GenmonApp, settings: Settings) -> TopicT:
    """The internal ``<prefix>.signals`` topic, keyed by model id."""
    return app.topic(
        settings.topic(SIGNALS_KIND),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.partitions,
        internal=True,
    )


def install_recorder(app: GenmonApp, topic: TopicT, metrics: SignalMetrics) -> SignalRecorder:
    """The agent storing ``<prefix>.signals`` in ``window_signal``, one poll per statement.

    Faust acknowledges a poll's events only once the agent asks for the next poll, after
    :meth:`SignalRecorder.store` returned: an outage holds the offsets where they are.
    """
    settings = app.genmon.settings
    recorder = SignalRecorder(settings.database.url, metrics)
    app.genmon.extras["signals"] = recorder
    size, within = settings.worker.batch_size, settings.worker.batch_within_s

    async def record_signals(stream: Any) -> None:
        async for events in stream.take_events(size, within=within):
            await recorder.store([event.message.value for event in events])

    app.agent(topic, name="genmon.pipeline.signals")(record_signals)
    return recorder


__all__ = [
    "SignalMetrics",
    "SignalPublisher",
    "SignalRecorder",
    "collecting",
    "install_recorder",
    "newly_judged",
    "record_rows",
    "signal_record",
    "signals_topic",
    "upsert_signals",
]
