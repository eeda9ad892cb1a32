"""Windowed aggregates of inference traffic: series, panes and the batch aggregation.

A *series* is one ``(model_id, model_version, segment)``; ``segment`` is ``"*"`` (all
traffic of that version) or one ``key=value`` segment attribute, so an event with two
attributes feeds three series. A batch adds each event to the pane
(:mod:`genmon.streams.windows.plan`) of every series it counts in, as one
:class:`~genmon.streams.windows.stats.WindowStats` per touched :class:`PaneKey`
(:func:`aggregate_inferences`); pure data structures, no Faust.

>>> from genmon.schemas.events import InferenceEvent
>>> from genmon.streams.windows.quality_signals import QualitySignals
>>> e = InferenceEvent(model_id="chat", latency_ms=100.0, segment={"locale": "fr"},
...                    response="Bonjour, le chat est là.")
>>> acc = aggregate_inferences([(None, e)], pane_ms=60_000, quality=QualitySignals.default())
>>> sorted(key.segment for key in acc)
['*', 'locale=fr']
>>> next(iter(acc.values())).summary()["requests"]
1
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from genmon.detectors.sketch import DEFAULT_RELATIVE_ACCURACY
from genmon.schemas.events import InferenceEvent
from genmon.streams.windows.quality_signals import QualitySignals
from genmon.streams.windows.stats import WindowStats

if TYPE_CHECKING:
    from genmon.streams.windows.join import JoinedPair
    from genmon.streams.windows.segment_cap import SegmentCap

ALL_SEGMENTS = "*"
#: Most bytes (as JSON) the raw sketches of one closed window record may take (see
#: :func:`window_sketches`); they come out of the series budget
#: (:data:`genmon.streams.windows.segment_cap.SERIES_BUDGET_BYTES`), so the record's bound holds.
SKETCH_BUDGET_BYTES = 64 * 1024


class SeriesKey(NamedTuple):
    model_id: str
    model_version: str
    segment: str


class PaneKey(NamedTuple):
    model_id: str
    model_version: str
    segment: str
    pane_start_ms: int


def segments_of(attributes: dict[str, str]) -> list[str]:
    """``["*", "k1=v1", ...]``: the segment series one event belongs to."""
    return [ALL_SEGMENTS, *(f"{k}={v}" for k, v in sorted(attributes.items()))]


def event_time_ms(event: InferenceEvent) -> int:
    """When an inference counts: when it completed, ``started_at`` plus its latency.

    LLM calls take seconds to minutes and services log them when they finish, so windows
    by start time would miss every call slower than the allowed lateness (the slow ones a
    latency detector must see); by completion they arrive in order, as metrics do.
    Integer milliseconds on both paths (the native decoder adds the same truncated latency).
    """
    return int(event.started_at.timestamp() * 1000) + int(event.latency_ms)


def aggregate_inferences(
    events: Iterable[tuple[int | None, InferenceEvent]],
    pane_ms: int,
    quality: QualitySignals,
    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
    applied: Callable[[PaneKey], int] | None = None,
    exemplars: int = 0,
    segment_cap: SegmentCap | None = None,
    redact_exemplars: bool = True,
) -> dict[PaneKey, WindowStats]:
    """Aggregate a whole batch in memory: one :class:`WindowStats` per touched pane key.

    ``events`` are ``(source offset or None, event)``; ``applied(key)`` is the highest
    inference offset the stored pane already holds, so redelivered events are not counted
    twice in it. Up to ``exemplars`` flagged examples per signal are kept in the ``"*"``
    series (the quality detectors judge whole versions), their texts redacted with
    ``redact_exemplars``. With a ``segment_cap`` its
    refused attribute values count in their attribute's overflow series.
    """
    # Each event is added once, to the group of events sharing its model, version, pane and
    # the segment series it still counts in; each series' pane is then the merge of its
    # groups (a few dozen merges per batch instead of one add per event and series).
    # Groups are keyed by the attributes themselves (not only the segments they count in),
    # as the native path (genmon.streams.native) groups, so both add the same floats in the
    # same order.
    groups: dict[_GroupKey, WindowStats] = {}
    done_by_group: dict[_GroupKey, tuple[int, ...]] = {}
    segment_cache: dict[tuple[tuple[str, str], ...], tuple[str, ...]] = {}
    for offset, event in events:
        t = event_time_ms(event)
        pane = t - t % pane_ms
        model, version = event.model_id, event.model_version
        attributes = tuple(sorted(event.segment.items()))
        if segment_cap is not None:
            segments = segment_cap.segments(model, event.segment)
        else:
            segments = segment_cache.get(attributes)
            if segments is None:
                segments = segment_cache[attributes] = tuple(segments_of(event.segment))
        group_key = (model, version, pane, attributes, segments)
        if offset is not None and applied is not None:
            done = done_by_group.get(group_key)
            if done is None:
                done = done_by_group[group_key] = tuple(
                    applied(PaneKey(model, version, segment, pane)) for segment in segments
                )
            if offset <= max(done):
                kept = tuple(s for s, d in zip(segments, done, strict=True) if offset > d)
                if not kept:
                    continue
                group_key = (model, version, pane, attributes, kept)
        stats = groups.get(group_key)
        if stats is None:
            stats = groups[group_key] = WindowStats(relative_accuracy, exemplars, redact_exemplars)
        sig = quality.of(event)
        stats.add_inference(
            event, sig.empty, sig.truncated, sig.refusal, sig.response_chars, sig.language
        )
        stats.saw("inference", offset)
    out: dict[PaneKey, WindowStats] = {}
    for (model, version, pane, _, segments), stats in groups.items():
        merge_group(out, model, version, pane, segments, stats, exemplars, redact_exemplars)
    return out


def merge_group(
    out: dict[PaneKey, WindowStats],
    model: str,
    version: str,
    pane: int,
    segments: Iterable[str],
    stats: WindowStats,
    exemplars: int,
    redact_exemplars: bool,
) -> None:
    """Merge one group's statistics into the pane of each segment series it counts in.

    Examples are kept in the ``"*"`` series only (the quality detectors judge versions).
    """
    for segment in segments:
        key = PaneKey(model, version, segment, pane)
        into = out.get(key)
        if into is None and segment == ALL_SEGMENTS:
            # The group's own statistics become the pane's (it keeps examples as "*" does):
            # one merge less per group. The caller never reads the group again.
            out[key] = stats
            continue
        if into is None:
            into = out[key] = WindowStats(stats.latency.relative_accuracy, 0, redact_exemplars)
        into.merge(stats)


_GroupKey = tuple[str, str, int, tuple[tuple[str, str], ...], tuple[str, ...]]


def aggregate_feedback(
    pairs: Iterable[tuple[int | None, JoinedPair]],
    pane_ms: int,
    topic: str,
    negative_below: float,
    relative_accuracy: float,
    applied: Callable[[PaneKey], int],
    exemplars: int,
    segment_cap: SegmentCap,
    redact_exemplars: bool,
) -> dict[PaneKey, WindowStats]:
    """Aggregate joined feedback: one :class:`WindowStats` per touched pane key.

    ``pairs`` are ``(source offset or None, pair)``, each counted at its join time in
    every segment series of its model the ``segment_cap`` admits; ``applied(key)`` is the
    highest ``topic`` offset the stored pane already holds. A pair scored below
    ``negative_below`` is also kept as a ``negative_feedback`` example (of up to
    ``exemplars`` per window, redacted with ``redact_exemplars``).
    """
    touched: dict[PaneKey, WindowStats] = {}
    for offset, pair in pairs:
        t = pair.join_time_ms
        pane = t - t % pane_ms
        for segment in segment_cap.segments(pair.model_id, pair.segment):
            key = PaneKey(pair.model_id, pair.inference["version"], segment, pane)
            if offset is not None and offset <= applied(key):
                continue
            stats = touched.get(key)
            if stats is None:
                stats = touched[key] = WindowStats(relative_accuracy, exemplars, redact_exemplars)
            score = pair.feedback["score"]
            stats.add_feedback(score, negative_below)
            if score is not None and score < negative_below:
                stats.add_negative_example(
                    pair.request_id,
                    pair.inference["prompt"],
                    pair.inference["response"],
                    pair.segment,
                    _feedback_note(pair.feedback),
                    pair.subject_id,
                )
            stats.saw(topic, offset)
    return touched


def _feedback_note(feedback: dict[str, Any]) -> str:
    """What the user said besides the score: label and correction."""
    return "; ".join(str(part) for part in (feedback["label"], feedback["correction"]) if part)


def window_sketches(
    series: dict[tuple[str, str], WindowStats], budget: int = SKETCH_BUDGET_BYTES
) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """The :meth:`WindowStats.sketch_states` of each version's ``"*"`` series in ``series``
    (``(version, segment) -> stats`` of one window), and the bytes they take as JSON.

    A sketch holds a few hundred buckets for realistic timings, but values spread over many
    orders of magnitude make it longer: the busiest versions get theirs while they fit
    ``budget``, the others none (their quantiles are still in the summary).
    """
    busiest_first = sorted(
        (-stats.requests, version)
        for (version, segment), stats in series.items()
        if segment == ALL_SEGMENTS
    )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    used = 0
    for _, version in busiest_first:
        states = series[(version, ALL_SEGMENTS)].sketch_states()
        size = len(json.dumps(states)) + len(', "sketches": ')
        if used + size <= budget:
            out[version] = states
            used += size
    return out, used
