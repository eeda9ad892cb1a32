"""Early looks at open windows: a change paged seconds after it starts, not at the close.

Every ``detectors.early_interval_s`` the worker (and ``genmon replay``, on its event-time
clock) hands :meth:`EarlyLooks.peek` the record of each open tumbling window whose
traffic changed (the all-traffic series of each version, without examples). Two tests
look at it, within the signal's false-alarm allowance:

- **the window's own tests as it stands**: the CUSUM from the sums the closed windows
  left, plus the open window so far (its threshold bounds a crossing at any instant),
  and its single-window test, whose alpha is split: half for the close, half shared by
  the looks. This is what finds a moderate rise a little before the close.
- **pane charts** (:class:`~genmon.detectors.anomaly.pane_cusum.PaneCUSUM`): CUSUMs
  designed for large rises, fed the requests *between two looks*, so they restart at the
  change instead of carrying the window's healthy part: 9 failures of 10 page within a
  few requests. They take half of the CUSUM's allowance (the closes' CUSUM threshold is
  raised by ``log 2`` for it): ``k`` charts looking ``L`` times a window cross at most
  ``exp(-h)/2`` times a window at threshold ``h + log(2 k L)``.

A look keeps no detector or baseline state in the model's record: it records the firing
(the close then publishes it again under the same ``dedup_key``, or the clear that starts
the auto-resolve), at most once per series and window and never while the series' incident
is open. The pane charts' sums live in this process's memory (bounded, least recently
looked-at dropped): a restart only restarts them, the closes' CUSUMs are in the record.
The tail of a window after its last look is not fed to them (a second of traffic).
Segments are judged at the close.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from genmon.detectors import DetectorResult, Evidence, RateCUSUM
from genmon.detectors.anomaly.pane_cusum import DEFAULT_ODDS_RATIOS, PaneCUSUM, PaneResult
from genmon.detectors.anomaly.rate_cusum import intraclass
from genmon.detectors.calibration.baselines import Reference
from genmon.schemas.events import Finding
from genmon.streams.detection.findings import WindowContext
from genmon.streams.detection.model_state import copy_state, series_key
from genmon.streams.detection.observations import ModelBaselines, Observation, one_cause
from genmon.streams.detection.points import observation_point

if TYPE_CHECKING:
    from genmon.streams.detection.runner import DetectorRunner

#: The CUSUM allowance's split between the closes' CUSUM and the pane charts.
SPLIT = math.log(2.0)
#: Pane charts kept in memory (one per model, version and signal looked at).
MAX_PANES = 65_536


@dataclass
class _Pane:
    """One series' pane charts and the counts its open windows had at the last look."""

    charts: PaneCUSUM
    seen: dict[int, tuple[int, int]] = field(default_factory=dict)  # window end -> (x, n)


class EarlyLooks:
    """The runner's early looks (see the module docstring)."""

    def __init__(self, runner: DetectorRunner, looks: int) -> None:
        self.runner = runner
        #: Looks per window (``L``); 0: early detection off.
        self.looks = looks
        self._panes: OrderedDict[tuple[str, str], _Pane] = OrderedDict()

    def peek(
        self,
        state: dict[str, Any] | None,
        window: dict[str, Any],
        with_examples: Callable[[], dict[str, Any] | None] | None = None,
    ) -> tuple[dict[str, Any] | None, list[Finding]]:
        """Judge an open tumbling ``window`` as it stands: return the state and the
        findings of the series that fire now.

        ``window`` may come without examples (cheap to build every second); when a series
        fires, ``with_examples()`` gives the same window with them, for the finding's
        evidence, and the look is made again on it (the charts take only the requests
        they have not seen: none, unless more arrived)."""
        runner = self.runner
        kind, end = window["kind"], int(window["end_ms"])
        if state is None or kind != "tumbling" or end <= state["last_end"].get(kind, -(2**62)):
            return state, []
        state = copy_state(state)
        scratch = copy_state(state)  # the looks' detector sums are thrown away
        baselines = ModelBaselines(scratch["baselines"], runner.settings, runner._parsed)
        observations = runner._observe(window, baselines)
        model_id = window["model_id"]
        per_signal = Counter(obs.signal for obs in observations)
        firing: list[Observation] = []
        for obs in observations:
            reference = obs.baseline.reference()
            if reference is None:
                continue
            skey = series_key(obs.signal, RateCUSUM.name, obs.version, obs.segment)
            may_fire = _may_fire(state, skey, end)
            pane = self._pane(model_id, skey, obs, end, reference, per_signal[obs.signal])
            if pane is not None and not may_fire:
                self._panes[(model_id, skey)].charts.reset()  # its incident is open
                pane = None
            crossed = pane is not None and pane.crossed
            if crossed or obs.events > obs.total * reference.rate:
                runner._judge(scratch, obs, per_signal[obs.signal], end, self.looks, model_id)
            if crossed and obs.result is not None:
                assert pane is not None
                obs.result = _pane_detected(obs.result, pane)
            if may_fire and obs.result is not None and obs.result.detected:
                firing.append(obs)
        one_cause(observations)
        firing = [obs for obs in firing if obs.result is not None and obs.result.detected]
        if firing and with_examples is not None:
            full = with_examples()
            if full is not None:
                return self.peek(state, full)
        return state, self._publish(state, window, firing, end)

    def _publish(
        self, state: dict[str, Any], window: dict[str, Any], firing: list[Observation], end: int
    ) -> list[Finding]:
        runner, ctx, findings = self.runner, WindowContext(window), []
        quantile = runner.settings.detectors.latency_quantile
        for obs in firing:
            point = observation_point(ctx.model_id, obs, end, quantile)
            runner._point(None if point is None else replace(point, early=True))
            skey = series_key(obs.signal, RateCUSUM.name, obs.version, obs.segment)
            findings += runner._publish_observation(state, ctx, obs, early=True)
            entry = state["series"][skey]
            entry["early_end"] = end
            entry.setdefault("seen_ms", end)
        return findings

    def _pane(
        self,
        model_id: str,
        skey: str,
        obs: Observation,
        end: int,
        reference: Reference,
        series: int,
    ) -> PaneResult | None:
        """Feed the series' pane charts the requests since the last look at this window."""
        threshold = self.pane_threshold(obs.signal, series, model_id)
        if threshold is None:
            return None
        key = (model_id, skey)
        pane = self._panes.get(key)
        if pane is None:
            floor = self.runner._min_increase(obs.signal)
            pane = self._panes[key] = _Pane(PaneCUSUM(threshold, DEFAULT_ODDS_RATIOS, floor))
            if len(self._panes) > MAX_PANES:
                self._panes.popitem(last=False)
        self._panes.move_to_end(key)
        pane.charts.threshold = threshold
        x, n = pane.seen.get(end, (0, 0))
        # A latency count comes from the window's sketch: between two looks it may move
        # by more than the requests that arrived, and is kept to them.
        dn = max(obs.total - n, 0)
        dx = min(max(obs.events - x, 0), dn)
        pane.seen = {e: c for e, c in pane.seen.items() if e >= end - self._window_ms()}
        pane.seen[end] = (obs.events, obs.total)
        # The correlation of the baseline's windows, at the size of the latest ones (this
        # window or, early in it, the one before): a pane is part of such a window.
        total = max(n for _, n in pane.seen.values())
        phi = max(reference.dispersion_of(total), reference.long_run)
        return pane.charts.update(dx, dn, reference.rate, intraclass(phi, total))

    def shares_allowance(self, signal: str, model_id: str) -> bool:
        """Whether pane charts run for the signal and take half of its CUSUM allowance
        (not for a plan entry outside the budget, whose own threshold is for its windows)."""
        entry = self.runner.budget.entry(signal, model_id)
        return bool(self.looks) and (entry is None or entry.calibrated)

    def pane_threshold(self, signal: str, series: int, model_id: str) -> float | None:
        """The pane charts' threshold, ``h + log(2 k L)`` (None: no pane charts)."""
        if not self.shares_allowance(signal, model_id):
            return None
        threshold, _ = self.runner.budget.rate_test(signal, series, model_id)
        return threshold + SPLIT + math.log(len(DEFAULT_ODDS_RATIOS) * self.looks)

    def _window_ms(self) -> int:
        return round(self.runner.settings.windows.tumbling_s * 1000)


def _pane_detected(result: DetectorResult, pane: PaneResult) -> DetectorResult:
    """The window's result, detected by a pane chart (its design rate and sum said)."""
    values = (
        *result.evidence.values,
        ("pane_design_rate", pane.design_rate),
        ("pane_cusum", pane.cusum),
    )
    evidence: Evidence = replace(result.evidence, values=values)
    return replace(result, detected=True, evidence=evidence)


def _may_fire(state: dict[str, Any], skey: str, end: int) -> bool:
    """Whether a look may publish the series firing: not when it already fired early in
    this window, nor while an earlier firing is still published (its incident is open:
    the closes keep it) or its detector still fires."""
    entry = state["series"].get(skey)
    if entry is None:
        return True
    det = entry.get("det", {}).get("state", {})
    return (
        entry.get("early_end") != end
        and not entry.get("clears", 0)
        and not det.get("firing", False)
    )
