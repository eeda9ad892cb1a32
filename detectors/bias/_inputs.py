"""Batch types for the bias and A/B detectors, and their conversion to per-segment counts.

The streaming pipeline sends one *window* per ``update()``, either already aggregated
or as raw per-event arrays:

- rates: a sequence of :class:`SegmentCounts` (``events`` out of ``total`` requests of
  one segment; repeated segments are summed; ``tested=False`` for traffic that belongs
  to the population but is no group of its own), or one :class:`SegmentObservations`
  (a segment label and a 0/1 outcome per event);
- labelled outcomes (equal opportunity): a sequence of :class:`ConfusionCounts`, or one
  :class:`LabeledObservations` (segment, predicted-positive, actual-positive per event).

An empty sequence is a window without traffic: it still advances the window ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genmon.detectors.exceptions import InputError

#: segment -> (events, total)
Counts = dict[str, tuple[int, int]]


def _check_segment(segment: object) -> None:
    if not isinstance(segment, str) or not segment:
        raise InputError(f"segment must be a non-empty string, got {segment!r}")


@dataclass(frozen=True, slots=True)
class SegmentCounts:
    """``events`` of ``total`` requests in ``segment`` had the signal (for example a refusal).

    ``tested=False`` counts them in the population (the rest and overall rates of the
    other segments) without testing ``segment`` itself: for a bucket that mixes many
    values (an overflow series), whose disparity names no group to act on.
    """

    segment: str
    events: int
    total: int
    tested: bool = True

    def __post_init__(self) -> None:
        _check_segment(self.segment)
        if not 0 <= self.events <= self.total:
            raise InputError(
                f"segment {self.segment!r}: events={self.events} total={self.total}; "
                "need 0 <= events <= total"
            )


@dataclass(frozen=True, slots=True)
class SegmentObservations:
    """Raw events: event i is in ``segments[i]``; ``outcomes[i]`` is 1 if it had the signal."""

    segments: Sequence[str]
    outcomes: Sequence[int] | np.ndarray

    def to_counts(self) -> Counts:
        names, codes = _encode(self.segments)
        outcomes = _binary(self.outcomes, "outcomes", codes.size)
        events = np.bincount(codes, weights=outcomes, minlength=len(names))
        totals = np.bincount(codes, minlength=len(names))
        return {s: (int(e), int(t)) for s, e, t in zip(names, events, totals, strict=True)}


@dataclass(frozen=True, slots=True)
class ConfusionCounts:
    """Confusion-matrix counts of one segment (positive = the favourable/flagged prediction)."""

    segment: str
    tp: int
    fn: int
    fp: int
    tn: int

    def __post_init__(self) -> None:
        _check_segment(self.segment)
        if min(self.tp, self.fn, self.fp, self.tn) < 0:
            raise InputError(f"segment {self.segment!r}: confusion counts must be >= 0")


@dataclass(frozen=True, slots=True)
class LabeledObservations:
    """Raw labelled events: segment, predicted positive (0/1), actually positive (0/1)."""

    segments: Sequence[str]
    predicted: Sequence[int] | np.ndarray
    actual: Sequence[int] | np.ndarray

    def to_confusion(self) -> list[ConfusionCounts]:
        names, codes = _encode(self.segments)
        predicted = _binary(self.predicted, "predicted", codes.size)
        actual = _binary(self.actual, "actual", codes.size)
        # cell index per event: 0 tp, 1 fn, 2 fp, 3 tn
        cell = (1 - predicted) + 2 * (1 - actual)
        table = np.bincount(codes * 4 + cell, minlength=4 * len(names)).reshape(-1, 4)
        return [ConfusionCounts(s, *map(int, row)) for s, row in zip(names, table, strict=True)]


def _encode(segments: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct segment names in order of first appearance, and each event's index."""
    labels = list(segments)
    if not all(isinstance(label, str) and label for label in labels):
        _check_segment(next(x for x in labels if not (isinstance(x, str) and x)))
    if not labels:
        return [], np.zeros(0, dtype=np.int64)
    names, first, codes = np.unique(
        np.asarray(labels, dtype=object), return_index=True, return_inverse=True
    )
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [str(names[i]) for i in order], rank[codes.ravel()]


def _binary(values: Any, name: str, expected_len: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != expected_len:
        raise InputError(
            f"{name} must be a 1-D array with one entry per segment label "
            f"({expected_len}), got shape {array.shape}"
        )
    if array.size and not np.isin(array, (0, 1)).all():
        raise InputError(f"{name} must contain only 0/1 (or booleans)")
    return array.astype(np.int64)


def rate_counts(batch: Any) -> Counts:
    """Per-segment ``(events, total)`` of one window from either accepted batch form
    (segments to test only, see :func:`split_rate_counts`)."""
    return split_rate_counts(batch)[0]


def split_rate_counts(batch: Any) -> tuple[Counts, Counts]:
    """Per-segment ``(events, total)`` of one window: the segments to test, and those
    counted in the population only (:class:`SegmentCounts` with ``tested=False``)."""
    if isinstance(batch, SegmentObservations):
        return batch.to_counts(), {}
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        tested: Counts = {}
        untested: Counts = {}
        for item in batch:
            if not isinstance(item, SegmentCounts):
                raise InputError(
                    f"expected SegmentCounts items or one SegmentObservations, got {item!r}"
                )
            counts = tested if item.tested else untested
            events, total = counts.get(item.segment, (0, 0))
            counts[item.segment] = (events + item.events, total + item.total)
        return tested, untested
    raise InputError(
        "batch must be a sequence of SegmentCounts or a SegmentObservations, "
        f"got {type(batch).__name__}"
    )


def confusion_counts(batch: Any) -> tuple[Counts, Counts]:
    """Per-segment true-positive-rate and false-positive-rate counts of one window."""
    if isinstance(batch, LabeledObservations):
        items: Sequence[Any] = batch.to_confusion()
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        items = batch
    else:
        raise InputError(
            "batch must be a sequence of ConfusionCounts or a LabeledObservations, "
            f"got {type(batch).__name__}"
        )
    tpr: Counts = {}
    fpr: Counts = {}
    for item in items:
        if not isinstance(item, ConfusionCounts):
            raise InputError(f"expected ConfusionCounts items, got {item!r}")
        e, t = tpr.get(item.segment, (0, 0))
        tpr[item.segment] = (e + item.tp, t + item.tp + item.fn)
        e, t = fpr.get(item.segment, (0, 0))
        fpr[item.segment] = (e + item.fp, t + item.fp + item.tn)
    return tpr, fpr
