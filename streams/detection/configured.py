"""Runs the detectors a model's plan configures beyond the runner's own tests.

The runner (:mod:`genmon.streams.detection.runner`) judges the built-in pairs itself: the
binomial rate CUSUM against the model's baselines (every rate signal; the extra ones,
like ``truncated_rate``, come from :meth:`ConfiguredDetectors.rate_observations`) and the
embedding shift test. Every other entry of the plan
(:mod:`genmon.detectors.calibration.plan`) runs here, after them: on each closed window
(:meth:`ConfiguredDetectors.on_window`) or each sub-sample of sampled texts
(:meth:`ConfiguredDetectors.on_sample`), with its input read by
:mod:`~genmon.streams.detection.signal_inputs`.

**State.** Each (entry, version, segment) is one series of the model's state record
(the embedding series' record for sample signals) under :func:`series_key` with the
entry's name as detector, so the TTL, the cap and the size bound of
:mod:`~genmon.streams.detection.model_state` apply to it. The record keeps the detector's
``det`` state and a fingerprint of the entry (``cfg``): a changed entry starts its
series afresh. A detector that learns a reference first collects it in ``ref``, at most
a tenth of it from one window (or look), so it spans at least ten of them.

**Calibration.** Inside the budget, the parameter that sets an entry's false-alarm rate is
recomputed each window from its share and the series judged at once (the entry's
series in that window; the model's series of the field for a sample), as the runner does
for its CUSUMs (:meth:`~genmon.detectors.calibration.budget.Budget.params`).

**Findings** go through the runner's ``_publishable`` (clear signals after a detection,
error analysis) with a title that has numbers and the entry's severity, or for ``auto``
one from effect size and score (:func:`auto_severity`). A sample's clear looks go out at
most once per window (as the embedding shift's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from genmon.detectors import REGISTRY, Detector, DetectorResult
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.catalog import (
    BUILTIN_RATE_SIGNALS,
    EMBEDDING_DIMS,
    FITS,
    RATE_CUSUM,
    SIGNALS,
    WINDOW,
    Input,
    reference_size,
)
from genmon.detectors.calibration.plan import PlanEntry
from genmon.detectors.drift._common import decode_array, encode_array
from genmon.detectors.exceptions import DetectorError
from genmon.schemas.events import Finding, FindingKind, Severity
from genmon.streams.detection.embedding_series import publishes
from genmon.streams.detection.findings import WindowContext
from genmon.streams.detection.model_state import series_key
from genmon.streams.detection.observations import ModelBaselines, Observation
from genmon.streams.detection.points import SignalPoint
from genmon.streams.detection.signal_inputs import (
    RATES,
    Job,
    sample_payload,
    window_jobs,
)

if TYPE_CHECKING:
    from genmon.streams.detection.runner import DetectorRunner

log = logging.getLogger(__name__)

ALL = sig.ALL
#: A reference spans at least this many windows (or looks): each gives at most its share.
REFERENCE_WINDOWS = 10
_ORDER = (Severity.WARNING, Severity.ERROR, Severity.CRITICAL)


class ConfiguredDetectors:
    """A runner's configured detectors (see the module docstring)."""

    def __init__(self, runner: DetectorRunner) -> None:
        self.runner = runner
        self.settings = runner.settings
        self.budget = runner.budget
        self.quantile = self.settings.detectors.latency_quantile
        self.window_ms = round(self.settings.windows.tumbling_s * 1000)
        self._complained: set[str] = set()

    # -- the rate CUSUMs the runner judges -------------------------------------------------
    def rate_observations(
        self, window: dict[str, Any], baselines: ModelBaselines, min_requests: int
    ) -> list[Observation]:
        """One observation per version of each rate signal the plan gives a ``rate_cusum``
        beyond the runner's own (``truncated_rate``): the runner judges, publishes and
        learns them as it does its own."""
        out: list[Observation] = []
        for entry in self.budget.plan.for_model(window["model_id"]):
            if entry.detector != RATE_CUSUM or entry.signal in BUILTIN_RATE_SIGNALS:
                continue
            rate = RATES[entry.signal]
            for series in window["series"]:
                if series["segment"] != ALL or series["requests"] < min_requests:
                    continue
                events, total = rate.counts(series)
                if total > 0:
                    version = series["model_version"]
                    baseline = baselines.rate(entry.signal, ALL)
                    observation = Observation(
                        entry.signal, rate.kind, version, ALL, events, total, series, baseline
                    )
                    observation.label = rate.label
                    out.append(observation)
        return out

    # -- windows and samples ----------------------------------------------------------------
    def on_window(
        self, state: dict[str, Any], ctx: WindowContext, window: dict[str, Any], end: int
    ) -> list[Finding]:
        """Judge a closed window with every configured window-signal entry of its model."""
        findings: list[Finding] = []
        for entry in self.budget.plan.for_model(ctx.model_id):
            if entry.builtin or SIGNALS[entry.signal].source != WINDOW:
                continue
            jobs = window_jobs(
                entry.signal, entry.input, window, self.runner.min_requests, self.quantile
            )
            for job in jobs:
                findings += self._judge(state, ctx, entry, job, len(jobs), end, sample=False)
        return findings

    def on_sample(
        self,
        state: dict[str, Any],
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
        array: np.ndarray,
        texts: Any,
        series: int,
    ) -> list[Finding]:
        """Judge one sub-sample of ``field``'s sampled texts (``texts`` may be empty: then
        the text signals are not judged) with the model's configured sample entries."""
        signals = (f"embedding_{field}", f"{field}_text")
        end_ms = round(window_end.timestamp() * 1000)
        ctx = WindowContext(
            {"model_id": model_id, "window_start": None, "window_end": window_end.isoformat()}
        )
        findings: list[Finding] = []
        for entry in self.budget.plan.for_model(model_id):
            if entry.builtin or entry.signal not in signals:
                continue
            dims = EMBEDDING_DIMS if entry.dims is None else entry.dims
            got = sample_payload(entry.signal, array, list(texts or ()), dims)
            if got is not None:
                job = Job(model_version, ALL, got[0], got[1], None)
                findings += self._judge(state, ctx, entry, job, series, end_ms, sample=True)
        return findings

    # -- one series ---------------------------------------------------------------------------
    def _judge(
        self,
        state: dict[str, Any],
        ctx: WindowContext,
        entry: PlanEntry,
        job: Job,
        series: int,
        end: int,
        sample: bool,
    ) -> list[Finding]:
        version = str(entry.params.get("candidate", job.version))
        skey = series_key(entry.signal, entry.name, job.version, job.segment)
        record = _record(state, skey, entry)
        record["seen_ms"] = end
        det = self._detector(record, entry, job, self.budget.params(entry, series))
        if det is None:
            return []
        try:
            result = det.update(job.payload)
        except Exception as exc:
            # One configured detector that fails must not cost the window its other
            # judgements (the built-in ones included): it is skipped, and said once.
            self._complain(entry, f"cannot judge {skey!r}: {type(exc).__name__}: {exc}")
            return []
        record["det"] = det.state_dict()
        self._chart(ctx.model_id, version, job, entry, result, end)
        if sample and not publishes(record, result.detected, end, self.window_ms):
            return []
        severity = entry.severity or auto_severity(entry, result, job.value, self.settings)
        return self.runner._publishable(
            state,
            skey,
            result,
            ctx,
            version,
            job.segment,
            entry.signal,
            FindingKind(det.kind.value),
            job.n,
            severity,
            title(entry, result, job.value, sig.where(ctx.model_id, version, job.segment)),
            {"plan": entry.source},
        )

    def _detector(
        self, record: dict[str, Any], entry: PlanEntry, job: Job, params: dict[str, Any]
    ) -> Detector | None:
        """The series' detector with this window's calibration; None while it learns its
        reference (or when it cannot be built on the one it learned)."""
        cls = REGISTRY[entry.detector]
        fit = FITS[entry.detector]
        det = self.runner._restored(record, cls)
        if det is not None:
            if entry.calibrated and fit.calibration is not None:
                for name in fit.calibration.params:
                    setattr(det, name, params[name])
            return det
        if not fit.reference:
            return cls(**params)
        reference = _grow_reference(record, entry, job)
        if reference is None:
            return None
        try:
            return cls(reference=reference, **params)
        except (DetectorError, ValueError) as exc:
            # A reference it cannot use (e.g. all its rows alike): learn another.
            record.pop("ref", None)
            self._complain(entry, f"learns its reference again: {exc}")
            return None

    def _chart(
        self,
        model_id: str,
        version: str,
        job: Job,
        entry: PlanEntry,
        result: DetectorResult,
        end: int,
    ) -> None:
        if self.runner.points is None:
            return
        score, threshold = float(result.score), float(result.threshold)
        if not (math.isfinite(score) and math.isfinite(threshold)):
            return
        self.runner._point(
            SignalPoint(
                model_id=model_id,
                version=version,
                segment=job.segment,
                signal=entry.signal,
                detector=entry.detector,
                at_ms=end,
                value=job.value,
                baseline=result.evidence.value("reference_rate"),
                score=score,
                threshold=threshold,
                detected=bool(result.detected),
                n=job.n,
            )
        )

    def _complain(self, entry: PlanEntry, problem: str) -> None:
        key = f"{entry.source}:{problem.split(':')[0]}"
        if key not in self._complained:
            self._complained.add(key)
            log.warning("%s (%s on %s, %s)", problem, entry.detector, entry.signal, entry.source)


def _record(state: dict[str, Any], skey: str, entry: PlanEntry) -> dict[str, Any]:
    """The series' entry in the state; a changed plan entry starts it afresh (its clear
    signals carry over, so an open incident still resolves)."""
    record = state["series"].setdefault(skey, {"clears": 0})
    cfg = fingerprint(entry)
    if record.get("cfg") != cfg:
        for stale in ("det", "ref"):
            record.pop(stale, None)
        record["cfg"] = cfg
    return record


def fingerprint(entry: PlanEntry) -> str:
    """What makes a series' detector: its detector, parameters, reference and dimensions."""
    key = [entry.detector, entry.params, entry.reference_size, entry.dims, entry.share > 0]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _grow_reference(record: dict[str, Any], entry: PlanEntry, job: Job) -> Any | None:
    """Add a spread part of the job's values to the series' reference; return the whole
    reference once it holds its size (its values then leave the record)."""
    form = entry.input
    size = entry.reference_size or reference_size(entry.detector, form, entry.params)
    per_window = max(1, math.ceil(size / REFERENCE_WINDOWS))
    if form is Input.EMBEDDINGS:
        have = decode_array(record["ref"]) if "ref" in record else None
        rows = _evenly(np.asarray(job.payload, dtype=np.float32), per_window)
        rows = rows if have is None else np.concatenate([have, rows])[:size]
        if len(rows) < size:
            record["ref"] = encode_array(rows)
            return None
        record.pop("ref", None)
        return rows
    have_list: list[Any] = list(record.get("ref", []))
    values = list(np.asarray(job.payload, dtype=object).ravel().tolist())
    have_list += list(_evenly(np.asarray(values, dtype=object), per_window).tolist())
    have_list = have_list[:size]
    if len(have_list) < size:
        record["ref"] = [v if isinstance(v, str) else float(v) for v in have_list]
        return None
    record.pop("ref", None)
    return have_list if form is Input.CATEGORIES else np.asarray(have_list, dtype=float)


def _evenly(items: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of ``items``, evenly spaced."""
    if len(items) <= most:
        return items
    return items[np.linspace(0, len(items) - 1, most).round().astype(int)]


# -- what a finding says ---------------------------------------------------------------------------
def title(entry: PlanEntry, result: DetectorResult, value: float | None, where: str) -> str:
    """``Requests 1,240: throughput z 8.1 over 4.6, support-bot v3``: the signal's value,
    the detector's score against its threshold, p-value, effect and flagged segment."""
    spec = SIGNALS[entry.signal]
    shown = f" {_value(value, spec.unit)}" if value is not None else ""
    parts = [
        f"{spec.label}{shown}: {entry.detector} {_num(result.score)} over {_num(result.threshold)}"
    ]
    if result.p_value is not None:
        parts.append(f"p={result.p_value:.2g}")
    if result.effect_size is not None and math.isfinite(result.effect_size):
        parts.append(f"effect {result.effect_size:.2g}")
    flagged = result.evidence.segment
    if flagged:
        parts.append(f"{flagged} flagged")
    return f"{', '.join(parts)}, {where}"


def _value(value: float, unit: str) -> str:
    if unit == "rate":
        return sig.percent(value)
    if unit == "ms":
        return sig.duration(value)
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


def auto_severity(
    entry: PlanEntry, result: DetectorResult, value: float | None, settings: Any
) -> Severity:
    """Severity from the effect and the score, as :mod:`~genmon.detectors.calibration.signals`
    judges the built-in signals: a rate against its reference rate by how far it rose;
    otherwise the worse of the score/threshold and |effect size| bands of
    ``incidents.severity_*_bands``; at least a warning."""
    reference = result.evidence.value("reference_rate")
    if reference is not None and value is not None and SIGNALS[entry.signal].unit == "rate":
        return sig.rate_severity(value, reference, confident=True)
    bands = settings.incidents
    best = Severity.WARNING
    score, threshold = float(result.score), float(result.threshold)
    if math.isfinite(score) and math.isfinite(threshold) and threshold > 0:
        best = _band(score / threshold, bands.severity_score_ratio_bands, best)
    effect = result.effect_size
    if effect is not None and math.isfinite(effect):
        best = _band(abs(effect), bands.severity_effect_size_bands, best)
    return best


def _band(value: float, bands: dict[str, float], floor: Severity) -> Severity:
    best = floor
    for name, least in bands.items():
        severity = Severity(name)
        if severity in _ORDER and value >= least and _ORDER.index(severity) > _ORDER.index(best):
            best = severity
    return best
