"""Bounding segment cardinality: at most ``windows.max_segment_values`` values per attribute.

Window records have one series per segment value (:mod:`~genmon.streams.windows.aggregates`), so
an attribute such as a user id would otherwise grow a model's panes without bound and
push its window records past Kafka's 1 MiB message limit. Two bounds keep them small:

- :class:`SegmentCap` admits, per model and attribute, at most ``max_values`` distinct
  values among the partition's live panes (first come, first served; a value keeps its
  slot while a live pane holds it). Traffic of any other value is aggregated as
  ``<attribute>=__other__``. A window is a merge of live panes, so it never has more than
  ``max_values`` series of one attribute besides the overflow series. A value refused
  in a busy stretch and admitted later has its series count only the admitted part;
  ``"*"`` and the overflow series keep every count exact.
- :func:`fold_to_budget` folds the least-requested segment values of a closing window
  into their overflow series while its series would take more than
  :data:`SERIES_BUDGET_BYTES` as JSON (many high-cardinality attributes or versions).

:func:`overflow_counts` is what the window record says about both (``segment_overflow``),
so detectors can tell an overflow series from a real segment.

>>> cap = SegmentCap(max_values=1)
>>> cap.segments("chat", {"user": "u1"}), cap.segments("chat", {"user": "u2"})
(('*', 'user=u1'), ('*', 'user=__other__'))
>>> cap.end_batch()  # the second event's attribute went to the overflow series
1
"""

from __future__ import annotations

import json

from genmon.streams.windows.aggregates import ALL_SEGMENTS, PaneKey
from genmon.streams.windows.stats import WindowStats

#: The value standing for every value of an attribute beyond the cap.
OVERFLOW_VALUE = "__other__"
#: Most bytes the series of one closed window may take as JSON (estimated from above by
#: :func:`series_bytes`); with the examples' own budget
#: (:data:`genmon.streams.windows.exemplars.WINDOW_BUDGET_BYTES`) a window record stays under
#: Kafka's default 1 MiB message limit.
SERIES_BUDGET_BYTES = 640 * 1024
#: Bytes of a series' fixed fields as JSON with every number at its longest (``tpot_ms``,
#: the ``p95`` quantiles and ``answered`` added up to 272 bytes to the 1280 before them).
_SERIES_FIXED_BYTES = 1600


#: Segment names of an event's attributes, and how many of them are overflow.
_Decision = tuple[tuple[str, ...], int]


def is_overflow(segment: str) -> bool:
    """Whether ``segment`` is an ``<attribute>=__other__`` overflow series."""
    return segment != ALL_SEGMENTS and split_segment(segment)[1] == OVERFLOW_VALUE


def split_segment(segment: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")`` (values may contain ``=``, keys should not)."""
    attribute, _, value = segment.partition("=")
    return attribute, value


class SegmentCap:
    """Per model and attribute, the values admitted among one partition's live panes.

    The owner reports every pane it stores (:meth:`add_pane`) and drops
    (:meth:`drop_pane`), and calls :meth:`end_batch` after each batch.
    """

    def __init__(self, max_values: int) -> None:
        if max_values < 1:
            raise ValueError(f"windows.max_segment_values must be >= 1, got {max_values}")
        self.max_values = max_values
        #: (model, attribute) -> value -> live panes holding it.
        self._live: dict[tuple[str, str], dict[str, int]] = {}
        #: Values admitted in this batch whose panes are not stored yet.
        self._admitted: dict[tuple[str, str], set[str]] = {}
        #: Decisions of this batch (within one, slots only fill, so they stay right).
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], _Decision] = {}
        self._folded = 0

    def segments(self, model: str, attributes: dict[str, str], events: int = 1) -> tuple[str, ...]:
        """``("*", "k1=v1", ...)`` with refused values replaced by :data:`OVERFLOW_VALUE`,
        for ``events`` events with these attributes."""
        key = (model, tuple(attributes.items()))
        decided = self._cache.get(key)
        if decided is None:
            names, folded = [ALL_SEGMENTS], 0
            for attribute, value in sorted(attributes.items()):
                if not self._admit(model, attribute, value):
                    value, folded = OVERFLOW_VALUE, folded + 1
                names.append(f"{attribute}={value}")
            decided = self._cache[key] = (tuple(names), folded)
        self._folded += decided[1] * events
        return decided[0]

    def end_batch(self) -> int:
        """Forget the batch's decisions; return how many attribute values it folded."""
        folded, self._folded = self._folded, 0
        self._admitted.clear()
        self._cache.clear()
        return folded

    def add_pane(self, key: PaneKey) -> None:
        """A pane was stored (call once per new key)."""
        if key.segment == ALL_SEGMENTS:
            return
        attribute, value = split_segment(key.segment)
        if value == OVERFLOW_VALUE:
            return
        group = (key.model_id, attribute)
        live = self._live.setdefault(group, {})
        live[value] = live.get(value, 0) + 1
        admitted = self._admitted.get(group)
        if admitted:
            admitted.discard(value)

    def drop_pane(self, key: PaneKey) -> None:
        """A pane was deleted."""
        if key.segment == ALL_SEGMENTS:
            return
        attribute, value = split_segment(key.segment)
        group = (key.model_id, attribute)
        live = self._live.get(group)
        if live is None or value not in live:
            return
        if live[value] > 1:
            live[value] -= 1
            return
        del live[value]
        if not live:
            del self._live[group]

    def _admit(self, model: str, attribute: str, value: str) -> bool:
        if value == OVERFLOW_VALUE:
            return True
        group = (model, attribute)
        live = self._live.get(group, {})
        if value in live:
            return True
        admitted = self._admitted.setdefault(group, set())
        if value in admitted:
            return True
        if len(live) + len(admitted) >= self.max_values:
            return False
        admitted.add(value)
        return True


def series_bytes(version: str, segment: str, stats: WindowStats) -> int:
    """An upper estimate of one series' size in a window record, as JSON."""
    size = _SERIES_FIXED_BYTES + len(json.dumps(version)) + len(json.dumps(segment))
    for counts in (stats.by_status, stats.by_error_code, stats.languages):
        size += sum(len(json.dumps(name)) + 24 for name in counts)
    return size


def fold_to_budget(
    series: dict[tuple[str, str], WindowStats], budget: int = SERIES_BUDGET_BYTES
) -> int:
    """Fold the least-requested segment values into their overflow series until ``series``
    (``(version, segment) -> stats`` of one window) fits ``budget``; return how many.

    Counts move, none is lost: every version's overflow series takes the folded series
    of that version. Stops early when only ``"*"`` and overflow series are left.
    """
    sizes = {key: series_bytes(*key, stats) for key, stats in series.items()}
    total = sum(sizes.values())
    if total <= budget:
        return 0
    weight: dict[str, int] = {}
    versions: dict[str, list[str]] = {}
    for (version, segment), stats in series.items():
        if segment != ALL_SEGMENTS and not is_overflow(segment):
            weight[segment] = weight.get(segment, 0) + stats.requests + stats.feedback
            versions.setdefault(segment, []).append(version)
    folded = 0
    for segment in sorted(weight, key=lambda s: (weight[s], s)):
        if total <= budget:
            break
        other = f"{split_segment(segment)[0]}={OVERFLOW_VALUE}"
        for version in versions[segment]:
            stats = series.pop((version, segment))
            total -= sizes.pop((version, segment))
            into = (version, other)
            if into in series:
                series[into].merge(stats)
                total -= sizes[into]
            else:
                series[into] = stats
            sizes[into] = series_bytes(version, other, series[into])
            total += sizes[into]
        folded += 1
    return folded


def overflow_counts(series: dict[tuple[str, str], WindowStats]) -> dict[str, dict[str, int]]:
    """Per attribute, the requests and feedback a window's overflow series hold."""
    out: dict[str, dict[str, int]] = {}
    for (_, segment), stats in sorted(series.items()):
        if segment == ALL_SEGMENTS:
            continue
        attribute, value = split_segment(segment)
        if value == OVERFLOW_VALUE:
            counts = out.setdefault(attribute, {"requests": 0, "feedback": 0})
            counts["requests"] += stats.requests
            counts["feedback"] += stats.feedback
    return out
