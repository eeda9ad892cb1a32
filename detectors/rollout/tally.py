"""Per-version counts of a rollout's signals, read from the worker's closed windows.

:class:`WindowTally` is the reading half of the watch: it sums, per signal and segment,
the champion's and the challenger's events and observations over the tumbling windows
both versions served (the same windows, so a change of traffic over time touches both
arms alike). The statistics live in :mod:`~genmon.detectors.rollout.watch`; the benchmark
reads the same tally for its fixed-horizon comparisons.

Signals (events / observations of one series):

- ``negative_feedback``: negative / scored feedback (``positive + negative``; feedback is
  counted in the window of its join with the inference, for the inference's version and
  segments);
- ``refusal_rate``: refusals / answered (non-error) requests;
- ``error_rate``: errors / requests;
- ``slow_rate`` (``"*"`` only): requests above a latency threshold / requests, from the
  windows' raw latency sketches. The threshold is the bucket of the champion's
  ``latency_quantile`` over its first ``calibration_windows`` windows with a sketch
  (:meth:`QuantileSketch.key_at`); counting starts with the window after it is fixed, so
  the windows that set it are not also tested against it, and reads the same bucket
  boundaries in every window (:meth:`QuantileSketch.count_above`): no interpolation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from genmon.detectors.rollout.result import ALL
from genmon.detectors.sketch import QuantileSketch

SEGMENT_SIGNALS = ("negative_feedback", "refusal_rate", "error_rate")
#: ``(signal, segment)``
Key = tuple[str, str]


def series_counts(series: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``signal -> (events, observations)`` of one series of a window record."""
    feedback = series.get("feedback") or {}
    negative = int(feedback.get("negative") or 0)
    scored = negative + int(feedback.get("positive") or 0)
    requests, errors = int(series.get("requests") or 0), int(series.get("errors") or 0)
    answered = series.get("answered")
    return {
        "negative_feedback": (negative, scored),
        "refusal_rate": (
            int(series.get("refusal") or 0),
            requests - errors if answered is None else int(answered),
        ),
        "error_rate": (errors, requests),
    }


def _latency_state(series: Mapping[str, Any] | None) -> dict[str, Any] | None:
    state = ((series or {}).get("sketches") or {}).get("latency_ms")
    return dict(state) if state else None


class WindowTally:
    """Sums of ``[champion events, champion n, challenger events, challenger n]`` per
    ``(signal, segment)``, over the windows both versions served.

    ``apply(record)`` returns False for a record it ignores: not ``"tumbling"``, or an
    ``end_ms`` at or before the newest already applied on its partition (redelivery).
    Segments beyond the first ``max_segments`` seen are not counted (``dropped``).
    """

    def __init__(
        self,
        champion: str,
        challenger: str,
        signals: Iterable[str],
        latency_quantile: float = 0.95,
        calibration_windows: int = 3,
        max_segments: int = 32,
    ) -> None:
        self.champion, self.challenger = champion, challenger
        self.signals = tuple(signals)
        self.latency_quantile = latency_quantile
        self.calibration_windows = calibration_windows
        self.max_segments = max_segments
        self.counts: dict[Key, list[int]] = {}
        self.requests: dict[str, int] = {}  # both versions, per segment
        self.partitions: dict[str, int] = {}
        self.first_ms: int | None = None  # first window applied
        self.start_ms: int | None = None  # first window with challenger traffic
        self.end_ms: int | None = None  # newest window end applied
        self.slow_since_ms: int | None = None
        #: Start of the first window with challenger observations, per comparison: the
        #: plan's rates run from there (feedback arrives late, slow counts after the
        #: calibration), and the time before it is an offset, not a slower rate.
        self.observed_from: dict[Key, int] = {}
        self._window_ms = 0
        self.calibration: dict[str, Any] = {"windows": 0, "sketch": None, "key": None}
        self.dropped: set[str] = set()

    @property
    def calibrated(self) -> bool:
        return self.calibration["sketch"] is None and self.calibration["windows"] > 0

    def apply(self, record: Mapping[str, Any]) -> bool:
        if record.get("kind") != "tumbling":
            return False
        partition = str(record.get("partition", 0))
        start, end = int(record["start_ms"]), int(record["end_ms"])
        if end <= self.partitions.get(partition, -(2**62)):
            return False
        self.partitions[partition] = end
        self.first_ms = start if self.first_ms is None else min(self.first_ms, start)
        self.end_ms = end if self.end_ms is None else max(self.end_ms, end)
        versions: dict[str, dict[str, Mapping[str, Any]]] = {
            self.champion: {},
            self.challenger: {},
        }
        for series in record.get("series") or ():
            version = series.get("model_version")
            if version in versions:
                versions[version][str(series.get("segment", ALL))] = series
        champion, challenger = versions[self.champion], versions[self.challenger]
        if ALL not in champion or int(challenger.get(ALL, {}).get("requests") or 0) <= 0:
            self._calibrate(champion.get(ALL), end)
            return True  # time passes; only windows both versions served are compared
        self._window_ms = start
        if self.start_ms is None:
            self.start_ms = start
            if self.calibrated:
                self.slow_since_ms = start
        for segment in sorted(set(champion) | set(challenger)):
            if segment == ALL or self._track(segment):
                self._add_segment(segment, champion.get(segment), challenger.get(segment))
        self._add_slow(champion[ALL], challenger[ALL])
        self._calibrate(champion[ALL], end)
        return True

    def _track(self, segment: str) -> bool:
        if segment in self.requests or len(self.requests) - (ALL in self.requests) < (
            self.max_segments
        ):
            return True
        self.dropped.add(segment)
        return False

    def _add_segment(self, segment: str, champion: Any, challenger: Any) -> None:
        arms = [series_counts(s) if s is not None else {} for s in (champion, challenger)]
        self.requests[segment] = self.requests.get(segment, 0) + sum(
            c["error_rate"][1] for c in arms if c
        )
        for signal in SEGMENT_SIGNALS:
            if signal in self.signals:
                (xb, nb), (xc, nc) = (c.get(signal, (0, 0)) for c in arms)
                self._add((signal, segment), xb, nb, xc, nc)

    def _add(self, key: Key, xb: int, nb: int, xc: int, nc: int) -> None:
        if nc > 0 and key not in self.observed_from:
            self.observed_from[key] = self._window_ms
        row = self.counts.setdefault(key, [0, 0, 0, 0])
        row[0] += xb
        row[1] += nb
        row[2] += xc
        row[3] += nc

    def _calibrate(self, champion_all: Mapping[str, Any] | None, end: int) -> None:
        """Merge the champion's latency sketches until the threshold is fixed."""
        cal = self.calibration
        state = _latency_state(champion_all)
        if self.calibrated or "slow_rate" not in self.signals or state is None:
            return
        sketch = QuantileSketch.from_state(state)
        if cal["sketch"] is not None:
            sketch.merge(QuantileSketch.from_state(cal["sketch"]))
        cal["windows"] += 1
        cal["sketch"] = sketch.to_state()
        if cal["windows"] >= self.calibration_windows and sketch.count > 0:
            cal["key"], cal["sketch"] = sketch.key_at(self.latency_quantile), None
            # Counting starts with the next window: the calibration's own are not tested.
            self.slow_since_ms = end if self.start_ms is not None else None

    def _add_slow(self, champion: Mapping[str, Any], challenger: Mapping[str, Any]) -> None:
        if not self.calibrated or self.slow_since_ms is None:
            return
        states = (_latency_state(champion), _latency_state(challenger))
        if states[0] is None or states[1] is None:
            return
        key = self.calibration["key"]
        (xb, nb), (xc, nc) = (
            (sketch.count_above(key), sketch.count)
            for sketch in map(QuantileSketch.from_state, states)
        )
        self._add(("slow_rate", ALL), xb, nb, xc, nc)

    def to_state(self) -> dict[str, Any]:
        return {
            "counts": [[s, seg, *row] for (s, seg), row in self.counts.items()],
            "observed_from": [[s, seg, ms] for (s, seg), ms in self.observed_from.items()],
            "requests": dict(self.requests),
            "partitions": dict(self.partitions),
            "first_ms": self.first_ms,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "slow_since_ms": self.slow_since_ms,
            "calibration": dict(self.calibration),
            "dropped": sorted(self.dropped),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.counts = {(s, seg): [int(v) for v in row] for s, seg, *row in state["counts"]}
        self.observed_from = {(s, seg): int(ms) for s, seg, ms in state["observed_from"]}
        self.requests = {str(k): int(v) for k, v in state["requests"].items()}
        self.partitions = {str(k): int(v) for k, v in state["partitions"].items()}
        self.first_ms, self.start_ms = state["first_ms"], state["start_ms"]
        self.end_ms, self.slow_since_ms = state["end_ms"], state["slow_since_ms"]
        self.calibration = dict(state["calibration"])
        self.dropped = set(state["dropped"])
