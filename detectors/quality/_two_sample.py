"""Shared algorithm of the distribution-shift quality detectors: KS of window vs reference."""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import Detector, DetectorKind, DetectorResult, Evidence, check_param
from genmon.detectors._stats import ALTERNATIVES
from genmon.detectors.exceptions import InvalidParameterError

#: Our ``alternative`` speaks about the window ("less": window values are smaller); scipy's
#: one-sided KS speaks about CDFs, and a smaller sample has the *greater* CDF.
_SCIPY_ALTERNATIVE = {"two-sided": "two-sided", "less": "greater", "greater": "less"}


class ReferenceSampleDetector(Detector):
    """Two-sample Kolmogorov-Smirnov test of a rolling window against the first values seen.

    The first ``reference_size`` values form a frozen reference; the window holds the last
    ``window_size`` values after it, across updates (memory is bounded by both). Once the
    window holds ``min_samples`` values it is compared with the reference. It is *detected* when
    ``p <= alpha`` (one-sided per ``alternative``) and the subclass's effect size reaches
    its minimum, so a huge window cannot alarm on a negligible change. ``score`` is the KS
    statistic and ``threshold`` its asymptotic critical value at ``alpha`` for these sizes.
    """

    kind = DetectorKind.QUALITY

    def _init_common(
        self,
        reference_size: int,
        window_size: int,
        min_samples: int,
        alpha: float,
        alternative: str,
    ) -> None:
        check_param("reference_size", reference_size, low=2, high=1_000_000)
        check_param("window_size", window_size, low=2, high=1_000_000)
        check_param("min_samples", min_samples, low=2, high=window_size)
        check_param("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        if alternative not in ALTERNATIVES:
            raise InvalidParameterError(f"alternative={alternative!r} is not one of {ALTERNATIVES}")
        self.reference_size = int(reference_size)
        self.window_size = int(window_size)
        self.min_samples = int(min_samples)
        self.alpha = float(alpha)
        self.alternative = alternative

    def reset(self) -> None:
        self._n_seen = 0
        self._reference: list[float] = []
        self._window: list[float] = []

    @abc.abstractmethod
    def _values(self, batch: Any) -> np.ndarray:
        """The batch as a 1-D float array of the monitored quantity."""

    @abc.abstractmethod
    def _effect(self, window: np.ndarray, reference: np.ndarray) -> tuple[float, bool]:
        """``(effect size, large enough)`` of the window against the reference."""

    def update(self, batch: Any) -> DetectorResult:
        values = self._values(batch)
        self._n_seen += int(values.size)
        missing = self.reference_size - len(self._reference)
        if missing > 0:
            self._reference.extend(values[:missing].tolist())
            values = values[missing:]
        self._window = (self._window + values.tolist())[-self.window_size :]
        if len(self._window) < self.min_samples:
            note = "building the reference or the window"
            return self._result(
                score=0.0,
                threshold=math.inf,
                detected=False,
                n_seen=self._n_seen,
                evidence=Evidence(
                    test="ks", notes=(note,), values=(("n", float(len(self._window))),)
                ),
            )
        reference = np.asarray(self._reference)
        values = np.asarray(self._window)
        test = stats.ks_2samp(values, reference, alternative=_SCIPY_ALTERNATIVE[self.alternative])
        effect, large = self._effect(values, reference)
        p_value = float(test.pvalue)
        n, m = values.size, reference.size
        level = self.alpha / 2 if self.alternative == "two-sided" else self.alpha
        critical = math.sqrt(-math.log(level) * (n + m) / (2.0 * n * m))
        evidence = (
            ("mean", float(values.mean())),
            ("reference_mean", float(reference.mean())),
            ("median", float(np.median(values))),
            ("reference_median", float(np.median(reference))),
            ("n", float(n)),
            ("reference_n", float(m)),
        )
        return self._result(
            score=float(test.statistic),
            threshold=critical,
            detected=bool(p_value <= self.alpha and large),
            n_seen=self._n_seen,
            p_value=p_value,
            effect_size=effect,
            evidence=Evidence(test="ks_2samp", values=evidence),
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "reference": list(self._reference),
            "window": list(self._window),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._reference = [float(v) for v in state["reference"]][: self.reference_size]
        self._window = [float(v) for v in state["window"]][-self.window_size :]
