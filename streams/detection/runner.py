"""Runs the default detectors on closed windows (and sampled embeddings) and turns results
into findings.

Pure logic: :class:`DetectorRunner` maps ``(model state, closed window) -> (new model
state, findings)``; the worker keeps the model state in a Faust table as JSON, so
detectors and baselines continue after a restart from the changelog, and ``genmon
replay`` runs the same code on a file.

**What is judged** (tumbling windows only; hopping windows are for dashboards): every
version's ``"*"`` series with at least ``detectors.min_window_requests`` requests, on the
default signals of :mod:`~genmon.detectors.calibration.signals` — TTFT, time per output token and
end-to-end latency (the share of requests above the baseline's
``detectors.latency_quantile``), error, refusal and empty-answer rates, negative feedback
— and every segment's negative feedback (``<attr>=__other__`` excluded: it mixes many
groups and names none to act on). A series of scored feedback is judged from
``detectors.min_segment_size`` scored items in the window.

**Against what.** Each signal is judged against the *model's* baseline
(:mod:`~genmon.detectors.calibration.baselines`; one per signal, and one per segment for feedback),
which carries across versions: a new version is judged from its first window against what
its predecessors did. A new model warms up silently for
``detectors.baseline_warmup_windows`` windows. Baselines learn only from healthy windows.

**How.** One :class:`~genmon.detectors.RateCUSUM` per (signal, version, segment), with
the threshold the false-alarm budget gives (:mod:`~genmon.detectors.calibration.budget`): at most
``false_pages_per_week x share`` false alarms a week per signal, split over the signal's
series of the window. The CUSUM keeps evidence across windows, so repeated looks never
spend the budget twice. User-written SLOs (``detectors.slos``,
:mod:`~genmon.schemas.slos`) are checked per window on top, outside the budget.

**Early looks** (:meth:`DetectorRunner.peek`, every ``detectors.early_interval_s``): the
window's close is not the first chance to page: the open window is judged as it stands,
and pane charts designed for large rises are fed the requests since the last look, so an
outage pages a few requests in (:mod:`~genmon.streams.detection.early`, which also says
how the looks share the false-alarm allowance).

**One cause, one incident.** The more specific finding explains the less specific one:
a window where TTFT or TPOT fires for a version does not also page its end-to-end latency
(which is judged only when TTFT is not reported), and one where a segment's negative
feedback fires does not also page the version's. Empty answers and refusals are counted
among *answered* requests, so an error burst is not also an empty-answer burst.
Findings carry a severity from effect size and confidence and a title with numbers
(:mod:`~genmon.detectors.calibration.signals`).

**What is published.** Every *detected* result becomes a :class:`Finding`. After a
detection, the evaluations of the same fingerprint keep being published with
``detected=False`` ("clear" signals) for at least ``incidents.auto_resolve_quiet_windows``
windows and until ``incidents.reopen_cooldown_s`` of event time has passed since the last
detection, so the incident manager can count quiet windows and auto-resolve; after that the
fingerprint goes quiet until it fires again. Never-firing series publish nothing.

**Duplicates.** A window is applied once per model and window family: the state remembers
the last window end applied and skips older or equal ones (re-emitted after a worker
crash). ``Finding.dedup_key`` (fingerprint + window end) is the same for a re-emitted
finding, and the incident manager drops repeats. Finding ``segment`` is
``model_version=<v>`` or ``model_version=<v>,<key>=<value>``, so versions never share a
fingerprint.

**State bounds.** A model's state is one table record: ``series`` (one entry per judged
series) and ``baselines``. Each applied window first drops the series and segment
baselines not judged for ``detectors.series_ttl_s``; after judging, the least recently
judged series go beyond ``detectors.max_series_per_model`` or the record's size bound
(:mod:`genmon.streams.detection.model_state`).

**Evidence.** A *detected* finding of ``error_rate``, ``refusal_rate``, ``empty_rate`` or
``negative_feedback`` carries clusters of the window's affected examples in
``evidence.clusters`` (:mod:`genmon.streams.detection.findings`).

**Embedding drift** (:meth:`DetectorRunner.on_embeddings`, signal ``embedding_<field>``):
one :class:`~genmon.detectors.EmbeddingShiftDrift` per (model, version, field), fed each
sub-sample of sampled texts as it arrives (every ``embedding.flush_interval_s`` of event
time: one look), at the false-alarm probability per look that the budget gives for looks
at that interval, so a shift is paged seconds of traffic after it begins. Detections are
published at every look, clear looks once per window. Each series is its own table
record under :func:`embedding_key`, bounded through a per-model index
(:meth:`DetectorRunner.admit_embedding_series`): series not sampled for
``detectors.series_ttl_s`` go, then the least recently sampled beyond
``detectors.max_embedding_series_per_model``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import numpy as np

from genmon.detectors import (
    Detector,
    DetectorKind,
    DetectorResult,
    EmbeddingShiftDrift,
    RateCUSUM,
    RateWindow,
    StateError,
    load_state,
)
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.baselines import LatencyBaseline
from genmon.detectors.calibration.budget import Budget
from genmon.detectors.calibration.plan import load_plan
from genmon.schemas.events import Finding, FindingKind, Severity
from genmon.schemas.slos import SLO, slos_for
from genmon.settings import Settings
from genmon.streams.detection.configured import ConfiguredDetectors
from genmon.streams.detection.early import SPLIT, EarlyLooks
from genmon.streams.detection.embedding_series import (
    EMBEDDING_KIND,
    admit,
    check_size,
    drift_params,
    embedding_index_key,
    embedding_key,
    field_series,
    matches,
    publishes,
)
from genmon.streams.detection.error_evidence import ErrorAnalyzer
from genmon.streams.detection.findings import (
    WindowContext,
    build_evidence,
    describe,
    explain,
    finding,
    window_examples,
)
from genmon.streams.detection.model_state import (
    EVICTION_REASONS,
    cap,
    copy_state,
    expire,
    mark_fired,
    save,
    series_key,
    sibling_fired,
)
from genmon.streams.detection.observations import (
    ModelBaselines,
    Observation,
    accept_limit,
    min_increase,
    observe,
    one_cause,
)
from genmon.streams.detection.points import SignalPoint, observation_point, result_point
from genmon.streams.detection.reference_refresh import (
    RefreshRequests,
    refresh_model,
    refresh_series,
)

log = logging.getLogger(__name__)
D = TypeVar("D", bound=Detector)

DETECT_ON = "tumbling"
ALL = sig.ALL
CUSUM = RateCUSUM.name


class DetectorRunner:
    """Applies closed windows and embedding samples to per-model detector state."""

    def __init__(
        self,
        settings: Settings,
        error_analyzer: ErrorAnalyzer | None = None,
        refresh: RefreshRequests | None = None,
    ) -> None:
        """``refresh``: the scheduler's reference-refresh requests; default: those in the
        database when a refresh cron is set (a replay sets :attr:`refresh` to ``None``)."""
        self.settings = settings
        self.refresh = refresh or RefreshRequests.from_settings(settings)
        d = settings.detectors
        # Without examples in the windows there is nothing to cluster.
        self.error_analyzer = error_analyzer or (
            ErrorAnalyzer(settings) if d.exemplars_per_window else None
        )
        #: The detector plan (``detectors.config_file``): loading validates it, so a bad
        #: file stops the worker (or replay) before anything is judged.
        self.plan = load_plan(settings)
        self.budget = Budget(settings, self.plan)
        self.configured = ConfiguredDetectors(self)
        self.min_requests = d.min_window_requests
        self.min_feedback = d.min_segment_size
        self.clear_windows = settings.incidents.auto_resolve_quiet_windows
        self.clear_for_ms = round(settings.incidents.reopen_cooldown_s * 1000)
        self.series_ttl_ms = round(d.series_ttl_s * 1000)
        self.max_series = d.max_series_per_model
        self.max_embedding_series = d.max_embedding_series_per_model
        #: Early looks at an open window (0: early detection off), see :meth:`peek`.
        self.early_looks = (
            math.ceil(settings.windows.tumbling_s / d.early_interval_s) if d.early_interval_s else 0
        )
        self.early = EarlyLooks(self, self.early_looks)
        #: Series this process dropped, by reason (for the pipeline's counter).
        self.series_evicted = dict.fromkeys(EVICTION_REASONS, 0)
        self._restarted: set[str] = set()  # detectors whose old states were met (said once)
        #: Latency baselines the early looks have read (see ModelBaselines).
        self._parsed: dict[int, tuple[dict[str, Any], LatencyBaseline]] = {}
        #: Called with every judgement (``genmon replay --report`` charts them); None: free.
        self.points: Callable[[SignalPoint], None] | None = None

    # -- windows ------------------------------------------------------------------------
    def on_window(
        self, state: dict[str, Any] | None, window: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Finding]]:
        """Apply one closed window of one model; return the new state and the findings."""
        state = copy_state(state)
        kind, end = window["kind"], int(window["end_ms"])
        if kind != DETECT_ON or end <= state["last_end"].get(kind, -(2**62)):
            return state, []
        state["last_end"][kind] = end
        baselines = ModelBaselines(state["baselines"], self.settings)
        # Before judging: a series back after the TTL starts fresh.
        self.series_evicted["ttl"] += expire(state, end, self.series_ttl_ms)
        baselines.expire(end, self.series_ttl_ms)
        refresh_model(self.refresh, state, baselines, self.settings, window["model_id"])
        ctx = WindowContext(window)
        observations = self._observe(window, baselines)
        per_signal = Counter(obs.signal for obs in observations)
        for obs in observations:
            self._judge(state, obs, per_signal[obs.signal], end, model_id=ctx.model_id)
        one_cause(observations)
        findings: list[Finding] = []
        quantile = self.settings.detectors.latency_quantile
        for obs in observations:
            if self.points is not None:
                self._point(observation_point(ctx.model_id, obs, end, quantile))
            findings += self._publish_observation(state, ctx, obs)
            self._learn(obs)
            baselines.save(obs, end)
        findings += self._check_slos(state, ctx, window, end)
        findings += self.configured.on_window(state, ctx, window, end)
        capped, oversized = cap(state, end, self.max_series, ctx.model_id)
        self.series_evicted["cap"] += capped
        self.series_evicted["size"] += oversized
        return state, findings

    def peek(
        self,
        state: dict[str, Any] | None,
        window: dict[str, Any],
        with_examples: Callable[[], dict[str, Any] | None] | None = None,
    ) -> tuple[dict[str, Any] | None, list[Finding]]:
        """Judge an open tumbling ``window`` as it stands (early detection, see
        :mod:`~genmon.streams.detection.early`): the state and the findings that fire now."""
        return self.early.peek(state, window, with_examples)

    def _point(self, point: SignalPoint | None) -> None:
        if self.points is not None and point is not None:
            self.points(point)

    def _restored(self, entry: dict[str, Any] | None, cls: type[D]) -> D | None:
        """The series' stored detector, or None: none stored, or stored in a state format
        its class no longer reads (``state_version`` bumped), when the series restarts
        (counted as evicted for ``format``) while every other detector's state still loads."""
        if entry is None or "det" not in entry:
            return None
        try:
            det = load_state(entry["det"])
        except StateError as error:
            self.series_evicted["format"] += 1
            if cls.name not in self._restarted:
                self._restarted.add(cls.name)
                log.warning("%s series restart (counted in series_evicted): %s", cls.name, error)
            return None
        assert isinstance(det, cls)
        return det

    def _judge(
        self,
        state: dict[str, Any],
        obs: Observation,
        series: int,
        end: int,
        looks: int = 0,
        model_id: str = ALL,
    ) -> None:
        """Run the series' CUSUM against its baseline (nothing while the baseline warms up).

        ``looks``: 0 for the judgement of a closed window, else the number of early looks
        at an open one (:meth:`peek`); with early detection on, the per-window alpha is
        half the close's and half shared by the looks (the CUSUM's threshold is the same
        for both: crossing it at any instant is what its run-length bound counts)."""
        reference = obs.baseline.reference()
        if reference is None:
            return
        threshold, alpha = self.budget.rate_test(obs.signal, series, model_id)
        if self.early_looks:
            alpha /= 2 * max(looks, 1)
            if self.early.shares_allowance(obs.signal, model_id):
                threshold += SPLIT  # the other half of the CUSUM's allowance: pane charts
        skey = series_key(obs.signal, CUSUM, obs.version, obs.segment)
        entry = state["series"].get(skey)
        det = self._restored(entry, RateCUSUM)
        if det is None:
            det = self._new_cusum(obs.signal, threshold, model_id)
        # The series of the window (and so each one's share) may have changed.
        det.threshold, det.window_alpha = threshold, alpha
        result = det.update(
            [
                RateWindow(
                    obs.events,
                    obs.total,
                    reference.rate,
                    # The sum over windows spreads as much as a block of them does.
                    max(reference.dispersion_of(obs.total), reference.long_run),
                    reference.dispersion_of(obs.total),
                )
            ]
        )
        cusum = float(result.evidence.value("cusum") or 0.0)
        obs.result = result
        obs.healthy = not result.detected and cusum <= threshold / 2
        save(state, skey, det.state_dict(), end)

    def _new_cusum(self, signal: str, threshold: float, model_id: str = ALL) -> RateCUSUM:
        entry = self.budget.entry(signal, model_id)
        params = entry.params if entry is not None else {}
        odds_ratio = params.get("odds_ratio", self.settings.detectors.rate_odds_ratio)
        floor = params.get("min_increase", self._min_increase(signal))
        return RateCUSUM(threshold=threshold, odds_ratio=odds_ratio, min_increase=floor)

    def _observe(self, window: dict[str, Any], baselines: ModelBaselines) -> list[Observation]:
        """The window's rate observations the plan runs for its model: the default ones it
        keeps (a signal it leaves out is not judged) and its extra rate signals."""
        observations = observe(window, baselines, self.min_requests, self.min_feedback)
        observations += self.configured.rate_observations(window, baselines, self.min_requests)
        model_id = window["model_id"]
        return [o for o in observations if self.plan.entry(model_id, o.signal, CUSUM)]

    def _min_increase(self, signal: str) -> float:
        return min_increase(self.settings, signal)

    def _learn(self, obs: Observation) -> None:
        limit = accept_limit(self.settings, obs.signal)
        baseline = obs.baseline
        if isinstance(baseline, LatencyBaseline):
            assert obs.sketch is not None
            baseline.learn(obs.sketch, obs.healthy, limit)
        else:
            baseline.learn(obs.events, obs.total, obs.healthy, limit)

    # -- findings -------------------------------------------------------------------------
    def _publish_observation(
        self, state: dict[str, Any], ctx: WindowContext, obs: Observation, early: bool = False
    ) -> list[Finding]:
        """``early``: judged on the open window (:meth:`peek`), said in the evidence as
        ``early_requests``, the requests the window held then."""
        if obs.result is None:
            return []
        reference = obs.baseline.reference()
        assert reference is not None
        quantile = self.settings.detectors.latency_quantile
        severity, title, extra = describe(ctx, obs, reference, quantile)
        if early:
            extra["early_requests"] = int(obs.series["requests"])
        planned = self.budget.entry(obs.signal, ctx.model_id)
        severity = planned.severity if planned is not None and planned.severity else severity
        skey = series_key(obs.signal, CUSUM, obs.version, obs.segment)
        return self._publishable(
            state,
            skey,
            obs.result,
            ctx,
            obs.version,
            obs.segment,
            obs.signal,
            obs.kind,
            obs.total,
            severity,
            title,
            extra,
            window_examples(obs.series, obs.signal),
            cumulative=True,
        )

    def _check_slos(
        self, state: dict[str, Any], ctx: WindowContext, window: dict[str, Any], end: int
    ) -> list[Finding]:
        objectives = slos_for(self.settings.detectors.slos, ctx.model_id)
        if not objectives:
            return []
        findings: list[Finding] = []
        for series in window["series"]:
            if series["segment"] != ALL or series["requests"] < self.min_requests:
                continue
            for slo in objectives:
                findings += self._slo_finding(state, ctx, series, slo, end)
        return findings

    def _slo_finding(
        self,
        state: dict[str, Any],
        ctx: WindowContext,
        series: dict[str, Any],
        slo: SLO,
        end: int,
    ) -> list[Finding]:
        value = slo.value(series)
        if value is None:
            return []
        version = series["model_version"]
        skey = series_key(slo.metric, "slo", version, ALL)
        breached = value > slo.limit
        state["series"].setdefault(skey, {"clears": 0})["seen_ms"] = end
        shown = sig.duration(value) if slo.is_latency else sig.percent(value)
        title = f"SLO {slo.text} breached: {shown}, {sig.where(ctx.model_id, version, ALL)}"
        result = DetectorResult(
            detector="slo",
            kind=DetectorKind(slo.kind.value),
            score=value,
            threshold=slo.limit,
            detected=breached,
            n_seen=int(series["requests"]),
        )
        signal = f"slo_{slo.metric}"
        self._point(result_point(ctx.model_id, version, ALL, signal, end, result, value, slo.limit))
        return self._publishable(
            state,
            skey,
            result,
            ctx,
            version,
            ALL,
            slo.metric,
            slo.kind,
            int(series["requests"]),
            sig.breach_severity(value, slo.limit),
            title,
            {"slo": slo.text},
            window_examples(series, slo.rate_signal) if slo.rate_signal else None,
        )

    def _publishable(
        self,
        state: dict[str, Any],
        skey: str,
        result: DetectorResult,
        ctx: WindowContext,
        version: str,
        segment: str,
        signal: str,
        kind: FindingKind,
        n: int,
        severity: Severity,
        title: str,
        extra: dict[str, Any],
        examples: list[dict[str, str]] | None = None,
        cumulative: bool = False,
    ) -> list[Finding]:
        # A series that never fired has nothing to clear: no entry records a firing, so
        # segments that come and go leave nothing behind. Its siblings on other versions
        # do, for the cool-down after one fired: the version that replaced a failing one
        # is what can clear that one's incident (genmon.incidents.grouping.superseded_incident).
        entry = state["series"].get(skey)
        end_ms = ctx.end_ms
        if result.detected:
            entry = state["series"].setdefault(skey, {"clears": 0})
            entry["clears"] = self.clear_windows
            entry["fired_ms"] = end_ms
            if end_ms is not None:
                mark_fired(state, skey, end_ms, self.clear_for_ms)
        elif entry is not None and (
            entry.get("clears", 0) > 0
            or (
                "fired_ms" in entry
                and end_ms is not None
                and end_ms - entry["fired_ms"] < self.clear_for_ms
            )
        ):
            entry["clears"] = max(entry.get("clears", 0) - 1, 0)
        elif end_ms is None or not sibling_fired(state, skey, end_ms, self.clear_for_ms):
            return []
        if entry is not None and cumulative:
            # A CUSUM that rose this window saw more evidence of the problem, not less.
            if not result.detected and result.score > entry.get("published_score", 0.0):
                extra = {**extra, "elevated": True}
            entry["published_score"] = result.score
        analysis: dict[str, Any] = {}
        if result.detected and examples and self.error_analyzer is not None:
            where = f"{signal} of {ctx.model_id}/{version}"
            result, analysis = explain(self.error_analyzer, result, signal, examples, where)
        found = build_evidence(result, n, analysis, extra)
        return [finding(ctx, result, version, segment, signal, kind, severity, title, found)]

    # -- embeddings (the hook the embedding stage calls) ----------------------------------
    def on_embeddings(
        self,
        state: dict[str, Any] | None,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
        array: np.ndarray,
        series: int = 1,
        texts: Sequence[str] = (),
    ) -> tuple[dict[str, Any], list[Finding]]:
        """Judge one sub-sample of ``(model, version, field)``'s sampled texts: one look.

        ``array`` holds their embeddings, ``texts`` the texts (same order; empty when the
        caller has none). ``state`` is the series' own record (:func:`embedding_key`);
        ``series`` how many embedding series of this field the model has (they share the
        field's budget). A sub-sample that ends no later than the last one applied
        changes nothing. Raises ``ConfigurationError`` when the new state would exceed
        :data:`~genmon.streams.detection.embedding_series.STATE_MAX_BYTES`.
        """
        state = copy_state(state)
        end_ms = round(window_end.timestamp() * 1000)
        if end_ms <= state["last_end"].get(EMBEDDING_KIND, -(2**62)):
            return state, []
        state["last_end"][EMBEDDING_KIND] = end_ms
        signal = f"embedding_{field}"
        configured = self.configured.on_sample(
            state, model_id, model_version, field, window_end, array, texts, series
        )
        planned = self.budget.entry(signal, model_id)
        if planned is None:  # the plan runs no shift test
            check_size(state, embedding_key(model_id, model_version, field))
            return state, configured
        skey = f"embedding:{field}\x1f{model_version}\x1f{ALL}"
        entry = state["series"].setdefault(skey, {"clears": 0})
        look_s = self.settings.embedding.flush_interval_s
        alpha = self.budget.look_alpha(signal, series, look_s, model_id)
        own = {k: v for k, v in planned.params.items() if k != "alpha"}  # plan's, in looks
        params = {**drift_params(self.settings), **own}
        det = self._restored(entry, EmbeddingShiftDrift)
        if det is not None and not matches(det, params):
            self.series_evicted["format"] += 1  # its looks or scales mean other times now
            det = None
        if det is not None:
            det.alpha = alpha
        else:
            det = EmbeddingShiftDrift(alpha=alpha, **params)
        refresh_series(self.refresh, state, det)
        result = det.update(np.asarray(array, dtype=np.float32))
        entry["det"] = det.state_dict()
        entry["seen_ms"] = end_ms
        ctx = WindowContext(
            {"model_id": model_id, "window_start": None, "window_end": window_end.isoformat()}
        )
        shift = float(result.effect_size or 0.0)
        self._point(result_point(model_id, model_version, ALL, signal, end_ms, result, shift))
        window_ms = round(self.settings.windows.tumbling_s * 1000)
        if not publishes(entry, result.detected, end_ms, window_ms):
            check_size(state, embedding_key(model_id, model_version, field))
            return state, configured
        what = "Prompt" if field == "prompt" else "Answer" if field == "response" else field
        pooled = result.evidence.value("scale_windows") if result.evidence else None
        rows = result.evidence.value("scale_rows") if result.evidence else None
        over = f" over {pooled * look_s:g} s" if pooled else ""
        title = (
            f"{what} embeddings shifted {shift:.2g} SD{over} (p={result.p_value or 1.0:.2g}, "
            f"{int(rows or len(array))} texts), {sig.where(model_id, model_version, ALL)}"
        )
        if result.evidence.notes and result.evidence.notes[0].startswith("novel texts"):
            share = result.evidence.value("novelty_share") or 0.0
            null = result.evidence.value("novelty_null") or 0.0
            title = (
                f"{what} embeddings: {share:.0%} of {len(array)} texts unlike the baseline"
                f" ({null:.0%} expected, p={result.p_value or 1.0:.2g}),"
                f" {sig.where(model_id, model_version, ALL)}"
            )
        findings = self._publishable(
            state,
            skey,
            result,
            ctx,
            model_version,
            ALL,
            signal,
            FindingKind.DRIFT,
            len(array),
            planned.severity or sig.shift_severity(shift),
            title,
            {},
        )
        check_size(state, embedding_key(model_id, model_version, field))
        return state, findings + configured

    def admit_embedding_series(
        self,
        store: Any,
        partition: int,
        model_id: str,
        model_version: str,
        field: str,
        window_end: datetime,
    ) -> dict[str, Any]:
        """Bound a model's embedding series in ``store`` (a
        :class:`~genmon.streams.windows.store.StateStore`) before one of them takes a
        sample; returns the model's index (its record under :func:`embedding_index_key`).

        A model's first sample starts an empty index. Deleted are the series not sampled for
        ``detectors.series_ttl_s`` before ``window_end`` (the sampled series itself when
        it is back after that: it starts fresh), then, beyond
        ``detectors.max_embedding_series_per_model``, the least recently sampled others
        (ties by key). Only window ends decide, so a replay evicts the same series. Their
        state is deleted before the index forgets them: a crash in between repeats a
        deletion rather than leaving a record no index lists.
        """
        index_key = embedding_index_key(model_id)
        stored = store.get(index_key)
        index = stored or {}
        key = embedding_key(model_id, model_version, field)
        new_index, expired, capped = admit(
            index, key, window_end, self.series_ttl_ms, self.max_embedding_series
        )
        self.series_evicted["ttl"] += len(expired)
        self.series_evicted["cap"] += len(capped)
        for stale in (*expired, *capped):
            store.delete(partition, stale)
        if new_index != stored:
            store.put(partition, index_key, new_index)
        return new_index

    field_series = staticmethod(field_series)
