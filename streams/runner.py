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

**Embedding drift** (:meth:`DetectorRunner.on_embeddings`, signal ``embedding_<field>``,
detector ``detectors.embedding_detector``, default ``online_mmd``). Each
``(model, version, field)`` series has its own state, one table record under
:func:`embedding_key`, apart from the model's window state:

- *Reference.* Samples are collected until they hold ``3 x detectors.drift_window``
  rows (the least the online detectors accept), across as many windows as it takes, so
  low-traffic models get a reference too; then the detector is fitted on them (a uniform
  subset if they exceed the cap below) and later samples are tested. Collected rows are
  at most ``3 x drift_window`` and stored as float16.
- *Size.* A changelog record must stay under Kafka's 1 MB default, so a series' JSON
  state is kept under :data:`STATE_MAX_BYTES` (900,000 bytes). The reference is rounded
  to float16 *before* fitting (relative error 2^-11, far below MiniLM's spread), which
  makes storing it as float16 exact: a detector rebuilt from the state equals the live
  one. Its rows are capped at ``min(detectors.reference_size, max_reference_rows(dim,
  drift_window))``: 733 rows for 384-dimensional MiniLM with the default window of 64.
  A state that would still exceed the bound (another detector) is refused with a
  ``ConfigurationError`` rather than written.
- *Live detectors.* Rebuilding an online detector recalibrates it (about a second at
  384 dimensions), so the last :data:`LIVE_DETECTORS` detectors stay in memory (LRU),
  reused while the stored state carries the revision they wrote; after a restart or a
  rebalance they are rebuilt from the state, with identical results.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from genmon.detectors import REGISTRY, Detector, DetectorResult, ThresholdDetector, load_state
from genmon.detectors.drift._common import decode_array, encode_array
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import Finding, FindingKind
from genmon.settings import Settings

log = logging.getLogger(__name__)

DETECT_ON = "tumbling"
ALL = "*"
#: ``last_end`` kind of embedding samples (a series applies each window's sample once).
EMBEDDING_KIND = "embedding"
#: Largest JSON state of one embedding series, i.e. one changelog record: under Kafka's
#: default 1 MB message size (``message.max.bytes``, ``max.request.size``) with room to spare.
STATE_MAX_BYTES = 900_000
#: Part of :data:`STATE_MAX_BYTES` kept for JSON keys, parameters and counters.
STATE_OVERHEAD_BYTES = 16_384
#: Live embedding detectors cached per process (each ~3 MB at 384 dimensions).
LIVE_DETECTORS = 64


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
        self,
        settings: Settings,
        scalar_signals: Sequence[ScalarSignal] | None = None,
        live_detectors: int = LIVE_DETECTORS,
    ) -> None:
        self.settings = settings
        self.min_reference_rows = 3 * settings.detectors.drift_window
        self.live_detectors = live_detectors
        # series -> (revision of the stored state it matches, detector); LRU order.
        self._live: OrderedDict[str, tuple[str, Detector]] = OrderedDict()
        # on_embeddings may run in worker threads (it calibrates for seconds).
        self._live_lock = threading.Lock()
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

        ``state`` is the series' own state (one table record per series, see
        :func:`embedding_key`). Until the reference is fitted, samples are collected
        (float16) and produce no finding; a sample whose window is not newer than the
        last one applied (a redelivery) changes nothing. Raises ``ConfigurationError``
        when the new state would exceed :data:`STATE_MAX_BYTES`.
        """
        state = _copy_state(state)
        end_ms = round(window_end.timestamp() * 1000)
        if end_ms <= state["last_end"].get(EMBEDDING_KIND, -(2**62)):
            return state, []
        state["last_end"][EMBEDDING_KIND] = end_ms
        skey = f"embedding:{field}\x1f{model_version}\x1f{ALL}"
        series = embedding_key(model_id, model_version, field)
        entry = state["series"].setdefault(skey, {"clears": 0})
        rows = np.asarray(array, dtype=np.float32)
        if "det" not in entry:
            self._collect_reference(entry, series, rows)
            _check_size(state, series)
            return state, []
        det = self._live_detector(series, entry)
        result = det.update(rows)
        self._keep_live(series, entry, det)
        ctx = _WindowContext(
            {"model_id": model_id, "window_start": None, "window_end": window_end.isoformat()}
        )
        findings = self._publishable(
            state,
            skey,
            result,
            ctx,
            model_version,
            ALL,
            f"embedding_{field}",
            FindingKind.DRIFT,
            len(rows),
        )
        _check_size(state, series)
        return state, findings

    def _collect_reference(self, entry: dict[str, Any], series: str, rows: np.ndarray) -> None:
        # The reference is rounded to float16 before the detector ever sees it, so storing
        # it as float16 is lossless and a rebuilt detector is identical to the live one.
        factory = self._embedding_factory()
        rows = _to_half(rows, series)
        if "pending" in entry:
            rows = np.concatenate([decode_array(entry["pending"]), rows])
        if len(rows) < self.min_reference_rows:
            entry["pending"] = encode_array(rows)
            return
        entry.pop("pending", None)
        cap = self.reference_rows(rows.shape[1])
        if len(rows) > cap:
            keep = np.random.default_rng(0).choice(len(rows), cap, replace=False)
            rows = rows[np.sort(keep)]
        det = factory(rows.astype(np.float32), **_embedding_params(factory, self.settings))
        self._keep_live(series, entry, det)

    def reference_rows(self, dim: int) -> int:
        """Most reference rows of a ``dim``-dimensional series: ``detectors.reference_size``
        capped by :func:`max_reference_rows`."""
        window = self.settings.detectors.drift_window
        cap = min(self.settings.detectors.reference_size, max_reference_rows(dim, window))
        if cap < self.min_reference_rows:
            raise ConfigurationError(
                f"a {dim}-dimensional embedding reference may hold at most {cap} rows "
                f"(detectors.reference_size, or a {STATE_MAX_BYTES}-byte state), but "
                f"detectors.drift_window={window} needs {self.min_reference_rows}; "
                "lower detectors.drift_window or raise detectors.reference_size"
            )
        return cap

    def _live_detector(self, series: str, entry: dict[str, Any]) -> Detector:
        # Taken out of the cache while in use: if update() raises half-way, the detector is
        # dropped and the next sample rebuilds it from the stored state.
        with self._live_lock:
            cached = self._live.pop(series, None)
        if cached is not None and cached[0] == entry.get("rev"):
            return cached[1]
        return load_state(entry["det"])

    def _keep_live(self, series: str, entry: dict[str, Any], det: Detector) -> None:
        # A fresh revision per write: a cached detector is reused only while the stored
        # state is the one it wrote (not after another worker wrote the series, nor when
        # this write never reached the table).
        entry["det"] = _compact_reference(det.state_dict())
        entry["rev"] = uuid.uuid4().hex
        with self._live_lock:
            self._live[series] = (entry["rev"], det)
            while len(self._live) > self.live_detectors:
                self._live.popitem(last=False)

    def forget_live_detectors(self) -> None:
        """Drop every cached embedding detector (on a rebalance)."""
        with self._live_lock:
            self._live.clear()

    def _embedding_factory(self) -> Callable[..., Detector]:
        name = self.settings.detectors.embedding_detector
        if name:
            if name not in REGISTRY:
                raise ConfigurationError(
                    f"detectors.embedding_detector={name!r} is not a registered detector; "
                    f"choose one of {sorted(REGISTRY)}"
                )
            factory = REGISTRY[name]
            if "reference" not in inspect.signature(factory).parameters:
                raise ConfigurationError(
                    f"detectors.embedding_detector={name!r} takes no reference sample; "
                    "choose a drift detector such as 'online_mmd'"
                )
            return factory
        for candidate in ("online_mmd", "mmd_drift"):
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


def embedding_key(model_id: str, model_version: str, field: str) -> str:
    """Table key of one embedding series: unambiguous whatever characters the ids hold."""
    return json.dumps([model_id, model_version, field], ensure_ascii=False)


def max_reference_rows(dim: int, window: int) -> int:
    """Most float16 reference rows that keep one series' JSON state under the bound.

    The state holds the reference (float16, base64), the detector's window (at most
    ``window`` float32 rows, base64) with two float64 sums per window row, and
    :data:`STATE_OVERHEAD_BYTES` for the rest.

    >>> max_reference_rows(384, 64)  # all-MiniLM-L6-v2, default drift_window
    733
    """
    window_bytes = _base64_len(window * dim * 4) + 2 * _base64_len(window * 8)
    free = STATE_MAX_BYTES - STATE_OVERHEAD_BYTES - window_bytes
    return max(free * 3 // (dim * 2 * 4), 0)


def _base64_len(n_bytes: int) -> int:
    return 4 * -(-n_bytes // 3)


def _to_half(rows: np.ndarray, series: str) -> np.ndarray:
    half = rows.astype(np.float16)
    if not np.isfinite(half).all():
        raise ConfigurationError(
            f"embeddings of {series} do not fit float16 (|value| > 65504 or not finite); "
            "normalise them before submitting"
        )
    return half


def _compact_reference(state: dict[str, Any]) -> dict[str, Any]:
    """Store a float32 reference as float16 when that is exact (it is for references
    the runner fitted), halving the state; detectors read it back as float32."""
    reference = state.get("params", {}).get("reference")
    if isinstance(reference, dict) and reference.get("dtype") == "<f4":
        values = decode_array(reference)
        half = values.astype(np.float16)
        if np.array_equal(half.astype(np.float32), values):
            state["params"]["reference"] = encode_array(half)
    return state


def _check_size(state: dict[str, Any], series: str) -> None:
    size = len(json.dumps(state))
    if size > STATE_MAX_BYTES:
        raise ConfigurationError(
            f"the embedding drift state of {series} would be {size} bytes, over "
            f"{STATE_MAX_BYTES} (Kafka refuses changelog records over 1 MB by default); "
            "lower detectors.reference_size or detectors.drift_window"
        )


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
