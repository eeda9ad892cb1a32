"""A/B and canary comparison of two model versions on latency (Mann-Whitney U + quantiles)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.bias._compare import check_versions, rate_ratio
from genmon.detectors.exceptions import InputError


@dataclass(frozen=True, slots=True)
class LatencyObservations:
    """Raw events: ``versions[i]`` served request i in ``latencies_ms[i]`` milliseconds."""

    versions: Sequence[str]
    latencies_ms: Sequence[float] | np.ndarray


@register
class ABLatencyDetector(Detector):
    """Is the ``candidate`` version slower than ``baseline`` by more than ``margin``?

    Each ``update()`` takes one :class:`LatencyObservations`; other versions are
    ignored. The last ``max_samples`` latencies per version are kept (older ones drop
    out), so memory is bounded and the comparison follows recent traffic.

    Test: one-sided Mann-Whitney U of candidate latencies against baseline latencies
    scaled by ``1 + margin`` (H0: the candidate is not stochastically slower than the
    baseline plus the relative margin); flagged when ``p <= alpha`` and both versions
    have ``min_samples``. Evidence: p50/p99 of each version, their ratios with seeded
    percentile-bootstrap intervals (``n_bootstrap`` resamples, level ``1 - 2 * alpha``;
    0 disables), and ``prob_candidate_slower`` = U / (n_c n_b), the common-language
    effect size (also ``effect_size``). ``evidence.segment`` names the slower version.

    References: Mann & Whitney (1947), Ann. Math. Statist. 18:50-60; McGraw & Wong
    (1992), Psychological Bulletin 111:361-365 (common-language effect size); Efron &
    Tibshirani (1993), *An Introduction to the Bootstrap*.

    >>> rng = np.random.default_rng(0)
    >>> d = ABLatencyDetector(baseline="v1", candidate="v2", margin=0.05)
    >>> fast, slow = rng.lognormal(5.0, 0.3, 400), rng.lognormal(5.3, 0.3, 400)
    >>> r = d.update(LatencyObservations(["v1"] * 400 + ["v2"] * 400,
    ...                                  np.concatenate([fast, slow])))
    >>> r.detected, r.evidence.segment, r.evidence.value("p50_ratio") > 1.2
    (True, 'v2', True)
    """

    name = "ab_latency"
    kind = DetectorKind.QUALITY

    def __init__(
        self,
        baseline: str,
        candidate: str,
        margin: float = 0.0,
        alpha: float = 0.05,
        max_samples: int = 2000,
        min_samples: int = 50,
        n_bootstrap: int = 200,
        seed: int = 0,
    ) -> None:
        check_versions(baseline, candidate)
        self.baseline = baseline
        self.candidate = candidate
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.max_samples = int(max_samples)
        self.min_samples = int(min_samples)
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)
        check_param("margin", self.margin, low=0.0)
        check_param("alpha", self.alpha, low=0.0, high=0.5, low_open=True, high_open=True)
        check_param("min_samples", self.min_samples, low=2)
        check_param("max_samples", self.max_samples, low=self.min_samples)
        check_param("n_bootstrap", self.n_bootstrap, low=0)
        self.reset()

    def reset(self) -> None:
        self._samples: dict[str, deque[float]] = {
            v: deque(maxlen=self.max_samples) for v in (self.baseline, self.candidate)
        }
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        if not isinstance(batch, LatencyObservations):
            raise InputError(f"batch must be a LatencyObservations, got {type(batch).__name__}")
        versions = list(batch.versions)
        latencies = np.asarray(batch.latencies_ms, dtype=float)
        if latencies.shape != (len(versions),):
            raise InputError(
                f"latencies_ms needs one value per version label ({len(versions)}), "
                f"got shape {latencies.shape}"
            )
        if not np.all(np.isfinite(latencies) & (latencies >= 0)):
            raise InputError("latencies_ms must be finite and >= 0")
        ignored = set()
        for version, latency in zip(versions, latencies.tolist(), strict=True):
            if version in self._samples:
                self._samples[version].append(latency)
                self._n_seen += 1
            else:
                ignored.add(str(version))
        notes = ["ignored versions: " + ", ".join(sorted(ignored))] if ignored else []
        base = np.fromiter(self._samples[self.baseline], dtype=float)
        cand = np.fromiter(self._samples[self.candidate], dtype=float)
        if min(base.size, cand.size) < self.min_samples:
            notes.append(
                f"waiting for min_samples={self.min_samples} per version "
                f"(n={base.size}, {cand.size})"
            )
            return self._result(
                score=0.0,
                threshold=-math.log10(self.alpha),
                detected=False,
                n_seen=self._n_seen,
                evidence=Evidence(test="mann-whitney-u", notes=tuple(notes)),
            )
        p_value = float(
            stats.mannwhitneyu(cand, base * (1 + self.margin), alternative="greater").pvalue
        )
        u = float(stats.mannwhitneyu(cand, base, alternative="greater").statistic)
        prob_slower = u / (cand.size * base.size)
        qb, qc = np.quantile(base, [0.5, 0.99]), np.quantile(cand, [0.5, 0.99])
        values = [
            ("baseline_p50", float(qb[0])),
            ("baseline_p99", float(qb[1])),
            ("candidate_p50", float(qc[0])),
            ("candidate_p99", float(qc[1])),
            ("p50_ratio", rate_ratio(qc[0], qb[0])),
            ("p99_ratio", rate_ratio(qc[1], qb[1])),
            ("prob_candidate_slower", prob_slower),
            ("margin", self.margin),
        ]
        if self.n_bootstrap:
            values += self._bootstrap_ratio_ci(base, cand)
        slower = (
            self.candidate if prob_slower > 0.5 else self.baseline if prob_slower < 0.5 else None
        )
        return self._result(
            score=-math.log10(max(p_value, 1e-300)),
            threshold=-math.log10(self.alpha),
            detected=p_value <= self.alpha,
            n_seen=self._n_seen,
            p_value=p_value,
            effect_size=prob_slower,
            evidence=Evidence(
                segment=slower, test="mann-whitney-u", values=tuple(values), notes=tuple(notes)
            ),
        )

    def _bootstrap_ratio_ci(self, base: np.ndarray, cand: np.ndarray) -> list[tuple[str, float]]:
        rng = np.random.default_rng(self.seed)
        qb = np.quantile(
            base[rng.integers(0, base.size, (self.n_bootstrap, base.size))], [0.5, 0.99], axis=1
        )
        qc = np.quantile(
            cand[rng.integers(0, cand.size, (self.n_bootstrap, cand.size))], [0.5, 0.99], axis=1
        )
        # Same convention as rate_ratio: 0/0 is "equal", x/0 is infinitely slower.
        safe = np.where(qb == 0, 1.0, qb)
        ratios = np.where(qb == 0, np.where(qc == 0, 1.0, math.inf), qc / safe)
        out = []
        for row, label in zip(ratios, ("p50", "p99"), strict=True):
            low, high = np.quantile(row, [self.alpha, 1 - self.alpha])
            out += [(f"{label}_ratio_ci_low", float(low)), (f"{label}_ratio_ci_high", float(high))]
        return out

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def events(rng: np.random.Generator, n: int, slowdown: float) -> LatencyObservations:
            versions = rng.choice(np.array(["v1", "v2"]), n)
            if constant is not None:
                return LatencyObservations(versions.tolist(), np.full(n, abs(float(constant))))
            latencies = rng.lognormal(5.0, 0.3, n) * np.where(versions == "v2", slowdown, 1.0)
            return LatencyObservations(versions.tolist(), latencies)

        detector = cls(baseline="v1", candidate="v2", margin=0.05, alpha=1e-3, n_bootstrap=50)
        return ContractExample(
            detector,
            lambda rng, n: events(rng, n, 1.0),
            lambda rng, n: events(rng, n, 2.0),
            warmup=2 * detector.min_samples,
            invalid=({"candidate": "v1"}, {"max_samples": 10}, {"n_bootstrap": -1}),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"samples": {v: list(s) for v, s in self._samples.items()}, "n_seen": self._n_seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        for version in (self.baseline, self.candidate):
            self._samples[version] = deque(
                (float(x) for x in state["samples"][version]), maxlen=self.max_samples
            )
        self._n_seen = int(state["n_seen"])
