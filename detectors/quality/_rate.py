"""The shared algorithm of the rate detectors: a window's flag rate against a reference rate."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import Detector, DetectorKind, DetectorResult, Evidence, check_param
from genmon.detectors._stats import ALTERNATIVES, compare_proportions, wilson_interval
from genmon.detectors.exceptions import InputError, InvalidParameterError


class RateDetector(Detector):
    """Tests whether the share of flagged items in a rolling window differs from a reference.

    The window holds the last ``window_size`` items after the reference, across updates, so
    callers may send one event or a whole tumbling window per ``update()``. The reference
    is ``baseline_rate`` when given (exact binomial test), else the first ``reference_size``
    items seen (two-proportion z-test, or Fisher's exact test when a cell is small). Once
    the window holds ``min_samples`` items, an update is *detected* when ``p <= alpha`` and
    the rate moved by at least ``min_difference`` in the direction of ``alternative``.
    ``score`` is the window rate and ``threshold`` the reference rate it was tested against.
    Subclasses say how an item is flagged (:meth:`_flags`), and may add evidence.
    """

    kind = DetectorKind.QUALITY

    def __init__(
        self,
        baseline_rate: float | None = None,
        reference_size: int = 500,
        window_size: int = 200,
        min_samples: int = 30,
        alpha: float = 0.01,
        min_difference: float = 0.0,
        alternative: str = "greater",
    ) -> None:
        if baseline_rate is not None:
            check_param("baseline_rate", baseline_rate, low=0.0, high=1.0)
        check_param("reference_size", reference_size, low=1, high=10_000_000)
        check_param("window_size", window_size, low=1, high=1_000_000)
        check_param("min_samples", min_samples, low=1, high=window_size)
        check_param("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_param("min_difference", min_difference, low=0.0, high=1.0)
        if alternative not in ALTERNATIVES:
            raise InvalidParameterError(f"alternative={alternative!r} is not one of {ALTERNATIVES}")
        self.baseline_rate = None if baseline_rate is None else float(baseline_rate)
        self.reference_size = int(reference_size)
        self.window_size = int(window_size)
        self.min_samples = int(min_samples)
        self.alpha = float(alpha)
        self.min_difference = float(min_difference)
        self.alternative = alternative
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._ref_flagged = 0
        self._ref_total = 0
        self._window: list[bool] = []

    @abc.abstractmethod
    def _flags(self, items: list[Any]) -> tuple[np.ndarray, tuple[tuple[str, float], ...]]:
        """One boolean per item, plus evidence values describing this batch."""

    def update(self, batch: Any) -> DetectorResult:
        items = _as_items(batch, type(self).__name__)
        flags, extra = self._flags(items)
        self._n_seen += len(items)
        if self.baseline_rate is None and self._ref_total < self.reference_size:
            take = min(flags.size, self.reference_size - self._ref_total)
            self._ref_flagged += int(flags[:take].sum())
            self._ref_total += take
            flags = flags[take:]
        self._window = (self._window + flags.tolist())[-self.window_size :]
        if len(self._window) < self.min_samples:
            return self._result(
                score=self._reference_rate(),
                threshold=self._reference_rate(),
                detected=False,
                n_seen=self._n_seen,
                evidence=Evidence(
                    values=self._reference_values() + extra,
                    notes=("building the reference or the window",),
                ),
            )
        return self._test(sum(self._window), len(self._window), extra)

    def _test(
        self, flagged: int, total: int, extra: tuple[tuple[str, float], ...]
    ) -> DetectorResult:
        rate, reference = flagged / total, self._reference_rate()
        if self.baseline_rate is not None:
            test = "binomial"
            p_value = float(
                stats.binomtest(flagged, total, self.baseline_rate, self.alternative).pvalue
            )
        else:
            result = compare_proportions(
                flagged, total, self._ref_flagged, self._ref_total, self.alternative
            )
            test, p_value = result.test, result.p_value
        moved = {"greater": rate - reference, "less": reference - rate}.get(
            self.alternative, abs(rate - reference)
        )
        ci = wilson_interval(flagged, total)
        values = (
            ("rate", rate),
            ("rate_low", ci.low),
            ("rate_high", ci.high),
            ("flagged", float(flagged)),
            ("n", float(total)),
            *self._reference_values(),
            *extra,
        )
        return self._result(
            score=rate,
            threshold=reference,
            detected=bool(p_value <= self.alpha and moved >= self.min_difference and moved > 0),
            n_seen=self._n_seen,
            p_value=p_value,
            effect_size=rate - reference,
            evidence=Evidence(test=test, values=values),
        )

    def _reference_rate(self) -> float:
        if self.baseline_rate is not None:
            return self.baseline_rate
        return self._ref_flagged / self._ref_total if self._ref_total else 0.0

    def _reference_values(self) -> tuple[tuple[str, float], ...]:
        total = float(self._ref_total) if self.baseline_rate is None else float("inf")
        return (("reference_rate", self._reference_rate()), ("reference_n", total))

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "ref_flagged": self._ref_flagged,
            "ref_total": self._ref_total,
            "window": list(self._window),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._ref_flagged = int(state["ref_flagged"])
        self._ref_total = int(state["ref_total"])
        self._window = [bool(v) for v in state["window"]][-self.window_size :]


def _as_items(batch: Any, owner: str) -> list[Any]:
    if isinstance(batch, str | bytes | dict):
        batch = [batch]
    try:
        items = list(batch)
    except TypeError as exc:
        raise InputError(
            f"{owner}.update() needs a sequence of items; got {type(batch).__name__}"
        ) from exc
    if not items:
        raise InputError(f"{owner}.update() needs at least one item")
    return items


def bool_flag(item: Any, owner: str) -> bool | None:
    """``item`` as a ready-made flag (bool or 0/1), or None when it is something else."""
    if isinstance(item, bool | np.bool_):
        return bool(item)
    if isinstance(item, int | float | np.integer | np.floating):
        if item not in (0, 1):
            raise InputError(f"{owner} takes numeric flags only as 0 or 1; got {item!r}")
        return bool(item)
    return None
