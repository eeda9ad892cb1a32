"""Response-length shift: the length distribution of a window against a reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, check_param, register
from genmon.detectors.anomaly._common import changes_after
from genmon.detectors.exceptions import InputError
from genmon.detectors.quality._two_sample import ReferenceSampleDetector


@register
class LengthShiftDetector(ReferenceSampleDetector):
    """Alarms when response lengths shift: KS test plus a minimum change of the median.

    Items are lengths (``completion_tokens``, characters) or response texts, measured in
    whitespace-separated words. Detected when the KS test rejects at ``alpha`` and the
    median moved by at least ``min_relative_change`` of the reference median (the median
    because length distributions are skewed by a few very long answers). ``effect_size`` is
    that relative change, signed. Shorter answers often mean a truncation or refusal
    regression, longer ones a prompt-template or model change.

    >>> rng = np.random.default_rng(0)
    >>> d = LengthShiftDetector(reference_size=200, window_size=100, min_samples=50)
    >>> d.update(rng.poisson(120, 200)).detected
    False
    >>> d.update(rng.poisson(120, 100)).detected
    False
    >>> r = d.update(rng.poisson(60, 100))
    >>> r.detected, round(r.effect_size, 1)
    (True, -0.5)

    References: F. J. Massey, "The Kolmogorov-Smirnov test for goodness of fit", JASA 46
    (1951); C. Shankar et al., "Operationalizing Machine Learning: An Interview Study",
    arXiv:2209.09125 (2022) on monitoring output statistics of deployed models.
    """

    name = "length_shift"

    def __init__(
        self,
        reference_size: int = 500,
        window_size: int = 200,
        min_samples: int = 30,
        alpha: float = 0.01,
        min_relative_change: float = 0.1,
        alternative: str = "two-sided",
    ) -> None:
        check_param("min_relative_change", min_relative_change, low=0.0)
        self._init_common(reference_size, window_size, min_samples, alpha, alternative)
        self.min_relative_change = float(min_relative_change)
        self.reset()

    def _values(self, batch: Any) -> np.ndarray:
        items = (
            [batch]
            if isinstance(batch, str)
            else list(np.atleast_1d(np.asarray(batch, dtype=object)))
        )
        if not items:
            raise InputError("LengthShiftDetector.update() needs at least one item")
        lengths = np.empty(len(items))
        for i, item in enumerate(items):
            if isinstance(item, str):
                lengths[i] = len(item.split())
            else:
                try:
                    lengths[i] = float(item)
                except (TypeError, ValueError) as exc:
                    raise InputError(
                        "LengthShiftDetector.update() takes lengths (numbers) or response texts; "
                        f"got {type(item).__name__}"
                    ) from exc
        if not np.all(np.isfinite(lengths)) or np.any(lengths < 0):
            raise InputError("LengthShiftDetector.update() needs finite lengths >= 0")
        return lengths

    def _effect(self, window: np.ndarray, reference: np.ndarray) -> tuple[float, bool]:
        base = max(float(np.median(reference)), 1.0)
        change = (float(np.median(window)) - base) / base
        return change, abs(change) >= self.min_relative_change

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> np.ndarray:
            if constant is not None:
                return np.full(n, abs(float(constant)))
            return rng.poisson(100, n).astype(float)

        def shorter(rng: np.random.Generator, n: int) -> np.ndarray:
            return rng.poisson(30, n).astype(float)

        detector = cls(reference_size=60, window_size=40, min_samples=20)
        invalid = ({"min_relative_change": -1.0}, {"min_samples": 1}, {"alternative": "up"})
        return ContractExample(detector, stream, changes_after(stream, shorter, 60), 60, invalid)
