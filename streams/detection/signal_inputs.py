"""What each signal of the catalog gives a detector, read from a closed window record or a
sample of texts (:mod:`genmon.detectors.calibration.catalog` names the signals and forms).

A closed tumbling window carries, per version, a ``"*"`` series (all its traffic) and one
series per ``key=value`` segment: counts (requests, errors, refusals, empty and truncated
answers, languages, feedback), token and length summaries (n, sum, max) and, for the
``"*"`` series, the raw latency sketches (:mod:`genmon.streams.windows.stats`). Forms that
are per-request values (a rate's 0/1 flags, latencies from the sketch, language labels)
are *spread*: each value's requests are interleaved evenly through the window's sequence,
so a detector that keeps the last ``n`` of them, or takes the first ``n`` as its
reference, gets a fair part of the window and not its sorted end.

A sample (the embedding stage's sub-sample of one model, version and field) gives the
texts' embeddings and the texts themselves; configured detectors see the embeddings
projected on :data:`~genmon.detectors.calibration.catalog.EMBEDDING_DIMS` fixed random
orthonormal directions (the same for every process), so a reference fits a state record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genmon.detectors import LatencyObservations, SegmentCounts
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.catalog import SIGNALS, Input
from genmon.detectors.sketch import QuantileSketch
from genmon.schemas.events import FindingKind
from genmon.streams.windows.segment_cap import is_overflow

ALL = sig.ALL
#: Latency signal -> the sketch (and summary) of the window record it reads.
LATENCY_SKETCH = {lat.signal: lat.sketch for lat in sig.LATENCY_SIGNALS}
#: Rate signal -> (events, total) of a window series.
RATES = {rate.signal: rate for rate in (*sig.RATE_SIGNALS, sig.FEEDBACK)}
RATES["truncated_rate"] = sig.RateSignal(
    "truncated_rate", "Truncated answers", "truncated", "requests", FindingKind.QUALITY
)
#: Language label of an answer without letters: says nothing about the mix (and every
#: failed request's empty answer has it, so an error burst is no language shift).
NO_LANGUAGE = "none"
_PROJECTION_SEED = 20_240_611


@dataclass(frozen=True)
class Job:
    """One series' input for one judgement: ``payload`` goes to ``update()``."""

    version: str
    segment: str  # "*", or "<attribute>=*" for a comparison across an attribute's values
    payload: Any
    n: int  # observations behind it
    value: float | None  # what the signal measured (for titles and charts)


def window_jobs(
    signal: str, form: Input, window: dict[str, Any], min_requests: int, quantile: float
) -> list[Job]:
    """The inputs of ``signal`` in ``form`` from a closed window: one job per version (per
    version and segment attribute for a comparison across segments; one per model for a
    comparison across versions and for the request count), none for a series without
    traffic or values."""
    series = window["series"]
    overall = sorted((s for s in series if s["segment"] == ALL), key=lambda s: s["model_version"])
    if form is Input.VERSIONS or form is Input.VERSION_SAMPLES:
        job = _across_versions(signal, form, overall)
        return [] if job is None else [job]
    if form is Input.SEGMENTS:
        return _across_segments(signal, series, min_requests)
    if form is Input.COUNT:
        # The model's traffic: a deploy that splits it between versions is no change.
        n = sum(int(one["requests"]) for one in overall)
        return [Job(ALL, ALL, [float(n)], n, float(n))] if n else []
    jobs = []
    for one in overall:
        if one["requests"] < min_requests and signal != "negative_feedback":
            continue
        job = _version_job(signal, form, one, quantile)
        if job is not None:
            jobs.append(job)
    return jobs


def _version_job(signal: str, form: Input, series: dict[str, Any], quantile: float) -> Job | None:
    version = series["model_version"]
    value = series_value(signal, series, quantile)
    if form is Input.VALUE:
        return None if value is None else Job(version, ALL, [value], 1, value)
    if form is Input.RATE:
        events, total = RATES[signal].counts(series)
        flags = spread([(True, events), (False, total - events)])
        return None if total == 0 else Job(version, ALL, flags, total, value)
    if form is Input.SAMPLES:
        values = sketch_values(series, signal)
        return None if not values else Job(version, ALL, np.asarray(values), len(values), value)
    if form is Input.CATEGORIES:
        counts = {k: int(n) for k, n in series.get("languages", {}).items() if k != NO_LANGUAGE}
        labels = spread(sorted(counts.items()))
        return None if not labels else Job(version, ALL, labels, len(labels), None)
    raise AssertionError(f"no window input {form} for {signal}")


def series_value(signal: str, series: dict[str, Any], quantile: float) -> float | None:
    """What ``signal`` measured in one window series: a rate, the latency quantile (ms),
    the mean tokens or characters per request, the request count."""
    if signal == "requests":
        return float(series["requests"])
    if signal in RATES:
        events, total = RATES[signal].counts(series)
        return events / total if total else None
    if signal in LATENCY_SKETCH:
        state = series.get("sketches", {}).get(LATENCY_SKETCH[signal])
        return None if state is None else QuantileSketch.from_state(state).quantile(quantile)
    summary = series.get(signal)
    if isinstance(summary, dict) and summary.get("n"):
        return float(summary["sum"]) / int(summary["n"])
    return None


def sketch_values(series: dict[str, Any], signal: str) -> list[float]:
    """The window's per-request values of a latency signal, read off its sketch (each within
    the sketch's relative accuracy), spread through the window."""
    state = series.get("sketches", {}).get(LATENCY_SKETCH[signal])
    if state is None:
        return []
    sketch = QuantileSketch.from_state(state)
    groups = [(sketch.key_value(key), n) for key, n in sorted(sketch.bins.items())]
    return spread([(0.0, sketch.zeros), *groups])


def spread(groups: Sequence[tuple[Any, int]]) -> list[Any]:
    """Each ``(value, count)``'s copies interleaved evenly: copy ``j`` of ``count`` sits at
    ``(j + 1/2) / count`` of the sequence (ties in the order of ``groups``)."""
    groups = [(v, int(n)) for v, n in groups if n > 0]
    if not groups:
        return []
    at = np.concatenate([(np.arange(n) + 0.5) / n for _, n in groups])
    which = np.repeat(np.arange(len(groups)), [n for _, n in groups])
    order = np.argsort(at, kind="stable")
    values = [v for v, _ in groups]
    return [values[i] for i in which[order].tolist()]


def _across_segments(signal: str, series: list[dict[str, Any]], min_requests: int) -> list[Job]:
    """Per version and segment attribute: every value's ``SegmentCounts`` (an overflow
    series counts in the population, untested)."""
    grouped: dict[tuple[str, str], list[SegmentCounts]] = {}
    for one in series:
        segment = one["segment"]
        if segment == ALL or "=" not in segment:
            continue
        events, total = RATES[signal].counts(one)
        if total == 0:
            continue
        attribute = segment.split("=", 1)[0]
        counts = SegmentCounts(segment, events, total, tested=not is_overflow(segment))
        grouped.setdefault((one["model_version"], attribute), []).append(counts)
    jobs = []
    for (version, attribute), items in sorted(grouped.items()):
        n = sum(item.total for item in items)
        if n >= min_requests:
            events = sum(item.events for item in items)
            jobs.append(Job(version, f"{attribute}=*", items, n, events / n if n else None))
    return jobs


def _across_versions(signal: str, form: Input, overall: list[dict[str, Any]]) -> Job | None:
    """One job for the model: each version's counts (A/B rates) or values (A/B latency)."""
    if form is Input.VERSIONS:
        items = []
        for one in overall:
            events, total = RATES[signal].counts(one)
            if total:
                items.append(SegmentCounts(one["model_version"], events, total))
        n = sum(item.total for item in items)
        return Job(ALL, ALL, items, n, None) if items else None
    versions: list[str] = []
    values: list[float] = []
    for one in overall:
        got = sketch_values(one, signal)
        versions += [one["model_version"]] * len(got)
        values += got
    if not values:
        return None
    return Job(ALL, ALL, LatencyObservations(versions, np.asarray(values)), len(values), None)


# -- samples ----------------------------------------------------------------------------------
def sample_payload(
    signal: str, array: np.ndarray, texts: Sequence[str], dims: int | None
) -> tuple[Any, int] | None:
    """The input of a sample signal and its size, or None when the sample lacks it (texts
    the caller did not pass, an empty sample)."""
    if SIGNALS[signal].inputs[0] is Input.TEXTS:
        items = [text for text in texts if isinstance(text, str)]
        return (items, len(items)) if items else None
    rows = np.asarray(array, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0:
        return None
    return project(rows, dims), int(rows.shape[0])


def project(rows: np.ndarray, dims: int | None) -> np.ndarray:
    """``rows`` on ``dims`` fixed random orthonormal directions (all of them for ``dims``
    of 0, or at least as many as the rows have)."""
    d = rows.shape[1]
    if not dims or dims >= d:
        return rows
    return (rows @ _basis(d, dims)).astype(np.float32)


_BASES: dict[tuple[int, int], np.ndarray] = {}


def _basis(d: int, k: int) -> np.ndarray:
    basis = _BASES.get((d, k))
    if basis is None:
        gaussian = np.random.default_rng(_PROJECTION_SEED).normal(size=(d, k))
        basis = _BASES[(d, k)] = np.linalg.qr(gaussian)[0].astype(np.float32)
    return basis
