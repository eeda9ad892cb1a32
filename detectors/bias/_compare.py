"""Segment-against-rest testing shared by the bias detectors.

For each segment with at least ``min_samples`` requests (and a rest that large):

1. test its rate against the *rest* (all other traffic; independent samples, so the
   test is valid) with :func:`~genmon.detectors._stats.compare_proportions`: the pooled
   two-proportion z-test with Yates' continuity correction (without it the one-sided
   false-alarm rate exceeds alpha for rates near 0), or Fisher's exact test when any
   expected cell is below ``fisher_below`` (Cochran's rule, default 5); one-sided in the
   ``direction`` that is harmful, two-sided for ``"both"``;
2. adjust all p-values of the family with Benjamini-Hochberg (q-values);
3. measure the effect against the ``baseline`` ("rest", or "overall" = the whole
   population including the segment; the test stays segment-vs-rest because a segment
   differs from the overall rate exactly when it differs from the rest);
4. flag the segment when ``q <= alpha`` and the effect passes ``effect_rule``:
   "difference" (``|difference| >= min_difference`` in the harmful direction), "ratio"
   (the four-fifths rule), "both" (and) or "either" (or).

Four-fifths rule (EEOC Uniform Guidelines, 29 CFR 1607.4(D)): a *favourable* rate below
``ratio_threshold`` (0.8) times the baseline is adverse ("lower" direction). For a
*harmful* rate such as refusals ("higher"), the mirror rule flags a ratio above
``1 / ratio_threshold`` (1.25). A ratio exactly at the bound is not flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from genmon.detectors._base import (
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    SegmentEvidence,
    check_param,
)
from genmon.detectors._stats import (
    benjamini_hochberg,
    compare_proportions,
    wilson_interval,
    z_quantile,
)
from genmon.detectors.bias._inputs import Counts
from genmon.detectors.exceptions import InvalidParameterError

DIRECTIONS = ("higher", "lower", "both")
BASELINES = ("rest", "overall")
EFFECT_RULES = ("difference", "ratio", "both", "either")
_ALTERNATIVE = {"higher": "greater", "lower": "less", "both": "two-sided"}
# Rates are ratios of counts; this keeps "exactly at the bound" from flipping on rounding.
_EPS = 1e-9


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidParameterError(f"{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True, slots=True)
class GapRule:
    alpha: float
    direction: str
    baseline: str
    min_samples: int
    min_difference: float
    ratio_threshold: float
    effect_rule: str
    fisher_below: float
    confidence: float

    def validate(self) -> None:
        check_param("alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        _choice("direction", self.direction, DIRECTIONS)
        _choice("baseline", self.baseline, BASELINES)
        _choice("effect_rule", self.effect_rule, EFFECT_RULES)
        check_param("min_samples", self.min_samples, low=1)
        check_param("min_difference", self.min_difference, low=0.0, high=1.0)
        check_param("ratio_threshold", self.ratio_threshold, low=0.0, high=1.0, low_open=True)
        check_param("fisher_below", self.fisher_below, low=0.0)
        z_quantile(self.confidence)

    def effect_passes(self, difference: float, ratio: float) -> bool:
        up = difference >= self.min_difference - _EPS
        down = -difference >= self.min_difference - _EPS
        high = ratio > (1.0 / self.ratio_threshold) * (1 + _EPS)
        low = ratio < self.ratio_threshold * (1 - _EPS)
        if self.direction == "higher":
            by_difference, by_ratio = up, high
        elif self.direction == "lower":
            by_difference, by_ratio = down, low
        else:
            by_difference, by_ratio = up or down, high or low
        return {
            "difference": by_difference,
            "ratio": by_ratio,
            "both": by_difference and by_ratio,
            "either": by_difference or by_ratio,
        }[self.effect_rule]


def rate_ratio(rate: float, baseline_rate: float) -> float:
    if baseline_rate == 0.0:
        return 1.0 if rate == 0.0 else math.inf
    return float(rate / baseline_rate)


def check_versions(baseline: object, candidate: object) -> None:
    """The A/B detectors compare two distinct, named model versions."""
    if not (isinstance(baseline, str) and isinstance(candidate, str)) or baseline == candidate:
        raise InvalidParameterError(
            f"baseline={baseline!r} and candidate={candidate!r} must be two different version names"
        )


def evaluate_segments(
    sums: Counts, population: tuple[int, int], rule: GapRule, label: str = ""
) -> tuple[list[SegmentEvidence], list[str]]:
    """Unadjusted evidence for every testable segment, and notes on the skipped ones.

    ``label`` prefixes segment names (``"tpr:"``) when several rates share one family.
    """
    tested: list[SegmentEvidence] = []
    skipped: list[str] = []
    pop_events, pop_total = population
    for segment, (events, total) in sums.items():
        rest_events, rest_total = pop_events - events, pop_total - total
        if total < rule.min_samples or rest_total < rule.min_samples:
            skipped.append(f"{label}{segment} (n={total}, rest n={rest_total})")
            continue
        test = compare_proportions(
            events, total, rest_events, rest_total, _ALTERNATIVE[rule.direction], rule.fisher_below
        )
        base_events, base_total = (
            (rest_events, rest_total) if rule.baseline == "rest" else (pop_events, pop_total)
        )
        rate, base_rate = events / total, base_events / base_total
        tested.append(
            SegmentEvidence(
                segment=f"{label}{segment}",
                rate=rate,
                rate_ci=wilson_interval(events, total, rule.confidence),
                baseline_rate=base_rate,
                baseline_ci=wilson_interval(base_events, base_total, rule.confidence),
                n=total,
                baseline_n=base_total,
                test=test.test,
                p_value=test.p_value,
                difference=rate - base_rate,
                ratio=rate_ratio(rate, base_rate),
            )
        )
    notes = []
    if skipped:
        notes.append(f"skipped below min_samples={rule.min_samples}: " + ", ".join(skipped))
    return tested, notes


def adjust_and_flag(tested: list[SegmentEvidence], rule: GapRule) -> tuple[SegmentEvidence, ...]:
    """Benjamini-Hochberg q-values over the family, then the significance + effect flag."""
    q_values = benjamini_hochberg([s.p_value for s in tested])
    return tuple(
        replace(
            s,
            q_value=float(q),
            flagged=bool(q <= rule.alpha and rule.effect_passes(s.difference, s.ratio)),
        )
        for s, q in zip(tested, q_values, strict=True)
    )


def significance_score(segments: tuple[SegmentEvidence, ...], rule: GapRule) -> float:
    """``-log10`` of the smallest q among segments whose effect passes (0 when none).

    Compared with ``-log10(alpha)``, it crosses exactly when a segment is flagged.
    """
    qs = [
        s.q_value
        for s in segments
        if s.q_value is not None and rule.effect_passes(s.difference, s.ratio)
    ]
    # q can underflow to 0 for huge samples; keep the score finite and JSON-safe.
    return -math.log10(max(min(qs), 1e-300)) if qs else 0.0


class SegmentGapDetector(Detector):
    """Base of the detectors that test every segment against the rest of the traffic.

    It holds the hyperparameters of the :class:`GapRule` as public attributes and turns a
    tested family of segments into the result; subclasses count the windows.
    """

    kind = DetectorKind.BIAS
    _n_seen: int

    def _init_gap(
        self,
        alpha: float,
        direction: str,
        baseline: str,
        n_windows: int,
        max_segments: int,
        min_samples: int,
        min_difference: float,
        ratio_threshold: float,
        effect_rule: str,
        fisher_below: float,
        confidence: float,
    ) -> None:
        self.alpha = float(alpha)
        self.direction = direction
        self.baseline = baseline
        self.n_windows = int(n_windows)
        self.max_segments = int(max_segments)
        self.min_samples = int(min_samples)
        self.min_difference = float(min_difference)
        self.ratio_threshold = float(ratio_threshold)
        self.effect_rule = effect_rule
        self.fisher_below = float(fisher_below)
        self.confidence = float(confidence)
        check_param("n_windows", self.n_windows, low=1)
        check_param("max_segments", self.max_segments, low=1)
        self._rule().validate()

    def _rule(self) -> GapRule:
        return GapRule(
            alpha=self.alpha,
            direction=self.direction,
            baseline=self.baseline,
            min_samples=self.min_samples,
            min_difference=self.min_difference,
            ratio_threshold=self.ratio_threshold,
            effect_rule=self.effect_rule,
            fisher_below=self.fisher_below,
            confidence=self.confidence,
        )

    def _gap_result(
        self,
        segments: tuple[SegmentEvidence, ...],
        notes: list[str],
        evicted: list[str],
        values: tuple[tuple[str, float], ...] = (),
    ) -> DetectorResult:
        """The result for a family from :func:`adjust_and_flag`; ``values`` add evidence."""
        flagged = [s for s in segments if s.flagged]
        worst = min(flagged, key=lambda s: (s.q_value, -abs(s.difference)), default=None)
        if evicted:
            notes.append(
                f"evicted by max_segments={self.max_segments} (least recent): " + ", ".join(evicted)
            )
        return self._result(
            score=significance_score(segments, self._rule()),
            threshold=-math.log10(self.alpha),
            detected=bool(flagged),
            n_seen=self._n_seen,
            p_value=min((s.q_value for s in segments if s.q_value is not None), default=None),
            effect_size=max((abs(s.difference) for s in segments), default=None),
            evidence=Evidence(
                segment=worst.segment if worst else None,
                test="benjamini-hochberg",
                segments=segments,
                values=(
                    ("n_tested", float(len(segments))),
                    ("n_flagged", float(len(flagged))),
                    *values,
                ),
                notes=tuple(notes),
            ),
        )
