"""The per-partition state machine of the pipeline: aggregates, join, window closing.

Pure Python over a small key-value store interface, so it runs unchanged in unit tests
(a dict) and in the worker (a Faust table, see :mod:`genmon.streams.pipeline`).

All state of partition ``p`` lives under keys that start with ``"<p>\\x1f"`` and is
written to changelog partition ``p``:

- ``<p> P <model> <version> <segment> <pane_start>``: a pane's :class:`WindowStats`;
- ``<p> S <seq>``: a *join segment*: the join entries (:mod:`genmon.streams.join`) changed
  in one batch, keyed by ``model, request_id``. Entries live in memory; a segment record
  is deleted once none of its entries is current (superseded by a later segment or
  expired). One record per batch instead of one per event keeps the changelog traffic
  per event small (each table write is one Kafka message through Faust's producer);
- ``<p> M``: the partition's mark: per model, its watermark and the last closed window
  end per window family; the last applied source offset per topic; and per model the
  eviction floor (below).

Panes hold at most ``windows.max_segment_values`` values per model and segment attribute
(:mod:`genmon.streams.segment_cap`); the index of live values is rebuilt from the pane
keys on restore.

A partition keeps at most ``feedback.join_max_entries`` join entries. Beyond that the
entries that expire soonest (least event time left before their model's watermark
reaches ``exp``) are evicted as if they had expired. The largest evicted
``(exp, join key)`` of a model is its *eviction floor*: its entries at or below it are
dropped on restore, the way expired entries are dropped at or below the watermark, so an
evicted entry left in a segment record that still holds live entries does not come back
after a restart. A floor only rises, because every live entry of the model lies above it
(a new entry at or below it is evicted at once), and is dropped once the model's
watermark passes it, since the watermark then drops those entries anyway.

Event time is tracked per model (the Kafka key, so its events are ordered): one model's
producer running behind does not make another model's events late. A model's watermark
is the largest event time seen; when the model has been idle for
``windows.idle_timeout_s`` it advances with the wall clock, so its last windows close.
A model without events for ``windows.expires_s`` (wall clock) and without panes or live
join entries is forgotten. Its expired entries may still sit in segment records kept by
other models' live entries, and restore could no longer tell them expired, so those
records are rewritten without them first.

The mark is written *after* the batch's panes and join entries, to the same changelog
partition, so after a crash the recovered mark never claims more than the recovered
panes contain; source events at or below the marked offset are skipped on redelivery.
That makes the aggregates effectively-once per partition when the caller passes offsets.
Closed windows are emitted at least once: a crash between emitting and writing the mark
re-emits them, and consumers deduplicate on ``(model_id, kind, window_end)``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.aggregates import (
    PaneKey,
    WindowPlan,
    WindowStats,
    aggregate_inferences,
    event_time_ms,
)
from genmon.streams.exemplars import fit_window_budget
from genmon.streams.join import FeedbackJoiner, JoinedPair, join_key
from genmon.streams.quality_signals import QualitySignals
from genmon.streams.segment_cap import SegmentCap, fold_to_budget, overflow_counts

SEP = "\x1f"
#: Approximate size at which changed join entries are split into another record.
SEGMENT_BYTES = 256 * 1024


class StateStore(Protocol):
    """What the core needs from a table: reads, and writes to a given partition."""

    def get(self, key: str) -> Any | None: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def all_keys(self) -> Iterable[str]: ...


class DictStore:
    """A :class:`StateStore` in a dict, recording writes per partition (for tests)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes = 0

    def get(self, key: str) -> Any | None:
        return self.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.writes += 1
        self.data[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.writes += 1
        self.data.pop(key, None)

    def all_keys(self) -> Iterable[str]:
        return list(self.data)


@dataclass
class Counters:
    """Monotonic counters the metrics layer exports (summed over partitions)."""

    inference_events: int = 0
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


@dataclass
class _Clock:
    """Event-time progress of one model in one partition."""

    watermark: int
    last_advance_wall: float
    #: Wall time of the model's last event (idle advances do not count as activity).
    last_event_wall: float
    closed: dict[str, int] = field(default_factory=dict)
    due_wm: int | None = None

    def to_state(self) -> dict[str, Any]:
        return {"wm": self.watermark, "closed": self.closed}


@dataclass
class _Partition:
    clocks: dict[str, _Clock] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    panes: set[PaneKey] = field(default_factory=set)
    join_heaps: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    dirty: bool = False
    #: Live join entries by join key, the segment record holding each, live entries per
    #: segment, and entries changed since the last checkpoint (written as new segments).
    joins: dict[str, dict[str, Any]] = field(default_factory=dict)
    join_segment: dict[str, int] = field(default_factory=dict)
    segment_live: dict[int, int] = field(default_factory=dict)
    unwritten: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_segment: int = 0
    evicted_floors: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Models with entries (live or not) in each segment record.
    segment_models: dict[int, set[str]] = field(default_factory=dict)
    segment_cap: SegmentCap = field(kw_only=True)

    def mark(self) -> dict[str, Any]:
        return {
            "models": {m: c.to_state() for m, c in self.clocks.items()},
            "off": self.offsets,
            "evicted": {m: list(floor) for m, floor in self.evicted_floors.items()},
        }

    def watermark(self, model_id: str) -> int | None:
        clock = self.clocks.get(model_id)
        return None if clock is None else clock.watermark


class PipelineCore:
    """Aggregates, joins and closes windows for the partitions this worker owns."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        quality: QualitySignals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        w = settings.windows
        self.plan = WindowPlan(
            w.tumbling_s, w.hopping_size_s, w.hopping_step_s, w.allowed_lateness_s, w.expires_s
        )
        self.alpha = w.sketch_relative_accuracy
        self.idle_s = w.idle_timeout_s
        self.skew_ms = round(w.max_future_skew_s * 1000)
        self.joiner = FeedbackJoiner(
            round(settings.feedback.join_ttl_s * 1000), settings.feedback.join_max_text_chars
        )
        self.negative_below = settings.feedback.negative_score_below
        self.exemplars = settings.detectors.exemplars_per_window
        self.redact_exemplars = settings.detectors.redact_exemplars
        self.join_max_entries = settings.feedback.join_max_entries
        self.max_segment_values = w.max_segment_values
        self.quality = quality or QualitySignals.from_file(w.refusal_phrases_file)
        self.store = store
        self.clock = clock
        self.counters = Counters()
        self._parts: dict[int, _Partition] = {}

    # -- partition lifecycle ----------------------------------------------------------
    @property
    def partitions(self) -> list[int]:
        return sorted(self._parts)

    @property
    def pending_feedback(self) -> int:
        """Join entries holding feedback that has not met its inference yet."""
        return sum(len(part.pending) for part in self._parts.values())

    @property
    def join_entries(self) -> int:
        """Live join entries, at most ``feedback.join_max_entries`` per partition."""
        return sum(len(part.joins) for part in self._parts.values())

    def restore(self, partitions: Iterable[int]) -> None:
        """(Re)build in-memory indexes of ``partitions`` from the store (after recovery)."""
        wanted = set(partitions)
        now = self.clock()
        segments: dict[int, list[tuple[int, str]]] = {}
        for p in wanted:
            self._parts[p] = _Partition(segment_cap=SegmentCap(self.max_segment_values))
        for key in self.store.all_keys():
            p_text, _, rest = key.partition(SEP)
            if not p_text.isdigit() or int(p_text) not in wanted:
                continue
            part = self._parts[int(p_text)]
            kind = rest[:1]
            if kind == "P":
                model, version, segment, start = rest[2:].split(SEP)
                pane = PaneKey(model, version, segment, int(start))
                part.panes.add(pane)
                part.segment_cap.add_pane(pane)
            elif kind == "S":
                segments.setdefault(int(p_text), []).append((int(rest[2:]), key))
            elif kind == "M":
                mark = self.store.get(key) or {}
                part.offsets = dict(mark.get("off", {}))
                part.evicted_floors = {
                    model: (int(exp), str(jkey))
                    for model, (exp, jkey) in mark.get("evicted", {}).items()
                }
                for model, clock in mark.get("models", {}).items():
                    part.clocks[model] = _Clock(clock["wm"], now, now, dict(clock["closed"]))
        for p, found in segments.items():
            self._restore_joins(p, self._parts[p], sorted(found))
        for p in wanted:
            part = self._parts[p]
            for heap in part.join_heaps.values():
                heapq.heapify(heap)
            # A lowered feedback.join_max_entries takes effect now; the mark with the new
            # floor is written by the partition's next checkpoint.
            if self._evict_joins(p, part):
                part.dirty = True

    def _restore_joins(self, p: int, part: _Partition, segments: list[tuple[int, str]]) -> None:
        # Later segments hold newer versions of an entry; expired ones stay dropped.
        for seq, key in segments:
            entries = (self.store.get(key) or {}).get("e", {})
            part.segment_models[seq] = {jkey.split(SEP, 1)[0] for jkey in entries}
            for jkey, entry in entries.items():
                part.joins[jkey] = entry
                part.join_segment[jkey] = seq
            part.next_segment = seq + 1
        for jkey, entry in list(part.joins.items()):
            model = jkey.split(SEP, 1)[0]
            watermark = part.watermark(model)
            expired = watermark is not None and entry["exp"] <= watermark
            floor = part.evicted_floors.get(model)
            if expired or (floor is not None and (entry["exp"], jkey) <= floor):
                del part.joins[jkey], part.join_segment[jkey]
                continue
            seq = part.join_segment[jkey]
            part.segment_live[seq] = part.segment_live.get(seq, 0) + 1
            part.join_heaps.setdefault(model, []).append((entry["exp"], jkey))
            if entry["fb"]:
                part.pending.add(jkey)
        for seq, key in segments:
            if seq not in part.segment_live:
                self.store.delete(p, key)
                del part.segment_models[seq]

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop in-memory indexes of revoked partitions (their state stays in the table)."""
        for p in partitions:
            self._parts.pop(p, None)

    def _part(self, p: int) -> _Partition:
        part = self._parts.get(p)
        if part is None:
            self.restore([p])
            part = self._parts[p]
        return part

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
        newest: dict[str, int] = {}
        for offset, event in fresh:
            t = event_time_ms(event)
            if t > now_ms + self.skew_ms:
                self.counters.skew_dropped += 1
                continue
            model = event.model_id
            newest[model] = max(t, newest.get(model, t))
            watermark = part.watermark(model)
            if watermark is not None and self._too_late(t, watermark):
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
        for offset, event in fresh:
            jkey = join_key(event.model_id, event.request_id)
            entry, joined = self.joiner.on_inference(part.joins.get(jkey), event)
            self._put_join(part, event.model_id, jkey, entry)
            pairs += [(offset, pair) for pair in joined]
        # Its own offset channel: the pane's "inference" offset already covers this batch.
        self._joined(partition, part, "join:inference", pairs, out)
        self.counters.segment_overflow += part.segment_cap.end_batch()
        self._advance(part, newest)
        self._offsets(part, "inference", events)
        if checkpoint:
            self.checkpoint(partition)
        return out

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
            jkey = join_key(event.model_id, event.request_id)
            entry, joined = self.joiner.on_feedback(part.joins.get(jkey), event)
            self._put_join(part, event.model_id, jkey, entry)
            pairs += [(offset, pair) for pair in joined]
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
                part.clocks[event.model_id] = _Clock(t, now, now)
            else:
                clock.last_advance_wall = clock.last_event_wall = now
        self._offsets(part, "feedback", events)
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
        self.store.put(partition, self._mark_key(partition), part.mark())
        part.dirty = False

    def _write_segments(self, partition: int, part: _Partition) -> None:
        """Changed join entries as few records as possible (one changelog message each)."""
        chunk: dict[str, dict[str, Any]] = {}
        size = 0
        for jkey, entry in part.unwritten.items():
            chunk[jkey] = entry
            inference = entry["inf"]
            size += 256 * (1 + len(entry["fb"]))
            if inference is not None:
                size += len(inference["prompt"]) + len(inference["response"])
            if size >= SEGMENT_BYTES:
                self._write_segment(partition, part, chunk)
                chunk, size = {}, 0
        if chunk:
            self._write_segment(partition, part, chunk)
        part.unwritten = {}

    def _write_segment(self, partition: int, part: _Partition, chunk: dict[str, Any]) -> None:
        seq = part.next_segment
        part.next_segment += 1
        self.store.put(partition, self._segment_key(partition, seq), {"e": chunk})
        part.segment_live[seq] = len(chunk)
        part.segment_models[seq] = {jkey.split(SEP, 1)[0] for jkey in chunk}
        for jkey in chunk:
            old = part.join_segment.get(jkey)
            part.join_segment[jkey] = seq
            if old is not None:
                self._release(partition, part, old)

    def _release(self, partition: int, part: _Partition, seq: int) -> None:
        left = part.segment_live[seq] - 1
        if left:
            part.segment_live[seq] = left
        else:
            del part.segment_live[seq]
            del part.segment_models[seq]
            self.store.delete(partition, self._segment_key(partition, seq))

    def _joined(
        self,
        partition: int,
        part: _Partition,
        topic: str,
        pairs: list[tuple[int | None, JoinedPair]],
        out: Output,
    ) -> None:
        touched: dict[PaneKey, WindowStats] = {}
        for offset, pair in pairs:
            self.counters.joined += 1
            out.examples.append(pair.example_row())
            t = pair.join_time_ms
            watermark = part.watermark(pair.model_id)
            if watermark is not None and self._too_late(t, watermark):
                self.counters.late_feedback += 1
                continue
            pane = t - t % self.plan.pane_ms
            for segment in part.segment_cap.segments(pair.model_id, pair.segment):
                key = PaneKey(pair.model_id, pair.inference["version"], segment, pane)
                if offset is not None and offset <= self._applied(partition, key, topic):
                    continue
                stats = touched.get(key)
                if stats is None:
                    stats = touched[key] = WindowStats(
                        self.alpha, self.exemplars, self.redact_exemplars
                    )
                score = pair.feedback["score"]
                stats.add_feedback(score, self.negative_below)
                if score is not None and score < self.negative_below:
                    stats.add_negative_example(
                        pair.request_id,
                        pair.inference["prompt"],
                        pair.inference["response"],
                        pair.segment,
                        _feedback_note(pair.feedback),
                        pair.subject_id,
                    )
                stats.saw(topic, offset)
        for key, stats in touched.items():
            self._merge_pane(partition, part, key, stats)

    # -- closing windows and expiring joins (the timer) ------------------------------------
    def tick(self, partition: int) -> Output:
        """Close due windows and expire join entries in one step (see :meth:`due_windows`)."""
        out = Output(windows=self.due_windows(partition))
        self.windows_sent(partition, out.windows)
        return out

    def due_windows(self, partition: int) -> list[dict[str, Any]]:
        """Advance idle models' watermarks and build the windows that are due.

        Nothing is marked closed or deleted until :meth:`windows_sent`, so a crash while
        sending them re-emits them after restart instead of losing them.
        """
        part = self._part(partition)
        now = self.clock()
        for clock in part.clocks.values():
            if now - clock.last_advance_wall >= self.idle_s:
                clock.watermark += int((now - clock.last_advance_wall) * 1000)
                clock.last_advance_wall = now
                part.dirty = True
            clock.due_wm = clock.watermark
        due: set[tuple[str, str, int, int]] = set()
        for pane in part.panes:
            pane_clock = part.clocks.get(pane.model_id)
            if pane_clock is None:
                continue
            closed = pane_clock.closed
            for kind, start, end in self.plan.windows_of_pane(pane.pane_start_ms):
                if self.plan.closable(end, pane_clock.watermark) and end > closed.get(
                    kind, -(2**62)
                ):
                    due.add((pane.model_id, kind, start, end))
        windows: list[dict[str, Any]] = []
        for model, kind, start, end in sorted(due, key=lambda w: (w[3], w[1], w[0])):
            windows.append(self._close(partition, part, model, kind, start, end))
        return windows

    def windows_sent(self, partition: int, windows: list[dict[str, Any]]) -> None:
        """Mark ``windows`` closed, drop finished panes and expired join entries, checkpoint."""
        part = self._part(partition)
        for window in windows:
            closed = part.clocks[window["model_id"]].closed
            closed[window["kind"]] = max(closed.get(window["kind"], -(2**62)), window["end_ms"])
        self.counters.windows_closed += len(windows)
        for pane in list(part.panes):
            clock = part.clocks.get(pane.model_id)
            wm = None if clock is None else clock.due_wm
            if wm is not None and self.plan.pane_done(pane.pane_start_ms, wm):
                part.panes.discard(pane)
                part.segment_cap.drop_pane(pane)
                self.store.delete(partition, self._pane_key(partition, pane))
        swept = self._sweep_joins(partition, part)
        self._forget_idle_models(part)
        if windows or swept or part.dirty:
            self.checkpoint(partition)

    def _close(
        self, partition: int, part: _Partition, model: str, kind: str, start: int, end: int
    ) -> dict[str, Any]:
        series: dict[tuple[str, str], WindowStats] = {}
        # Only the runner reads examples, and it judges tumbling windows only.
        exemplars = self.exemplars if kind == "tumbling" else 0
        for pane in part.panes:
            if pane.model_id == model and start <= pane.pane_start_ms < end:
                state = self.store.get(self._pane_key(partition, pane))
                if state is None:
                    continue
                stats = series.get((pane.model_version, pane.segment))
                pane_stats = WindowStats.from_state(state, exemplars, self.redact_exemplars)
                if stats is None:
                    series[(pane.model_version, pane.segment)] = pane_stats
                else:
                    stats.merge(pane_stats)
        self.counters.segment_folded += fold_to_budget(series)
        return {
            "model_id": model,
            "kind": kind,
            "window_start": _iso(start),
            "window_end": _iso(end),
            "start_ms": start,
            "end_ms": end,
            "partition": partition,
            "closed_at": datetime.now(UTC).isoformat(),
            "segment_overflow": overflow_counts(series),
            "series": fit_window_budget(
                [
                    {
                        "model_version": version,
                        "segment": segment,
                        **stats.summary(),
                        **({"exemplars": stats.exemplars.records()} if stats.exemplars else {}),
                    }
                    for (version, segment), stats in sorted(series.items())
                ]
            ),
        }

    def _sweep_joins(self, partition: int, part: _Partition) -> int:
        swept = 0
        for model, heap in part.join_heaps.items():
            clock = part.clocks.get(model)
            if clock is None or clock.due_wm is None:
                continue
            wm = clock.due_wm
            while heap and heap[0][0] <= wm:
                _, key = heapq.heappop(heap)
                entry = part.joins.get(key)
                if entry is None:
                    continue
                if entry["exp"] > wm:  # refreshed since it was pushed
                    heapq.heappush(heap, (entry["exp"], key))
                    continue
                self._drop_join(partition, part, key, entry)
                swept += 1
        return swept

    def _evict_joins(self, partition: int, part: _Partition) -> int:
        """Evict the soonest-expiring entries beyond ``feedback.join_max_entries``.

        Also evicts entries at or below their model's eviction floor (a late event can
        create one), which keeps every live entry above the floor restore filters by.
        """
        evicted = 0
        floors = part.evicted_floors
        for model, heap in part.join_heaps.items():
            floor = floors.get(model)
            while heap and floor is not None and heap[0] <= floor:
                evicted += self._pop_join(partition, part, model, heap)
                floor = floors.get(model)
        if len(part.joins) > self.join_max_entries:
            # Models by how soon their next entry expires; the index keeps min()'s
            # first-in-order tie-break, so which entries go does not depend on the heap.
            soonest = [
                (self._time_left(part, model, heap), index, model)
                for index, (model, heap) in enumerate(part.join_heaps.items())
                if heap
            ]
            heapq.heapify(soonest)
            while soonest and len(part.joins) > self.join_max_entries:
                _, index, model = heapq.heappop(soonest)
                heap = part.join_heaps[model]
                evicted += self._pop_join(partition, part, model, heap)
                if heap:
                    heapq.heappush(soonest, (self._time_left(part, model, heap), index, model))
        for model, (exp, _) in list(floors.items()):
            watermark = part.watermark(model)
            if watermark is not None and exp <= watermark:
                del floors[model]
        self.counters.join_evicted += evicted
        self._compact_join_heaps(part)
        return evicted

    def _pop_join(
        self, partition: int, part: _Partition, model: str, heap: list[tuple[int, str]]
    ) -> int:
        """Pop ``model``'s soonest item and drop its entry unless stale; 1 if dropped."""
        exp, key = heapq.heappop(heap)
        entry = part.joins.get(key)
        if entry is None or entry["exp"] != exp:
            return 0  # a stale item: the entry is gone or has a newer item of its own
        self._drop_join(partition, part, key, entry)
        floors = part.evicted_floors
        floors[model] = max(floors.get(model, (exp, key)), (exp, key))
        return 1

    @staticmethod
    def _time_left(part: _Partition, model: str, heap: list[tuple[int, str]]) -> float:
        watermark = part.watermark(model)
        # Without a clock (all its inferences were too far in the future) the model's
        # entries would never expire: they go first.
        return -math.inf if watermark is None else heap[0][0] - watermark

    @staticmethod
    def _compact_join_heaps(part: _Partition) -> None:
        """Rebuild the heaps once stale items (left by refreshed entries) outnumber live ones.

        Items are only popped at the top, so without this a partition whose entries are
        refreshed often would keep growing its heaps while its entries stay capped.
        """
        items = sum(len(heap) for heap in part.join_heaps.values())
        if items <= 2 * len(part.joins) + 1024:
            return
        heaps: dict[str, list[tuple[int, str]]] = {}
        for key, entry in part.joins.items():
            heaps.setdefault(key.split(SEP, 1)[0], []).append((entry["exp"], key))
        for heap in heaps.values():
            heapq.heapify(heap)
        part.join_heaps = heaps

    def _drop_join(self, partition: int, part: _Partition, key: str, entry: dict[str, Any]) -> None:
        """Forget an expired or evicted entry; its segment record goes once none is live."""
        self.counters.orphaned += self.joiner.orphans(entry)
        part.pending.discard(key)
        del part.joins[key]
        part.unwritten.pop(key, None)
        seq = part.join_segment.pop(key, None)
        if seq is not None:
            self._release(partition, part, seq)

    def _forget_idle_models(self, part: _Partition) -> None:
        """Drop clocks of models without panes or join entries and without events for
        windows.expires_s, and rewrite the segment records still holding their dropped
        entries (the next checkpoint writes the live entries anew and deletes the records).
        """
        now = self.clock()
        busy = {pane.model_id for pane in part.panes}
        busy |= {model for model, heap in part.join_heaps.items() if heap}
        for model in [m for m in part.join_heaps if not part.join_heaps[m]]:
            del part.join_heaps[model]
        forgotten = {
            model
            for model, clock in part.clocks.items()
            if model not in busy and now - clock.last_event_wall > self.plan.expires_ms / 1000
        }
        if not forgotten:
            return
        for model in forgotten:
            del part.clocks[model]
            part.evicted_floors.pop(model, None)
        part.dirty = True
        stale = {seq for seq, models in part.segment_models.items() if models & forgotten}
        for jkey, seq in part.join_segment.items():
            if seq in stale:
                part.unwritten.setdefault(jkey, part.joins[jkey])

    # -- helpers --------------------------------------------------------------------------
    def _too_late(self, t: int, watermark: int) -> bool:
        pane = t - t % self.plan.pane_ms
        return self.plan.pane_done(pane, watermark)

    def _applied(self, partition: int, key: PaneKey, topic: str) -> int:
        state = self.store.get(self._pane_key(partition, key))
        return -1 if state is None else int(state.get("off", {}).get(topic, -1))

    def _merge_pane(
        self, partition: int, part: _Partition, key: PaneKey, stats: WindowStats
    ) -> None:
        skey = self._pane_key(partition, key)
        state = self.store.get(skey)
        if state is not None:
            stats = WindowStats.from_state(state, self.exemplars, self.redact_exemplars).merge(
                stats
            )
        self.store.put(partition, skey, stats.to_state())
        if key not in part.panes:
            part.panes.add(key)
            part.segment_cap.add_pane(key)

    @staticmethod
    def _put_join(part: _Partition, model: str, key: str, entry: dict[str, Any]) -> None:
        previous = part.joins.get(key)
        part.joins[key] = entry
        part.unwritten[key] = entry
        if previous is None or previous["exp"] != entry["exp"]:
            heapq.heappush(part.join_heaps.setdefault(model, []), (entry["exp"], key))
        if entry["fb"]:
            part.pending.add(key)
        else:
            part.pending.discard(key)

    def _fresh(
        self, part: _Partition, topic: str, events: Sequence[tuple[int | None, Any]]
    ) -> list[tuple[int | None, Any]]:
        done = part.offsets.get(topic, -1)
        fresh = [(offset, event) for offset, event in events if offset is None or offset > done]
        self.counters.redelivered_skipped += len(events) - len(fresh)
        return fresh

    @staticmethod
    def _offsets(part: _Partition, topic: str, events: Sequence[tuple[int | None, Any]]) -> None:
        offsets = [offset for offset, _ in events if offset is not None]
        if offsets:
            part.offsets[topic] = max(part.offsets.get(topic, -1), *offsets)

    def _advance(self, part: _Partition, newest: dict[str, int]) -> None:
        now = self.clock()
        for model, t in newest.items():
            clock = part.clocks.get(model)
            if clock is None:
                part.clocks[model] = _Clock(t, now, now)
            else:
                clock.watermark = max(clock.watermark, t)
                clock.last_advance_wall = clock.last_event_wall = now

    @staticmethod
    def _pane_key(partition: int, key: PaneKey) -> str:
        return SEP.join(
            (
                str(partition),
                "P",
                key.model_id,
                key.model_version,
                key.segment,
                str(key.pane_start_ms),
            )
        )

    @staticmethod
    def _segment_key(partition: int, seq: int) -> str:
        return SEP.join((str(partition), "S", f"{seq:012d}"))

    @staticmethod
    def _mark_key(partition: int) -> str:
        return f"{partition}{SEP}M"


def _feedback_note(feedback: dict[str, Any]) -> str:
    """What the user said besides the score: label and correction."""
    return "; ".join(str(part) for part in (feedback["label"], feedback["correction"]) if part)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
