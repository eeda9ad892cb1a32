"""A mergeable quantile sketch (DDSketch) whose state is plain JSON.

The bucket mapping is DDSketch's :class:`ddsketch.mapping.LogarithmicMapping`
(Masson, Rim & Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
Relative-Error Guarantees", VLDB 2019): every quantile it returns is within
``relative_accuracy`` (default 1 %) of the exact value of some observation of the same
rank. Only non-negative values are kept (latencies, token counts); values too small to
index count as zero, like DDSketch's zero bucket.

Two things differ from ``ddsketch.DDSketch``, on purpose:

- ``add_many`` maps a whole batch to bucket keys at once, in the compiled module when it
  is built, else vectorised with numpy (the pure-python ``DDSketch.add`` costs ~1 µs per
  value, too much at 10k events/s and several series per event). Both compute
  ``ceil(log2(v) * multiplier + offset)``; numpy's ``log2`` may differ from the C
  library's in the last bit for about 1 value in 6,000, which moves a key only for a value
  within that bit of a bucket edge (none in 10 million lognormal latencies tried);
- the store is a sparse ``{key: count}`` map, so :meth:`to_state` is small JSON a Faust
  table can hold (no pickle, no protobuf).

>>> s = QuantileSketch()
>>> s.add_many([10.0, 20.0, 30.0, 40.0, 1000.0])
>>> abs(s.quantile(0.5) - 30.0) <= 0.01 * 30.0  # within the relative accuracy
True
>>> QuantileSketch.from_state(s.to_state()).count
5
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from ddsketch.mapping import LogarithmicMapping

DEFAULT_RELATIVE_ACCURACY = 0.01


def _add_counts_python(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


try:  # compiled (genmon.streams.native): the same loops, without numpy's per-call overhead
    from genmon_native import add_counts, sketch_values
except ImportError:  # pragma: no cover - a checkout built without Rust
    add_counts = _add_counts_python
    sketch_values = None  # type: ignore[assignment]


class QuantileSketch:
    """DDSketch over non-negative values with a sparse, JSON-serialisable store."""

    __slots__ = ("_mapping", "bins", "count", "max", "min", "relative_accuracy", "sum", "zeros")

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        self.relative_accuracy = float(relative_accuracy)
        self._mapping = _mapping(self.relative_accuracy)
        self.bins: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_many(self, values: Iterable[float] | np.ndarray) -> None:
        """Add a batch of non-negative values (negative values are clipped to zero)."""
        mapping = self._mapping
        if sketch_values is not None:
            # A few values per call in the pipeline: numpy's fixed cost per call dominated.
            listed = values.tolist() if isinstance(values, np.ndarray) else list(values)
            if not listed:
                return
            bins, zeros, count, total, low, high = sketch_values(
                listed, mapping._multiplier, mapping._offset, mapping.min_possible
            )
        else:
            arr = np.clip(np.asarray(values, dtype=float).ravel(), 0.0, None)
            if arr.size == 0:
                return
            positive = arr[arr > mapping.min_possible]
            # Same formula as LogarithmicMapping.key, vectorised.
            keys = np.ceil(np.log2(positive) * mapping._multiplier + mapping._offset)
            uniq, counts = np.unique(keys.astype(np.int64), return_counts=True)
            bins = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
            zeros, count = int(arr.size - positive.size), int(arr.size)
            total, low, high = float(arr.sum()), float(arr.min()), float(arr.max())
        add_counts(self.bins, bins)
        self.zeros += zeros
        self.count += count
        self.sum += total
        self.min = min(self.min, low)
        self.max = max(self.max, high)

    def merge(self, other: QuantileSketch) -> None:
        """Add ``other``'s observations to this sketch (both must share the accuracy)."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                f"cannot merge sketches of relative accuracy {other.relative_accuracy} and "
                f"{self.relative_accuracy}; configure one accuracy for the whole pipeline"
            )
        if other.count == 0:
            return
        add_counts(self.bins, other.bins)
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` in [0, 1] (DDSketch's rank rule), None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q!r} must be in [0, 1]")
        if self.count == 0:
            return None
        if q == 1.0:
            return self.max
        if q == 0.0:
            return self.min
        rank = q * (self.count - 1)
        if rank < self.zeros:
            return 0.0
        running = float(self.zeros)
        for key in sorted(self.bins):
            running += self.bins[key]
            if running > rank:
                # The true value lies in [min, max], so clamping only reduces the error.
                return min(max(self._mapping.value(key), self.min), self.max)
        return self.max

    def key_at(self, q: float) -> int | None:
        """The bucket key holding quantile ``q`` (None when empty or in the zero bucket).

        The latency baselines count requests *above* this bucket: a count read off the
        same bucket boundaries in every window, so no interpolation error enters the test.
        """
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        if rank < self.zeros:
            return None
        running = float(self.zeros)
        keys = sorted(self.bins)
        for key in keys:
            running += self.bins[key]
            if running > rank:
                return key
        return keys[-1] if keys else None

    def count_above(self, key: int | None) -> int:
        """Values in buckets above ``key`` (``None``: every positive value)."""
        if key is None:
            return self.count - self.zeros
        return sum(n for k, n in self.bins.items() if k > key)

    def key_value(self, key: int) -> float:
        """The value a bucket key stands for (within the relative accuracy)."""
        return float(self._mapping.value(key))

    def quantiles(self, qs: Iterable[float]) -> dict[str, float | None]:
        """``{"p50": ..., "p90": ...}`` for the given quantiles (one pass over the buckets;
        each value is what :meth:`quantile` returns)."""
        wanted = sorted((float(q), f"p{round(q * 100):d}") for q in qs)
        out: dict[str, float | None] = {}
        pending = []
        for q, name in wanted:
            if self.count == 0 or q in (0.0, 1.0):
                out[name] = self.quantile(q)
            elif q * (self.count - 1) < self.zeros:
                out[name] = 0.0
            else:
                pending.append((q * (self.count - 1), name))
        if pending:
            running, index = float(self.zeros), 0
            for key in sorted(self.bins):
                running += self.bins[key]
                while index < len(pending) and running > pending[index][0]:
                    value = min(max(self._mapping.value(key), self.min), self.max)
                    out[pending[index][1]] = value
                    index += 1
                if index == len(pending):
                    break
            for _, name in pending[index:]:
                out[name] = self.max
        return {f"p{round(q * 100):d}": out[f"p{round(q * 100):d}"] for q in qs}

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state; bins as ``[[key, count], ...]`` because JSON keys are strings."""
        return {
            "alpha": self.relative_accuracy,
            "bins": [[k, n] for k, n in self.bins.items()],
            "zeros": self.zeros,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantileSketch:
        sketch = cls(state["alpha"])
        sketch.bins = {int(k): int(n) for k, n in state["bins"]}
        sketch.zeros = int(state["zeros"])
        sketch.count = int(state["count"])
        sketch.sum = float(state["sum"])
        if sketch.count:
            sketch.min = float(state["min"])
            sketch.max = float(state["max"])
        return sketch


_MAPPINGS: dict[float, LogarithmicMapping] = {}


def _mapping(relative_accuracy: float) -> LogarithmicMapping:
    mapping = _MAPPINGS.get(relative_accuracy)
    if mapping is None:
        mapping = _MAPPINGS[relative_accuracy] = LogarithmicMapping(relative_accuracy)
    return mapping
