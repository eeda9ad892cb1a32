"""The gate per segment: the TFX per-slice rule, and the segment a job up-weighted.

A candidate better on average can be worse for some of the users: a fine-tune on this
week's complaints about card payments may help them and hurt the German-speaking ones.
:func:`judge_segments` takes the per-item scores of every metric the gate judged overall
(:class:`~genmon.retrain.gate.Scores`) and slices them:

- **Segments** are the ``key=value`` items of the evaluation examples' segments, one
  attribute at a time (crossings would multiply the tests and thin the evidence). A metric
  is judged on a segment holding at least ``gate.min_segment_examples`` of its items;
  smaller segments are listed as not judged.
- **The rule**: a segment fails when the candidate is worse there *with confidence* by more
  than ``gate.segment_tolerance`` (the metric's units): the whole paired-bootstrap interval
  of the change lies beyond the tolerance on the bad side. A segment need not improve (the
  overall thresholds say what must), it must not get worse.
- **Many segments are many tests.** With 20 segments at 95 % each, a candidate exactly as
  good as the serving model would fail one of them by chance about two times in three. The
  segment checks are one family under **Bonferroni**: each of the m (metric, segment)
  intervals is at confidence ``1 - (1 - gate.confidence) / m``, so the chance of rejecting an
  equal candidate for some segment is at most ``1 - gate.confidence`` (family-wise, like the
  rollout watch's ``alpha``). Bonferroni rather than Benjamini-Hochberg because one false
  segment rejects the whole candidate: the family-wise error is what costs, not the share of
  false discoveries; and each segment keeps a plain interval to show. The bootstrap draws
  enough resamples for the far tails these intervals read (:func:`bootstrap_samples`).

:func:`judge_upweighted`: a bias-triggered job whose dataset up-weighted a segment
(manifest ``upweight.segment``) is judged on it as on the whole set, by the same thresholds
at the gate's own confidence (the segment was named before the data was seen, so it is no
part of the family): what must improve must improve there, and a segment with too few
examples is ``insufficient evidence on segment ...``, never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from genmon.retrain.examples import SftExample
from genmon.retrain.gate import GateConfig, Scores
from genmon.retrain.gate_stats import NUMERICAL_TOLERANCE, Comparison, compare, fmt, judge

#: Resamples each tail of a bootstrap interval should rest on (25 = 1000 draws at 95 %).
TAIL_SAMPLES = 25
#: The most resamples one segment interval draws (a few hundred tests at most).
MAX_SAMPLES = 200_000


@dataclass
class SegmentReport:
    """What the segment checks add to a verdict: comparisons that decide (failures,
    insufficient evidence, the up-weighted segment's), notes, and the numbers."""

    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_segment(raw: Mapping[str, Any] | str) -> dict[str, str]:
    """A segment as a mapping, from a mapping or ``k=v,k=v``."""
    if isinstance(raw, str):
        pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
        return {key.strip(): value.strip() for key, value in pairs}
    return {str(k): str(v) for k, v in raw.items()}


def segment_name(segment: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(segment.items())) or "all segments"


def matches(segment: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """``segment`` holds every item of ``wanted`` (a value ``*`` matches any value)."""
    return all(segment.get(k) == v or (v == "*" and k in segment) for k, v in wanted.items())


def segment_indexes(items: Sequence[SftExample]) -> dict[str, np.ndarray]:
    """Indexes of the items of each segment ``key=value``, by name."""
    found: dict[str, list[int]] = {}
    for index, example in enumerate(items):
        for key, value in example.segment.items():
            found.setdefault(f"{key}={value}", []).append(index)
    return {name: np.array(found[name], dtype=np.int64) for name in sorted(found)}


def bonferroni(confidence: float, tests: int) -> float:
    """Per-test confidence so that ``tests`` intervals hold together at ``confidence``."""
    return 1 - (1 - confidence) / max(1, tests)


def bootstrap_samples(config: GateConfig, confidence: float) -> int:
    """Resamples for an interval at ``confidence``: at least the gate's, and enough that
    each tail rests on :data:`TAIL_SAMPLES` draws."""
    tail = (1 - confidence) / 2
    return int(min(MAX_SAMPLES, max(config.bootstrap_samples, math.ceil(TAIL_SAMPLES / tail))))


def level(confidence: float) -> str:
    """``95%``, ``99.17%``: a confidence as reasons show it."""
    return f"{100 * confidence:.2f}".rstrip("0").rstrip(".") + "%"


def worse_beyond(comparison: Comparison, greater_is_better: bool, tolerance: float) -> bool:
    """The whole interval of the change is worse than ``tolerance`` (worse with confidence)."""
    sign = 1.0 if greater_is_better else -1.0
    best = max(sign * comparison.ci[0], sign * comparison.ci[1])
    margin = max(tolerance, NUMERICAL_TOLERANCE * max(1.0, abs(comparison.serving)))
    return best < -margin


def _direction(comparison: Comparison | None, greater_is_better: bool) -> str:
    """What the metric did on the whole set, for a segment's reason."""
    if comparison is None or comparison.status == "insufficient":
        return "could not be judged"
    if worse_beyond(comparison, greater_is_better, 0.0):
        return "got worse"
    flipped = replace(comparison, ci=(-comparison.ci[0], -comparison.ci[1]))
    if worse_beyond(flipped, greater_is_better, 0.0):
        return "improved"
    return "did not change significantly"


def judge_segments(
    scores: Sequence[Scores], overall: Mapping[str, Comparison], config: GateConfig
) -> SegmentReport:
    """Every scored metric on every segment big enough; a failure per segment that got
    worse with confidence (Bonferroni over all the segment tests)."""
    plan: list[tuple[Scores, str, np.ndarray]] = []
    small: dict[str, dict[str, int]] = {}
    for score in scores:
        for name, indexes in segment_indexes(score.items).items():
            if len(indexes) >= config.min_segment_examples:
                plan.append((score, name, indexes))
            else:
                small.setdefault(score.metric, {})[name] = len(indexes)
    tests = len(plan)
    confidence = bonferroni(config.confidence, tests)
    sliced = replace(
        config, confidence=confidence, bootstrap_samples=bootstrap_samples(config, confidence)
    )
    report = SegmentReport()
    judged: dict[str, dict[str, Any]] = {}
    for score, name, indexes in plan:
        threshold = config.threshold_for(score.metric)
        assert threshold is not None  # scored metrics have one
        comparison = compare(score.metric, score.candidate[indexes], score.serving[indexes], sliced)
        comparison.extra["segment"] = name
        if worse_beyond(comparison, threshold.greater_is_better, config.segment_tolerance):
            whole = _direction(overall.get(score.metric), threshold.greater_is_better)
            comparison.status = "fail"
            comparison.reason = (
                f"{score.metric} on {name} got worse: {fmt(comparison.serving)} -> "
                f"{fmt(comparison.candidate)} ({level(confidence)} CI of the change "
                f"{comparison.ci[0]:+.3f}..{comparison.ci[1]:+.3f}; Bonferroni over {tests} "
                f"segment tests, tolerance {fmt(config.segment_tolerance)}), "
                f"while overall it {whole}"
            )
            report.comparisons.append(comparison)
        judged.setdefault(score.metric, {})[name] = comparison.to_json()
    report.metrics = {
        "correction": "bonferroni",
        "tests": tests,
        "family_confidence": config.confidence,
        "test_confidence": confidence,
        "tolerance": config.segment_tolerance,
        "min_examples": config.min_segment_examples,
        "judged": judged,
        "not_judged": small,
    }
    report.notes.append(_summary(report, tests, confidence, config, small))
    return report


def _summary(
    report: SegmentReport,
    tests: int,
    confidence: float,
    config: GateConfig,
    small: Mapping[str, Mapping[str, int]],
) -> str:
    need = config.min_segment_examples
    if tests == 0:
        text = f"per-segment: no segment has {need} items of a metric; none judged"
    else:
        failed = len(report.comparisons)
        text = (
            f"per-segment: {tests} tests, each at {level(confidence)} (Bonferroni: at most "
            f"{level(1 - config.confidence)} chance to reject an equal candidate for some "
            f"segment); {failed} got worse beyond the tolerance "
            f"{fmt(config.segment_tolerance)}"
        )
    if small:
        listed = "; ".join(
            f"{metric}: " + ", ".join(f"{name} ({n})" for name, n in sorted(found.items()))
            for metric, found in sorted(small.items())
        )
        text += f"; not judged (fewer than {need} items, gate.min_segment_examples): {listed}"
    return text


def judge_upweighted(
    scores: Sequence[Scores], segment: Mapping[str, str], config: GateConfig
) -> SegmentReport:
    """The up-weighted segment judged like the whole set, at the gate's confidence."""
    where = segment_name(segment)
    report = SegmentReport()
    judged: dict[str, Any] = {}
    need = config.min_segment_examples
    for score in scores:
        threshold = config.threshold_for(score.metric)
        assert threshold is not None  # scored metrics have one
        indexes = np.array(
            [i for i, e in enumerate(score.items) if matches(e.segment, segment)], dtype=np.int64
        )
        if len(indexes) < need:
            judged[score.metric] = {"n": len(indexes), "status": "not judged"}
            if not threshold.must_improve:
                report.notes.append(
                    f"up-weighted segment {where}: {score.metric} not judged ({len(indexes)} "
                    f"items, fewer than {need})"
                )
                continue
            nan = math.nan
            short = Comparison(score.metric, nan, nan, (nan, nan), len(indexes), nan)
            short.status = "insufficient"
            short.reason = (
                f"insufficient evidence on segment {where}: {len(indexes)} evaluation items "
                f"for {score.metric}, the gate needs at least {need} "
                "(gate.min_segment_examples); the job up-weighted this segment, so it must "
                "be judged on it"
            )
            report.comparisons.append(short)
            judged[score.metric]["status"] = "insufficient"
            continue
        comparison = compare(score.metric, score.candidate[indexes], score.serving[indexes], config)
        comparison = judge(comparison, threshold)
        comparison.reason = f"up-weighted segment {where}: {comparison.reason}"
        report.comparisons.append(comparison)
        judged[score.metric] = comparison.to_json()
    if not scores:
        report.notes.append(f"up-weighted segment {where}: no metric was scored to judge it on")
    report.metrics = {"segment": dict(segment), "metrics": judged}
    return report
