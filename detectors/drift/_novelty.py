"""The share of texts unlike the reference: a sequential test on each text's residual.

A mean test (Hotelling T^2, mean Q) sees a topic that takes over a stream, but a topic
that takes over one app of four moves the mean by a quarter of its distance, and the
window-to-window variance real traffic needs makes that slow to prove. Each such text,
though, is far from the reference on its own: its residual out of the reference's
principal subspace (Q, Jackson & Mudholkar) is above the reference's 99th percentile for
most texts of a new domain (63 % of the travel prompts of the detection benchmark, 1 %
of held-out healthy ones). So every text is flagged against that cut, and the share of
flagged texts is tested by :class:`~genmon.detectors.anomaly.pane_cusum.PaneCUSUM`
charts, one look at a time, against twice the nominal share (the cut is estimated).

Texts come in bursts (one customer's batch of unusual prompts), so the flags of one look
are not independent: the charts' evidence is scaled for the intra-look correlation that
the healthy looks show (a beta-binomial ``rho`` at its 95 % upper bound, as the rate
baselines do), so a stream whose odd texts arrive together is judged by its own standard.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from genmon.detectors.anomaly.pane_cusum import PaneCUSUM
from genmon.detectors.calibration.baselines import CountSums
from genmon.detectors.drift._common import decode_array, encode_array

#: Healthy residuals kept to place the cut (the latest ones).
RING_ROWS = 2000
#: Fewest healthy residuals before the share is tested.
MIN_ROWS = 200
#: Design rises of the charts (odds ratios against the null share): 2 % -> 14 % and 57 %.
ODDS_RATIOS = (8.0, 64.0)


class NoveltyResult(NamedTuple):
    detected: bool
    share: float  # flagged texts of this look
    null: float  # the share tested against
    cusum: float
    p_value: float  # the charts' bound at this sum: k exp(-cusum) alarms a look


class NoveltyRate:
    """Flag texts whose residual is above the ``quantile`` of healthy ones; test the share."""

    def __init__(self, quantile: float) -> None:
        self.quantile = quantile
        self._ring = np.zeros(0, dtype=np.float32)
        self._sizes = np.zeros(0, dtype=np.int64)  # the looks the ring holds, in order
        self._cut: float | None = None
        self._rho = 0.0
        self._charts = PaneCUSUM(1.0, ODDS_RATIOS)

    @property
    def null(self) -> float:
        """The share tested against: twice the nominal one, for the cut's estimation."""
        return min(2.0 * (1.0 - self.quantile), 0.5)

    def learn(self, q: np.ndarray) -> None:
        """Keep a healthy look's residuals (whole looks, about :data:`RING_ROWS` rows)."""
        if not len(q):
            return
        self._ring = np.concatenate((self._ring, q.astype(np.float32)))
        self._sizes = np.append(self._sizes, len(q))
        # The oldest looks go while the ring would still hold RING_ROWS without them.
        kept = np.cumsum(self._sizes[::-1])[::-1]  # rows from each look to the newest
        drop = int((kept > RING_ROWS).sum()) - 1
        if drop > 0:
            self._ring = self._ring[int(self._sizes[:drop].sum()) :]
            self._sizes = self._sizes[drop:]

    def fit(self) -> None:
        """Place the cut at the quantile of the healthy residuals kept, and bound the
        correlation of the flags within their looks."""
        if len(self._ring) < MIN_ROWS:
            return
        self._cut = float(np.quantile(self._ring.astype(np.float64), self.quantile))
        starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1]))
        flags = np.add.reduceat((self._ring > self._cut).astype(np.float64), starts)
        looks = CountSums()  # the rate baselines' sums: one look, one "window"
        for events, total in zip(flags, self._sizes, strict=True):
            looks.add(int(events), int(total))
        self._rho = min(looks.intraclass(), 0.99)

    def test(self, q: np.ndarray, alpha: float) -> NoveltyResult | None:
        """One look: ``alpha`` is its share of the per-look false-alarm probability (the
        charts' run-length bound gives at most ``k exp(-h)`` alarms a look)."""
        if self._cut is None or not len(q):
            return None
        charts = self._charts
        charts.threshold = math.log(len(ODDS_RATIOS) / alpha)
        flagged = int((q > self._cut).sum())
        result = charts.update(flagged, len(q), self.null, self._rho)
        crossed = result.cusum > charts.threshold
        if crossed:
            charts.hold()
        p_value = min(1.0, len(ODDS_RATIOS) * math.exp(-result.cusum))
        return NoveltyResult(crossed, flagged / len(q), self.null, result.cusum, p_value)

    def to_state(self) -> dict[str, Any]:
        ring, sizes = encode_array(self._ring), encode_array(self._sizes)
        sums, fitted = self._charts.sums, [self._cut, self._rho]  # fitted: not from the ring
        return {"ring": ring, "sizes": sizes, "sums": sums, "fitted": fitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._ring = decode_array(state["ring"]).astype(np.float32)
        self._sizes = decode_array(state["sizes"]).astype(np.int64)
        self._charts.set_sums(state["sums"])
        self._cut, self._rho = state["fitted"][0], float(state["fitted"][1])
