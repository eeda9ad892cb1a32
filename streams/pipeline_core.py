"""The per-partition state machine of the pipeline: aggregates, join, window closing.

Pure Python over a small key-value store interface, so it runs unchanged in unit tests
(a dict) and in the worker (a Faust table, see :mod:`genmon.streams.pipeline`).

All state of partition ``p`` lives under keys that start with ``"<p>\\x1f"`` and is
written to changelog partition ``p``:

- ``<p> P <model> <version> <segment> <pane_start>``: a pane's :class:`WindowStats`;
- ``<p> S <seq>``: a *join segment*: the join entries (:mod:`genmon.streams.join`) changed
  in one batch, keyed by ``model, request_id`` (a dict, or its JSON as bytes from the
  native join table). Entries live in memory; a segment record
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
producer running behind does not make another model's events late. An inference's event
time is when it completed (``started_at`` plus its latency,
:func:`~genmon.streams.aggregates.event_time_ms`), the order services log calls in. A
model's watermark is the largest event time seen; when the model has been idle for
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

A *buffered* core (the worker's) holds these writes in a :class:`BufferedStore` and
writes them on :meth:`PipelineCore.flush`, which the worker calls before each offset
commit: one write per changed key per flush instead of per batch, and panes stay live
:class:`WindowStats` between batches, serialised by the flush. The flush writes the
partition's records, then its deletes, then its mark, so the argument above holds for
all the batches since the last flush as for one batch: a crash loses them whole, or
part-way leaves the old mark, and redelivery from the last commit replays them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Protocol

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.aggregates import (
    ALL_SEGMENTS,
    PaneKey,
    WindowPlan,
    WindowStats,
    aggregate_inferences,
    event_time_ms,
    window_sketches,
)
from genmon.streams.exemplars import Exemplars, fit_window_budget
from genmon.streams.join import (
    JoinedPair,
    JoinTable,
    feedback_record,
    inference_record,
    record_entries,
)
from genmon.streams.quality_signals import QualitySignals
from genmon.streams.segment_cap import (
    SERIES_BUDGET_BYTES,
    SegmentCap,
    fold_to_budget,
    overflow_counts,
)

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


class _Deleted:
    """What a held delete holds (``None`` is a value a store may hold)."""


_DELETED = _Deleted()


class BufferedStore:
    """A :class:`StateStore` that holds each partition's writes in memory until :meth:`flush`.

    Reads see the held writes. A value with a ``to_state()`` (a pane's :class:`WindowStats`)
    stays that object, also after a flush, until its key is deleted or its partition
    dropped: only the flush after a put of it serialises it.

    :meth:`flush` writes a partition's puts, then its deletes, then its mark
    (``mark_key(partition)``). A crash part-way leaves the old mark over newer records,
    as a crash within a batch does; deletes come after the puts so that a join segment
    record is never gone before the record superseding its entries is written.
    """

    def __init__(self, inner: StateStore, mark_key: Callable[[int], str]) -> None:
        self.inner = inner
        self.mark_key = mark_key
        self._held: dict[str, tuple[int, Any]] = {}
        self._live: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        held = self._held.get(key)
        if held is not None:
            return None if held[1] is _DELETED else held[1]
        live = self._live.get(key)
        return live if live is not None else self.inner.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self._held[key] = (partition, value)
        if hasattr(value, "to_state"):
            self._live[key] = value
        else:
            self._live.pop(key, None)

    def delete(self, partition: int, key: str) -> None:
        self._held[key] = (partition, _DELETED)
        self._live.pop(key, None)

    def all_keys(self) -> Iterable[str]:
        keys = dict.fromkeys(self.inner.all_keys())
        for key, (_, value) in self._held.items():
            if value is _DELETED:
                keys.pop(key, None)
            else:
                keys[key] = None
        return list(keys)

    def flush(self) -> None:
        """Write the held writes to the inner store, each partition's mark last."""
        by_partition: dict[int, list[tuple[str, Any]]] = {}
        for key, (partition, value) in self._held.items():
            by_partition.setdefault(partition, []).append((key, value))
        self._held = {}
        inner = self.inner
        for partition, writes in by_partition.items():
            mark = self.mark_key(partition)
            last = [(key, value) for key, value in writes if key == mark]
            deletes = [key for key, value in writes if value is _DELETED and key != mark]
            for key, value in writes:
                if value is not _DELETED and key != mark:
                    inner.put(partition, key, _serialised(value))
            for key in deletes:
                # A record put and deleted between two flushes never reached the store.
                if inner.get(key) is not None:
                    inner.delete(partition, key)
            for key, value in last:
                if value is _DELETED:
                    inner.delete(partition, key)
                else:
                    inner.put(partition, key, value)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the held writes and live objects of ``partitions`` (unflushed: lost)."""
        dropped = set(partitions)
        prefixes = tuple(f"{p}{SEP}" for p in dropped)
        self._held = {k: held for k, held in self._held.items() if held[0] not in dropped}
        self._live = {k: live for k, live in self._live.items() if not k.startswith(prefixes)}


def _serialised(value: Any) -> Any:
    return value.to_state() if hasattr(value, "to_state") else value


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
        return {"wm": self.watermark, "closed": dict(self.closed)}


@dataclass
class _Partition:
    clocks: dict[str, _Clock] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    panes: set[PaneKey] = field(default_factory=set)
    dirty: bool = False
    segment_cap: SegmentCap = field(kw_only=True)
    #: A :class:`~genmon.streams.join.JoinTable` (or the native one).
    joins: Any = field(kw_only=True)
    #: Highest inference offset a restored pane holds (it can be above the mark after a
    #: crash between writing panes and the mark; the native path defers to the Python one
    #: for events up to it).
    panes_ahead_until: int = -1
    #: Per model, the earliest watermark at which one of its windows becomes closable, as
    #: of the last scan; valid until a pane is added or a window closes (``rescan``). Lets
    #: the closing timer skip the scan of every pane when nothing can be due.
    next_close: dict[str, int] = field(default_factory=dict)
    rescan: bool = True

    def mark(self) -> dict[str, Any]:
        return {
            "models": {m: c.to_state() for m, c in self.clocks.items()},
            # Copies: a store may serialise the mark after the next batch has moved on.
            "off": dict(self.offsets),
            "evicted": {m: list(floor) for m, floor in self.joins.floors.items()},
        }

    def watermark(self, model_id: str) -> int | None:
        clock = self.clocks.get(model_id)
        return None if clock is None else clock.watermark

    def watermarks(self) -> dict[str, int]:
        return {model: clock.watermark for model, clock in self.clocks.items()}


class PipelineCore:
    """Aggregates, joins and closes windows for the partitions this worker owns.

    Writes go through to ``store`` unless ``buffered``: then they are held in a
    :class:`BufferedStore` over it, panes as live :class:`WindowStats`, until :meth:`flush`.
    Join entries live in the native join table when the module is built, unless
    ``native_joins`` is false (see :mod:`genmon.streams.join`).
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
        self._buffer = BufferedStore(store, self._mark_key) if buffered else None
        self.store: StateStore = self._buffer or store
        self.clock = clock
        #: Window geometry for the native path's lateness test.
        self._native_plan = SimpleNamespace(
            pane_ms=self.plan.pane_ms,
            specs=[(spec.size_ms, spec.step_ms) for spec in self.plan.specs],
            lateness_ms=self.plan.lateness_ms,
            expires_ms=self.plan.expires_ms,
        )
        self.counters = Counters()
        self._parts: dict[int, _Partition] = {}

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
        wanted = set(partitions)
        now = self.clock()
        segments: dict[int, list[tuple[int, str]]] = {p: [] for p in wanted}
        floors: dict[int, dict[str, tuple[int, str]]] = {p: {} for p in wanted}
        for p in wanted:
            self._parts[p] = _Partition(
                segment_cap=SegmentCap(self.max_segment_values), joins=self._join_table()
            )
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
                part.rescan = True
                part.segment_cap.add_pane(pane)
                applied = self._applied(int(p_text), pane, "inference")
                part.panes_ahead_until = max(part.panes_ahead_until, applied)
            elif kind == "S":
                segments[int(p_text)].append((int(rest[2:]), key))
            elif kind == "M":
                mark = self.store.get(key) or {}
                part.offsets = dict(mark.get("off", {}))
                floors[int(p_text)] = {
                    model: (int(exp), str(jkey))
                    for model, (exp, jkey) in mark.get("evicted", {}).items()
                }
                for model, clock in mark.get("models", {}).items():
                    part.clocks[model] = _Clock(clock["wm"], now, now, dict(clock["closed"]))
        for p in wanted:
            part = self._parts[p]
            records = [(seq, record_entries(self.store.get(key))) for seq, key in segments[p]]
            part.joins.restore(records, part.watermarks(), floors[p])
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
        if self._buffer is not None:
            self._buffer.drop(dropped)

    def flush(self) -> None:
        """Write a buffered core's held state to its store (each partition's mark last)."""
        if self._buffer is not None:
            self._buffer.flush()

    def _part(self, p: int) -> _Partition:
        part = self._parts.get(p)
        if part is None:
            self.restore([p])
            part = self._parts[p]
        return part

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
        cut = self.join_max_text_chars
        for offset, event in fresh:
            record = inference_record(event, cut)
            joined = part.joins.add_inference(event.model_id, event.request_id, record)
            pairs += [(offset, JoinedPair(*pair)) for pair in joined]
        self._offsets(part, "inference", events)
        self._end_inference_batch(partition, part, pairs, out, newest, checkpoint)
        return out

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
        result = batch.aggregate(
            partition,
            done,
            int(self.clock() * 1000),
            self.skew_ms,
            part.watermarks(),
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
        part: _Partition,
        pairs: list[tuple[int | None, JoinedPair]],
        out: Output,
        newest: dict[str, int],
        checkpoint: bool,
    ) -> None:
        """What ends an inference batch on either path, after its offsets are recorded."""
        # Its own offset channel: the pane's "inference" offset already covers this batch.
        self._joined(partition, part, "join:inference", pairs, out)
        self.counters.segment_overflow += part.segment_cap.end_batch()
        self._advance(part, newest)
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
        for seq, record in part.joins.segments(SEGMENT_BYTES):
            self.store.put(partition, self._segment_key(partition, seq), record)
        self._delete_dead_segments(partition, part)

    def _delete_dead_segments(self, partition: int, part: _Partition) -> None:
        for seq in part.joins.take_dead():
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
        if not part.rescan and all(
            part.clocks[model].watermark < at
            for model, at in part.next_close.items()
            if model in part.clocks
        ):
            return []
        due: set[tuple[str, str, int, int]] = set()
        next_close: dict[str, int] = {}
        lateness = self.plan.lateness_ms
        # Every series of a model shares its pane starts: look at each start once.
        for model, pane_start in {(pane.model_id, pane.pane_start_ms) for pane in part.panes}:
            pane_clock = part.clocks.get(model)
            if pane_clock is None:
                continue
            closed = pane_clock.closed
            for kind, start, end in self.plan.windows_of_pane(pane_start):
                if end <= closed.get(kind, -(2**62)):
                    continue
                if self.plan.closable(end, pane_clock.watermark):
                    due.add((model, kind, start, end))
                else:
                    at = next_close.get(model)
                    next_close[model] = end + lateness if at is None else min(at, end + lateness)
        part.next_close, part.rescan = next_close, bool(due)
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
        done: dict[tuple[str, int], bool] = {}
        for pane in list(part.panes):
            start = (pane.model_id, pane.pane_start_ms)
            finished = done.get(start)
            if finished is None:
                clock = part.clocks.get(pane.model_id)
                wm = None if clock is None else clock.due_wm
                finished = done[start] = wm is not None and self.plan.pane_done(start[1], wm)
            if finished:
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
                if isinstance(state, WindowStats):  # a live pane: copied by merging
                    pane_stats = WindowStats(self.alpha, exemplars, self.redact_exemplars)
                    pane_stats.merge(state)
                else:
                    pane_stats = WindowStats.from_state(state, exemplars, self.redact_exemplars)
                stats = series.get((pane.model_version, pane.segment))
                if stats is None:
                    series[(pane.model_version, pane.segment)] = pane_stats
                else:
                    stats.merge(pane_stats)
        # The runner compares tumbling windows' latency distributions with a baseline, so
        # their "*" series carry the raw sketches, whose bytes the segment series give up.
        sketches, sketch_bytes = window_sketches(series) if kind == "tumbling" else ({}, 0)
        self.counters.segment_folded += fold_to_budget(series, SERIES_BUDGET_BYTES - sketch_bytes)
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
                        **(
                            {"sketches": sketches[version]}
                            if segment == ALL_SEGMENTS and version in sketches
                            else {}
                        ),
                    }
                    for (version, segment), stats in sorted(series.items())
                ]
            ),
        }

    def _sweep_joins(self, partition: int, part: _Partition) -> int:
        watermarks = {m: c.due_wm for m, c in part.clocks.items() if c.due_wm is not None}
        expired, orphaned = part.joins.expire(watermarks)
        self.counters.orphaned += orphaned
        self._delete_dead_segments(partition, part)
        return int(expired)

    def _evict_joins(self, partition: int, part: _Partition) -> int:
        """Evict the entries with least time left beyond ``feedback.join_max_entries``."""
        evicted, orphaned = part.joins.evict(self.join_max_entries, part.watermarks())
        self.counters.join_evicted += evicted
        self.counters.orphaned += orphaned
        self._delete_dead_segments(partition, part)
        return int(evicted)

    def _forget_idle_models(self, part: _Partition) -> None:
        """Drop clocks of models without panes or join entries and without events for
        windows.expires_s, and rewrite the segment records still holding their dropped
        entries (the next checkpoint writes the live entries anew and deletes the records).
        """
        now = self.clock()
        busy = {pane.model_id for pane in part.panes} | part.joins.models()
        forgotten = {
            model
            for model, clock in part.clocks.items()
            if model not in busy and now - clock.last_event_wall > self.plan.expires_ms / 1000
        }
        if not forgotten:
            return
        for model in forgotten:
            del part.clocks[model]
        part.joins.forget(forgotten)
        part.dirty = True

    # -- helpers --------------------------------------------------------------------------
    def _too_late(self, t: int, watermark: int) -> bool:
        pane = t - t % self.plan.pane_ms
        return self.plan.pane_done(pane, watermark)

    def _applied(self, partition: int, key: PaneKey, topic: str) -> int:
        state = self.store.get(self._pane_key(partition, key))
        if state is None:
            return -1
        offsets = state.offsets if isinstance(state, WindowStats) else state.get("off", {})
        return int(offsets.get(topic, -1))

    def _merge_pane(
        self, partition: int, part: _Partition, key: PaneKey, stats: WindowStats
    ) -> None:
        skey = self._pane_key(partition, key)
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
        if key not in part.panes:
            part.panes.add(key)
            part.rescan = True
            part.segment_cap.add_pane(key)

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
