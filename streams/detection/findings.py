"""What a judged series publishes: the :class:`~genmon.schemas.events.Finding` and its evidence.

The runner (:mod:`genmon.streams.detection.runner`) decides *whether* a series publishes
(it fired, or it is still clearing after a detection); this module builds *what* goes
out, from the window alone and without touching the model's state:

- the severity and a title with numbers (:func:`describe`, from effect size and
  confidence; :mod:`~genmon.detectors.calibration.signals`);
- the evidence (:func:`build_evidence`): the detector's own, the window's size, the baseline it
  was judged against and, for a *detected* ``error_rate``, ``refusal_rate``,
  ``empty_rate`` or ``negative_feedback`` finding (or an SLO on one of those rates),
  clusters of the window's affected examples in ``evidence.clusters``
  (:func:`explain`, :mod:`genmon.streams.detection.error_evidence`);
- the finding itself (:func:`finding`): ``segment`` is ``model_version=<v>`` or
  ``model_version=<v>,<key>=<value>``, so versions never share a fingerprint.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from genmon.detectors import DetectorResult
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.baselines import LatencyBaseline, Reference
from genmon.schemas.events import Finding, FindingKind, Severity
from genmon.streams.detection.error_evidence import EXAMPLES_OF_SIGNAL, ErrorAnalyzer
from genmon.streams.detection.observations import Observation

log = logging.getLogger(__name__)

ALL = sig.ALL
#: The default signal whose examples an SLO on a rate shows.
RATE_OF_SLO = {"negative_feedback_rate": "negative_feedback"}


class WindowContext:
    """The model and bounds of the window (or embedding sample) a finding is about."""

    def __init__(self, window: dict[str, Any]) -> None:
        self.model_id: str = window["model_id"]
        self.window_start = window.get("window_start")
        self.window_end = window.get("window_end")
        end = window.get("end_ms")
        if end is None and self.window_end is not None:
            end = datetime.fromisoformat(str(self.window_end)).timestamp() * 1000
        self.end_ms: int | None = None if end is None else int(end)


def describe(
    ctx: WindowContext, obs: Observation, reference: Reference, latency_quantile: float
) -> tuple[Severity, str, dict[str, Any]]:
    """Severity, title and the baseline evidence of a judged observation."""
    assert obs.result is not None
    # Confident: this window alone would have alarmed.
    confident = bool(obs.result.evidence.value("window_alone"))
    baseline: dict[str, Any] = {
        "rate": reference.observed,
        "tested_rate": reference.rate,
        "dispersion": reference.dispersion_of(obs.total),
        "long_run_dispersion": reference.long_run,
        "intraclass": reference.intraclass,
        "windows": reference.windows,
    }
    if isinstance(obs.baseline, LatencyBaseline) and obs.sketch is not None:
        q = latency_quantile
        value, base = obs.sketch.quantile(q), obs.baseline.value()
        ratio = value / base if value is not None and base else 1.0
        share = obs.events / obs.total if obs.total else 0.0
        baseline.update(quantile=q, value_ms=base, window_value_ms=value)
        title = sig.latency_title(obs.label, q, value, base, ctx.model_id, obs.version)
        return sig.latency_severity(ratio, share, confident), title, {"baseline": baseline}
    rate = obs.events / obs.total if obs.total else 0.0
    title = sig.rate_title(
        obs.label,
        obs.events,
        obs.total,
        reference.observed,
        ctx.model_id,
        obs.version,
        obs.segment,
    )
    severity = sig.rate_severity(rate, reference.observed, confident)
    return severity, title, {"baseline": baseline}


def window_examples(series: dict[str, Any], signal: str) -> list[dict[str, str]] | None:
    """The series' examples of what ``signal`` counts, if the window carries any."""
    name = EXAMPLES_OF_SIGNAL.get(signal)
    return None if name is None else series.get("exemplars", {}).get(name)


def explain(
    analyzer: ErrorAnalyzer,
    result: DetectorResult,
    signal: str,
    examples: list[dict[str, str]],
    where: str,
) -> tuple[DetectorResult, dict[str, Any]]:
    """Cluster the window's ``examples`` of ``signal`` (a default signal, or an SLO on a
    rate) into ``result``; the analysis to add to the evidence comes with it."""
    examples_of = EXAMPLES_OF_SIGNAL[RATE_OF_SLO.get(signal, signal)]
    try:
        return analyzer.explain(result, examples_of, examples)
    except Exception as exc:
        # Evidence is a help, not a condition: the finding goes out without it.
        log.exception("error analysis of %s failed; publishing it without clusters", where)
        return result, {"error_analysis": {"error": f"{type(exc).__name__}: {exc}"}}


def build_evidence(
    result: DetectorResult, n: int, analysis: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """The detector's evidence with the window's size, each cluster's requests and
    subjects, the rest of the ``analysis`` and ``extra`` (e.g. the baseline)."""
    found = result.to_dict()["evidence"]
    found["window_n"] = n
    for cluster, request_ids, subject_ids in zip(
        found["clusters"],
        analysis.pop("request_ids", []),
        analysis.pop("subject_ids", []),
        strict=False,
    ):
        cluster["request_ids"] = request_ids
        cluster["subject_ids"] = subject_ids
    found.update(analysis)
    found.update(extra)
    return found


def finding(
    ctx: WindowContext,
    result: DetectorResult,
    version: str,
    segment: str,
    signal: str,
    kind: FindingKind,
    severity: Severity,
    title: str,
    evidence: dict[str, Any],
) -> Finding:
    """The finding of one series' result (a severity only when it is detected)."""
    return Finding(
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
        severity=severity if result.detected else None,
        title=title[:512],
    )


def _segment_label(version: str, segment: str) -> str:
    return f"model_version={version}" if segment == ALL else f"model_version={version},{segment}"


def _finite(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        return 0.0 if value != value else (1e308 if value > 0 else -1e308)
    return float(value)
