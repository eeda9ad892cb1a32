"""River's ADWIN and PageHinkley, fed one request at a time on genmon's signals.

Signals (names as genmon's findings call them), from a stream's :class:`Table`:

- ``error_rate``: 0/1 per request (failed);
- ``refusal_rate``: 0/1 per answered request (genmon's refusal phrases);
- ``ttft``: log of the time to first token per answered request (the log gives River the
  best chance on latencies, whose tails span 100x; genmon tests quantile exceedances);
- ``embedding_prompt``: per *sampled* prompt (genmon's ``embedding.sample_rate``), its
  cosine distance to the centroid of the first :data:`REFERENCE_TEXTS` sampled prompts
  of the stream, from the same embeddings genmon's replay uses (the same encoder and
  the same on-disk cache, keyed by the text).

Scaling: ADWIN gets the 0/1 rates as they are (its bound assumes values in [0, 1]) and the
continuous signals standardised by the mean and SD of the stream's warm-up; PageHinkley
gets every signal standardised (a 0/1 rate by its warm-up rate ``p``, SD
``sqrt(p (1 - p))``), so its ``delta`` and ``threshold`` are in SDs. PageHinkley runs in
``mode="up"`` (every change here is a rise); ADWIN flags changes either way, as shipped.
Each detector is River's own, fresh per stream and signal, fed in arrival order; an
alarm is the request after which ``drift_detected`` is true.

The grid (:func:`grid`): ADWIN's ``delta`` and PageHinkley's ``threshold`` (for two
``delta`` values) from very sensitive to very conservative. Tuning to genmon's
false-page budget happens in :mod:`bench.detection.results` on the stationary replays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from river import drift

from bench.detection.table import Table

SIGNALS = ("error_rate", "refusal_rate", "ttft", "embedding_prompt")
RATES = frozenset({"error_rate", "refusal_rate"})
REFERENCE_TEXTS = 100
ADWIN_DELTAS = (0.1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10, 1e-13, 1e-16, 1e-20, 1e-25, 1e-30)
PH_DELTAS = (0.1, 0.5)
PH_THRESHOLDS = (5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)


@dataclass(frozen=True, order=True)
class Param:
    """One point of a detector's grid; ``rank`` orders it from most to least sensitive."""

    detector: str  # "adwin" or "ph"
    delta: float
    threshold: float | None = None

    @property
    def key(self) -> str:
        if self.detector == "adwin":
            return f"adwin:delta={self.delta:g}"
        return f"ph:delta={self.delta:g}:threshold={self.threshold:g}"

    @property
    def family(self) -> str:
        """The curve it belongs to: ``adwin`` or ``ph:delta=<d>``."""
        return "adwin" if self.detector == "adwin" else f"ph:delta={self.delta:g}"

    @property
    def rank(self) -> float:
        """Smaller is more sensitive."""
        if self.detector == "adwin":
            return -math.log10(self.delta)
        assert self.threshold is not None
        return self.threshold

    def make(self) -> Any:
        if self.detector == "adwin":
            return drift.ADWIN(delta=self.delta)
        assert self.threshold is not None
        return drift.PageHinkley(delta=self.delta, threshold=self.threshold, mode="up")


def grid() -> list[Param]:
    adwin = [Param("adwin", d) for d in ADWIN_DELTAS]
    ph = [Param("ph", d, t) for d in PH_DELTAS for t in PH_THRESHOLDS]
    return adwin + ph


def embedding_distances(
    table: Table, cache_path: Path | None, encoder: Callable[[], Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times, cosine distances) of the sampled prompts (see the module docstring)."""
    from genmon.replay.engine import EmbeddingCache

    if not table.sampled:
        return np.empty(0), np.empty(0)
    rows = np.array([row for row, _ in table.sampled])
    cache = EmbeddingCache(cache_path)
    try:
        vectors = cache.encode(encoder, [text for _, text in table.sampled]).astype(np.float64)
    finally:
        cache.close()
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    centroid = vectors[:REFERENCE_TEXTS].mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    return table.arrival[rows], 1.0 - vectors @ centroid


def signal_values(
    table: Table, distances: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(arrival times, raw values) per signal."""
    answered = table.answered
    has_ttft = answered & ~np.isnan(table.ttft_ms) & (table.ttft_ms > 0)
    out = {
        "error_rate": (table.arrival, table.error.astype(float)),
        "refusal_rate": (table.arrival[answered], table.refusal[answered].astype(float)),
        "ttft": (table.arrival[has_ttft], np.log(table.ttft_ms[has_ttft])),
    }
    if distances is not None:
        out["embedding_prompt"] = distances
    return out


def standardise(signal: str, values: np.ndarray, warm: np.ndarray) -> np.ndarray:
    """``values`` in SDs of the warm-up (``warm``: mask of the warm-up values)."""
    head = values[warm] if warm.any() else values[:100]
    if signal in RATES:
        p = max(float(head.mean()) if head.size else 0.0, 0.5 / max(head.size, 1))
        return (values - p) / math.sqrt(p * (1.0 - p))
    sd = float(head.std()) if head.size > 1 else 1.0
    return (values - float(head.mean())) / (sd or 1.0)


def run(
    values: dict[str, tuple[np.ndarray, np.ndarray]], warm_end: float, params: Iterable[Param]
) -> dict[str, dict[str, list[float]]]:
    """Alarm times: ``{param key: {signal: [times]}}``."""
    params = list(params)
    out: dict[str, dict[str, list[float]]] = {p.key: {} for p in params}
    for signal, (times, raw) in values.items():
        if raw.size == 0:
            continue
        scaled = standardise(signal, raw, times < warm_end)
        feeds = {"adwin": (raw if signal in RATES else scaled).tolist(), "ph": scaled.tolist()}
        for param in params:
            hits = _alarms(param.make(), feeds[param.detector])
            if hits:
                out[param.key][signal] = times[hits].tolist()
    return out


def _alarms(detector: Any, values: list[float]) -> list[int]:
    """Indices of the values after which the detector flagged a drift."""
    hits = []
    update = detector.update
    for i, x in enumerate(values):
        update(x)
        if detector.drift_detected:
            hits.append(i)
    return hits
