"""Per-segment rate disparity: is one segment's refusal/error/negative-feedback rate off?"""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, DetectorResult, register
from genmon.detectors.bias._compare import SegmentGapDetector, adjust_and_flag, evaluate_segments
from genmon.detectors.bias._inputs import SegmentObservations, split_rate_counts
from genmon.detectors.bias._windows import SegmentWindows
from genmon.detectors.exceptions import InvalidParameterError


@register
class SegmentRateBiasDetector(SegmentGapDetector):
    """Flags segments whose rate of ``signal`` differs from the rest of the traffic.

    ``signal`` names the rate (``"refusal"``, ``"negative_feedback"``, ``"error"``,
    ``"empty_response"``, ``"slow_response"``, ...); the detector only counts events.
    Each ``update()`` is one window: a sequence of
    :class:`~genmon.detectors.bias.SegmentCounts` or one
    :class:`~genmon.detectors.bias.SegmentObservations`. Sums over the last
    ``n_windows`` windows are tested; at most ``max_segments`` segments are tracked
    (least recently seen evicted first, listed in the notes). Items with
    ``tested=False`` (an overflow bucket of many values) count in the rest and overall
    population but are never tested themselves (listed in the notes).

    Per segment with ``min_samples`` requests (smaller ones are skipped and listed in
    ``evidence.notes``): z-test against the rest, Fisher's exact test when an expected
    cell is below ``fisher_below``; Benjamini-Hochberg across segments; flagged when
    ``q <= alpha`` and the effect passes ``effect_rule`` (``min_difference`` and/or the
    four-fifths rule; see :mod:`genmon.detectors.bias._compare`). ``direction`` says
    which way is harmful: "higher" for bad rates (ratio > 1/0.8 = 1.25 is adverse),
    "lower" for favourable ones (ratio < 0.8), "both".

    Result: ``score = -log10(min q)`` over segments whose effect passes, ``threshold =
    -log10(alpha)``; ``p_value`` is the smallest q; ``effect_size`` the largest absolute
    difference; ``evidence.segments`` has every tested segment (rates, Wilson CIs, test,
    p, q); ``evidence.segment`` is the most significant flagged one.

    References: Benjamini & Hochberg (1995), JRSS B 57:289-300; Wilson (1927), JASA
    22:209-212; EEOC Uniform Guidelines on Employee Selection, 29 CFR 1607.4(D)
    (four-fifths rule); Feldman et al. (2015), "Certifying and removing disparate
    impact", KDD.

    >>> from genmon.detectors.bias import SegmentCounts
    >>> d = SegmentRateBiasDetector(signal="refusal", min_samples=50)
    >>> r = d.update([SegmentCounts("en", 10, 500), SegmentCounts("de", 12, 500),
    ...               SegmentCounts("fr", 60, 500), SegmentCounts("it", 3, 20)])
    >>> r.detected, r.evidence.segment, [s.segment for s in r.evidence.segments if s.flagged]
    (True, 'fr', ['fr'])
    >>> r.evidence.notes[1]
    'skipped below min_samples=50: it (n=20, rest n=1500)'
    """

    name = "segment_rate_bias"

    def __init__(
        self,
        signal: str = "refusal",
        alpha: float = 0.05,
        direction: str = "higher",
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
        if not isinstance(signal, str) or not signal:
            raise InvalidParameterError(f"signal={signal!r} must name the rate, e.g. 'refusal'")
        self.signal = signal
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
        self._windows = SegmentWindows(self.n_windows, self.max_segments)
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        counts, untested = split_rate_counts(batch)
        evicted = self._windows.push(counts, untested)
        self._n_seen += sum(total for _, total in (*counts.values(), *untested.values()))
        rule = self._rule()
        tested, notes = evaluate_segments(
            self._windows.sums(), self._windows.population_sum(), rule
        )
        segments = adjust_and_flag(tested, rule)
        n_flagged = sum(s.flagged for s in segments)
        notes.insert(0, f"signal {self.signal!r}: {n_flagged} of {len(segments)} segments flagged")
        if untested:
            notes.append(
                "in the population, not tested (this window): "
                + ", ".join(f"{s} (n={total})" for s, (_, total) in sorted(untested.items()))
            )
        tracked = (("n_tracked", float(len(self._windows.segments))),)
        return self._gap_result(segments, notes, evicted, tracked)

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        segments = np.array(["a", "b", "c", "d"])

        def events(rng: np.random.Generator, n: int, rate_c: float) -> SegmentObservations:
            labels = rng.choice(segments, n)
            if constant is not None:
                return SegmentObservations(labels.tolist(), np.full(n, int(constant > 0)))
            rates = np.where(labels == "c", rate_c, 0.1)
            return SegmentObservations(labels.tolist(), (rng.random(n) < rates).astype(int))

        detector = cls(alpha=1e-4, min_samples=50, effect_rule="both", n_windows=50)
        return ContractExample(
            detector,
            lambda rng, n: events(rng, n, 0.1),
            lambda rng, n: events(rng, n, 0.6),
            warmup=2 * detector.min_samples,
            invalid=({"direction": "up"}, {"n_windows": 0}, {"effect_rule": "any"}, {"signal": ""}),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"windows": self._windows.to_json(), "n_seen": self._n_seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._windows = SegmentWindows.from_json(
            state["windows"], self.n_windows, self.max_segments
        )
        self._n_seen = int(state["n_seen"])
