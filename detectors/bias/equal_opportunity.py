"""Equal opportunity / equalized odds: true- and false-positive-rate gaps across segments."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, DetectorResult, register
from genmon.detectors.bias._compare import SegmentGapDetector, adjust_and_flag, evaluate_segments
from genmon.detectors.bias._inputs import LabeledObservations, confusion_counts
from genmon.detectors.bias._windows import SegmentWindows


@register
class EqualOpportunityDetector(SegmentGapDetector):
    """Flags segments whose true-positive rate (and, for equalized odds, false-positive
    rate) differs from the rest, once labels or user corrections exist.

    Each ``update()`` is one window: a sequence of
    :class:`~genmon.detectors.bias.ConfusionCounts` or one
    :class:`~genmon.detectors.bias.LabeledObservations` (segment, predicted positive,
    actually positive per event). TPR = TP / (TP + FN) is tested among actual
    positives, FPR = FP / (FP + TN) among actual negatives, each with the machinery of
    :class:`~genmon.detectors.bias.SegmentRateBiasDetector` (z or Fisher test against
    the rest, ``min_samples`` per segment *within* the conditioning class, the effect
    rule). With ``equalized_odds=True`` both rates form one Benjamini-Hochberg family.
    Evidence segments are named ``"tpr:<segment>"`` and ``"fpr:<segment>"``.

    ``direction`` says which gap is harm. The default "lower" flags segments that get the
    positive prediction *less often* given the true label (lower TPR; with equalized
    odds also lower FPR), right when the positive prediction is the favourable one.
    Use "higher" when it is the harmful one (e.g. "flagged as toxic"), "both" for any
    gap; note that with "both" a single segment's drop also makes the others look
    higher than their rest.

    References: Hardt, Price & Srebro (2016), "Equality of opportunity in supervised
    learning", NeurIPS; Benjamini & Hochberg (1995), JRSS B 57:289-300.

    >>> from genmon.detectors.bias import ConfusionCounts
    >>> d = EqualOpportunityDetector(min_samples=50)
    >>> r = d.update([ConfusionCounts("a", tp=180, fn=20, fp=10, tn=190),
    ...               ConfusionCounts("b", tp=178, fn=22, fp=12, tn=188),
    ...               ConfusionCounts("c", tp=110, fn=90, fp=11, tn=189)])
    >>> r.detected, r.evidence.segment
    (True, 'tpr:c')
    >>> d.equalized_odds, len(r.evidence.segments)
    (False, 3)
    """

    name = "equal_opportunity"

    def __init__(
        self,
        equalized_odds: bool = False,
        alpha: float = 0.05,
        direction: str = "lower",
        baseline: str = "rest",
        n_windows: int = 12,
        max_segments: int = 200,
        min_samples: int = 50,
        min_difference: float = 0.05,
        ratio_threshold: float = 0.8,
        effect_rule: str = "either",
        fisher_below: float = 5.0,
        confidence: float = 0.95,
    ) -> None:
        self.equalized_odds = bool(equalized_odds)
        self._init_gap(
            alpha,
            direction,
            baseline,
            n_windows,
            max_segments,
            min_samples,
            min_difference,
            ratio_threshold,
            effect_rule,
            fisher_below,
            confidence,
        )
        self.reset()

    def reset(self) -> None:
        self._tpr = SegmentWindows(self.n_windows, self.max_segments)
        self._fpr = SegmentWindows(self.n_windows, self.max_segments)
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        tpr_counts, fpr_counts = confusion_counts(batch)
        evicted = self._tpr.push(tpr_counts)
        self._fpr.push(fpr_counts)
        self._n_seen += sum(t for _, t in tpr_counts.values())
        self._n_seen += sum(t for _, t in fpr_counts.values())
        rule = self._rule()
        tested, notes = evaluate_segments(
            self._tpr.sums(), self._tpr.population_sum(), rule, "tpr:"
        )
        if self.equalized_odds:
            fpr_tested, fpr_notes = evaluate_segments(
                self._fpr.sums(), self._fpr.population_sum(), rule, "fpr:"
            )
            tested += fpr_tested
            notes += fpr_notes
        return self._gap_result(adjust_and_flag(tested, rule), notes, evicted)

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        segments = np.array(["a", "b", "c", "d"])

        def events(rng: np.random.Generator, n: int, tpr_c: float) -> LabeledObservations:
            labels = rng.choice(segments, n)
            if constant is not None:
                same = np.full(n, int(constant > 0))
                return LabeledObservations(labels.tolist(), same, same)
            actual = (rng.random(n) < 0.5).astype(int)
            hit = rng.random(n) < np.where(labels == "c", tpr_c, 0.9)
            predicted = np.where(actual == 1, hit, rng.random(n) < 0.1).astype(int)
            return LabeledObservations(labels.tolist(), predicted, actual)

        detector = cls(alpha=1e-4, min_samples=30, effect_rule="both", n_windows=50)
        return ContractExample(
            detector,
            lambda rng, n: events(rng, n, 0.9),
            lambda rng, n: events(rng, n, 0.3),
            # TPR is measured among actual positives, about half of the events
            warmup=4 * detector.min_samples,
            invalid=({"direction": "up"}, {"max_segments": 0}, {"baseline": "median"}),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"tpr": self._tpr.to_json(), "fpr": self._fpr.to_json(), "n_seen": self._n_seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._tpr = SegmentWindows.from_json(state["tpr"], self.n_windows, self.max_segments)
        self._fpr = SegmentWindows.from_json(state["fpr"], self.n_windows, self.max_segments)
        self._n_seen = int(state["n_seen"])
