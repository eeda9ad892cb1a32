"""Runs detectors on closed windows (and sampled embeddings) and turns results into findings.

Pure logic: :class:`DetectorRunner` maps ``(model state, closed window) -> (new model
state, findings)``; the worker keeps the model state in a Faust table as JSON (every
detector's ``state_dict``), so detectors continue after a restart from the changelog.

Default wiring, on *tumbling* windows only (hopping windows are for dashboards):

=====================  ===========================  =============================================
signal                 series                       detectors
=====================  ===========================  =============================================
``latency_p99``        each version, segment ``*``  threshold ``windows.slow_latency_ms``;
                                                    ``ewma_zscore`` (upwards) when registered
``error_rate``         each version, segment ``*``  threshold ``detectors.error_rate_max``
``refusal_rate``       each version, segment ``*``  threshold ``detectors.refusal_rate_max``
``empty_rate``         each version, segment ``*``  threshold ``detectors.empty_rate_max``
``negative_feedback``  each version, all segments   ``segment_rate_bias`` when registered (one
                                                    finding per flagged segment), else a
                                                    threshold per segment
=====================  ===========================  =============================================

Windows with fewer than ``detectors.min_window_requests`` requests (or, for feedback,
``detectors.min_segment_size`` scored feedback) are not judged.

**What is published.** Every *detected* result becomes a :class:`Finding`. After a
detection, the evaluations of the same fingerprint keep being published with
``detected=False`` ("clear" signals) for at least ``incidents.auto_resolve_quiet_windows``
windows and until ``incidents.reopen_cooldown_s`` of event time has passed since the last
detection, so the incident manager can count quiet windows and auto-resolve (a flapping
incident also needs a quiet cool-down); after that the fingerprint goes quiet until it
fires again. Never-firing series publish nothing.

**Duplicates.** A window is applied once per model and window family: the state remembers
the last window end applied and skips older or equal ones (re-emitted after a worker
crash). Findings still cross Kafka at least once; ``Finding.dedup_key`` (fingerprint +
window end) is the same for a re-emitted finding, and the incident manager drops repeats.

Finding ``segment`` is ``model_version=<v>`` for whole-version signals and
``model_version=<v>,<key>=<value>`` for a segment, so versions never share a fingerprint.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from genmon.detectors import REGISTRY, Detector, DetectorResult, ThresholdDetector, load_state
from genmon.detectors.exceptions import NotFittedError
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import Finding, FindingKind
from genmon.settings import Settings

log = logging.getLogger(__name__)

DETECT_ON = "tumbling"
ALL = "*"


@dataclass(frozen=True)
class ScalarSignal:
    """A per-window number of one series, judged by one detector."""

    signal: str
    kind: FindingKind
    extract: Callable[[dict[str, Any]], float | None]
    factory: Callable[[], Detector]


def _rate(name: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda s: s.get(name)


def _p99(s: dict[str, Any]) -> float | None:
    return s["latency_ms"].get("p99")


def default_scalar_signals(settings: Settings) -> list[ScalarSignal]:
    d = settings.detectors
    specs = [
        ScalarSignal(
            "latency_p99",
            FindingKind.ANOMALY,
            _p99,
            lambda: ThresholdDetector(settings.windows.slow_latency_ms),
        ),
        ScalarSignal(
            "error_rate",
            FindingKind.QUALITY,
            _rate("error_rate"),
            lambda: ThresholdDetector(d.error_rate_max),
        ),
        ScalarSignal(
            "refusal_rate",
            FindingKind.QUALITY,
            _rate("refusal_rate"),
            lambda: ThresholdDetector(d.refusal_rate_max),
        ),
        ScalarSignal(
            "empty_rate",
            FindingKind.QUALITY,
            _rate("empty_rate"),
            lambda: ThresholdDetector(d.empty_rate_max),
        ),
    ]
    ewma = REGISTRY.get("ewma_zscore")
    if ewma is not None:
        specs.insert(
            1, ScalarSignal("latency_p99", FindingKind.ANOMALY, _p99, lambda: ewma(direction="up"))
        )
    return specs


def _segment_label(version: str, segment: str) -> str:
    return f"model_version={version}" if segment == ALL else f"model_version={version},{segment}"


class DetectorRunner:
    """Applies closed windows and embedding batches to per-model detector state."""

    def __init__(
        self, settings: Settings, scalar_signals: Sequence[ScalarSignal] | None = None
    ) -> None:
        self.settings = settings
        self.signals = list(scalar_signals or default_scalar_signals(settings))
        # One signal may have several detectors: their state is keyed by detector name too.
        self._detector_names = [spec.factory().name for spec in self.signals]
        self.min_requests = settings.detectors.min_window_requests
        self.min_feedback = settings.detectors.min_segment_size
        self.clear_windows = settings.incidents.auto_resolve_quiet_windows
        self.clear_for_ms = round(settings.incidents.reopen_cooldown_s * 1000)
        bias = REGISTRY.get("segment_rate_bias")
        self._bias_factory: Callable[[], Detector] | None = (
            (
                lambda: bias(
                    signal="negative_feedback",
                    alpha=settings.detectors.fdr_alpha,
                    min_samples=self.min_feedback,
                )
            )
            if bias is not None
            else None
        )

    # -- windows ------------------------------------------------------------------------
    def on_window(
        self, state: dict[str, Any] | None, window: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Finding]]:
        """Apply one closed window of one model; return the new state and the findings."""
        state = _copy_state(state)
        kind, end = window["kind"], int(window["end_ms"])
        if kind != DETECT_ON or end <= state["last_end"].get(kind, -(2**62)):
            return state, []
        state["last_end"][kind] = end
        ctx = _WindowContext(window)
        findings: list[Finding] = []
        by_version: dict[str, list[dict[str, Any]]] = {}
        for series in window["series"]:
            by_version.setdefault(series["model_version"], []).append(series)
        for version, series_list in sorted(by_version.items()):
            overall = next((s for s in series_list if s["segment"] == ALL), None)
            if overall is not None and overall["requests"] >= self.min_requests:
                for spec, name in zip(self.signals, self._detector_names, strict=True):
                    value = spec.extract(overall)
                    if value is None:
                        continue
                    skey = f"{spec.signal}\x1f{name}\x1f{version}\x1f{ALL}"
                    det = self._detector(state, skey, spec.factory)
                    result = det.update([value])
                    self._save(state, skey, det)
                    findings += self._publishable(
                        state,
                        skey,
                        result,
                        ctx,
                        version,
                        ALL,
                        spec.signal,
                        spec.kind,
                        overall["requests"],
                    )
            findings += self._feedback_bias(state, ctx, version, series_list)
        return state, findings

    def _feedback_bias(
        self,
        state: dict[str, Any],
        ctx: _WindowContext,
        version: str,
        series_list: list[dict[str, Any]],
    ) -> list[Finding]:
        segments = [s for s in series_list if s["segment"] != ALL]
        scored = {
            s["segment"]: (
                s["feedback"]["negative"],
                s["feedback"]["negative"] + s["feedback"]["positive"],
            )
            for s in segments
        }
        if not any(total for _, total in scored.values()):
            return []
        signal, out = "negative_feedback", []
        if self._bias_factory is not None:
            from genmon.detectors.bias import SegmentCounts

            skey = f"{signal}\x1f{version}\x1f(segments)"
            det = self._detector(state, skey, self._bias_factory)
            result = det.update(
                [
                    SegmentCounts(seg, neg, total)
                    for seg, (neg, total) in sorted(scored.items())
                    if total
                ]
            )
            self._save(state, skey, det)
            flagged = {e.segment for e in result.evidence.segments if e.flagged}
            tested = {e.segment for e in result.evidence.segments}
            for seg in sorted(tested):
                per_seg = f"{signal}\x1f{version}\x1f{seg}"
                seg_result = _with_detected(result, seg in flagged)
                out += self._publishable(
                    state,
                    per_seg,
                    seg_result,
                    ctx,
                    version,
                    seg,
                    signal,
                    FindingKind.BIAS,
                    scored.get(seg, (0, 0))[1],
                )
            return out
        threshold = self.settings.detectors.negative_feedback_rate_max
        for seg, (neg, total) in sorted(scored.items()):
            if total < self.min_feedback:
                continue
            skey = f"{signal}\x1f{version}\x1f{seg}"
            det = self._detector(state, skey, lambda: ThresholdDetector(threshold))
            result = det.update([neg / total])
            self._save(state, skey, det)
            out += self._publishable(
                state, skey, result, ctx, version, seg, signal, FindingKind.BIAS, total
            )
        return out

    # -- embeddings (the hook the embedding stage calls) ----------------------------------
    def on_embeddings(
        self,
        state: dict[str, Any] | None,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
        array: np.ndarray,
    ) -> tuple[dict[str, Any], list[Finding]]:
        """Run the embedding drift detector of ``(model, version, field)`` on one sample.

        The first sample of a series becomes the detector's reference when the detector
        needs one (``NotFittedError`` -> ``fit(array)``), and produces no finding.
        """
        state = _copy_state(state)
        factory = self._embedding_factory()
        skey = f"embedding:{field}\x1f{model_version}\x1f{ALL}"
        if skey not in state["series"] and _needs_reference(factory):
            # The first sample of the series is its reference (H9's embedding stage edit).
            build: Callable[..., Detector] = factory
            self._save(state, skey, build(array, **_embedding_params(build, self.settings)))
            return state, []
        det = self._detector(state, skey, factory)
        try:
            result = det.update(array)
        except NotFittedError:
            fit = getattr(det, "fit", None)
            if fit is None:
                raise
            fit(array)
            self._save(state, skey, det)
            return state, []
        self._save(state, skey, det)
        ctx = _WindowContext(
            {"model_id": model_id, "window_start": None, "window_end": window_end.isoformat()}
        )
        return state, self._publishable(
            state,
            skey,
            result,
            ctx,
            model_version,
            ALL,
            f"embedding_{field}",
            FindingKind.DRIFT,
            len(array),
        )

    def _embedding_factory(self) -> Callable[[], Detector]:
        name = self.settings.detectors.embedding_detector
        if name:
            if name not in REGISTRY:
                raise ConfigurationError(
                    f"detectors.embedding_detector={name!r} is not a registered detector; "
                    f"choose one of {sorted(REGISTRY)}"
                )
            return REGISTRY[name]
        for candidate in ("online_mmd", "mmd"):
            if candidate in REGISTRY:
                return REGISTRY[candidate]
        raise ConfigurationError(
            "no embedding drift detector is registered; set detectors.embedding_detector"
        )

    # -- state and publishing ---------------------------------------------------------------
    @staticmethod
    def _detector(state: dict[str, Any], skey: str, factory: Callable[[], Detector]) -> Detector:
        entry = state["series"].get(skey)
        if entry is None:
            return factory()
        return load_state(entry["det"])

    @staticmethod
    def _save(state: dict[str, Any], skey: str, det: Detector) -> None:
        entry = state["series"].setdefault(skey, {"clears": 0})
        entry["det"] = det.state_dict()

    def _publishable(
        self,
        state: dict[str, Any],
        skey: str,
        result: DetectorResult,
        ctx: _WindowContext,
        version: str,
        segment: str,
        signal: str,
        kind: FindingKind,
        n: int,
    ) -> list[Finding]:
        entry = state["series"].setdefault(skey, {"clears": 0})
        end_ms = ctx.end_ms
        if result.detected:
            entry["clears"] = self.clear_windows
            entry["fired_ms"] = end_ms
        elif entry.get("clears", 0) > 0 or (
            "fired_ms" in entry
            and end_ms is not None
            and end_ms - entry["fired_ms"] < self.clear_for_ms
        ):
            entry["clears"] = max(entry.get("clears", 0) - 1, 0)
        else:
            return []
        evidence = result.to_dict()["evidence"]
        evidence["window_n"] = n
        return [
            Finding(
                model_id=ctx.model_id,
                model_version=version,
                detector=result.detector,
                kind=kind,
                signal=signal,
                segment=_segment_label(version, segment),
                window_start=ctx.window_start,
                window_end=ctx.window_end,
                score=_finite(result.score),
                threshold=_finite(result.threshold),
                detected=result.detected,
                p_value=result.p_value,
                effect_size=result.effect_size,
                n_seen=result.n_seen,
                evidence=evidence,
            )
        ]


def _needs_reference(factory: Callable[..., Detector]) -> bool:
    return "reference" in inspect.signature(factory).parameters


def _embedding_params(factory: Callable[..., Detector], settings: Settings) -> dict[str, Any]:
    wanted = {"window_size": settings.detectors.drift_window, "ert": settings.detectors.ert}
    accepted = inspect.signature(factory).parameters
    return {name: value for name, value in wanted.items() if name in accepted}


class _WindowContext:
    def __init__(self, window: dict[str, Any]) -> None:
        self.model_id: str = window["model_id"]
        self.window_start = window.get("window_start")
        self.window_end = window.get("window_end")
        end = window.get("end_ms")
        if end is None and self.window_end is not None:
            end = datetime.fromisoformat(str(self.window_end)).timestamp() * 1000
        self.end_ms: int | None = None if end is None else int(end)


def _with_detected(result: DetectorResult, detected: bool) -> DetectorResult:
    from dataclasses import replace

    return replace(result, detected=detected)


def _finite(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        return 0.0 if value != value else (1e308 if value > 0 else -1e308)
    return float(value)


def _copy_state(state: dict[str, Any] | None) -> dict[str, Any]:
    if state is None:
        return {"last_end": {}, "series": {}}
    return {
        "last_end": dict(state["last_end"]),
        "series": {k: dict(v) for k, v in state["series"].items()},
    }
