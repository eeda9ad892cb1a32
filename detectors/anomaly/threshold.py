"""A static threshold on the batch mean: the simplest detector, and the template to copy.

A new detector starts as a copy of this file in its family's folder (``drift/``,
``bias/``, ``anomaly/``, ``quality/``): hyperparameters public and checked in
``__init__``, state private and set only in ``reset()``, ``update()`` returning a
:class:`~genmon.detectors.DetectorResult`, ``_get_state``/``_set_state`` as JSON, a
``state_version`` bumped when that state's layout changes, and a
:class:`~genmon.detectors.ContractExample` so ``tests/detectors/test_contract.py`` checks it
with every other registered detector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.exceptions import InputError


@register
class ThresholdDetector(Detector):
    """Fires when the mean of a batch is above ``threshold`` (or below, with ``above=False``).

    Warm-up: nothing fires until ``min_samples`` values have been seen in total.

    >>> d = ThresholdDetector(threshold=0.5, min_samples=2)
    >>> d.update([0.1, 0.2]).detected
    False
    >>> d.update([0.9, 0.8]).detected
    True
    """

    name = "threshold"
    kind = DetectorKind.ANOMALY

    def __init__(self, threshold: float, above: bool = True, min_samples: int = 1) -> None:
        self.threshold = float(threshold)
        self.above = bool(above)
        self.min_samples = int(min_samples)
        check_param("threshold", self.threshold)
        check_param("min_samples", self.min_samples, low=1)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0

    def update(self, batch: Any) -> DetectorResult:
        values = np.asarray(batch, dtype=float).ravel()
        if values.size == 0:
            raise InputError("ThresholdDetector.update() needs at least one value")
        self._n_seen += int(values.size)
        score = float(values.mean())
        crossed = score > self.threshold if self.above else score < self.threshold
        return self._result(
            score=score,
            threshold=self.threshold,
            detected=bool(crossed and self._n_seen >= self.min_samples),
            n_seen=self._n_seen,
            evidence=Evidence(values=(("batch_size", float(values.size)),)),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"n_seen": self._n_seen}

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        level = 0.0 if constant is None else float(constant)

        def stream(rng: np.random.Generator, n: int) -> np.ndarray:
            if constant is not None:
                return np.full(n, level)
            return rng.normal(level, 0.1, n)

        def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
            return rng.normal(level + 5.0, 0.1, n)

        detector = cls(threshold=level + 1.0, min_samples=5)
        return ContractExample(detector, stream, shifted, 5, invalid=({"min_samples": 0},))

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
