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
``negative_feedback``  each version, each segment   ``segment_rate_bias`` when registered (one
                       but ``<attr>=__other__``     test per version and attribute, one finding
                                                    per flagged segment), else a threshold per
                                                    segment
=====================  ===========================  =============================================

Windows with fewer than ``detectors.min_window_requests`` requests (or, for feedback,
``detectors.min_segment_size`` scored feedback) are not judged.

**Overflow series.** A window's ``<attribute>=__other__`` series (traffic of the values
beyond ``windows.max_segment_values``, see :mod:`~genmon.streams.segment_cap`) mixes many
values: a disparity found in it names no group on-call could act on and would page on
noise, so it is never a compared segment (no ``negative_feedback`` finding, no threshold
of its own). Its traffic stays in the population of its attribute's ``segment_rate_bias``
test (as ``SegmentCounts(tested=False)``): every other value of the attribute is still
compared with all the rest of the attribute's traffic, and the evidence notes say how
much of it there was.

**Bias tests.** Each ``attribute=value`` series of a window counts every request
carrying the attribute, so with several attributes a request is in one series per
attribute. The feedback bias test is therefore one ``segment_rate_bias`` detector per
model version and *attribute* (state key :func:`bias_family_key`): ``locale=fr`` is
compared with the other ``locale`` values and ``locale=__other__``, never with
``tier=*`` series that hold fr's own requests again. Requests without the attribute are
in none of its series and not in its test, and a window without scored feedback of the
attribute leaves its test as it was. Benjamini-Hochberg runs per attribute, so
``detectors.fdr_alpha`` bounds the expected share of false flags among each attribute's
flagged values: an attribute is one question ("do locales differ?") with its own values
as hypotheses; pooling attributes would mix tests of the same requests (dependent in
ways the data do not show) and let a many-valued attribute dilute the power of every
other one. The price: the rate is controlled within each attribute, not across them, so
a model with many attributes can expect more false flags in all than one with a single
attribute. Findings are unchanged (one per flagged segment, ``segment`` names the
attribute), so an open incident keeps its fingerprint across the change. State written
before per-attribute tests (one family per version mixing attributes, key
``...(segments)``) cannot be split exactly (its population ring counted a request once
per attribute): it is dropped at the version's next window and the attribute tests start
fresh, their ``n_windows`` ring refilling (per-segment clear signals carry on).

**State bounds.** A model's window state is one table record with one entry per series
(signal, detector, version, segment) and ``seen_ms``, the end of the last window that
judged it (event time). Each applied window first drops the series not judged for
``detectors.series_ttl_s`` (default 24 h): a version or segment back after that starts
fresh (a new detector, ``n_seen`` from 1, no clear signals owed). After judging, the least
recently judged series (ties by key) go while there are more than
``detectors.max_series_per_model`` or the record would exceed :data:`STATE_MAX_BYTES`.
Eviction depends on window ends only, so a replay evicts the same series, and it is part
of the state written to the changelog, so it holds across restarts. A series judged in
every window keeps its state (``n_seen`` continues). A segment that never fired stores no
entry (``segment_rate_bias`` keeps its per-segment counts in one entry per version and
attribute, bounded by its ``max_segments`` and ``n_windows``). Evictions are counted in
``genmon_detector_series_evicted{reason="ttl"|"cap"|"size"}``.

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

**Error analysis.** A *detected* finding of ``error_rate``, ``refusal_rate``,
``empty_rate`` (or ``truncated_rate``, for a custom signal) or ``negative_feedback``
carries clusters of the window's affected examples of that signal (the series' own
examples: the version's for the rates, the flagged segment's for feedback) in
``evidence.clusters`` and ``evidence.error_analysis``, see
:mod:`genmon.streams.error_evidence`. Clear findings carry none.

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
- *Bounds.* A model's embedding series are listed, each with the end of the last window
  it was sampled in, in one more record of the same table, under
  :func:`embedding_index_key`. Before a sample is applied
  (:meth:`DetectorRunner.admit_embedding_series`), the series not sampled for
  ``detectors.series_ttl_s`` of event time go (a version back after that collects a new
  reference), then the least recently sampled beyond
  ``detectors.max_embedding_series_per_model`` (default 20: ten versions of both
  fields). That cap is not ``max_series_per_model`` because one embedding series may
  hold 900 KB, as much as a model's whole window state: 1000 of them would be 900 MB per
  model. The worker deletes evicted records (changelog tombstones) before it writes the
  index, so a crash in between only repeats a deletion; records written before the index
  existed are adopted when the model's index is first built. Evictions count in
  ``genmon_detector_series_evicted`` (reasons ``ttl``, ``cap``) and drop the series'
  live detector.
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
from genmon.streams.error_evidence import EXAMPLES_OF_SIGNAL, ErrorAnalyzer
from genmon.streams.segment_cap import is_overflow, split_segment

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
#: Why a series left a model's window state: ``detectors.series_ttl_s``,
#: ``detectors.max_series_per_model``, :data:`STATE_MAX_BYTES`.
EVICTION_REASONS = ("ttl", "cap", "size")
#: The per-attribute feedback bias detector (its name in state keys).
BIAS_DETECTOR = "segment_rate_bias"


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


def bias_family_key(version: str, attribute: str) -> str:
    """Window-state key of the ``segment_rate_bias`` test of one version's attribute, laid
    out like a scalar series' (signal, detector, version, segment)."""
    return f"negative_feedback\x1f{BIAS_DETECTOR}\x1f{version}\x1f{attribute}"


def _legacy_bias_key(version: str) -> str:
    return f"negative_feedback\x1f{version}\x1f(segments)"


def _segment_label(version: str, segment: str) -> str:
    return f"model_version={version}" if segment == ALL else f"model_version={version},{segment}"


class DetectorRunner:
    """Applies closed windows and embedding batches to per-model detector state."""

    def __init__(
        self,
        settings: Settings,
        scalar_signals: Sequence[ScalarSignal] | None = None,
        live_detectors: int = LIVE_DETECTORS,
        error_analyzer: ErrorAnalyzer | None = None,
    ) -> None:
        self.settings = settings
        # Without examples in the windows there is nothing to cluster.
        self.error_analyzer = error_analyzer or (
            ErrorAnalyzer(settings) if settings.detectors.exemplars_per_window else None
        )
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
        self.series_ttl_ms = round(settings.detectors.series_ttl_s * 1000)
        self.max_series = settings.detectors.max_series_per_model
        self.max_embedding_series = settings.detectors.max_embedding_series_per_model
        #: Window-state and embedding series this process dropped, by reason (for the
        #: pipeline's counter).
        self.series_evicted = dict.fromkeys(EVICTION_REASONS, 0)
        bias = REGISTRY.get(BIAS_DETECTOR)
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
        # Before judging: a series back after the TTL starts fresh, whether or not other
        # windows of the model came in between.
        self._expire(state["series"], end)
        ctx = _WindowContext(window)
        findings: list[Finding] = []
        by_version: dict[str, list[dict[str, Any]]] = {}
        for series in window["series"]:
            by_version.setdefault(series["model_version"], []).append(series)
        for version, series_list in sorted(by_version.items()):
            # Written before the bias tests were per attribute: one family over every
            # attribute, whose counts cannot be split again (see "Bias tests").
            state["series"].pop(_legacy_bias_key(version), None)
            overall = next((s for s in series_list if s["segment"] == ALL), None)
            if overall is not None and overall["requests"] >= self.min_requests:
                for spec, name in zip(self.signals, self._detector_names, strict=True):
                    value = spec.extract(overall)
                    if value is None:
                        continue
                    skey = f"{spec.signal}\x1f{name}\x1f{version}\x1f{ALL}"
                    det = self._detector(state, skey, spec.factory)
                    result = det.update([value])
                    self._save(state, skey, det, end)
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
                        _examples(overall, spec.signal),
                    )
            findings += self._feedback_bias(state, ctx, end, version, series_list)
        self._cap(state, end, ctx.model_id)
        return state, findings

    def _feedback_bias(
        self,
        state: dict[str, Any],
        ctx: _WindowContext,
        end: int,
        version: str,
        series_list: list[dict[str, Any]],
    ) -> list[Finding]:
        segments = [s for s in series_list if s["segment"] != ALL]
        examples = {s["segment"]: _examples(s, "negative_feedback") for s in segments}
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
            by_attribute: dict[str, dict[str, tuple[int, int]]] = {}
            for seg, counts in scored.items():
                by_attribute.setdefault(split_segment(seg)[0], {})[seg] = counts
            for attribute, family in sorted(by_attribute.items()):
                out += self._attribute_bias(
                    self._bias_factory, state, ctx, end, version, attribute, family, examples
                )
            return out
        threshold = self.settings.detectors.negative_feedback_rate_max
        for seg, (neg, total) in sorted(scored.items()):
            # Without a rest to compare with, the overflow series has nothing to add.
            if total < self.min_feedback or is_overflow(seg):
                continue
            skey = f"{signal}\x1f{version}\x1f{seg}"
            det = self._detector(state, skey, lambda: ThresholdDetector(threshold))
            result = det.update([neg / total])
            self._save(state, skey, det, end)
            out += self._publishable(
                state,
                skey,
                result,
                ctx,
                version,
                seg,
                signal,
                FindingKind.BIAS,
                total,
                examples.get(seg),
            )
        return out

    def _attribute_bias(
        self,
        factory: Callable[[], Detector],
        state: dict[str, Any],
        ctx: _WindowContext,
        end: int,
        version: str,
        attribute: str,
        scored: dict[str, tuple[int, int]],
        examples: dict[str, list[dict[str, str]] | None],
    ) -> list[Finding]:
        """One ``segment_rate_bias`` test of one attribute's values (one BH family)."""
        from genmon.detectors.bias import SegmentCounts

        if not any(total for _, total in scored.values()):
            return []
        signal, out = "negative_feedback", []
        skey = bias_family_key(version, attribute)
        det = self._detector(state, skey, factory)
        # The overflow series mixes many values: its traffic belongs to the rest of every
        # other value of the attribute, but a disparity of its own names no group to act on.
        result = det.update(
            [
                SegmentCounts(seg, neg, total, tested=not is_overflow(seg))
                for seg, (neg, total) in sorted(scored.items())
                if total
            ]
        )
        self._save(state, skey, det, end)
        flagged = {e.segment for e in result.evidence.segments if e.flagged}
        for seg in sorted(e.segment for e in result.evidence.segments):
            per_seg = f"{signal}\x1f{version}\x1f{seg}"
            out += self._publishable(
                state,
                per_seg,
                _with_detected(result, seg in flagged),
                ctx,
                version,
                seg,
                signal,
                FindingKind.BIAS,
                scored.get(seg, (0, 0))[1],
                examples.get(seg),
            )
            if per_seg in state["series"]:
                state["series"][per_seg]["seen_ms"] = end
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

    def admit_embedding_series(
        self,
        index: dict[str, Any] | None,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
    ) -> tuple[dict[str, Any], list[str]]:
        """Bound a model's embedding series before one of them takes a sample.

        ``index`` is the model's record under :func:`embedding_index_key` (``None``: build
        it with :meth:`embedding_index`). Returns the new index and the series keys whose
        stored state must be deleted before the sample is applied: those not sampled for
        ``detectors.series_ttl_s`` before ``window_end`` (the sampled series itself when it
        is back after that: it starts fresh), then, beyond
        ``detectors.max_embedding_series_per_model``, the least recently sampled others
        (ties by key). Only window ends decide, so a replay evicts the same series.
        """
        seen: dict[str, int] = dict((index or {}).get("series", {}))
        key = embedding_key(model_id, model_version, field)
        end_ms = round(window_end.timestamp() * 1000)
        expired = sorted(k for k, ms in seen.items() if end_ms - ms > self.series_ttl_ms)
        for stale in expired:
            del seen[stale]
        seen[key] = max(seen.get(key, end_ms), end_ms)
        lru = sorted((k for k in seen if k != key), key=lambda k: (seen[k], k))
        capped = lru[: max(len(seen) - self.max_embedding_series, 0)]
        for stale in capped:
            del seen[stale]
        self.series_evicted["ttl"] += len(expired)
        self.series_evicted["cap"] += len(capped)
        with self._live_lock:
            for stale in (*expired, *capped):
                self._live.pop(stale, None)
        return {"series": seen}, [*expired, *capped]

    @staticmethod
    def embedding_index(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A model's embedding index from its series' stored states (by table key), for
        series written before the index existed."""
        return {
            "series": {
                key: int(state["last_end"].get(EMBEDDING_KIND, 0)) for key, state in states.items()
            }
        }

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
    def _save(state: dict[str, Any], skey: str, det: Detector, seen_ms: int) -> None:
        entry = state["series"].setdefault(skey, {"clears": 0})
        entry["det"] = det.state_dict()
        entry["seen_ms"] = seen_ms

    def _expire(self, series: dict[str, Any], now_ms: int) -> None:
        """Drop the series not judged for ``detectors.series_ttl_s`` before ``now_ms``."""
        for entry in series.values():
            # Written before series were aged: their age counts from now.
            entry.setdefault("seen_ms", now_ms)
        expired = [k for k, e in series.items() if now_ms - e["seen_ms"] > self.series_ttl_ms]
        for skey in expired:
            del series[skey]
        self.series_evicted["ttl"] += len(expired)

    def _cap(self, state: dict[str, Any], now_ms: int, model_id: str) -> None:
        """Drop the least recently judged series beyond ``detectors.max_series_per_model``,
        then while the state would exceed :data:`STATE_MAX_BYTES` (one changelog record)."""
        series = state["series"]
        # Ties (series judged in the same window) go by key, so a replay evicts the same.
        lru = sorted(series, key=lambda k: (series[k]["seen_ms"], k))
        over = max(len(series) - self.max_series, 0)
        dropped = {skey: series.pop(skey) for skey in lru[:over]}
        size = len(json.dumps(state))
        for skey in lru[over:]:
            if size <= STATE_MAX_BYTES:
                break
            # The entry and its separators: '"key": value, '.
            size -= len(json.dumps(skey)) + len(json.dumps(series[skey])) + 4
            dropped[skey] = series.pop(skey)
        self.series_evicted["cap"] += over
        self.series_evicted["size"] += len(dropped) - over
        judged_now = sum(entry["seen_ms"] == now_ms for entry in dropped.values())
        if judged_now:
            log.warning(
                "model %s: dropped %d detector series judged in this window (more live series"
                " than detectors.max_series_per_model=%d or %d bytes of state); they restart"
                " every window: raise the cap or lower windows.max_segment_values",
                model_id,
                judged_now,
                self.max_series,
                STATE_MAX_BYTES,
            )

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
        examples: list[dict[str, str]] | None = None,
    ) -> list[Finding]:
        # A series that never fired has nothing to clear: no entry is made for it, so
        # segments that come and go leave nothing behind.
        entry = state["series"].get(skey)
        end_ms = ctx.end_ms
        if result.detected:
            entry = state["series"].setdefault(skey, {"clears": 0})
            entry["clears"] = self.clear_windows
            entry["fired_ms"] = end_ms
        elif entry is not None and (
            entry.get("clears", 0) > 0
            or (
                "fired_ms" in entry
                and end_ms is not None
                and end_ms - entry["fired_ms"] < self.clear_for_ms
            )
        ):
            entry["clears"] = max(entry.get("clears", 0) - 1, 0)
        else:
            return []
        extra: dict[str, Any] = {}
        if result.detected and examples and self.error_analyzer is not None:
            where = f"{signal} of {ctx.model_id}/{version}"
            result, extra = _explain(self.error_analyzer, result, signal, examples, where)
        evidence = result.to_dict()["evidence"]
        evidence["window_n"] = n
        for cluster, request_ids, subject_ids in zip(
            evidence["clusters"],
            extra.pop("request_ids", []),
            extra.pop("subject_ids", []),
            strict=False,
        ):
            cluster["request_ids"] = request_ids
            cluster["subject_ids"] = subject_ids
        evidence.update(extra)
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


def _explain(
    analyzer: ErrorAnalyzer,
    result: DetectorResult,
    signal: str,
    examples: list[dict[str, str]],
    where: str,
) -> tuple[DetectorResult, dict[str, Any]]:
    try:
        return analyzer.explain(result, EXAMPLES_OF_SIGNAL[signal], examples)
    except Exception as exc:
        # Evidence is a help, not a condition: the finding goes out without it.
        log.exception("error analysis of %s failed; publishing it without clusters", where)
        return result, {"error_analysis": {"error": f"{type(exc).__name__}: {exc}"}}


def _examples(series: dict[str, Any], signal: str) -> list[dict[str, str]] | None:
    """The series' examples of what ``signal`` counts, if the window carries any."""
    name = EXAMPLES_OF_SIGNAL.get(signal)
    return None if name is None else series.get("exemplars", {}).get(name)


def embedding_key(model_id: str, model_version: str, field: str) -> str:
    """Table key of one embedding series: unambiguous whatever characters the ids hold."""
    return json.dumps([model_id, model_version, field], ensure_ascii=False)


def embedding_index_key(model_id: str) -> str:
    """Table key of a model's embedding series index (one element: never a series key)."""
    return json.dumps([model_id], ensure_ascii=False)


def embedding_series_model(key: str) -> str | None:
    """The model of an :func:`embedding_key`, ``None`` for any other key of the table."""
    try:
        parts = json.loads(key)
    except ValueError:
        return None
    return str(parts[0]) if isinstance(parts, list) and len(parts) == 3 else None


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
