"""A bounded ring of the last K windows of per-segment counts.

Memory is ``O(max_segments * n_windows)``:

- each tracked segment keeps ``n_windows`` slots of ``(events, total)``; pushing a
  window overwrites the oldest slot, so sums cover exactly the last ``n_windows``
  windows;
- a segment with no traffic in the whole ring is dropped (it has nothing to test);
- at most ``max_segments`` segments are tracked: when a new one arrives beyond the cap,
  the least recently seen segment is evicted (LRU) and reported to the caller;
- the population (all segments, evicted or not, and traffic counted in the population
  only) has its own ring, so "the rest" and "overall" stay exact even when segments are
  evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from genmon.detectors.bias._inputs import Counts


class SegmentWindows:
    def __init__(self, n_windows: int, max_segments: int) -> None:
        self.n_windows = n_windows
        self.max_segments = max_segments
        self.window = 0
        # LRU order: least recently seen first.
        self.segments: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self.population: tuple[list[int], list[int]] = ([0] * n_windows, [0] * n_windows)

    def push(self, counts: Counts, population_only: Counts | None = None) -> list[str]:
        """Add one window's counts; return the segments evicted by the ``max_segments`` cap.

        ``population_only`` counts go to the population ring alone (no segment is tracked).
        """
        slot = self.window % self.n_windows
        self.window += 1
        for events, totals in (*self.segments.values(), self.population):
            events[slot] = 0
            totals[slot] = 0
        for segment in [s for s, (_, totals) in self.segments.items() if not any(totals)]:
            del self.segments[segment]
        evicted: list[str] = []
        for segment, (events, total) in counts.items():
            if segment not in self.segments:
                self.segments[segment] = ([0] * self.n_windows, [0] * self.n_windows)
            self.segments.move_to_end(segment)
            ring_events, ring_totals = self.segments[segment]
            ring_events[slot] += events
            ring_totals[slot] += total
            self.population[0][slot] += events
            self.population[1][slot] += total
        for events, total in (population_only or {}).values():
            self.population[0][slot] += events
            self.population[1][slot] += total
        while len(self.segments) > self.max_segments:
            evicted.append(self.segments.popitem(last=False)[0])
        return evicted

    def sums(self) -> Counts:
        """Per-segment ``(events, total)`` over the ring, in LRU order."""
        return {s: (sum(e), sum(t)) for s, (e, t) in self.segments.items()}

    def population_sum(self) -> tuple[int, int]:
        return sum(self.population[0]), sum(self.population[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "segments": [[s, e, t] for s, (e, t) in self.segments.items()],
            "population": [self.population[0], self.population[1]],
        }

    @classmethod
    def from_json(cls, state: dict[str, Any], n_windows: int, max_segments: int) -> SegmentWindows:
        ring = cls(n_windows, max_segments)
        ring.window = int(state["window"])
        ring.segments = OrderedDict(
            (str(s), ([int(x) for x in e], [int(x) for x in t])) for s, e, t in state["segments"]
        )
        ring.population = (
            [int(x) for x in state["population"][0]],
            [int(x) for x in state["population"][1]],
        )
        return ring
