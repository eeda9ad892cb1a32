"""What the window state keeps in memory per partition: model clocks, offsets, the pane index.

The store (:mod:`genmon.streams.windows.store`) holds the panes and join segments; a
:class:`PartitionState` indexes them (which panes exist, the join table of live entries)
and holds what the partition's *mark* records, so it can be rebuilt from the store's
records after a restart (:func:`restore_partitions`).

Event time is tracked per model (the Kafka key, so its events are ordered): one model's
producer running behind does not make another model's events late. An inference's event
time is when it completed (``started_at`` plus its latency,
:func:`~genmon.streams.windows.aggregates.event_time_ms`), the order services log calls in. A
model's watermark is the largest event time seen; when the model has been idle for
``windows.idle_timeout_s`` it advances with the wall clock, so its last windows close;
idle only counts while the worker has read all the broker holds for the partition.

A partition keeps at most ``feedback.join_max_entries`` join entries. Beyond that the
entries that expire soonest (least event time left before their model's watermark
reaches ``exp``) are evicted as if they had expired. The largest evicted
``(exp, join key)`` of a model is its *eviction floor*, kept in the mark: its entries at or
below it are dropped on restore, the way expired entries are dropped at or below the
watermark, so an evicted entry left in a segment record that still holds live entries does
not come back after a restart. A floor only rises, because every live entry of the model
lies above it (a new entry at or below it is evicted at once), and is dropped once the
model's watermark passes it, since the watermark then drops those entries anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genmon.streams.windows.aggregates import PaneKey
from genmon.streams.windows.join import record_entries
from genmon.streams.windows.segment_cap import SegmentCap
from genmon.streams.windows.store import SEP, StateStore


@dataclass
class ModelClock:
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
class PartitionState:
    """One partition's clocks, applied offsets, pane index and join table."""

    clocks: dict[str, ModelClock] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    panes: set[PaneKey] = field(default_factory=set)
    dirty: bool = False
    segment_cap: SegmentCap = field(kw_only=True)
    #: A :class:`~genmon.streams.windows.join.JoinTable` (or the native one).
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
    #: Requests added to all-traffic panes since this state was built (restored open
    #: windows' requests included), and those sent in closed tumbling windows: the
    #: exact-windows invariant (:meth:`~genmon.streams.windows.state.WindowState.unaccounted`).
    pane_requests: int = 0
    windowed_requests: int = 0
    #: Closed windows' records not yet acknowledged by the broker, by store key.
    outbox: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mark(self) -> dict[str, Any]:
        return {
            "models": {m: c.to_state() for m, c in self.clocks.items()},
            # Copies: a store may serialise the mark after the next batch has moved on.
            "off": dict(self.offsets),
            "evicted": {m: list(floor) for m, floor in self.joins.floors.items()},
        }

    def load_mark(self, mark: Mapping[str, Any], now: float) -> dict[str, tuple[int, str]]:
        """Take offsets and clocks from a stored :meth:`mark`; return its eviction floors,
        which the join table's restore needs together with the segment records."""
        self.offsets = dict(mark.get("off", {}))
        for model, clock in mark.get("models", {}).items():
            self.clocks[model] = ModelClock(clock["wm"], now, now, dict(clock["closed"]))
        return {
            model: (int(exp), str(jkey)) for model, (exp, jkey) in mark.get("evicted", {}).items()
        }

    def watermark(self, model_id: str) -> int | None:
        clock = self.clocks.get(model_id)
        return None if clock is None else clock.watermark

    def watermarks(self) -> dict[str, int]:
        return {model: clock.watermark for model, clock in self.clocks.items()}

    def fresh(
        self, topic: str, events: Sequence[tuple[int | None, Any]]
    ) -> list[tuple[int | None, Any]]:
        """``events`` (``(source offset or None, event)``) after the last applied ``topic``
        offset: the others are redelivered."""
        done = self.offsets.get(topic, -1)
        return [(offset, event) for offset, event in events if offset is None or offset > done]

    def saw_offsets(self, topic: str, events: Sequence[tuple[int | None, Any]]) -> None:
        """Note the highest ``topic`` offset of ``events`` as applied."""
        offsets = [offset for offset, _ in events if offset is not None]
        if offsets:
            self.offsets[topic] = max(self.offsets.get(topic, -1), *offsets)

    def close_outboxed(self) -> None:
        """Count the windows in the outbox as closed, even where a crash during a flush
        wrote a record but not the mark after it: a window is never closed twice."""
        for record in self.outbox.values():
            clock = self.clocks.get(record.get("model_id", ""))
            kind, end = record.get("kind"), record.get("end_ms")
            if clock is not None and isinstance(kind, str) and isinstance(end, int):
                clock.closed[kind] = max(clock.closed.get(kind, end), end)

    def add_pane(self, pane: PaneKey) -> None:
        """Index a pane written to the store (a new pane may make a window due later)."""
        if pane not in self.panes:
            self.panes.add(pane)
            self.rescan = True
            self.segment_cap.add_pane(pane)

    def drop_pane(self, pane: PaneKey) -> None:
        self.panes.discard(pane)
        self.segment_cap.drop_pane(pane)

    def advance(self, newest: dict[str, int], now: float) -> None:
        """Move each model's watermark to its newest event time (it never goes back)."""
        for model, t in newest.items():
            clock = self.clocks.get(model)
            if clock is None:
                self.clocks[model] = ModelClock(t, now, now)
            else:
                clock.watermark = max(clock.watermark, t)
                clock.last_advance_wall = clock.last_event_wall = now

    def advance_idle(self, now: float, idle_s: float, caught_up_since: float | None) -> None:
        """Advance the watermarks of models idle for ``idle_s`` with the wall clock, and
        take each model's watermark as the one its windows are closed at (``due_wm``).

        Idle means no events because there are none to read: the idle clock only runs
        since ``caught_up_since``, the wall time from which the worker has seen itself
        caught up with a broker that answers (``None``: not caught up now; then the clock
        stands still). Otherwise an outage, a freeze or a backlog would close windows by
        the wall clock before their events arrive.
        """
        for clock in self.clocks.values():
            if caught_up_since is None:
                clock.last_advance_wall = max(clock.last_advance_wall, now)
            else:
                since = max(clock.last_advance_wall, caught_up_since)
                if now - since >= idle_s:
                    clock.watermark += int((now - since) * 1000)
                    clock.last_advance_wall = now
                    self.dirty = True
            clock.due_wm = clock.watermark


def restore_partitions(
    store: StateStore,
    wanted: set[int],
    new: Callable[[], PartitionState],
    now: float,
    applied: Callable[[int, PaneKey, str], int],
) -> dict[int, PartitionState]:
    """Rebuild the state of the ``wanted`` partitions from their records in ``store``.

    ``new()`` makes an empty partition state, ``now`` is the wall time its clocks start
    from, and ``applied(partition, pane, topic)`` is the highest ``topic`` offset a stored
    pane holds. The join tables take the segment records' entries that are neither expired
    nor evicted; deleting dead records is left to the caller, which owns the writes.
    """
    parts = {p: new() for p in wanted}
    segments: dict[int, list[tuple[int, str]]] = {p: [] for p in wanted}
    floors: dict[int, dict[str, tuple[int, str]]] = {p: {} for p in wanted}
    for key in store.all_keys():
        p_text, _, rest = key.partition(SEP)
        if not p_text.isdigit() or int(p_text) not in wanted:
            continue
        part = parts[int(p_text)]
        kind = rest[:1]
        if kind == "P":
            model, version, segment, start = rest[2:].split(SEP)
            pane = PaneKey(model, version, segment, int(start))
            part.add_pane(pane)
            ahead = applied(int(p_text), pane, "inference")
            part.panes_ahead_until = max(part.panes_ahead_until, ahead)
        elif kind == "S":
            segments[int(p_text)].append((int(rest[2:]), key))
        elif kind == "M":
            floors[int(p_text)] = part.load_mark(store.get(key) or {}, now)
        elif kind == "W":
            part.outbox[key] = store.get(key) or {}
    for p, part in parts.items():
        part.close_outboxed()
        records = [(seq, record_entries(store.get(key))) for seq, key in segments[p]]
        part.joins.restore(records, part.watermarks(), floors[p])
    return parts
