"""Parallel CUSUMs of a rate on short panes: an abrupt rise found within a few requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from genmon.detectors._base import check_param
from genmon.detectors.anomaly.rate_cusum import _clamp, design_rate, scaled_llr
from genmon.detectors.exceptions import InputError, InvalidParameterError

#: Design rises (odds ratios against the baseline) of the default charts: an error or
#: refusal rate 8x and 64x its baseline's odds (0.5 % -> 3.9 % and 24 %).
DEFAULT_ODDS_RATIOS = (8.0, 64.0)


class PaneResult(NamedTuple):
    """What one pane did to the charts."""

    crossed: bool
    """A chart's sum is above the threshold."""
    chart: int
    """The chart with the largest sum relative to the threshold."""
    design_rate: float
    """That chart's design rate."""
    cusum: float
    """That chart's sum."""


class PaneCUSUM:
    """``k`` one-sided binomial CUSUMs of one rate, each designed for its own rise, fed the
    counts of short panes (the requests between two early looks, a second apart).

    Why several: one CUSUM is quickest for the rise it is designed for (Moustakides 1986)
    and slow for others: designed for a doubling, it needs a dozen failures to see 9 of
    10 requests fail, since each failure adds only ``log 2``. Charts designed for larger
    rises add ``log(p1/p0)`` per failure (4 to 6 nats against a 0.5 % baseline) and lose
    more per success, so the one designed near the actual rise crosses first: a few
    requests into an outage, while the window's own CUSUM keeps the small sustained rises.
    This is the parallel-CUSUM scheme of Lorden & Pollak (2005) / Tartakovsky's
    "multichart" CUSUM. Each chart's run-length bound is ``exp(threshold)`` panes, so with
    ``k`` charts and ``L`` panes per window a threshold of ``h + log(k L)`` spends at most
    ``exp(-h)`` false alarms per window, the close's CUSUM allowance.

    ``update(events, total, baseline_rate, rho)`` adds one pane. ``rho`` is the baseline's
    intra-window correlation: the pane's evidence is scaled by
    :func:`~genmon.detectors.anomaly.rate_cusum.evidence_scale` for a beta-binomial pane of
    that correlation, as the window CUSUM's is, so overdispersed traffic keeps its bound.

    >>> charts = PaneCUSUM(threshold=15.0)
    >>> charts.update(0, 20, 0.005).crossed
    False
    >>> [charts.update(3, 4, 0.005).crossed for _ in range(2)]
    [False, True]

    Reference: G. Lorden & M. Pollak (2005), Nonanticipating estimation applied to
    sequential analysis and changepoint detection, Ann. Statist. 33; A. G. Tartakovsky,
    I. V. Nikiforov & M. Basseville (2014), Sequential Analysis, sec. 8.3.
    """

    def __init__(
        self,
        threshold: float,
        odds_ratios: Sequence[float] = DEFAULT_ODDS_RATIOS,
        min_increase: float = 0.0,
    ) -> None:
        check_param("threshold", threshold, low=0.0, low_open=True)
        if not odds_ratios or any(o <= 1.0 for o in odds_ratios):
            raise InvalidParameterError(f"odds_ratios={list(odds_ratios)!r}: each must be above 1")
        self.threshold = float(threshold)
        self.odds_ratios = tuple(float(o) for o in odds_ratios)
        self.min_increase = float(min_increase)
        self._sums = [0.0] * len(self.odds_ratios)

    @property
    def sums(self) -> list[float]:
        return list(self._sums)

    def reset(self) -> None:
        self._sums = [0.0] * len(self.odds_ratios)

    def hold(self) -> None:
        """Hold every sum at the threshold (after a crossing): the alarm then ends soon
        after the rise does, however long it lasted."""
        self._sums = [min(s, self.threshold) for s in self._sums]

    def set_sums(self, sums: Sequence[float]) -> None:
        """Restore the sums (from :attr:`sums`)."""
        if len(sums) != len(self.odds_ratios):
            raise InputError(f"{len(sums)} sums for {len(self.odds_ratios)} charts")
        self._sums = [float(s) for s in sums]

    def update(self, events: int, total: int, baseline_rate: float, rho: float = 0.0) -> PaneResult:
        """Add one pane of ``events`` of ``total`` against ``baseline_rate``."""
        if total < 0 or not 0 <= events <= total:
            raise InputError(f"a pane needs 0 <= events <= total, got {events} of {total}")
        p0 = _clamp(baseline_rate)
        best, best_rate = 0, p0
        for i, odds in enumerate(self.odds_ratios):
            p1 = design_rate(p0, odds, self.min_increase)
            if total:
                self._sums[i] = max(0.0, self._sums[i] + scaled_llr(events, total, p0, p1, rho))
            if self._sums[i] >= self._sums[best]:
                best, best_rate = i, p1
        top = self._sums[best]
        return PaneResult(top > self.threshold, best, best_rate, top)
