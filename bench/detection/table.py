"""Per-request columns of a stream, for the detectors that do not run inside genmon.

River's detectors are fed one request at a time and the old fixed thresholds are computed
per 60 s window, both from these columns, so they see the very requests genmon's replay
sees, with genmon's own definitions:

- ``error``: status ``error`` or ``timeout`` (``genmon.streams.windows.stats.ERROR_STATUSES``);
- ``refusal``: an answered (non-error), non-empty response that genmon's refusal phrase
  list matches (:class:`genmon.streams.windows.quality_signals.QualitySignals`, the list
  the window aggregates count with);
- ``ttft_ms``: time to first token (NaN for errors), ``latency_ms`` end to end;
- ``arrival``: when the request was logged (``finished_at``; the order a topic holds
  events in, the order every detector here sees them), ``started``: its event time.

Times are epoch seconds. Rows are in arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from genmon.schemas.events import InferenceStatus
from genmon.streams.windows.quality_signals import QualitySignals

_ERROR = {InferenceStatus.ERROR.value, InferenceStatus.TIMEOUT.value}


@dataclass
class Table:
    """Columns of one stream's inferences (numpy arrays of equal length)."""

    arrival: np.ndarray
    started: np.ndarray
    error: np.ndarray
    refusal: np.ndarray
    empty: np.ndarray
    ttft_ms: np.ndarray
    latency_ms: np.ndarray
    app: np.ndarray  # segment.app, for the magnitudes of segment-limited changes
    #: (row, prompt) of the prompts sampled for the embedding signal.
    sampled: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.arrival.size)

    @property
    def answered(self) -> np.ndarray:
        return ~self.error


class TableBuilder:
    """Collects rows from chunks of wire events (dicts), sampling prompts as it goes."""

    def __init__(self, sample_rate: float, max_chars: int, seed: int) -> None:
        self.quality = QualitySignals.default()
        self.sample_rate, self.max_chars = sample_rate, max_chars
        self.rng = np.random.default_rng([seed, 0x5A3])
        self.rows: list[tuple[float, float, bool, bool, bool, float, float, str]] = []
        self.sampled: list[tuple[int, str]] = []

    def add(self, events: Iterable[Mapping[str, Any]]) -> None:
        for e in events:
            if "started_at" not in e:
                continue
            started = datetime.fromisoformat(e["started_at"]).timestamp()
            latency = float(e["latency_ms"])
            response = e.get("response") or ""
            error = e.get("status", "ok") in _ERROR
            empty = not response.strip()
            refusal = not error and not empty and self.quality.is_refusal(response)
            ttft = e.get("time_to_first_token_ms")
            app = (e.get("segment") or {}).get("app", "")
            prompt = e.get("prompt") or ""
            if prompt and self.rng.random() < self.sample_rate:
                self.sampled.append((len(self.rows), prompt[: self.max_chars]))
            self.rows.append(
                (
                    started + latency / 1000.0,
                    started,
                    error,
                    refusal,
                    empty,
                    np.nan if ttft is None else float(ttft),
                    latency,
                    app,
                )
            )

    def build(self) -> Table:
        if not self.rows:
            raise ValueError("no inference events in the stream")
        cols = list(zip(*self.rows, strict=True))
        arrival = np.asarray(cols[0], dtype=float)
        order = np.argsort(arrival, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        table = Table(
            arrival=arrival[order],
            started=np.asarray(cols[1], dtype=float)[order],
            error=np.asarray(cols[2], dtype=bool)[order],
            refusal=np.asarray(cols[3], dtype=bool)[order],
            empty=np.asarray(cols[4], dtype=bool)[order],
            ttft_ms=np.asarray(cols[5], dtype=float)[order],
            latency_ms=np.asarray(cols[6], dtype=float)[order],
            app=np.asarray(cols[7], dtype=object)[order],
            sampled=sorted((int(rank[row]), text) for row, text in self.sampled),
        )
        self.rows = []
        return table


def magnitude(table: Table, begin: float, end: float, warm: float) -> dict[str, float | None]:
    """What the change did, measured on the requests started in ``[warm, begin)`` against
    those in ``[begin, end)``: error and refusal rates (refusals among answers), median and
    p95 TTFT."""
    before = (table.started >= warm) & (table.started < begin)
    after = (table.started >= begin) & (table.started < end)

    def rate(flags: np.ndarray, among: np.ndarray) -> float | None:
        n = int(among.sum())
        return float(flags[among].sum() / n) if n else None

    def quantile(mask: np.ndarray, q: float) -> float | None:
        values = table.ttft_ms[mask & ~np.isnan(table.ttft_ms)]
        return float(np.quantile(values, q)) if values.size else None

    out: dict[str, float | None] = {}
    for name, mask in (("before", before), ("after", after)):
        out[f"error_rate_{name}"] = rate(table.error, mask)
        out[f"refusal_rate_{name}"] = rate(table.refusal, mask & table.answered)
        out[f"ttft_p50_ms_{name}"] = quantile(mask, 0.5)
        out[f"ttft_p95_ms_{name}"] = quantile(mask, 0.95)
    return out
