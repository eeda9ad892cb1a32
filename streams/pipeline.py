"""The streaming pipeline in the worker: aggregates, feedback join, window closing, detectors.

:func:`install` (an app installer, see :mod:`genmon.streams.app`) wires the pure cores
(:mod:`~genmon.streams.windows.state`, :mod:`~genmon.streams.detection.runner`) to Faust:

- ingest sinks hand each validated batch, grouped by source partition, to
  :class:`~genmon.streams.windows.state.WindowState`; joined pairs become
  ``labelled_example`` rows (one batch insert per batch, ``ON CONFLICT DO NOTHING`` on
  ``(model_id, request_id)``, so redelivery never duplicates a row;
  :mod:`~genmon.streams.labelled_examples`);
- a timer (``windows.close_interval_s``) closes due windows and expires join entries,
  and sends each closed window to ``<prefix>.windows`` keyed by model id, on the same
  partition number as its source;
- an agent on ``<prefix>.windows`` runs :class:`~genmon.streams.detection.runner.DetectorRunner`
  and publishes :class:`~genmon.schemas.events.Finding` records to ``<prefix>.findings``
  keyed by model id;
- each window the runner judges is summarised, with every signal's score against its
  threshold, to ``<prefix>.signals`` in the background, and an agent stores those records
  in table ``window_signal`` for people (:mod:`~genmon.streams.signals`;
  ``worker.record_signals``);
- :meth:`Pipeline.submit_embeddings` is the hook of the embedding stage.

State lives in three Faust tables written to explicit changelog partitions
(:class:`~genmon.streams.table_store.TableStore`; a take() batch mixes partitions, so the
"current event" partition Faust would pick is wrong):
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
:mod:`~genmon.streams.windows.segment_cap`). Tumbling windows also carry
``exemplars`` where there are any: per signal (``error``, ``refusal``, ``empty``,
``truncated`` in ``"*"``; ``negative_feedback`` in every series) a uniform sample of up
to ``detectors.exemplars_per_window`` affected examples (``request_id``, ``prompt``,
``response``, ``segment``, ``note``), which the runner clusters into a firing finding's
evidence (:mod:`~genmon.streams.windows.exemplars`,
:mod:`~genmon.streams.detection.error_evidence`).
Their ``"*"`` series (tumbling windows only) also carry ``sketches``: ``latency_ms``,
``ttft_ms`` and ``tpot_ms`` as raw DDSketch states (``QuantileSketch.to_state``:
``alpha``, ``bins`` as ``[[key, count], ...]``, ``zeros``, ``count``, ``sum``, ``min``,
``max``), for the runner to compare whole distributions with a baseline; the busiest
versions' sketches while they fit ``aggregates.SKETCH_BUDGET_BYTES`` (64 KiB, taken from
the series budget). Hopping windows and segment series carry none.

**Delivery guarantees** (RELIABILITY.md). Aggregates and joins are effectively-once per
partition when ingest reports source offsets (redelivered events at or below the
checkpointed offset are skipped; a crash loses the writes since the last flush, and Kafka
redelivers their events from the last commit). Every accepted inference is in exactly one
tumbling window record; an event whose window has closed is counted late, one stamped too
far ahead future (``genmon_pipeline_unaccounted_events`` checks it). A closing window's
record goes to the window stage's outbox and is flushed before it is sent, so a crash or
a rebalance re-sends the same record, never a recomputed one; idle watermarks advance
only while the partition is caught up with a broker that answers, so an outage or a
backlog does not close windows before their events arrive. Closed windows and findings
are at-least-once: the runner skips windows it has applied and the incident manager
drops findings whose ``dedup_key`` (fingerprint + window end) it has seen. Labelled
examples are stored at least once (idempotent insert; while the database is down they
wait in ``<prefix>.examples-retry``, see :mod:`~genmon.streams.labelled_examples`).
Producers must key inference and feedback by model id (the SDK does), so a model's
events, its feedback and its windows share one partition number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from faust.types import TP

from genmon.schemas.codec import encode
from genmon.schemas.events import FeedbackEvent, Finding
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.detection.embedding_series import embedding_key
from genmon.streams.detection.points import SignalPoint
from genmon.streams.detection.runner import DetectorRunner
from genmon.streams.faust_consumer import fetch_progress, read_position
from genmon.streams.labelled_examples import (
    LabelledExampleSink,
    install_retry_agent,
    make_sink,
)
from genmon.streams.partitioning import group_by_partition, partition_for
from genmon.streams.pipeline_metrics import PipelineMetrics
from genmon.streams.signals import (
    SignalMetrics,
    SignalPublisher,
    collecting,
    install_recorder,
    newly_judged,
    signal_record,
    signals_topic,
)
from genmon.streams.table_store import TableStore
from genmon.streams.windows.state import WindowState

if TYPE_CHECKING:
    from genmon.streams.app import GenmonApp
    from genmon.streams.ingest import InferenceBatch

log = logging.getLogger(__name__)


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
        self.core = WindowState(
            settings,
            self.state_store,
            buffered=True,
            native_joins=use_native,
        )
        self.runner = DetectorRunner(settings)
        self.detector_store = TableStore(self.detector_table)
        self.embedding_store = TableStore(self.embedding_table)
        self.metrics = PipelineMetrics(app.genmon.metrics.registry)
        # Stored before each checkpoint, or durable in <prefix>.examples-retry.
        self.examples: LabelledExampleSink = make_sink(app, settings, self.metrics)
        #: Each judged window's summary and scores for people (``worker.record_signals``).
        self.signals: SignalPublisher | None = None
        if settings.worker.record_signals:
            self.signals = SignalPublisher(
                signals_topic(app, settings), SignalMetrics(app.genmon.metrics.registry)
            )
        self.inference_topic = settings.topic("inference")
        self.feedback_topic = settings.topic("feedback")
        self._lock = asyncio.Lock()
        #: Per partition: since when the closing timer has seen it caught up, and when
        #: it last looked (see _caught_up_since).
        self._caught_up_from: dict[int, float] = {}
        self._last_check: dict[int, float] = {}
        #: Partitions whose broker has not answered since they were last caught up.
        self._silent: set[int] = set()
        self._runner_lock = asyncio.Lock()
        self._next_peek = 0.0  # monotonic time of the next early look (peek_windows)
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
                await self.examples.write(out.examples, self.inference_topic, partition)
                self.core.checkpoint(partition)
            self.metrics.sync(self.core)

    async def on_feedback(self, events: list[FeedbackEvent]) -> None:
        async with self._lock:
            for partition, items in group_by_partition(events, self.partitions).items():
                out = self.core.on_feedback(partition, items, checkpoint=False)
                await self.examples.write(out.examples, self.feedback_topic, partition)
                self.core.checkpoint(partition)
            self.metrics.sync(self.core)

    # -- timer: closing windows -------------------------------------------------------------
    def owned_partitions(self) -> list[int]:
        assignment = self.app.assignor.assigned_actives()
        return sorted(tp.partition for tp in assignment if tp.topic == self.inference_topic)

    async def close_windows(self) -> int:
        """Close due windows of every owned partition; return how many were emitted.

        The closed windows' records and marks are flushed to the changelog before the
        records are sent (the window stage's outbox, see
        :meth:`~genmon.streams.windows.state.WindowState.due_windows`): a window that a
        crash or a rebalance interrupts is sent again as it was. A send that fails (the
        broker is down) leaves its records in the outbox for the next tick.
        """
        if self.app.rebalancing:
            return 0
        sent = 0
        async with self._lock:
            due = {
                partition: self.core.due_windows(partition, self._caught_up_since(partition))
                for partition in self.owned_partitions()
            }
            if any(due.values()):
                self.core.flush()
                await self.state_store.wait_sent()
            for partition, windows in due.items():
                acks = [
                    await self.windows_topic.send(
                        key=window["model_id"].encode(),
                        value=json.dumps(window).encode(),
                        partition=partition,
                    )
                    for window in windows
                ]
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
            self.metrics.sync_invariant(self.core)
        self._update_lag()
        return sent

    def _caught_up_since(self, partition: int) -> float | None:
        """The wall time since which this timer has seen ``partition`` caught up at every
        tick, ``None`` when it is not now.

        A tick that comes late (the timer waited for the lock while a flush waited for a
        frozen broker) cannot vouch for the time before it: the span restarts there. After
        the broker did not answer, the span starts ``windows.outage_grace_s`` later: the
        producers reconnect with a backoff (the SDK's up to 5 s, librdkafka's 10 s) before
        they deliver what they buffered, and their events are not late for that.
        """
        now = time.time()
        last, self._last_check[partition] = self._last_check.get(partition), now
        progress = self._progress(partition)
        if progress != "caught up":
            self._caught_up_from.pop(partition, None)
            if progress == "silent":
                self._silent.add(partition)
            return None
        gap = now - last if last is not None else 0.0
        idle_s = self.settings.windows.idle_timeout_s
        if gap >= max(idle_s, 5.0):  # held up that long: most likely by an outage
            self._silent.add(partition)
        if partition not in self._caught_up_from or gap > idle_s / 2:
            grace = self.settings.windows.outage_grace_s if partition in self._silent else 0.0
            self._silent.discard(partition)
            self._caught_up_from[partition] = now + grace
        return self._caught_up_from[partition]

    def _progress(self, partition: int) -> str:
        """``caught up`` when the worker has handled every inference the broker held for
        ``partition`` at a fetch answered within half the idle timeout; ``silent`` when
        the broker has not answered that long; ``behind`` otherwise.

        Only when caught up may idle models' watermarks advance with the wall clock:
        during a broker outage, a freeze or a backlog, no events is not idleness, and
        closing windows by the wall clock would shut out the events still to come.
        """
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return "caught up"  # not consuming from Kafka (tests driving the pipeline)
        progress = fetch_progress(consumer, TP(self.inference_topic, partition))
        if progress is None:
            return "behind"  # no fetch answered since the assignment
        highwater, fetched_at, handled = progress
        if time.time() - fetched_at >= self.settings.windows.idle_timeout_s / 2:
            return "silent"
        if handled is None:  # no batch handled since the assignment: what the state holds
            handled = self.core.applied_offset(partition)
        return "caught up" if handled + 1 >= highwater else "behind"

    def _update_lag(self) -> None:
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in (self.inference_topic, self.feedback_topic):
                continue
            highwater = consumer.highwater(tp)
            position = read_position(consumer, tp)
            if highwater is not None and position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - position - 1, 0)
                )

    # -- runner -----------------------------------------------------------------------------
    async def peek_windows(self) -> list[Finding]:
        """Early detection: every ``detectors.early_interval_s``, judge each owned open
        tumbling window whose traffic changed since the last look, as it stands
        (:meth:`~genmon.streams.detection.runner.DetectorRunner.peek`), and publish what
        fires. A look keeps no detector state but the firing it reports."""
        interval = self.settings.detectors.early_interval_s
        now = time.monotonic()
        if not interval or now < self._next_peek or self.app.rebalancing:
            return []
        self._next_peek = now + interval
        async with self._lock:
            windows = [
                (partition, window)
                for partition in self.owned_partitions()
                for window in self.core.open_windows(partition)
            ]
        findings: list[Finding] = []
        for partition, window in windows:
            try:
                findings += await self._peek(partition, window)
            except Exception:
                log.exception("detector runner failed on an open window")
        return findings

    async def _peek(self, partition: int, window: dict[str, Any]) -> list[Finding]:
        """One look; when it fires, the look again on the window with its examples (built
        under the state lock, never while holding the runner's: the closing timer takes
        them in the other order), clustered off the event loop, then published."""
        model_id = window["model_id"]
        async with self._runner_lock:
            _, findings = self.runner.peek(self.detector_store.get(model_id), window)
        if not findings:
            return []
        async with self._lock:
            only = (model_id, int(window["end_ms"]))
            full = next(iter(self.core.open_windows(partition, only=only)), None)
        if full is None:  # closed meanwhile: the close judges it
            return []
        async with self._runner_lock:
            state = self.detector_store.get(model_id)
            new_state, findings = await asyncio.to_thread(self.runner.peek, state, full)
            if findings:
                await self._publish(findings)
                self.detector_store.put(partition, model_id, new_state)
                self.metrics.early_findings.inc(len(findings))
        return findings

    async def on_window(self, partition: int, window: dict[str, Any]) -> list[Finding]:
        model_id = window["model_id"]
        async with self._runner_lock:
            state = self.detector_store.get(model_id)
            with collecting(self.runner) as points:
                if any("exemplars" in series for series in window["series"]):
                    # A firing quality or feedback detector clusters the examples (and may
                    # load the sentence encoder once): not on the event loop.
                    new_state, findings = await asyncio.to_thread(
                        self.runner.on_window, state, window
                    )
                else:
                    new_state, findings = self.runner.on_window(state, window)
            self.metrics.sync_runner(self.runner)
            # Findings first, acknowledged: a crash before the state write re-runs the window
            # from the old state and re-sends the same findings (same dedup keys).
            await self._publish(findings)
            self._publish_signals(state, new_state, window, points)
            if new_state != state:
                self.detector_store.put(partition, model_id, new_state)
        if findings:
            closed = datetime.fromisoformat(window["closed_at"]).timestamp()
            self.metrics.close_to_finding.observe(max(time.time() - closed, 0.0))
        return findings

    def _publish_signals(
        self,
        state: dict[str, Any] | None,
        new_state: dict[str, Any],
        window: dict[str, Any],
        points: list[SignalPoint],
    ) -> None:
        """Send a window the runner judged now to ``<prefix>.signals``, in the background
        (:mod:`~genmon.streams.signals`): charts never hold up or break detection."""
        if self.signals is None or not newly_judged(state, new_state, window):
            return
        try:
            self.signals.publish(signal_record(window, points))
        except Exception:
            log.exception("window signals of %s not published", window.get("model_id"))

    async def submit_embeddings(
        self,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
        array: np.ndarray,
        texts: Sequence[str] = (),
    ) -> list[Finding]:
        """Run the embedding drift detector of ``(model, version, field)`` on one sample.

        The embedding stage calls this once per sub-sample (every
        ``embedding.flush_interval_s`` of event time) with the sampled embeddings
        (``array``: n x d) and their texts (same order). State is kept in the
        ``embedding-state`` table, one record per series under
        :func:`~genmon.streams.detection.embedding_series.embedding_key`, bounded through one
        index per model
        (:meth:`~genmon.streams.detection.runner.DetectorRunner.admit_embedding_series`);
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
                tuple(texts),
            )
            await self._publish(findings)
            if new_state != state:
                self.embedding_store.put(partition, key, new_state)
        return findings

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
    # Labelled examples need no hook: each is stored, or acknowledged in the retry topic,
    # before its batch is checkpointed; the retry agent acknowledges its records by hand.
    install_retry_agent(app, pipeline.examples)
    if pipeline.signals is not None:
        install_recorder(app, pipeline.signals.topic, pipeline.signals.metrics)
    pipeline.state_table.on_recover(pipeline.on_recovered)

    @app.on_partitions_revoked.connect
    async def forget(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        await pipeline.on_revoked(revoked)

    @app.timer(interval=settings.windows.close_interval_s, name="genmon.pipeline.close")
    async def close_windows() -> None:
        await pipeline.close_windows()
        await pipeline.peek_windows()

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
