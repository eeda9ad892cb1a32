"""The rollout watch: a challenger judged against the champion on the same closed windows.

:class:`RolloutWatch` reads the worker's closed tumbling windows (the records of
``<prefix>.windows``) into a :class:`~genmon.detectors.rollout.tally.WindowTally` and,
after every window:

1. gives each comparison (signal x segment) with ``min_samples`` observations per
   version its always-valid p-value (:func:`~genmon.detectors.rollout.msprt.always_valid_p`,
   the running minimum of the one-sided mSPRT);
2. adjusts the family with Benjamini-Hochberg as the bias tests do, and flags a
   comparison whose q-value is at most ``alpha`` with the challenger worse;
3. plans the watch: the challenger observations each *required* comparison needs for
   ``power`` at ``min_regression`` (``msprt.challenger_samples_needed`` at ``alpha / m``,
   Bonferroni, conservative for BH), divided by the rate at which the challenger has
   gathered them per second of event time.

Why BH stays valid under continuous looking: each running-minimum p-value only falls, so
if BH rejects at some look it also rejects on the final minima ``p*``, which are valid
p-values (``P(p* <= a) <= a``, Ville's inequality). When the challenger equals the
champion every hypothesis is null, and BH on ``p*`` is Simes' test, whose chance of *any*
rejection is at most ``alpha`` for independent or positively dependent p-values
(Benjamini & Yekutieli 2001; a segment's counts are part of ``"*"``'s, a positive
dependence). ``bench/rollout`` measures it over seeded replays.

A required segment is one whose share of traffic may be ``min_segment_share`` or more:
the upper end of its 99 % Wilson interval reaches it. It stays required once it is, so a
segment right at the bound does not drop out of the plan (and shorten it) by chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from genmon.detectors._base import check_param
from genmon.detectors._stats import benjamini_hochberg, wilson_interval
from genmon.detectors.bias._compare import check_versions
from genmon.detectors.exceptions import InvalidParameterError, StateError
from genmon.detectors.rollout.msprt import always_valid_p, challenger_samples_needed, default_tau
from genmon.detectors.rollout.result import (
    ALL,
    DEFAULT_MIN_REGRESSION,
    WATCH_SIGNALS,
    Comparison,
    Decision,
    WatchResult,
    make_title,
)
from genmon.detectors.rollout.tally import SEGMENT_SIGNALS, Key, WindowTally, series_counts

_STATE_VERSION = 1
#: The planning baseline's floor: a rate near 0 would plan a watch too short to see one.
_BASELINE_FLOOR = 0.01


class RolloutWatch:
    """Is the challenger worse than the champion on any signal, overall or on a segment?

    Hyperparameters are public attributes; ``update(record)`` takes one closed-window
    record (a dict decoded from ``<prefix>.windows``) and returns a :class:`WatchResult`.
    ``min_regression`` maps each *watched* signal (some of :data:`WATCH_SIGNALS`) to the
    smallest absolute rate increase the plan must catch with ``power``; a model that gets
    no feedback, or whose windows carry no latency sketches, leaves ``negative_feedback``
    or ``slow_rate`` out, or its watch can never be planned (and ends inconclusive).

    ``share`` is the challenger's share of traffic (the plan gives the champion
    ``(1 - share) / share`` observations per challenger one); ``alpha`` the false-rollback
    level of the whole family; ``power`` the chance to catch a regression of
    ``min_regression`` within the planned watch; ``min_segment_share`` which segments the
    plan waits for; ``min_samples`` per version before a comparison is tested (the normal
    approximation's floor; it never decides on a handful of requests);
    ``latency_quantile`` and ``calibration_windows`` set the slow threshold;
    ``max_segments`` bounds the state (segments beyond it are noted, not counted).

    Decisions: ``regressed`` as soon as a comparison is flagged; ``clean`` once the
    elapsed event time reaches the planned watch with nothing flagged; ``inconclusive``
    at ``max_watch_s`` without a plan reached (also when the challenger never served:
    then the windows' own span counts). A decided watch returns the same result.

    >>> watch = RolloutWatch("v1", "v2")
    >>> empty = {"kind": "tumbling", "start_ms": 0, "end_ms": 10_000, "series": []}
    >>> watch.update(empty).decision
    'watching'
    """

    def __init__(
        self,
        champion: str,
        challenger: str,
        share: float = 0.10,
        alpha: float = 0.05,
        power: float = 0.80,
        min_regression: Mapping[str, float] | None = None,
        min_segment_share: float = 0.25,
        max_watch_s: float = 86_400.0,
        min_samples: int = 30,
        latency_quantile: float = 0.95,
        calibration_windows: int = 3,
        max_segments: int = 32,
    ) -> None:
        check_versions(champion, challenger)
        self.champion, self.challenger = champion, challenger
        self.share, self.alpha, self.power = float(share), float(alpha), float(power)
        chosen = DEFAULT_MIN_REGRESSION if min_regression is None else min_regression
        self.min_regression = {str(k): float(v) for k, v in chosen.items()}
        self.min_segment_share = float(min_segment_share)
        self.max_watch_s = float(max_watch_s)
        self.min_samples = int(min_samples)
        self.latency_quantile = float(latency_quantile)
        self.calibration_windows = int(calibration_windows)
        self.max_segments = int(max_segments)
        self._validate()
        # Fixed before any data: a mixture chosen from the data it tests is no martingale.
        self._tau = {s: default_tau(0.0, d) for s, d in self.min_regression.items()}
        self._tally = WindowTally(
            champion,
            challenger,
            [s for s in WATCH_SIGNALS if s in self.min_regression],
            self.latency_quantile,
            self.calibration_windows,
            self.max_segments,
        )
        self._p: dict[Key, float] = {}
        self._required: set[str] = set()
        self._final: WatchResult | None = None
        self._last: WatchResult | None = None

    def _validate(self) -> None:
        def fraction(name: str, value: float, high_open: bool = True) -> None:
            check_param(name, value, low=0.0, high=1.0, low_open=True, high_open=high_open)

        fraction("share", self.share)
        check_param("alpha", self.alpha, low=0.0, high=0.5, low_open=True, high_open=True)
        check_param("power", self.power, low=0.5, high=1.0, low_open=True, high_open=True)
        fraction("min_segment_share", self.min_segment_share, high_open=False)
        fraction("latency_quantile", self.latency_quantile)
        check_param("max_watch_s", self.max_watch_s, low=0.0, low_open=True)
        check_param("min_samples", self.min_samples, low=1)
        check_param("calibration_windows", self.calibration_windows, low=1)
        check_param("max_segments", self.max_segments, low=0)
        unknown = sorted(set(self.min_regression) - set(WATCH_SIGNALS))
        if unknown or not self.min_regression:
            raise InvalidParameterError(
                f"min_regression must map some of {WATCH_SIGNALS} to an absolute rate "
                f"increase, e.g. {{'error_rate': 0.02}}; got {sorted(self.min_regression)}"
            )
        for signal, delta in self.min_regression.items():
            fraction(f"min_regression[{signal}]", delta)

    def update(self, record: Mapping[str, Any]) -> WatchResult:
        """Apply one closed-window record and judge; a decided watch stays decided."""
        if self._final is not None:
            return self._final
        if not self._tally.apply(record) and self._last is not None:
            return self._last
        result = self._judge()
        self._last = result
        if result.decision != "watching":
            self._final = result
        return result

    def _judge(self) -> WatchResult:
        counts = self._tally.counts
        keys = sorted(counts, key=_order)
        tested = [k for k in keys if min(counts[k][1], counts[k][3]) >= self.min_samples]
        for key in tested:
            xb, nb, xc, nc = counts[key]
            self._p[key] = always_valid_p(xc, nc, xb, nb, self._tau[key[0]], self._p.get(key, 1.0))
        q_values = benjamini_hochberg([self._p[k] for k in tested]).tolist()
        q_of = dict(zip(tested, q_values, strict=True))
        required = self._required_keys()
        needed, planned, missing = self._plan(required)
        comparisons = tuple(
            self._comparison(k, q_of.get(k), needed.get(k), k in required) for k in keys
        )
        tally = self._tally
        start, end = tally.start_ms, tally.end_ms
        elapsed = (end - start) / 1000.0 if start is not None and end is not None else 0.0
        notes = [f"no estimate yet for {_label(m)}" for m in missing]
        decision: Decision = "watching"
        if any(c.flagged for c in comparisons):
            decision = "regressed"
        elif planned is not None and planned <= self.max_watch_s and elapsed >= planned:
            decision = "clean"
        elif self._timed_out(elapsed):
            decision = "inconclusive"
            if planned is not None and planned > self.max_watch_s:
                notes.append(f"the planned watch ({planned / 3600:.1f} h) exceeds max_watch_s")
        if tally.dropped:
            notes.append(f"{len(tally.dropped)} segment(s) beyond max_segments not watched")
        worst = _worst(comparisons)
        shown = None if planned is None else min(planned, self.max_watch_s)
        title = make_title(self.challenger, self.champion, decision, elapsed, shown, worst, notes)
        return WatchResult(
            decision=decision,
            elapsed_s=elapsed,
            planned_watch_s=shown,
            comparisons=comparisons,
            worst=worst,
            title=title,
            watch_from_ms=start,
            notes=tuple(notes),
        )

    def forecast(self, records: Iterable[Mapping[str, Any]]) -> float | None:
        """The planned watch at current traffic, before the challenger serves.

        ``records``: recent closed tumbling windows of the champion alone (say the last
        15 minutes). The challenger will get ``share`` of each flow of observations, at
        the champion's rates (``slow_rate``'s is ``1 - latency_quantile`` by
        construction); segments count when their share reaches ``min_segment_share``.
        None without traffic on every watched signal (e.g. no feedback yet). It leaves out
        the feedback's delay, which the watch's own plan includes once both versions
        serve (it re-plans from the rollout's windows after each one).
        """
        sums: dict[Key, list[int]] = {}
        starts, ends = [], []
        for record in records:
            if record.get("kind") != "tumbling":
                continue
            starts.append(int(record["start_ms"]))
            ends.append(int(record["end_ms"]))
            for series in record.get("series") or ():
                if series.get("model_version") == self.champion:
                    segment = str(series.get("segment", ALL))
                    for signal, (x, n) in series_counts(series).items():
                        row = sums.setdefault((signal, segment), [0, 0])
                        row[0], row[1] = row[0] + x, row[1] + n
        span = (max(ends) - min(starts)) / 1000.0 if starts else 0.0
        total = sums.get(("error_rate", ALL), [0, 0])[1]
        if span <= 0.0 or total <= 0:
            return None
        if "slow_rate" in self.min_regression:
            sums[("slow_rate", ALL)] = [round(total * (1 - self.latency_quantile)), total]
        big = {
            seg
            for s, seg in sums
            if s == "error_rate" and seg != ALL and self._large(sums[(s, seg)][1], total)
        }
        watched = [s for s in SEGMENT_SIGNALS if s in self.min_regression]
        required = {(s, ALL) for s in self.min_regression}
        required |= {(s, seg) for seg in big for s in watched}
        times = []
        for key in required:
            x, n = sums.get(key, [0, 0])
            if n <= 0:
                return None
            baseline = _planning_baseline(x / n)
            needed = challenger_samples_needed(
                baseline,
                min(self.min_regression[key[0]], 1.0 - baseline - 1e-6),
                self.share,
                self.alpha / len(required),
                self.power,
                self._tau[key[0]],
            )
            times.append(needed / (self.share * n / span))
        return max(times)

    def _timed_out(self, elapsed: float) -> bool:
        tally = self._tally
        if tally.start_ms is not None:
            return elapsed >= self.max_watch_s
        span = (tally.end_ms or 0) - (tally.first_ms or 0)
        return span / 1000.0 >= self.max_watch_s

    def _required_keys(self) -> set[Key]:
        requests = self._tally.requests
        total = requests.get(ALL, 0)
        for segment, n in requests.items():
            if segment == ALL or segment in self._required or total <= 0:
                continue
            if self._large(n, total):
                self._required.add(segment)
        watched = [s for s in SEGMENT_SIGNALS if s in self.min_regression]
        keys = {(s, ALL) for s in self.min_regression}
        return keys | {(s, seg) for seg in self._required for s in watched}

    def _large(self, requests: int, total: int) -> bool:
        """May this segment's share of traffic be ``min_segment_share`` or more?"""
        upper = wilson_interval(min(requests, total), total, 0.99).high
        return bool(upper >= self.min_segment_share)

    def _plan(self, required: set[Key]) -> tuple[dict[Key, int], float | None, list[Key]]:
        """Needed challenger observations per required comparison, the planned watch in
        seconds (None while a required comparison has no rate estimate), and those without.

        A comparison's time is when the challenger's observations for it began to arrive
        (feedback late, slow counts after the calibration) plus ``needed / rate``, the
        rate being those observations per second since; the baseline is the champion's
        rate, floored at 0.01 (:func:`_planning_baseline`).
        """
        tally = self._tally
        needed: dict[Key, int] = {}
        times: list[float] = []
        missing: list[Key] = []
        alpha = self.alpha / max(1, len(required))
        for key in sorted(required, key=_order):
            since = tally.observed_from.get(key)
            xb, nb, _, nc = tally.counts.get(key, (0, 0, 0, 0))
            span = ((tally.end_ms or 0) - since) / 1000.0 if since is not None else 0.0
            if nb <= 0 or nc <= 0 or span <= 0.0 or since is None:
                missing.append(key)
                continue
            baseline = _planning_baseline(xb / nb)
            delta = min(self.min_regression[key[0]], 1.0 - baseline - 1e-6)
            needed[key] = challenger_samples_needed(
                baseline, delta, self.share, alpha, self.power, self._tau[key[0]]
            )
            offset = (since - (tally.start_ms or since)) / 1000.0
            times.append(offset + needed[key] * span / nc)
        planned = max(times) if times and not missing else None
        return needed, planned, missing

    def _comparison(
        self, key: Key, q: float | None, needed: int | None, required: bool
    ) -> Comparison:
        xb, nb, xc, nc = self._tally.counts[key]
        difference = xc / nc - xb / nb if nb and nc else None
        worse = difference is not None and difference > 0
        return Comparison(
            signal=key[0],
            segment=key[1],
            champion_events=xb,
            champion_n=nb,
            challenger_events=xc,
            challenger_n=nc,
            difference=difference,
            p_value=self._p.get(key) if q is not None else None,
            q_value=q,
            flagged=bool(q is not None and q <= self.alpha and worse),
            needed_n=needed,
            required=required,
        )

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state: hyperparameters, counts, running p-values and the decision."""
        return {
            "version": _STATE_VERSION,
            "params": {
                "champion": self.champion,
                "challenger": self.challenger,
                "share": self.share,
                "alpha": self.alpha,
                "power": self.power,
                "min_regression": dict(self.min_regression),
                "min_segment_share": self.min_segment_share,
                "max_watch_s": self.max_watch_s,
                "min_samples": self.min_samples,
                "latency_quantile": self.latency_quantile,
                "calibration_windows": self.calibration_windows,
                "max_segments": self.max_segments,
            },
            "tally": self._tally.to_state(),
            "p": [[s, seg, p] for (s, seg), p in self._p.items()],
            "required": sorted(self._required),
            "final": self._final.to_json() if self._final is not None else None,
            "last": self._last.to_json() if self._last is not None else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RolloutWatch:
        """The watch :meth:`to_state` saved, ready for the next window."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise StateError(
                f"not a RolloutWatch state of version {_STATE_VERSION}; start a new "
                "RolloutWatch(champion, challenger, ...) for this rollout"
            )
        watch = cls(**state["params"])
        watch._tally.load_state(state["tally"])
        watch._p = {(s, seg): float(p) for s, seg, p in state["p"]}
        watch._required = set(state["required"])
        final, last = state.get("final"), state.get("last")
        watch._final = WatchResult.from_json(final) if final else None
        watch._last = WatchResult.from_json(last) if last else None
        return watch


def _planning_baseline(rate: float) -> float:
    """The champion's rate floored at 0.01 and rounded *up* to three significant digits.

    Up: below 0.5 a higher rate has the larger variance, so the plan can only grow (by
    1 % at most); rounded: the planning (a few root searches, cached per input) runs once
    per grid value instead of after every window.

    >>> _planning_baseline(0.1037), _planning_baseline(0.002)
    (0.104, 0.01)
    """
    rate = max(rate, _BASELINE_FLOOR)
    step = 10.0 ** (math.floor(math.log10(rate)) - 2)
    return min(round(math.ceil(rate / step - 1e-9) * step, 12), 0.99)


def _order(key: Key) -> tuple[int, bool, str]:
    return (WATCH_SIGNALS.index(key[0]), key[1] != ALL, key[1])


def _label(key: Key) -> str:
    where = "overall" if key[1] == ALL else f"on {key[1]}"
    return f"{key[0].replace('_', ' ')} {where}"


def _worst(comparisons: tuple[Comparison, ...]) -> Comparison | None:
    """The flagged comparison with the smallest q, else the tested one closest to it."""
    tested = [c for c in comparisons if c.q_value is not None]
    pool = [c for c in tested if c.flagged] or tested
    if not pool:
        return None
    return min(
        pool,
        key=lambda c: (c.q_value or 0.0, -(c.difference or 0.0), _order((c.signal, c.segment))),
    )
