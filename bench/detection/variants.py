"""The benchmark's streams: seeded variants of each class of change, and long stationary replays.

A **class** is one kind of problem genmon must page on (:data:`CLASSES`): the abrupt
error burst of the issue (87 % of requests fail), a smaller error burst, a latency
regime change, a refusal-rate jump and a topic switch. Each class gets ``n`` seeded
**variants** (:func:`plan`) that differ in what a real deployment would: the trace
(``azure_code``, ``azure_conv``, ``mooncake``: their rates and token mixes differ), the
slice of it (the block-bootstrap seed of :func:`bench.replay.traffic.stationary`), the
change point (drawn in ``at_min``), and, where the change kind has them, the magnitude
and the segment (cycled over :data:`KNOBS`). Every variant states its magnitude (its knobs;
the measured before/after values are added by :mod:`bench.detection.table`).

The **stationary** replays (:func:`stationary_chunks`) are long healthy streams of one
model per trace, built in chunks of :data:`CHUNK_H` hours (each its own bootstrap seed,
shifted in time, the events that arrive after the next chunk's start carried over), so
that a day-long stream never sits in memory as dicts at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.replay import traffic
from bench.replay.changes import SIGNALS

START = datetime(2026, 1, 5, tzinfo=UTC)
MODEL = "bot"
#: Hours per generated piece of a stationary replay.
CHUNK_H = 6.0


@dataclass(frozen=True)
class ChangeClass:
    """One class of change: the change kind it injects and what it is called."""

    name: str
    kind: str  # a bench.replay.changes kind
    title: str

    @property
    def signals(self) -> tuple[str, ...]:
        """genmon's signals that should fire (bench.replay.changes.SIGNALS)."""
        return SIGNALS[self.kind]


CLASSES: tuple[ChangeClass, ...] = (
    ChangeClass("error_burst", "error_burst", "error burst, 87 % of requests fail"),
    ChangeClass("error_burst_small", "error_burst", "smaller error burst (5-20 % of requests)"),
    ChangeClass("latency_regime", "latency_regime", "latency regime change"),
    ChangeClass("refusal_jump", "refusal_jump", "refusal-rate jump (new version)"),
    ChangeClass("topic_switch", "topic_switch", "topic switch (prompt embeddings)"),
)
BY_NAME = {c.name: c for c in CLASSES}
#: Classes whose replays need the embedding stage (the others run without it: faster).
EMBEDDING_CLASSES = frozenset({"topic_switch"})
#: Where a class's change point is drawn (minutes into the stream): after genmon has
#: learned what it judges the change against, since a monitor meets most changes on a
#: model it has watched for a while. Rates and latencies: 15 windows of warm-up plus a
#: baseline of as many again. Prompt embeddings: the embedding reference (256 sampled
#: prompts fix its components, ~1,000 more make it) fills in ~80 minutes on the slowest
#: trace (azure_code: 2.6 requests/s; it was 10 % sampled then, 25 % now).
AT_MIN: dict[str, tuple[float, float]] = {"topic_switch": (85.0, 100.0)}
DEFAULT_AT_MIN = (45.0, 60.0)

#: The magnitudes and segments each class cycles through (Change keyword arguments).
KNOBS: dict[str, tuple[dict[str, Any], ...]] = {
    "error_burst": ({"error_share": 0.87},),
    "error_burst_small": (
        {"error_share": 0.05},
        {"error_share": 0.10},
        {"error_share": 0.20},
        {"error_share": 0.87, "segment": {"app": "Gmail"}},
        {"error_share": 0.87, "segment": {"app": "LinkedIn"}},
    ),
    "latency_regime": (
        {"provider": "replicate_70b"},
        {"factor": 2.0},
        {"factor": 1.5},
        {"provider": "lepton_70b"},
        {"provider": "replicate_70b", "segment": {"app": "assistant"}},
        {"factor": 3.0},
    ),
    "refusal_jump": (
        {"refusal_model": "llama2orig"},
        {"refusal_model": "llama2new"},
        {"refusal_model": "mistralguard"},
    ),
    "topic_switch": (
        {"domain": "travel"},
        {"domain": "banking"},
        {"domain": "kitchen_and_dining"},
        {"domain": "travel", "segment": {"app": "assistant"}},
        {"domain": "home"},
        {"domain": "auto_and_commute"},
        {"domain": "banking77"},
        {"domain": "utility"},
        {"domain": "small_talk"},
        {"domain": "work"},
        {"domain": "credit_cards"},
    ),
}


@dataclass(frozen=True)
class Variant:
    """One change stream: ``at_s`` of healthy traffic, the change, ``after_s`` more."""

    cls: str
    index: int
    trace: str
    seed: int
    at_s: float
    after_s: float
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.cls}-{self.index:02d}"

    @property
    def hours(self) -> float:
        return (self.at_s + self.after_s) / 3600.0

    def change(self) -> traffic.Change:
        return traffic.Change(BY_NAME[self.cls].kind, timedelta(seconds=self.at_s), **self.knobs)

    def stated(self) -> str:
        """The magnitude as injected, in words (e.g. ``error_share=0.87 app=Gmail``)."""
        parts = [f"{k}={v}" for k, v in self.knobs.items() if k != "segment"]
        segment = self.knobs.get("segment")
        if segment:
            parts += [f"{k}={v}" for k, v in segment.items()]
        return " ".join(parts)


@dataclass(frozen=True)
class Stationary:
    """One long healthy replay of one model."""

    trace: str
    hours: float
    seed: int

    @property
    def id(self) -> str:
        return f"stationary-{self.trace}-{self.hours:g}h"


def plan(
    n: int, after_min: float, at_min: tuple[float, float] | None = None, seed: int = 0
) -> list[Variant]:
    """``n`` variants of every class, deterministic for ``seed``; the change point is
    drawn in ``at_min`` (minutes; default: the class's :data:`AT_MIN`)."""
    rng = np.random.default_rng([seed, 0xDE7EC7])
    out = []
    for c, cls in enumerate(CLASSES):
        knobs = KNOBS[cls.name]
        span = at_min or AT_MIN.get(cls.name, DEFAULT_AT_MIN)
        for i in range(n):
            at = float(rng.uniform(*span)) * 60.0
            out.append(
                Variant(
                    cls=cls.name,
                    index=i,
                    trace=traffic.TRACES[i % len(traffic.TRACES)],
                    seed=1000 * (c + 1) + i,
                    at_s=round(at, 1),
                    after_s=after_min * 60.0,
                    knobs=knobs[i % len(knobs)],
                )
            )
    return out


def change_stream(
    variant: Variant, data_dir: Path
) -> tuple[list[dict[str, Any]], traffic.GroundTruth]:
    """The variant's events (arrival order) and the change's ground truth."""
    _, changed, truth = traffic.scenario(
        data_dir,
        variant.trace,
        variant.hours,
        variant.change(),
        seed=variant.seed,
        model_id=MODEL,
        start=START,
    )
    return changed, truth


def stationary_chunks(spec: Stationary, data_dir: Path) -> Iterator[list[dict[str, Any]]]:
    """The replay's events in arrival order, one chunk of about :data:`CHUNK_H` hours at a
    time (events arriving after the next chunk's start are carried into it)."""
    pieces = max(1, math.ceil(spec.hours / CHUNK_H - 1e-9))
    carried: list[dict[str, Any]] = []
    for k in range(pieces):
        hours = min(CHUNK_H, spec.hours - k * CHUNK_H)
        begin = START + timedelta(hours=k * CHUNK_H)
        events = traffic.stationary(
            data_dir, spec.trace, hours, seed=spec.seed * 1000 + k, model_id=MODEL, start=begin
        )
        events = sorted(carried + events, key=traffic.arrival_time) if carried else events
        if k == pieces - 1:
            yield events
            return
        cut = begin + timedelta(hours=hours)
        split = next(
            (i for i, e in enumerate(events) if traffic.arrival_time(e) >= cut), len(events)
        )
        carried = events[split:]
        yield events[:split]
