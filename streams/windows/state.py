"""The per-partition state machine of the window stage: aggregates, feedback join, closing.

Pure Python over a small key-value store interface (:mod:`genmon.streams.windows.store`,
which describes the key layout), so it runs unchanged in unit tests (a dict) and in the
worker (a Faust table, see :mod:`genmon.streams.pipeline`). :class:`WindowState` takes
batches of inferences and feedback, adds them to panes
(:mod:`genmon.streams.windows.aggregates`), joins feedback to its inference
(:mod:`genmon.streams.windows.join`) and, on its timer, closes due windows
(:mod:`genmon.streams.windows.closing`). What it keeps in memory per partition (model
clocks, the pane index, the join table) is in :mod:`genmon.streams.windows.partition`, and
is rebuilt from the store on restore.

The mark is written *after* the batch's panes and join entries, to the same changelog
partition, so after a crash the recovered mark never claims more than the recovered
panes contain; source events at or below the marked offset are skipped on redelivery.
That makes the aggregates effectively-once per partition when the caller passes offsets.

A *buffered* state (the worker's) holds these writes in a
:class:`~genmon.streams.windows.store.BufferedStore` and writes them on
:meth:`WindowState.flush`, which the worker calls before each offset commit. The flush
writes each partition's mark last, so the argument above holds for all the batches since
the last flush as for one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.windows.aggregates import (
    ALL_SEGMENTS,
    PaneKey,
    aggregate_feedback,
    aggregate_inferences,
    event_time_ms,
)
from genmon.streams.windows.closing import (
    Window,
    closable_windows,
    finished_panes,
    idle_models,
    open_windows,
    window_record,
    window_series,
)
from genmon.streams.windows.exemplars import Exemplars
from genmon.streams.windows.join import JoinedPair, JoinTable, feedback_record, inference_record
from genmon.streams.windows.partition import ModelClock, PartitionState, restore_partitions
from genmon.streams.windows.plan import NEVER, WindowPlan
from genmon.streams.windows.quality_signals import QualitySignals
from genmon.streams.windows.segment_cap import SegmentCap
from genmon.streams.windows.stats import WindowStats
from genmon.streams.windows.store import (
    BufferedStore,
    StateStore,
    mark_key,
    pane_key,
    segment_key,
    window_key,
)

#: Approximate size at which changed join entries are split into another record.
SEGMENT_BYTES = 256 * 1024


@dataclass
class Counters:
    """Monotonic counters the metrics layer exports (summed over partitions)."""

    inference_events: int = 0
    #: Requests in the all-traffic series of closed tumbling windows.
    windowed_events: int = 0
    feedback_events: int = 0
    late_events: int = 0
    skew_dropped: int = 0
    redelivered_skipped: int = 0
    windows_closed: int = 0
    joined: int = 0
    orphaned: int = 0
    late_feedback: int = 0
    join_evicted: int = 0
    #: Attribute values of events (inferences and joined feedback) counted as overflow.
    segment_overflow: int = 0
    #: Segment values of closing windows folded into overflow to fit the record.
    segment_folded: int = 0


@dataclass
class Output:
    """What one call produced for the I/O layer to send or persist."""

    windows: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)


class WindowState:
    """Aggregates, joins and closes windows for the partitions this worker owns.

    Writes go through to ``store`` unless ``buffered``: then they are held in a
    :class:`BufferedStore` over it, panes as live :class:`WindowStats`, until :meth:`flush`.
    Join entries live in the native join table when the module is built, unless
    ``native_joins`` is false (see :mod:`genmon.streams.windows.join`).
    """

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        quality: QualitySignals | None = None,
        clock: Callable[[], float] = time.time,
        *,
        buffered: bool = False,
        native_joins: bool | None = None,
    ) -> None:
        w = settings.windows
        self.plan = WindowPlan(
            w.tumbling_s, w.hopping_size_s, w.hopping_step_s, w.allowed_lateness_s, w.expires_s
        )
        self.alpha = w.sketch_relative_accuracy
        self.idle_s = w.idle_timeout_s
        self.skew_ms = round(w.max_future_skew_s * 1000)
        self.join_ttl_ms = round(settings.feedback.join_ttl_s * 1000)
        self.join_max_text_chars = settings.feedback.join_max_text_chars
        self.native_joins = native.available() if native_joins is None else native_joins
        self._join_table()  # invalid join settings fail here, not at the first event
        self.negative_below = settings.feedback.negative_score_below
        self.exemplars = settings.detectors.exemplars_per_window
        self.redact_exemplars = settings.detectors.redact_exemplars
        self.join_max_entries = settings.feedback.join_max_entries
        self.max_segment_values = w.max_segment_values
        self.quality = quality or QualitySignals.from_file(w.refusal_phrases_file)
        self._buffer = BufferedStore(store, mark_key) if buffered else None
        self.store: StateStore = self._buffer or store
        self.clock = clock
        #: Window geometry for the native path's lateness test.
        self._native_plan = SimpleNamespace(
            pane_ms=self.plan.pane_ms,
            specs=[(spec.size_ms, spec.step_ms) for spec in self.plan.specs],
            expires_ms=self.plan.expires_ms,
        )
        self.counters = Counters()
        self._parts: dict[int, PartitionState] = {}
        #: Per partition, the traffic of each open window when early detection last saw it.
        self._peeked: dict[int, dict[tuple[str, int], int]] = {}

    # -- partition lifecycle ----------------------------------------------------------
    @property
    def partitions(self) -> list[int]:
        return sorted(self._parts)

    def models_with_panes(self) -> set[str]:
        """Models with panes in an owned partition (windows not all closed yet)."""
        return {pane.model_id for part in self._parts.values() for pane in part.panes}

    @property
    def pending_feedback(self) -> int:
        """Join entries holding feedback that has not met its inference yet."""
        return sum(part.joins.pending for part in self._parts.values())

    @property
    def join_entries(self) -> int:
        """Live join entries, at most ``feedback.join_max_entries`` per partition."""
        return sum(len(part.joins) for part in self._parts.values())

    def restore(self, partitions: Iterable[int]) -> None:
        """(Re)build in-memory indexes of ``partitions`` from the store (after recovery)."""
        parts = restore_partitions(
            self.store, set(partitions), self._new_partition, self.clock(), self._applied
        )
        for p, part in parts.items():
            self._parts[p] = part
            part.pane_requests = self._open_requests(p, part)
            self._delete_dead_segments(p, part)
            # A lowered feedback.join_max_entries takes effect now; the mark with the new
            # floor is written by the partition's next checkpoint.
            if self._evict_joins(p, part):
                part.dirty = True

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop in-memory indexes of revoked partitions (their state stays in the table).

        A buffered core also drops their unflushed writes and live panes: the store keeps
        their state as of the last :meth:`flush`.
        """
        dropped = set(partitions)
        for p in dropped:
            self._parts.pop(p, None)
            self._peeked.pop(p, None)
        if self._buffer is not None:
            self._buffer.drop(dropped)

    def flush(self) -> None:
        """Write a buffered core's held state to its store (each partition's mark last)."""
        if self._buffer is not None:
            self._buffer.flush()

    def _part(self, p: int) -> PartitionState:
        part = self._parts.get(p)
        if part is None:
            self.restore([p])
            part = self._parts[p]
        return part

    def _new_partition(self) -> PartitionState:
        return PartitionState(
            segment_cap=SegmentCap(self.max_segment_values), joins=self._join_table()
        )

    def _join_table(self) -> Any:
        if self.native_joins:
            return native.join_table(self.join_ttl_ms, self.join_max_text_chars)
        return JoinTable(self.join_ttl_ms, self.join_max_text_chars)

    # -- inference ----------------------------------------------------------------------
    def on_inferences(
        self,
        partition: int,
        events: Sequence[tuple[int | None, InferenceEvent]],
        *,
        checkpoint: bool = True,
    ) -> Output:
        """Aggregate a batch from one partition (offsets may be None when unknown).

        With ``checkpoint=False`` the caller writes the mark with :meth:`checkpoint` once
        it has persisted ``Output.examples``, so a crash in between replays the batch.
        """
        part = self._part(partition)
        fresh = self._fresh(part, "inference", events)
        self.counters.inference_events += len(fresh)
        now_ms = int(self.clock() * 1000)
        accepted: list[tuple[int | None, InferenceEvent]] = []
        timed = [(offset, event, event_time_ms(event)) for offset, event in fresh]
        seeds = self._clock_seeds(part, [(e.model_id, t) for _, e, t in timed], now_ms)
        newest: dict[str, int] = {}
        closed = {model: clock.closed for model, clock in part.clocks.items()}
        for offset, event, t in timed:
            if t > now_ms + self.skew_ms:
                self.counters.skew_dropped += 1
                continue
            model = event.model_id
            seen = newest.get(model)
            watermark = seeds[model] if (wm := part.watermark(model)) is None else wm
            if seen is not None:
                watermark = max(watermark, seen)
                newest[model] = max(seen, t)
            else:
                newest[model] = t
            if self.plan.too_late(t, watermark, closed.get(model, {})):
                self.counters.late_events += 1
            else:
                accepted.append((offset, event))
        out = Output()
        aggregated = aggregate_inferences(
            accepted,
            self.plan.pane_ms,
            self.quality,
            self.alpha,
            applied=lambda key: self._applied(partition, key, "inference"),
            exemplars=self.exemplars,
            segment_cap=part.segment_cap,
            redact_exemplars=self.redact_exemplars,
        )
        for key, stats in aggregated.items():
            self._merge_pane(partition, part, key, stats)
        pairs: list[tuple[int | None, JoinedPair]] = []
        cut = self.join_max_text_chars
        for offset, event in fresh:
            record = inference_record(event, cut)
            joined = part.joins.add_inference(event.model_id, event.request_id, record)
            pairs += [(offset, JoinedPair(*pair)) for pair in joined]
        part.saw_offsets("inference", events)
        self._end_inference_batch(partition, part, pairs, out, newest, checkpoint)
        return out

    def _clock_seeds(
        self, part: PartitionState, times: Sequence[tuple[str, int]], now_ms: int
    ) -> dict[str, int]:
        """Where the clock of each model without one starts: ``windows.expires_s`` before
        its newest (not future) event of the batch.

        Each event is judged against the largest event time before it (the model's
        watermark, then the batch's earlier events), so a 1970 stamp among today's events
        is late. A model's first event has nothing before it: judged against this seed,
        a first event from 1970 followed by today's does not open windows in 1970, while
        a replay of last month's dump starts its clock last month.
        """
        newest: dict[str, int] = {}
        for model, t in times:
            if t <= now_ms + self.skew_ms and model not in part.clocks:
                newest[model] = max(t, newest.get(model, t))
        return {model: t - self.plan.expires_ms for model, t in newest.items()}

    def on_batch(self, partition: int, batch: Any) -> Output:
        """One partition's events of an ingest batch (an
        :class:`~genmon.streams.ingest.InferenceBatch`), without the checkpoint: natively
        decoded ones through :meth:`on_native_inferences` where it takes them, else the
        pydantic events through :meth:`on_inferences`. The caller persists the output's
        examples, then calls :meth:`checkpoint`."""
        out = None
        if batch.native is not None:
            out = self.on_native_inferences(partition, batch.native, checkpoint=False)
        if out is None:
            out = self.on_inferences(partition, batch.items(partition), checkpoint=False)
        return out

    def on_native_inferences(
        self, partition: int, batch: Any, *, checkpoint: bool = True
    ) -> Output | None:
        """:meth:`on_inferences` for the events of ``partition`` in a native batch.

        The per-event work runs in :mod:`genmon.streams.native`; the result is the same
        state. Returns ``None``, having changed nothing, when the batch redelivers events
        into panes restored ahead of the mark (after a crash between writing a pane and
        the mark), or when the core keeps its join entries in Python: the caller then takes
        :meth:`on_inferences`, which skips per pane.
        """
        if not self.native_joins:
            return None
        part = self._part(partition)
        done = part.offsets.get("inference", -1)
        ahead = part.panes_ahead_until
        if ahead > done and any(
            p == partition and done < offset <= ahead for _, p, offset in batch.accepted()
        ):
            return None
        kinds = [spec.kind for spec in self.plan.specs]
        result = batch.aggregate(
            partition,
            done,
            int(self.clock() * 1000),
            self.skew_ms,
            part.watermarks(),
            {m: [c.closed.get(k, NEVER) for k in kinds] for m, c in part.clocks.items()},
            self._native_plan,
            part.joins,
        )
        groups = result["groups"]
        counters = self.counters
        counters.inference_events += result["fresh"]
        counters.redelivered_skipped += result["skipped"]
        counters.skew_dropped += result["skew"]
        counters.late_events += result["late"]
        out = Output()
        aggregated = native.pane_stats(
            groups,
            batch,
            self.quality,
            self.alpha,
            self.exemplars,
            self.redact_exemplars,
            part.segment_cap,
        )
        for key, stats in aggregated.items():
            self._merge_pane(partition, part, key, stats)
        pairs = [(offset, JoinedPair(*pair)) for offset, *pair in result["pairs"]]
        if result["max_offset"] is not None:
            part.offsets["inference"] = max(done, result["max_offset"])
        self._end_inference_batch(partition, part, pairs, out, result["newest"], checkpoint)
        return out

    def _end_inference_batch(
        self,
        partition: int,
        part: PartitionState,
        pairs: list[tuple[int | None, JoinedPair]],
        out: Output,
        newest: dict[str, int],
        checkpoint: bool,
    ) -> None:
        """What ends an inference batch on either path, after its offsets are recorded."""
        # Its own offset channel: the pane's "inference" offset already covers this batch.
        self._joined(partition, part, "join:inference", pairs, out)
        self.counters.segment_overflow += part.segment_cap.end_batch()
        part.advance(newest, self.clock())
        if checkpoint:
            self.checkpoint(partition)

    # -- feedback -----------------------------------------------------------------------
    def on_feedback(
        self,
        partition: int,
        events: Sequence[tuple[int | None, FeedbackEvent]],
        *,
        checkpoint: bool = True,
    ) -> Output:
        part = self._part(partition)
        fresh = self._fresh(part, "feedback", events)
        self.counters.feedback_events += len(fresh)
        out = Output()
        pairs: list[tuple[int | None, JoinedPair]] = []
        for offset, event in fresh:
            record = feedback_record(event)
            joined = part.joins.add_feedback(event.model_id, event.request_id, record)
            pairs += [(offset, JoinedPair(*pair)) for pair in joined]
        self._joined(partition, part, "feedback", pairs, out)
        self.counters.segment_overflow += part.segment_cap.end_batch()
        # Feedback keeps a model's clock awake but does not move it. A model first seen
        # through feedback starts its clock one longest window (plus lateness) before the
        # feedback time, so inferences arriving next are not judged late because of it.
        now = self.clock()
        for _, event in fresh:
            clock = part.clocks.get(event.model_id)
            if clock is None:
                t = int(event.created_at.timestamp() * 1000) - self.plan.longest_ms
                part.clocks[event.model_id] = ModelClock(t, now, now)
            else:
                clock.last_advance_wall = clock.last_event_wall = now
        part.saw_offsets("feedback", events)
        if checkpoint:
            self.checkpoint(partition)
        return out

    def checkpoint(self, partition: int) -> None:
        """Write changed join entries, then the mark (watermarks, closed windows, offsets).

        Join entries are written here, not as they change, so the caller can store the
        batch's labelled examples first: a crash before that replays the batch and joins
        again instead of finding the feedback already marked as joined.
        """
        part = self._part(partition)
        self._evict_joins(partition, part)
        self._write_segments(partition, part)
        self.store.put(partition, mark_key(partition), part.mark())
        part.dirty = False

    def _write_segments(self, partition: int, part: PartitionState) -> None:
        """Changed join entries as few records as possible (one changelog message each)."""
        for seq, record in part.joins.segments(SEGMENT_BYTES):
            self.store.put(partition, segment_key(partition, seq), record)
        self._delete_dead_segments(partition, part)

    def _delete_dead_segments(self, partition: int, part: PartitionState) -> None:
        for seq in part.joins.take_dead():
            self.store.delete(partition, segment_key(partition, seq))

    def _joined(
        self,
        partition: int,
        part: PartitionState,
        topic: str,
        pairs: list[tuple[int | None, JoinedPair]],
        out: Output,
    ) -> None:
        """Count joined ``pairs``, keep their examples, and add those not too late to panes."""
        in_time: list[tuple[int | None, JoinedPair]] = []
        for offset, pair in pairs:
            self.counters.joined += 1
            out.examples.append(pair.example_row())
            clock = part.clocks.get(pair.model_id)
            if clock is not None and self.plan.too_late(
                pair.join_time_ms, clock.watermark, clock.closed
            ):
                self.counters.late_feedback += 1
            else:
                in_time.append((offset, pair))
        touched = aggregate_feedback(
            in_time,
            self.plan.pane_ms,
            topic,
            self.negative_below,
            self.alpha,
            applied=lambda key: self._applied(partition, key, topic),
            exemplars=self.exemplars,
            segment_cap=part.segment_cap,
            redact_exemplars=self.redact_exemplars,
        )
        for key, stats in touched.items():
            self._merge_pane(partition, part, key, stats)

    # -- closing windows and expiring joins (the timer) ------------------------------------
    def tick(self, partition: int) -> Output:
        """Close due windows and expire join entries in one step (see :meth:`due_windows`)."""
        out = Output(windows=self.due_windows(partition))
        self.windows_sent(partition, out.windows)
        return out

    def due_windows(
        self, partition: int, caught_up_since: float | None = 0.0
    ) -> list[dict[str, Any]]:
        """Close the windows that are due and return every closed window's record not yet
        acknowledged by :meth:`windows_sent`, oldest end first.

        ``caught_up_since`` is the wall time since which the partition's events have all
        been read, ``None`` while they are not (see
        :meth:`~genmon.streams.windows.partition.PartitionState.advance_idle`); by default
        always, as in a replay. A closing
        window is marked closed and its record put in the outbox (``W`` keys, see
        :mod:`~genmon.streams.windows.store`) at once; the worker flushes them before it
        sends the records. So a window's record is decided once: after a crash or a
        rebalance the outbox sends it again as it was, and events that arrive once it has
        closed are counted late instead of changing it.
        """
        part = self._part(partition)
        part.advance_idle(self.clock(), self.idle_s, caught_up_since)
        closing = closable_windows(part, self.plan)
        for window in closing:
            model, kind, _, end = window
            record = self._close(partition, part, window)
            key = window_key(partition, model, kind, end)
            self.store.put(partition, key, record)
            part.outbox[key] = record
            closed = part.clocks[model].closed
            closed[kind] = max(closed.get(kind, NEVER), end)
            if kind == "tumbling":
                requests = sum(
                    series["requests"]
                    for series in record["series"]
                    if series["segment"] == ALL_SEGMENTS
                )
                part.windowed_requests += requests
                self.counters.windowed_events += requests
        self.counters.windows_closed += len(closing)
        for pane in finished_panes(part, self.plan):
            part.drop_pane(pane)
            self.store.delete(partition, pane_key(partition, pane))
        swept = self._sweep_joins(partition, part)
        self._forget_idle_models(part)
        if closing or swept or part.dirty:
            self.checkpoint(partition)
        return sorted(part.outbox.values(), key=lambda w: (w["end_ms"], w["kind"], w["model_id"]))

    def open_windows(
        self, partition: int, only: tuple[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """Records of the tumbling windows of ``partition`` not closed yet, as they stand:
        what early detection judges. Each holds the all-traffic series of each version
        (segments are judged when the window closes), without examples; built as a
        closing window's record is, but nothing is marked, stored or sent.

        By default only the windows whose traffic changed since the last call; with
        ``only`` (``(model, window end)``) that window, with its examples (for the
        evidence of a firing finding) whether or not it changed.
        """
        part = self._part(partition)
        seen = None if only else self._peeked.setdefault(partition, {})
        records = []
        for window, panes in open_windows(partition, part, self.plan, self.store, seen):
            if only and (window[0], window[3]) != only:
                continue
            exemplars = self.exemplars if only else 0
            series = window_series(
                self.store, partition, panes, self.alpha, exemplars, self.redact_exemplars
            )
            records.append(window_record(partition, window, series)[0])
        return records

    def windows_sent(self, partition: int, windows: list[dict[str, Any]]) -> None:
        """Take ``windows``, acknowledged by the broker, out of the outbox."""
        part = self._part(partition)
        for window in windows:
            key = window_key(partition, window["model_id"], window["kind"], window["end_ms"])
            if part.outbox.pop(key, None) is not None:
                self.store.delete(partition, key)

    def applied_offset(self, partition: int) -> int:
        """The highest source offset of an inference applied to ``partition`` (-1: none)."""
        return self._part(partition).offsets.get("inference", -1)

    def unaccounted(self) -> int:
        """Requests added to panes that no tumbling window holds or will hold: 0 unless
        an event entered a pane after its tumbling window closed (the exact-windows
        invariant: every accepted event is in exactly one tumbling window record, every
        other one is counted late or future; the worker exports this as a gauge)."""
        return sum(
            part.pane_requests - part.windowed_requests - self._open_requests(p, part)
            for p, part in self._parts.items()
        )

    def _open_requests(self, partition: int, part: PartitionState) -> int:
        """Requests in all-traffic panes whose tumbling window has not closed yet."""
        tumbling = self.plan.specs[0]
        total = 0
        for pane in part.panes:
            if pane.segment != ALL_SEGMENTS:
                continue
            clock = part.clocks.get(pane.model_id)
            closed = NEVER if clock is None else clock.closed.get("tumbling", NEVER)
            if tumbling.last_end_containing(pane.pane_start_ms) <= closed:
                continue
            state = self.store.get(pane_key(partition, pane))
            if isinstance(state, WindowStats):
                total += state.requests
            elif state is not None:
                total += int(state["requests"])
        return total

    def _close(self, partition: int, part: PartitionState, window: Window) -> dict[str, Any]:
        model, kind, start, end = window
        # Only the runner reads examples, and it judges tumbling windows only.
        exemplars = self.exemplars if kind == "tumbling" else 0
        panes = (p for p in part.panes if p.model_id == model and start <= p.pane_start_ms < end)
        series = window_series(
            self.store, partition, panes, self.alpha, exemplars, self.redact_exemplars
        )
        record, folded = window_record(partition, window, series)
        self.counters.segment_folded += folded
        return record

    def _sweep_joins(self, partition: int, part: PartitionState) -> int:
        watermarks = {m: c.due_wm for m, c in part.clocks.items() if c.due_wm is not None}
        expired, orphaned = part.joins.expire(watermarks)
        self.counters.orphaned += orphaned
        self._delete_dead_segments(partition, part)
        return int(expired)

    def _evict_joins(self, partition: int, part: PartitionState) -> int:
        """Evict the entries with least time left beyond ``feedback.join_max_entries``."""
        evicted, orphaned = part.joins.evict(self.join_max_entries, part.watermarks())
        self.counters.join_evicted += evicted
        self.counters.orphaned += orphaned
        self._delete_dead_segments(partition, part)
        return int(evicted)

    def _forget_idle_models(self, part: PartitionState) -> None:
        """Drop clocks of models without panes or join entries and without events for
        windows.expires_s, and rewrite the segment records still holding their dropped
        entries (the next checkpoint writes the live entries anew and deletes the records).
        """
        forgotten = idle_models(part, self.clock(), self.plan.expires_ms)
        if not forgotten:
            return
        for model in forgotten:
            del part.clocks[model]
        part.joins.forget(forgotten)
        part.dirty = True

    # -- helpers --------------------------------------------------------------------------
    def _applied(self, partition: int, key: PaneKey, topic: str) -> int:
        state = self.store.get(pane_key(partition, key))
        if state is None:
            return -1
        offsets = state.offsets if isinstance(state, WindowStats) else state.get("off", {})
        return int(offsets.get(topic, -1))

    def _merge_pane(
        self, partition: int, part: PartitionState, key: PaneKey, stats: WindowStats
    ) -> None:
        if key.segment == ALL_SEGMENTS:
            part.pane_requests += stats.requests
        skey = pane_key(partition, key)
        state = self.store.get(skey)
        if isinstance(state, WindowStats):  # live in a buffered store: merged in place
            stats = state.merge(stats)
        elif state is not None:
            stats = WindowStats.from_state(state, self.exemplars, self.redact_exemplars).merge(
                stats
            )
        elif self._buffer is not None and stats.exemplars is None and self.exemplars:
            # A new segment pane has no sample; read back from the store, it would have one
            # (and collect joined negative examples): so does the live pane.
            stats.exemplars = Exemplars(self.exemplars, self.redact_exemplars)
        self.store.put(partition, skey, stats if self._buffer is not None else stats.to_state())
        part.add_pane(key)

    def _fresh(
        self, part: PartitionState, topic: str, events: Sequence[tuple[int | None, Any]]
    ) -> list[tuple[int | None, Any]]:
        fresh = part.fresh(topic, events)
        self.counters.redelivered_skipped += len(events) - len(fresh)
        return fresh
