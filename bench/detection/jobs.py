"""One stream, every configuration: the unit of work a worker process runs.

A :class:`Job` builds its stream (a change variant or a stationary replay), replays it
through genmon with its settings, and, for the main run (``compare=True``), computes the
fixed thresholds and River's grid on the same requests. It returns a JSON-able dict:
the stream's facts, its ground truth and measured magnitude, and one
:class:`~bench.detection.scoring.Outcome` per configuration (``genmon``, ``fixed``, and
one per River grid point, keyed by :attr:`~bench.detection.river_side.Param.key`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.detection import fixed, genmon_side, river_side, variants
from bench.detection.scoring import score
from bench.detection.table import Table, TableBuilder, magnitude
from bench.detection.variants import BY_NAME, Stationary, Variant

#: The signals each comparison configuration detects a class's change on (genmon's are
#: bench.replay.changes.SIGNALS). The old thresholds had nothing for a topic switch.
FIXED_SIGNALS = {
    "error_burst": ("error_rate",),
    "latency_regime": ("latency_p99",),
    "refusal_jump": ("refusal_rate",),
    "topic_switch": (),
}
RIVER_SIGNALS = {
    "error_burst": ("error_rate",),
    "latency_regime": ("ttft",),
    "refusal_jump": ("refusal_rate",),
    "topic_switch": ("embedding_prompt",),
}


@dataclass(frozen=True)
class Job:
    """A change ``variant`` or a ``stationary`` replay, at ``pages_per_week`` (None: the
    default settings)."""

    variant: Variant | None
    stationary: Stationary | None
    pages_per_week: float | None
    embeddings: bool
    compare: bool  # also the fixed thresholds and River
    data_dir: Path
    cache: Path

    @property
    def id(self) -> str:
        stream = self.variant or self.stationary
        assert stream is not None
        setting = "default" if self.pages_per_week is None else f"{self.pages_per_week:g}/week"
        return f"{stream.id}@{setting}"

    @property
    def weight(self) -> float:
        """Expected cost, for scheduling the longest first."""
        stream = self.variant or self.stationary
        assert stream is not None
        return stream.hours * (2.0 if self.embeddings else 1.0)


def _encoder() -> Any:
    from genmon.settings import Settings
    from genmon.streams.embedding.encoder import shared_encoder

    return shared_encoder(Settings().embedding)


def run_job(job: Job) -> dict[str, Any]:
    """Run one job (in a worker process); see the module docstring for what it returns."""
    settings = genmon_side.settings_for(job.pages_per_week)
    warmup_s = settings.detectors.baseline_warmup_windows * settings.windows.tumbling_s
    start = variants.START.timestamp()
    builder = TableBuilder(
        settings.embedding.sample_rate, settings.embedding.max_text_chars, seed=17
    )
    built = time.perf_counter()
    truth = None
    if job.variant is not None:
        events, truth = variants.change_stream(job.variant, job.data_dir)
        chunks: Iterator[list[dict[str, Any]]] = iter([events])
        hours = job.variant.hours
    else:
        assert job.stationary is not None
        chunks = variants.stationary_chunks(job.stationary, job.data_dir)
        hours = job.stationary.hours

    def tabled() -> Iterator[list[dict[str, Any]]]:
        for chunk in chunks:
            builder.add(chunk)
            yield chunk

    run = genmon_side.replay(
        tabled(), settings, embeddings=job.embeddings, embedding_cache=job.cache
    )
    table = builder.build()
    total_s = time.perf_counter() - built
    change_at = None if truth is None else truth.start.timestamp()
    started = np.sort(table.started)
    judged_from = start + warmup_s
    end = start + hours * 3600.0
    out: dict[str, Any] = {
        "id": job.variant.id if job.variant else job.stationary.id,  # type: ignore[union-attr]
        "job": job.id,
        "kind": "change" if job.variant else "stationary",
        "pages_per_week": job.pages_per_week,
        "embeddings": job.embeddings,
        "hours": hours,
        "inferences": len(table),
        "events": run.events,
        "change_at": change_at,
        "judged_from": judged_from,
        "exposure_s": max((change_at or end) - judged_from, 0.0),
        "replay_s": run.seconds,
        "counts": run.counts,
        "genmon_pages": [list(t) for t in run.titles[:20]],
        # Pages during the warm-up are left out of every configuration's false pages
        # (scoring.py); genmon's are counted here so that they are not hidden.
        "genmon_warmup_pages": sum(t < judged_from for ts in run.pages.values() for t in ts),
    }
    if job.variant is not None:
        out.update(_variant_facts(job.variant, truth, table, judged_from, end))
    cls = BY_NAME[job.variant.cls] if job.variant else None
    outcomes = {
        "genmon": score(
            run.pages,
            judged_from=judged_from,
            change_at=change_at,
            end=end,
            signals=cls.signals if cls else (),
            started=started,
            fallback=run.findings,
        ).to_dict()
    }
    if job.compare:
        began = time.perf_counter()
        kind = cls.kind if cls else None
        outcomes.update(_compare(job, table, started, judged_from, change_at, end, kind))
        out["compare_s"] = time.perf_counter() - began
    out["outcomes"] = outcomes
    out["total_s"] = time.perf_counter() - built
    out["build_and_replay_s"] = total_s
    return out


def _variant_facts(
    variant: Variant, truth: Any, table: Table, judged_from: float, end: float
) -> dict[str, Any]:
    begin = truth.start.timestamp()
    after = int(((table.started >= begin) & (table.started < end)).sum())
    return {
        "cls": variant.cls,
        "trace": variant.trace,
        "seed": variant.seed,
        "at_s": variant.at_s,
        "stated": variant.stated(),
        "knobs": variant.knobs,
        "affected": truth.affected,
        "affected_share": truth.affected / after if after else None,
        "magnitude": magnitude(table, begin, end, judged_from),
    }


def _compare(
    job: Job,
    table: Table,
    started: np.ndarray,
    judged_from: float,
    change_at: float | None,
    end: float,
    kind: str | None,
) -> dict[str, Any]:
    """Outcomes of the fixed thresholds and of every River grid point."""
    out = {
        "fixed": score(
            fixed.alarms(table),
            judged_from=judged_from,
            change_at=change_at,
            end=end,
            signals=FIXED_SIGNALS[kind] if kind else (),
            started=started,
        ).to_dict()
    }
    distances = river_side.embedding_distances(table, job.cache, _encoder)
    values = river_side.signal_values(table, distances)
    alarms = river_side.run(values, judged_from, river_side.grid())
    for key, by_signal in alarms.items():
        out[key] = score(
            by_signal,
            judged_from=judged_from,
            change_at=change_at,
            end=end,
            signals=RIVER_SIGNALS[kind] if kind else (),
            started=started,
        ).to_dict()
    return out
