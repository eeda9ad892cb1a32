"""The streaming pipeline in the worker: aggregates, feedback join, window closing, detectors.

:func:`install` (an app installer, see :mod:`genmon.streams.app`) wires the pure cores
(:mod:`~genmon.streams.pipeline_core`, :mod:`~genmon.streams.runner`) to Faust:

- ingest sinks hand each validated batch, grouped by source partition, to
  :class:`~genmon.streams.pipeline_core.PipelineCore`; joined pairs become
  ``labelled_example`` rows (one batch insert per batch, ``ON CONFLICT DO NOTHING`` on
  ``(model_id, request_id)``, so redelivery never duplicates a row);
- a timer (``windows.close_interval_s``) closes due windows and expires join entries,
  and sends each closed window to ``<prefix>.windows`` keyed by model id, on the same
  partition number as its source;
- an agent on ``<prefix>.windows`` runs :class:`~genmon.streams.runner.DetectorRunner`
  and publishes :class:`~genmon.schemas.events.Finding` records to ``<prefix>.findings``
  keyed by model id;
- :meth:`Pipeline.submit_embeddings` is the hook of the embedding stage.

State lives in three Faust tables written to explicit changelog partitions (a take()
batch mixes partitions, so the "current event" partition Faust would pick is wrong):
``pipeline-state`` (panes, join entries, marks), ``detector-state`` (per model: every
detector's JSON ``state_dict``) and ``embedding-state`` (per model, version and embedded
field: the embedding drift detector, under 900 KB; per model: an index that bounds those
series). All are recovered from their changelogs on restart or rebalance.
``pipeline-state`` is written once per offset commit, not per batch: the core holds its
writes (and touched panes as live objects) in memory, and :meth:`Pipeline.flush`, a
pre-commit hook, writes them before Faust commits the offsets they cover.

**The window record** (JSON, ``<prefix>.windows``, key = model id; an inference counts in
the windows holding the time it completed): ``model_id``,
``kind`` (``tumbling`` or ``hopping``), ``window_start``/``window_end`` (ISO 8601, UTC),
``start_ms``/``end_ms``, ``partition``, ``closed_at``, and ``series``: one entry per
``(model_version, segment)`` with ``requests``, ``errors``, ``error_rate``, ``answered``
(``requests - errors``), ``by_status``, ``by_error_code``, ``latency_ms`` (also ``mean``,
``max``), ``ttft_ms`` and ``tpot_ms`` (time per output token after the first,
``(latency - ttft) / (completion_tokens - 1)`` of non-error requests with a time to first
token no later than the latency and at least two completion tokens; both with ``n``), each
with ``p50``/``p90``/``p95``/``p99`` from DDSketch, within ``sketch_relative_accuracy``;
``prompt_tokens``/``completion_tokens``/``response_chars`` (``n``, ``sum``, ``mean``,
``max``), ``empty``/``truncated``/``refusal`` counts and rates (``empty`` and ``refusal``
count answered requests only, their rates are over ``answered``: an error is one cause,
not also an empty answer; ``truncated_rate`` is over ``requests``), ``languages``
(label -> count) and ``feedback`` (``n``, ``positive``, ``negative``, ``negative_rate``,
``mean_score``). Segment ``"*"`` is all traffic of the version; ``"key=value"`` one
segment attribute. An attribute has at most
``windows.max_segment_values`` value series per window; traffic of its other values is
in the series ``"key=__other__"`` (also where values are folded to keep the record's
series under 640 KiB), and ``segment_overflow`` maps each such attribute to the
``requests`` and ``feedback`` its overflow series hold (empty when none overflowed;
:mod:`~genmon.streams.segment_cap`). Tumbling windows also carry
``exemplars`` where there are any: per signal (``error``, ``refusal``, ``empty``,
``truncated`` in ``"*"``; ``negative_feedback`` in every series) a uniform sample of up
to ``detectors.exemplars_per_window`` affected examples (``request_id``, ``prompt``,
``response``, ``segment``, ``note``), which the runner clusters into a firing finding's
evidence (:mod:`~genmon.streams.exemplars`, :mod:`~genmon.streams.error_evidence`).
Their ``"*"`` series (tumbling windows only) also carry ``sketches``: ``latency_ms``,
``ttft_ms`` and ``tpot_ms`` as raw DDSketch states (``QuantileSketch.to_state``:
``alpha``, ``bins`` as ``[[key, count], ...]``, ``zeros``, ``count``, ``sum``, ``min``,
``max``), for the runner to compare whole distributions with a baseline; the busiest
versions' sketches while they fit ``aggregates.SKETCH_BUDGET_BYTES`` (64 KiB, taken from
the series budget). Hopping windows and segment series carry none.

**Delivery guarantees.** Aggregates and joins are effectively-once per partition when
ingest reports source offsets (redelivered events at or below the checkpointed offset are
skipped; a crash loses the writes since the last flush, and Kafka redelivers their events
from the last commit). Closed windows and findings are at-least-once: a crash after
sending but before the next flush re-sends them; the runner skips windows it has applied
and the incident manager drops findings whose ``dedup_key`` (fingerprint + window end) it
has seen.
Producers must key inference and feedback by model id (the SDK does), so a model's
events, its feedback and its windows share one partition number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka.partitioner import murmur2
from prometheus_client import Counter, Gauge, Histogram

from genmon.schemas.events import FeedbackEvent, Finding
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.codec import encode
from genmon.streams.pipeline_core import PipelineCore
from genmon.streams.runner import (
    DetectorRunner,
    embedding_key,
    embedding_series_model,
)

if TYPE_CHECKING:
    from faust.types import TP

    from genmon.streams.app import GenmonApp
    from genmon.streams.ingest import InferenceBatch

log = logging.getLogger(__name__)


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives ``key``, as the SDK sends."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def insert_examples(engine: Any, rows: list[dict[str, Any]]) -> int:
    """Insert ``labelled_example`` rows in one statement; existing (model, request) are kept.

    Returns how many rows were new where the driver reports it (SQLite, PostgreSQL).
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from genmon.db import session_scope
    from genmon.schemas.tables import LabelledExample

    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(LabelledExample.__table__).on_conflict_do_nothing(
        index_elements=["model_id", "request_id"]
    )
    with session_scope(engine) as session:
        result = session.execute(statement, rows)
        return max(int(getattr(result, "rowcount", 0) or 0), 0)


class TableStore:
    """:class:`~genmon.streams.pipeline_core.StateStore` over a Faust table.

    Writes go to ``table.data`` and to the changelog partition given by the caller. A
    ``bytes`` value is JSON already (the native join table's segment records); the
    table's JSON codec reads it back on recovery as it reads the others. With
    ``native_json`` other values are encoded by the native module's ``dumps`` (4x the
    standard library's speed), falling back to the table's codec for a value it cannot
    encode.
    """

    def __init__(self, table: Any, *, native_json: bool = False, track_sends: bool = False) -> None:
        self.table = table
        self._dumps = native.dumps if native_json else None
        #: With ``track_sends``, the changelog sends since the last :meth:`wait_sent`.
        self._sends: list[asyncio.Future[Any]] | None = [] if track_sends else None

    async def wait_sent(self) -> None:
        """Wait until the broker has acknowledged every changelog write since the last call.

        Faust's ``Producer.flush`` gives up on its buffer after 0.1 s without a send (a
        new changelog topic's metadata, a loaded machine), and the commit that follows
        would then pass state still in that buffer: a crash loses the state of events
        whose offsets are committed. A failed send raises here, before any commit.
        """
        if not self._sends:
            return
        sends, self._sends = self._sends, []
        await asyncio.gather(*sends)

    def _send(self, partition: int, key: str, value: Any, **kwargs: Any) -> None:
        sent = self.table.send_changelog(partition, key, value, **kwargs)
        if self._sends is not None:
            self._sends.append(sent)

    def get(self, key: str) -> Any | None:
        return self.table.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.table.data[key] = value
        if isinstance(value, bytes):  # JSON already: a native join segment record
            self._send(partition, key, value, value_serializer="raw")
            return
        if self._dumps is not None:
            try:
                encoded = self._dumps(value)
            except (TypeError, ValueError, OverflowError):
                pass
            else:
                self._send(partition, key, encoded, value_serializer="raw")
                return
        self._send(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        self.table.data.pop(key, None)
        self._send(partition, key, None, value_serializer="raw")

    def all_keys(self) -> Iterable[str]:
        return list(self.table.data.keys())


class PipelineMetrics:
    """Operational signals of the pipeline, on the worker's Prometheus registry."""

    def __init__(self, registry: Any) -> None:
        r = registry
        self.events = Counter("genmon_pipeline_events", "Events aggregated", ["kind"], registry=r)
        self.events_per_s = Gauge(
            "genmon_pipeline_events_per_second",
            "Inference events aggregated per second (last interval)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "genmon_pipeline_consumer_lag",
            "Messages behind the end of each owned source partition",
            ["topic", "partition"],
            registry=r,
        )
        self.late = Counter(
            "genmon_pipeline_late_events",
            "Events whose windows had all closed",
            ["kind"],
            registry=r,
        )
        self.skew = Counter(
            "genmon_pipeline_future_events",
            "Events dropped for timestamps beyond windows.max_future_skew_s",
            registry=r,
        )
        self.redelivered = Counter(
            "genmon_pipeline_redelivered_skipped",
            "Redelivered events skipped (already aggregated)",
            registry=r,
        )
        self.windows_closed = Counter(
            "genmon_pipeline_windows_closed", "Closed windows emitted", ["kind"], registry=r
        )
        self.joined = Counter("genmon_join_joined", "Feedback joined to its inference", registry=r)
        self.orphaned = Counter(
            "genmon_join_orphaned", "Feedback dropped at the TTL without its inference", registry=r
        )
        self.segment_overflow = Counter(
            "genmon_pipeline_segment_overflow",
            "Attribute values of events counted as <attribute>=__other__ because the model"
            " had windows.max_segment_values values of the attribute in live panes",
            registry=r,
        )
        self.segment_folded = Counter(
            "genmon_pipeline_segment_values_folded",
            "Segment values of closing windows folded into <attribute>=__other__ to keep"
            " the window record within its size budget",
            registry=r,
        )
        self.series_evicted = Counter(
            "genmon_detector_series_evicted",
            "Detector series dropped from a model's window state or embedding drift state:"
            " not judged for detectors.series_ttl_s of event time (ttl), beyond"
            " detectors.max_series_per_model or detectors.max_embedding_series_per_model"
            " (cap) or over the window state's size bound (size)",
            ["reason"],
            registry=r,
        )
        self.evicted = Counter(
            "genmon_join_evicted",
            "Join entries evicted before their TTL to stay within feedback.join_max_entries",
            registry=r,
        )
        self.pending = Gauge(
            "genmon_join_pending",
            "Join entries holding feedback that waits for its inference",
            registry=r,
        )
        self.entries = Gauge(
            "genmon_join_entries",
            "Live join entries (at most feedback.join_max_entries per partition)",
            registry=r,
        )
        self.examples = Counter(
            "genmon_join_examples_written",
            "Labelled examples inserted (duplicates excluded)",
            registry=r,
        )
        self.example_errors = Counter(
            "genmon_join_example_errors", "Batches of labelled examples that failed", registry=r
        )
        self.findings = Counter(
            "genmon_findings_published", "Findings published", ["detected"], registry=r
        )
        self.close_to_finding = Histogram(
            "genmon_window_close_to_finding_seconds",
            "From closing a window to publishing its findings",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._last: dict[str, int] = {}
        self._last_tick = time.monotonic()
        self._last_events = 0

    def sync_runner(self, runner: DetectorRunner) -> None:
        """Carry the runner's eviction counts over (they only grow)."""
        for reason, value in runner.series_evicted.items():
            name = f"series_evicted_{reason}"
            delta = value - self._last.get(name, 0)
            if delta:
                self.series_evicted.labels(reason).inc(delta)
            self._last[name] = value

    def sync(self, core: PipelineCore) -> None:
        """Carry the core's counters over (they only grow) and refresh the gauges."""
        c = core.counters
        for name, value, metric in (
            ("inference", c.inference_events, self.events.labels("inference")),
            ("feedback", c.feedback_events, self.events.labels("feedback")),
            ("late", c.late_events, self.late.labels("inference")),
            ("late_feedback", c.late_feedback, self.late.labels("feedback")),
            ("skew", c.skew_dropped, self.skew),
            ("redelivered", c.redelivered_skipped, self.redelivered),
            ("joined", c.joined, self.joined),
            ("orphaned", c.orphaned, self.orphaned),
            ("evicted", c.join_evicted, self.evicted),
            ("segment_overflow", c.segment_overflow, self.segment_overflow),
            ("segment_folded", c.segment_folded, self.segment_folded),
        ):
            delta = value - self._last.get(name, 0)
            if delta:
                metric.inc(delta)
            self._last[name] = value
        self.pending.set(core.pending_feedback)
        self.entries.set(core.join_entries)
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self.events_per_s.set(
                (c.inference_events - self._last_events) / (now - self._last_tick)
            )
            self._last_tick, self._last_events = now, c.inference_events


class Pipeline:
    """The installed pipeline of one app (``app.genmon.extras["pipeline"]``)."""

    def __init__(self, app: GenmonApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        n = settings.kafka.partitions
        self.partitions = n
        # Keys are str and values JSON-able dicts: Faust's default json codec for both.
        self.state_table = app.Table("pipeline-state", default=None, partitions=n)
        self.detector_table = app.Table("detector-state", default=None, partitions=n)
        # Embedding drift: one record per (model, version, field) series, in a table of its
        # own so that no model id can make a series key collide with a window-state key.
        self.embedding_table = app.Table("embedding-state", default=None, partitions=n)
        self.windows_topic = app.topic(
            settings.topic("windows"),
            key_serializer="raw",
            value_serializer="raw",
            partitions=n,
            internal=True,
        )
        # Held in memory between offset commits (see flush()).
        use_native = native.available() and settings.worker.native_ingest
        self.state_store = TableStore(self.state_table, native_json=use_native, track_sends=True)
        self.core = PipelineCore(
            settings,
            self.state_store,
            buffered=True,
            native_joins=use_native,
        )
        self.runner = DetectorRunner(settings)
        self.detector_store = TableStore(self.detector_table)
        self.embedding_store = TableStore(self.embedding_table)
        self.metrics = PipelineMetrics(app.genmon.metrics.registry)
        self.inference_topic = settings.topic("inference")
        self.feedback_topic = settings.topic("feedback")
        self._engine: Any = None
        self._lock = asyncio.Lock()
        self._runner_lock = asyncio.Lock()
        # Embedding submits read, compute (in a thread) and write their series' state:
        # serialised among themselves, and never holding up the window detectors.
        self._embedding_lock = asyncio.Lock()

    # -- ingest sinks ---------------------------------------------------------------------
    async def on_inference_batch(self, batch: InferenceBatch) -> None:
        """The ingest sink of inferences: each source partition's events through the core,
        natively decoded ones without pydantic events (:mod:`genmon.streams.native`)."""
        async with self._lock:
            for partition in batch.partitions():
                out = self.core.on_batch(partition, batch)
                await self._persist(out.examples)
                self.core.checkpoint(partition)
            self.metrics.sync(self.core)

    async def on_feedback(self, events: list[FeedbackEvent]) -> None:
        async with self._lock:
            for partition, items in self._by_partition(events).items():
                out = self.core.on_feedback(partition, items, checkpoint=False)
                await self._persist(out.examples)
                self.core.checkpoint(partition)
            self.metrics.sync(self.core)

    def _by_partition(self, events: Sequence[Any]) -> dict[int, list[tuple[int | None, Any]]]:
        from genmon.streams import ingest

        positions = getattr(ingest, "SOURCE_POSITIONS", None)
        known = positions.get() if positions is not None else None
        grouped: dict[int, list[tuple[int | None, Any]]] = defaultdict(list)
        if known is not None and len(known) == len(events):
            for (partition, offset), event in zip(known, events, strict=True):
                grouped[partition].append((offset, event))
        else:
            for event in events:
                grouped[partition_for(event.model_id, self.partitions)].append((None, event))
        return grouped

    async def _persist(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            inserted = await asyncio.to_thread(self._insert_examples, rows)
        except Exception:
            self.metrics.example_errors.inc()
            log.exception("could not store %d labelled examples", len(rows))
            return
        self.metrics.examples.inc(inserted)

    def _insert_examples(self, rows: list[dict[str, Any]]) -> int:
        from genmon.db import make_engine

        if self._engine is None:
            self._engine = make_engine(self.settings.database.url)
        return insert_examples(self._engine, rows)

    # -- timer: closing windows -------------------------------------------------------------
    def owned_partitions(self) -> list[int]:
        assignment = self.app.assignor.assigned_actives()
        return sorted(tp.partition for tp in assignment if tp.topic == self.inference_topic)

    async def close_windows(self) -> int:
        """Close due windows of every owned partition; return how many were emitted."""
        if self.app.rebalancing:
            return 0
        sent = 0
        async with self._lock:
            for partition in self.owned_partitions():
                windows = self.core.due_windows(partition)
                acks = [
                    await self.windows_topic.send(
                        key=window["model_id"].encode(),
                        value=json.dumps(window).encode(),
                        partition=partition,
                    )
                    for window in windows
                ]
                # Only after the broker has them are they marked closed and their panes dropped.
                await asyncio.gather(*acks)
                self.core.windows_sent(partition, windows)
                for window in windows:
                    self.metrics.windows_closed.labels(window["kind"]).inc()
                    # Judged here, at once, by the owner of the partition; the agent on the
                    # windows topic then finds them applied (it judges windows whose worker
                    # died after sending them, and retries one whose judging failed here).
                    try:
                        await self.on_window(partition, window)
                    except Exception:
                        log.exception("detector runner failed on a closed window")
                sent += len(windows)
            self.metrics.sync(self.core)
        self._update_lag()
        return sent

    def _update_lag(self) -> None:
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in (self.inference_topic, self.feedback_topic):
                continue
            highwater = consumer.highwater(tp)
            position = consumer._read_offset.get(tp)
            if highwater is not None and position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - position - 1, 0)
                )

    # -- runner -----------------------------------------------------------------------------
    async def on_window(self, partition: int, window: dict[str, Any]) -> list[Finding]:
        model_id = window["model_id"]
        async with self._runner_lock:
            state = self.detector_store.get(model_id)
            if any("exemplars" in series for series in window["series"]):
                # A firing quality or feedback detector clusters the examples (and may load
                # the sentence encoder once): not on the event loop.
                new_state, findings = await asyncio.to_thread(self.runner.on_window, state, window)
            else:
                new_state, findings = self.runner.on_window(state, window)
            self.metrics.sync_runner(self.runner)
            # Findings first, acknowledged: a crash before the state write re-runs the window
            # from the old state and re-sends the same findings (same dedup keys).
            await self._publish(findings)
            if new_state != state:
                self.detector_store.put(partition, model_id, new_state)
        if findings:
            closed = datetime.fromisoformat(window["closed_at"]).timestamp()
            self.metrics.close_to_finding.observe(max(time.time() - closed, 0.0))
        return findings

    async def submit_embeddings(
        self,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
        array: np.ndarray,
    ) -> list[Finding]:
        """Run the embedding drift detector of ``(model, version, field)`` on one sample.

        The embedding stage calls this once per window with the sampled embeddings
        (``array``: n x d). State is kept in the ``embedding-state`` table, one record per
        series under :func:`~genmon.streams.runner.embedding_key`, bounded through one
        index per model (:meth:`~genmon.streams.runner.DetectorRunner.admit_embedding_series`);
        findings are published like window findings (signal ``embedding_<field>``). The
        detector runs in a thread (fitting its principal components takes a moment).
        """
        partition = partition_for(model_id, self.partitions)
        key = embedding_key(model_id, model_version, field)
        async with self._embedding_lock:
            index = self.runner.admit_embedding_series(
                self.embedding_store,
                partition,
                model_id,
                model_version,
                field,
                window_end,
                missing_index=lambda: self._embedding_index(model_id),
            )
            self.metrics.sync_runner(self.runner)
            state = self.embedding_store.get(key)
            new_state, findings = await asyncio.to_thread(
                self.runner.on_embeddings,
                state,
                model_id,
                model_version,
                field,
                window_end,
                np.asarray(array),
                self.runner.field_series(index, field),
            )
            await self._publish(findings)
            if new_state != state:
                self.embedding_store.put(partition, key, new_state)
        return findings

    def _embedding_index(self, model_id: str) -> dict[str, Any]:
        # A model's first sample, or one of series stored before indexes existed.
        states = {
            key: self.embedding_store.get(key)
            for key in self.embedding_store.all_keys()
            if embedding_series_model(key) == model_id
        }
        return self.runner.embedding_index({k: v for k, v in states.items() if v is not None})

    async def _publish(self, findings: list[Finding]) -> None:
        topic = self.app.genmon.topics.findings
        acks = [
            await topic.send(key=finding.model_id.encode(), value=encode(finding))
            for finding in findings
        ]
        await asyncio.gather(*acks)
        for finding in findings:
            self.metrics.findings.labels(str(finding.detected).lower()).inc()

    # -- commits and rebalancing ---------------------------------------------------------------
    async def flush(self) -> None:
        """Write the core's held state to the changelog and wait for the broker's acks: a
        pre-commit hook (see :class:`~genmon.streams.app.WorkerContext`), so the committed
        offsets never pass it. Under the pipeline lock, so no flush splits a batch or a
        window closing, and no batch is handled (so none acknowledged) while it waits.
        """
        async with self._lock:
            self.core.flush()
            await self.state_store.wait_sent()

    async def on_recovered(self) -> None:
        self.core.restore(self.owned_partitions())

    async def on_revoked(self, revoked: set[TP]) -> None:
        """Forget revoked partitions, with the core's writes held since the last flush.

        Dropping those writes loses nothing: offsets are committed only by
        ``Consumer.force_commit``, which flushes first, and Faust commits nothing on a
        revocation (``App._on_partitions_revoked`` waits for pending messages and flushes
        the producer; ``Consumer.on_partitions_revoked`` has already forgotten the revoked
        partitions' acknowledged offsets, and ``_commit_offsets`` discards offsets of
        partitions no longer assigned). The events behind the dropped writes lie past the
        committed offset, and the partition's next owner (this worker too) reads them again.
        The lock waits for a window closing in progress, whose writes go too.
        """
        async with self._lock:
            self.core.forget(tp.partition for tp in revoked if tp.topic == self.inference_topic)


def install_pipeline(app: GenmonApp, settings: Settings | None = None) -> Pipeline:
    """Add the pipeline's tables, timer, sinks and runner agent to ``app``."""
    settings = settings or app.genmon.settings
    pipeline = Pipeline(app, settings)
    app.genmon.extras["pipeline"] = pipeline
    app.genmon.sinks.add_inference_batch_sink(
        pipeline.on_inference_batch, name="pipeline.aggregates"
    )
    app.genmon.sinks.add_feedback_sink(pipeline.on_feedback, name="pipeline.join")
    app.genmon.pre_commit_hooks.append(pipeline.flush)
    pipeline.state_table.on_recover(pipeline.on_recovered)

    @app.on_partitions_revoked.connect
    async def forget(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        await pipeline.on_revoked(revoked)

    @app.timer(interval=settings.windows.close_interval_s, name="genmon.pipeline.close")
    async def close_windows() -> None:
        await pipeline.close_windows()

    async def run_detectors(stream: Any) -> None:
        async for event in stream.events():
            try:
                await pipeline.on_window(event.message.partition, json.loads(event.value))
            except Exception:
                log.exception("detector runner failed on a closed window")

    app.agent(pipeline.windows_topic, name="genmon.pipeline.detectors")(run_detectors)
    return pipeline


def install(app: GenmonApp) -> None:
    """Installer for :data:`genmon.streams.app.DEFAULT_INSTALLERS`."""
    install_pipeline(app)
