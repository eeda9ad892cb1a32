"""Closing windows: which are due, which panes are done, and what a closed window's record holds.

The timer of :class:`~genmon.streams.windows.state.WindowState` closes a window once its
model's watermark passes its end plus the allowed lateness
(:meth:`~genmon.streams.windows.plan.WindowPlan.closable`): the window's statistics are the
merge of its panes' (:func:`window_series`), sent as one record (:func:`window_record`).
A pane is deleted once every window it belongs to has closed
(:meth:`~genmon.streams.windows.plan.WindowPlan.pane_done`).

Closed windows are emitted at least once: a crash between emitting and writing the mark
re-emits them, and consumers deduplicate on ``(model_id, kind, window_end)``.

A model without events for ``windows.expires_s`` (wall clock) and without panes or live
join entries is forgotten (:func:`idle_models`). Its expired entries may still sit in
segment records kept by other models' live entries, and restore could no longer tell them
expired, so those records are rewritten without them first.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from genmon.streams.windows.aggregates import ALL_SEGMENTS, PaneKey, window_sketches
from genmon.streams.windows.exemplars import fit_window_budget
from genmon.streams.windows.partition import PartitionState
from genmon.streams.windows.plan import NEVER, WindowPlan
from genmon.streams.windows.segment_cap import (
    SERIES_BUDGET_BYTES,
    fold_to_budget,
    overflow_counts,
)
from genmon.streams.windows.stats import WindowStats
from genmon.streams.windows.store import StateStore, pane_key

#: A window to close: ``(model_id, kind, start_ms, end_ms)``.
Window = tuple[str, str, int, int]


def closable_windows(part: PartitionState, plan: WindowPlan) -> list[Window]:
    """The windows of ``part`` due at its models' ``due_wm``, oldest end first.

    Also notes per model when its next window becomes closable (``part.next_close``), so
    the next call skips the scan of every pane while no watermark has reached it.
    """
    if not part.rescan and all(
        part.clocks[model].watermark < at
        for model, at in part.next_close.items()
        if model in part.clocks
    ):
        return []
    due: set[Window] = set()
    next_close: dict[str, int] = {}
    lateness = plan.lateness_ms
    # Every series of a model shares its pane starts: look at each start once.
    for model, pane_start in {(pane.model_id, pane.pane_start_ms) for pane in part.panes}:
        pane_clock = part.clocks.get(model)
        if pane_clock is None:
            continue
        closed = pane_clock.closed
        for kind, start, end in plan.windows_of_pane(pane_start):
            if end <= closed.get(kind, -(2**62)):
                continue
            if plan.closable(end, pane_clock.watermark):
                due.add((model, kind, start, end))
            else:
                at = next_close.get(model)
                next_close[model] = end + lateness if at is None else min(at, end + lateness)
    part.next_close, part.rescan = next_close, bool(due)
    return sorted(due, key=lambda w: (w[3], w[1], w[0]))


def finished_panes(part: PartitionState, plan: WindowPlan) -> list[PaneKey]:
    """The panes of ``part`` whose windows have all closed at their model's ``due_wm``."""
    done: dict[tuple[str, int], bool] = {}
    finished_ones: list[PaneKey] = []
    for pane in list(part.panes):
        start = (pane.model_id, pane.pane_start_ms)
        finished = done.get(start)
        if finished is None:
            clock = part.clocks.get(pane.model_id)
            wm = None if clock is None else clock.due_wm
            finished = done[start] = wm is not None and plan.pane_done(start[1], wm)
        if finished:
            finished_ones.append(pane)
    return finished_ones


def idle_models(part: PartitionState, now: float, expires_ms: int) -> set[str]:
    """Models of ``part`` without panes or join entries and without events for
    ``expires_ms`` of wall time: their clocks can go."""
    busy = {pane.model_id for pane in part.panes} | part.joins.models()
    return {
        model
        for model, clock in part.clocks.items()
        if model not in busy and now - clock.last_event_wall > expires_ms / 1000
    }


def open_windows(
    partition: int,
    part: PartitionState,
    plan: WindowPlan,
    store: StateStore,
    seen: dict[tuple[str, int], int] | None,
) -> list[tuple[Window, list[PaneKey]]]:
    """The tumbling windows of ``part`` not closed yet, with their all-traffic panes: what
    early detection judges as it stands
    (:meth:`~genmon.streams.detection.runner.DetectorRunner.peek`).

    With ``seen`` (``(model, window end)`` -> the requests and feedback of the window when
    it was last listed), only the windows whose traffic changed since, and ``seen`` is
    updated and pruned of the windows that closed, so it holds at most the open ones.
    """
    tumbling = plan.specs[0]
    panes: dict[Window, list[PaneKey]] = {}
    for pane in part.panes:
        if pane.segment != ALL_SEGMENTS:
            continue
        clock = part.clocks.get(pane.model_id)
        closed = NEVER if clock is None else clock.closed.get(tumbling.kind, NEVER)
        for start, end in tumbling.windows_containing(pane.pane_start_ms):
            if end > closed:
                panes.setdefault((pane.model_id, tumbling.kind, start, end), []).append(pane)
    ordered = sorted(panes.items(), key=lambda item: (item[0][3], item[0][0]))
    if seen is None:
        return ordered
    changed = []
    for window, window_panes in ordered:
        traffic = sum(_traffic(store, partition, pane) for pane in window_panes)
        at = (window[0], window[3])
        if traffic != seen.get(at):
            seen[at] = traffic
            changed.append((window, window_panes))
    size = tumbling.size_ms
    for at in [at for at in seen if (at[0], tumbling.kind, at[1] - size, at[1]) not in panes]:
        del seen[at]
    return changed


def _traffic(store: StateStore, partition: int, pane: PaneKey) -> int:
    """Requests and feedback counted in a pane (what a new judgement could differ by)."""
    state = store.get(pane_key(partition, pane))
    if state is None:
        return 0
    if isinstance(state, WindowStats):
        return state.requests + state.feedback
    return int(state["requests"]) + int(state["feedback"][0])


def window_series(
    store: StateStore,
    partition: int,
    panes: Iterable[PaneKey],
    alpha: float,
    exemplars: int,
    redact_exemplars: bool,
) -> dict[tuple[str, str], WindowStats]:
    """A window's statistics per ``(version, segment)``: the merge of its ``panes``
    (those of one model within the window), read from ``store``.

    Keeps up to ``exemplars`` examples per signal, redacted with ``redact_exemplars``.
    """
    series: dict[tuple[str, str], WindowStats] = {}
    for pane in panes:
        state = store.get(pane_key(partition, pane))
        if state is None:
            continue
        if isinstance(state, WindowStats):  # a live pane: copied by merging
            pane_stats = WindowStats(alpha, exemplars, redact_exemplars)
            pane_stats.merge(state)
        else:
            pane_stats = WindowStats.from_state(state, exemplars, redact_exemplars)
        stats = series.get((pane.model_version, pane.segment))
        if stats is None:
            series[(pane.model_version, pane.segment)] = pane_stats
        else:
            stats.merge(pane_stats)
    return series


def window_record(
    partition: int,
    window: Window,
    series: dict[tuple[str, str], WindowStats],
) -> tuple[dict[str, Any], int]:
    """The record of a closed ``window`` with statistics ``series`` (see
    :func:`window_series`), and how many segment values it folded into overflow to fit
    the record's budget."""
    model, kind, start, end = window
    # The runner compares tumbling windows' latency distributions with a baseline, so
    # their "*" series carry the raw sketches, whose bytes the segment series give up.
    sketches, sketch_bytes = window_sketches(series) if kind == "tumbling" else ({}, 0)
    folded = fold_to_budget(series, SERIES_BUDGET_BYTES - sketch_bytes)
    record = {
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
    return record, folded


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
