"""The judgements of a replay, kept for its report in bounded memory.

A replay of weeks of traffic judges each series once a window (tens of thousands of
times); a chart shows at most :data:`MAX_POINTS` of them. :class:`PointLog` keeps each
series to that many points as it goes: when a series is full, neighbouring points merge
in pairs and each kept point then stands for twice as many consecutive judgements (its
*stride*). The point kept for a run is its most alarming one (a detection first, then
the highest score against its threshold), so a firing is never merged away and peaks
stay visible. Only the order of the judgements decides, so a replay keeps the same points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genmon.streams.detection.points import SignalPoint

#: Points kept per series (one line of one chart).
MAX_POINTS = 2000
#: Series kept per replay; judgements of further series are counted in ``dropped``.
MAX_SERIES = 500

SeriesKey = tuple[str, str, str, str, str, bool]


def series_of(point: SignalPoint) -> SeriesKey:
    """What one line of a chart follows: a model's signal, version, segment and detector
    (early, sub-window judgements apart from the window's)."""
    return (point.model_id, point.signal, point.version, point.segment, point.detector, point.early)


def alarm(point: SignalPoint) -> tuple[bool, float]:
    """How alarming a judgement is: detected first, then its score against its threshold."""
    ratio = point.score / point.threshold if point.threshold > 0 else point.score
    return point.detected, ratio


@dataclass
class _Series:
    points: list[SignalPoint] = field(default_factory=list)
    stride: int = 1
    pending: SignalPoint | None = None  # the most alarming of the run being gathered
    gathered: int = 0
    # Exact sums over every judgement, whatever was thinned: value and baseline weighted
    # by the observations behind each, and the judgements that fired.
    value_sum: float = 0.0
    value_n: float = 0.0
    baseline_sum: float = 0.0
    baseline_n: float = 0.0
    fired: int = 0

    def account(self, point: SignalPoint) -> None:
        weight = max(point.n, 1)
        if point.value is not None and math.isfinite(point.value):
            self.value_sum += point.value * weight
            self.value_n += weight
        if point.baseline is not None and math.isfinite(point.baseline):
            self.baseline_sum += point.baseline * weight
            self.baseline_n += weight
        self.fired += point.detected


class PointLog:
    """Collects :class:`SignalPoint` s (set ``DetectorRunner.points = log.add``)."""

    def __init__(self, max_points: int = MAX_POINTS, max_series: int = MAX_SERIES) -> None:
        if max_points < 2 or max_series < 1:
            raise ValueError("a point log keeps at least 2 points of at least 1 series")
        self.max_points, self.max_series = max_points, max_series
        self._series: dict[SeriesKey, _Series] = {}
        #: Judgements not kept because :data:`MAX_SERIES` series were already kept.
        self.dropped = 0
        #: Judgements seen.
        self.seen = 0

    def add(self, point: SignalPoint) -> None:
        self.seen += 1
        key = series_of(point)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.max_series:
                self.dropped += 1
                return
            series = self._series[key] = _Series()
        series.account(point)
        if series.pending is None or alarm(point) > alarm(series.pending):
            series.pending = point
        series.gathered += 1
        if series.gathered < series.stride:
            return
        series.points.append(series.pending)
        series.pending, series.gathered = None, 0
        if len(series.points) >= self.max_points:
            series.points = [max(pair, key=alarm) for pair in _pairs(series.points)]
            series.stride *= 2

    def series(self) -> dict[SeriesKey, list[SignalPoint]]:
        """Every series' points in time order (a run still being gathered included)."""
        out: dict[SeriesKey, list[SignalPoint]] = {}
        for key, series in self._series.items():
            tail = [series.pending] if series.pending is not None else []
            out[key] = sorted([*series.points, *tail], key=lambda p: p.at_ms)
        return out

    def stride(self, key: SeriesKey) -> int:
        """How many consecutive judgements one kept point of a series stands for."""
        return self._series[key].stride

    def means(self, key: SeriesKey) -> tuple[float | None, float | None, int]:
        """A series' mean value and baseline over every judgement (weighted by the
        observations behind each; None when it had none) and how many judgements fired."""
        s = self._series[key]
        value = s.value_sum / s.value_n if s.value_n else None
        baseline = s.baseline_sum / s.baseline_n if s.baseline_n else None
        return value, baseline, s.fired

    @property
    def points(self) -> list[SignalPoint]:
        """All kept points, series after series."""
        return [p for points in self.series().values() for p in points]

    def signals(self) -> set[tuple[str, str]]:
        """``(model, signal)`` of every kept series."""
        return {(key[0], key[1]) for key in self._series}


def _pairs(points: list[SignalPoint]) -> list[tuple[SignalPoint, ...]]:
    return [tuple(points[i : i + 2]) for i in range(0, len(points), 2)]
