"""A/B and canary comparison of two model versions on a rate (errors, refusals, feedback)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    SegmentEvidence,
    check_param,
    register,
)
from genmon.detectors._stats import compare_proportions, newcombe_interval, wilson_interval
from genmon.detectors.bias._compare import check_versions, rate_ratio
from genmon.detectors.bias._inputs import SegmentObservations, rate_counts
from genmon.detectors.bias._windows import SegmentWindows


@register
class ABRateDetector(Detector):
    """Is the ``candidate`` version worse than ``baseline`` on ``signal`` beyond ``margin``?

    Each ``update()`` is one window of per-version counts: a sequence of
    :class:`~genmon.detectors.bias.SegmentCounts` (or one
    :class:`~genmon.detectors.bias.SegmentObservations`) whose segment is the model
    version; other versions are ignored (noted). Counts are summed over the last
    ``n_windows`` windows.

    Decision (non-inferiority): with ``d`` = candidate rate - baseline rate, oriented so
    that positive is worse (``higher_is_worse``), the candidate is flagged when the lower
    bound of Newcombe's hybrid score interval for ``d`` at level ``1 - 2 * alpha`` (a
    one-sided ``alpha`` test) exceeds ``margin``. Both versions need ``min_samples``.
    ``p_value`` is the one-sided z-test (Fisher's exact test when an expected cell is
    below ``fisher_below``) of "candidate worse at all", reported next to the interval.

    ``score`` is that lower bound, ``threshold`` the margin, ``effect_size`` the oriented
    difference; ``evidence.segment`` names the worse version (None on a tie). A version
    regression is a quality finding, hence ``kind = quality``.

    References: Newcombe (1998), Statistics in Medicine 17:873-890 (method 10);
    Kohavi, Tang & Xu (2020), *Trustworthy Online Controlled Experiments*, CUP.

    >>> from genmon.detectors.bias import SegmentCounts
    >>> d = ABRateDetector(baseline="v1", candidate="v2", signal="error", margin=0.01)
    >>> r = d.update([SegmentCounts("v1", 20, 1000), SegmentCounts("v2", 60, 1000)])
    >>> r.detected, r.evidence.segment, round(r.effect_size, 3)
    (True, 'v2', 0.04)
    >>> d.update([SegmentCounts("v1", 20, 1000), SegmentCounts("v2", 15, 1000)]).detected
    False
    """

    name = "ab_rate"
    kind = DetectorKind.QUALITY

    def __init__(
        self,
        baseline: str,
        candidate: str,
        signal: str = "error",
        higher_is_worse: bool = True,
        margin: float = 0.0,
        alpha: float = 0.05,
        n_windows: int = 60,
        min_samples: int = 100,
        fisher_below: float = 5.0,
    ) -> None:
        check_versions(baseline, candidate)
        self.baseline = baseline
        self.candidate = candidate
        self.signal = signal
        self.higher_is_worse = bool(higher_is_worse)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.n_windows = int(n_windows)
        self.min_samples = int(min_samples)
        self.fisher_below = float(fisher_below)
        check_param("margin", self.margin, low=0.0, high=1.0, high_open=True)
        check_param("alpha", self.alpha, low=0.0, high=0.5, low_open=True, high_open=True)
        check_param("n_windows", self.n_windows, low=1)
        check_param("min_samples", self.min_samples, low=1)
        check_param("fisher_below", self.fisher_below, low=0.0)
        self.reset()

    def reset(self) -> None:
        self._windows = SegmentWindows(self.n_windows, max_segments=2)
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        counts = rate_counts(batch)
        versions = (self.baseline, self.candidate)
        notes = []
        ignored = sorted(set(counts) - set(versions))
        if ignored:
            notes.append("ignored versions: " + ", ".join(ignored))
        self._windows.push({v: c for v, c in counts.items() if v in versions})
        self._n_seen += sum(t for v, (_, t) in counts.items() if v in versions)
        sums = self._windows.sums()
        xb, nb = sums.get(self.baseline, (0, 0))
        xc, nc = sums.get(self.candidate, (0, 0))
        confidence = 1.0 - 2.0 * self.alpha
        ci = newcombe_interval(xc, nc, xb, nb, confidence)
        sign = 1.0 if self.higher_is_worse else -1.0
        rate_c = xc / nc if nc else 0.0
        rate_b = xb / nb if nb else 0.0
        difference = rate_c - rate_b
        worse_by = sign * difference
        worse_low = ci.low if self.higher_is_worse else -ci.high
        test = compare_proportions(
            xc, nc, xb, nb, "greater" if self.higher_is_worse else "less", self.fisher_below
        )
        enough = min(nb, nc) >= self.min_samples
        detected = enough and worse_low > self.margin
        if not enough:
            notes.append(f"waiting for min_samples={self.min_samples} per version (n={nb}, {nc})")
        worse = self.candidate if worse_by > 0 else self.baseline if worse_by < 0 else None
        ratio = rate_ratio(rate_c, rate_b)
        if worse is not None:
            notes.append(
                f"{worse} is worse on {self.signal!r} by {abs(difference):.4f} "
                f"(candidate/baseline ratio {ratio:.3g})"
            )
        evidence = SegmentEvidence(
            segment=self.candidate,
            rate=rate_c,
            rate_ci=wilson_interval(xc, nc, confidence),
            baseline_rate=rate_b,
            baseline_ci=wilson_interval(xb, nb, confidence),
            n=nc,
            baseline_n=nb,
            test=test.test,
            p_value=test.p_value,
            difference=difference,
            ratio=ratio,
            flagged=detected,
        )
        return self._result(
            score=worse_low,
            threshold=self.margin,
            detected=detected,
            n_seen=self._n_seen,
            p_value=test.p_value,
            effect_size=worse_by,
            evidence=Evidence(
                segment=worse,
                test=f"newcombe-non-inferiority+{test.test}",
                segments=(evidence,),
                values=(
                    ("difference", difference),
                    ("difference_ci_low", ci.low),
                    ("difference_ci_high", ci.high),
                    ("ci_level", confidence),
                    ("margin", self.margin),
                ),
                notes=tuple(notes),
            ),
        )

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def events(rng: np.random.Generator, n: int, rate_v2: float) -> SegmentObservations:
            versions = rng.choice(np.array(["v1", "v2"]), n)
            if constant is not None:
                return SegmentObservations(versions.tolist(), np.full(n, int(constant > 0)))
            rates = np.where(versions == "v2", rate_v2, 0.1)
            return SegmentObservations(versions.tolist(), (rng.random(n) < rates).astype(int))

        detector = cls(baseline="v1", candidate="v2", margin=0.02, alpha=1e-3, min_samples=50)
        return ContractExample(
            detector,
            lambda rng, n: events(rng, n, 0.1),
            lambda rng, n: events(rng, n, 0.5),
            warmup=2 * detector.min_samples,
            invalid=({"candidate": "v1"}, {"alpha": 0.5}, {"n_windows": 0}),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"windows": self._windows.to_json(), "n_seen": self._n_seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._windows = SegmentWindows.from_json(state["windows"], self.n_windows, 2)
        self._n_seen = int(state["n_seen"])
