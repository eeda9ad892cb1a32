"""A CUSUM of binomial log-likelihood ratios: is a rate above its baseline, window after window?"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from scipy import special, stats

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

#: Rates are kept this far from 0 and 1 so the log-likelihood ratio stays finite.
_EPS = 1e-9
#: Largest intra-window correlation used (1 would make a window one draw).
_MAX_RHO = 0.99


class RateWindow(NamedTuple):
    """One window of a rate: ``events`` of ``total`` (errors of requests, thumbs-down of
    scored feedback, requests above the baseline's latency quantile), and the baseline it is
    judged against: ``baseline_rate`` and the baseline's ``dispersion`` (variance relative
    to binomial sampling; 1 = windows differ by sampling noise only) of the sums the CUSUM
    adds up, and ``window_dispersion``, that of one window alone (default: the same)."""

    events: int
    total: int
    baseline_rate: float
    dispersion: float = 1.0
    window_dispersion: float | None = None


def design_rate(baseline: float, odds_ratio: float, min_increase: float) -> float:
    """The rate the test is designed to catch: the baseline's odds times ``odds_ratio``,
    and at least ``min_increase`` above the baseline.

    >>> round(design_rate(0.05, 2.0, 0.0), 4)
    0.0952
    >>> design_rate(0.001, 2.0, 0.01)
    0.011
    """
    baseline = _clamp(baseline)
    odds = baseline / (1.0 - baseline) * odds_ratio
    return min(max(odds / (1.0 + odds), baseline + min_increase), 1.0 - _EPS)


@register
class RateCUSUM(Detector):
    """One-sided CUSUM of the binomial log-likelihood ratio of a raised rate against a baseline.

    Each window adds ``llr = (x log(p1/p0) + (n - x) log((1-p1)/(1-p0))) / dispersion`` to
    ``S = max(0, S + llr)`` and alarms when ``S > threshold``; ``p0`` is the window's
    baseline rate and ``p1`` :func:`design_rate`, the smallest rise worth a page. This is
    Page's CUSUM for Bernoulli data (Reynolds & Stoumbos 1999), the quickest detector of
    a change from ``p0`` to ``p1`` for a given false-alarm rate (Moustakides 1986). Its
    in-control average run length is at least ``exp(threshold)`` windows (Wald's
    inequality on the likelihood-ratio martingale), so ``threshold = log(ARL)`` makes
    "at most one false alarm per ARL windows" true by construction, whatever the traffic
    in each window. When windows vary more than binomially (the baseline's
    ``dispersion``), the ratio is scaled down by :func:`evidence_scale` so that the bound
    still holds for beta-binomial windows of that variance.

    Evidence accumulates across windows: a burst where most requests fail crosses in one
    window, a small sustained rise after a few. The CUSUM is tuned for small rises, so it
    underweights a huge one in a small window (11 refusals of 32 against 2 %); with
    ``window_alpha`` a window whose own quasi-binomial p-value is below it alarms too (the
    combined Shewhart-CUSUM scheme of Lucas 1982). Both parts spend the false-alarm
    budget: expected alarms per window are at most ``exp(-threshold) + window_alpha``.

    After an alarm the detector is *firing*: the sum is held at the threshold and the
    alarm lasts until it has fallen to half the threshold (hysteresis), then the sum
    starts again from 0. A lasting problem is one
    alarm that ends when the rate is back, not a page per window nor an alarm that
    flickers with every window's noise; a fresh alarm needs a whole new climb, so the
    run-length bound holds between alarms.

    >>> d = RateCUSUM(threshold=math.log(1000))
    >>> d.update([RateWindow(5, 1000, 0.005)]).detected
    False
    >>> r = d.update([RateWindow(870, 1000, 0.005)])
    >>> r.detected, round(r.evidence.value("rate"), 2)
    (True, 0.87)

    References: E. S. Page (1954), Continuous inspection schemes, Biometrika 41;
    M. R. Reynolds & Z. G. Stoumbos (1999), A CUSUM chart for monitoring a proportion when
    inspecting continuously, J. Quality Technology 31; G. V. Moustakides (1986), Optimal
    stopping times for detecting changes in distributions, Ann. Statist. 14; J. M. Lucas
    (1982), Combined Shewhart-CUSUM quality control schemes, J. Quality Technology 14.
    """

    name = "rate_cusum"
    kind = DetectorKind.ANOMALY

    def __init__(
        self,
        threshold: float,
        odds_ratio: float = 2.0,
        min_increase: float = 0.0,
        window_alpha: float = 0.0,
    ) -> None:
        check_param("threshold", threshold, low=0.0, low_open=True)
        check_param("odds_ratio", odds_ratio, low=1.0, low_open=True)
        check_param("min_increase", min_increase, low=0.0, high=1.0, high_open=True)
        check_param("window_alpha", window_alpha, low=0.0, high=0.5, high_open=True)
        self.threshold = float(threshold)
        self.odds_ratio = float(odds_ratio)
        self.min_increase = float(min_increase)
        self.window_alpha = float(window_alpha)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._sum = 0.0
        self._firing = False

    def update(self, batch: Iterable[RateWindow] | Any) -> DetectorResult:
        windows = [RateWindow(*w) for w in batch]
        if not windows:
            raise InputError("RateCUSUM.update() needs at least one RateWindow")
        detected, alarms, peak, last = False, 0, 0.0, windows[-1]
        last_llr, last_p = 0.0, None
        for window in windows:
            _check(window)
            self._n_seen += window.total
            llr, p = self.llr(window), self._p_value(window)
            self._sum = max(0.0, self._sum + llr)
            peak = max(peak, self._sum)
            if not self._firing and self._improbable(p):
                self._sum = self.threshold + 1e-9  # alarms below, as a crossing would
            if self._firing:
                # Hysteresis: the sum is held at the threshold while the problem lasts and
                # must fall to half of it before the alarm ends (then it starts from 0).
                self._sum = min(self._sum, self.threshold)
                if self._sum > self.threshold / 2:
                    detected = True
                else:
                    self._sum, self._firing = 0.0, False
            elif self._sum > self.threshold:
                alarms += 1
                self._sum, self._firing, detected = self.threshold, True, True
            last_llr, last_p = llr, p
        return self._report(last, detected, alarms, peak, last_llr, last_p)

    def _improbable(self, p: float | None) -> bool:
        """A window's p-value below ``window_alpha``: too improbable under the baseline."""
        return p is not None and p < self.window_alpha

    @staticmethod
    def _p_value(window: RateWindow) -> float | None:
        """The window's p-value when it is above its baseline (None: at or below it, where
        no test looks, and the beta-binomial tail is not worth its cost)."""
        if window.events <= window.total * window.baseline_rate:
            return None
        phi = window.dispersion if window.window_dispersion is None else window.window_dispersion
        return window_p_value(window.events, window.total, window.baseline_rate, phi)

    def llr(self, window: RateWindow) -> float:
        """The window's binomial log-likelihood ratio of the design rate against the
        baseline, scaled by :func:`evidence_scale` for the window's dispersion."""
        p0 = _clamp(window.baseline_rate)
        p1 = design_rate(p0, self.odds_ratio, self.min_increase)
        x, n = window.events, window.total
        return scaled_llr(x, n, p0, p1, intraclass(window.dispersion, n))

    def _report(
        self,
        window: RateWindow,
        detected: bool,
        alarms: int,
        peak: float,
        llr: float,
        p_value: float | None,
    ) -> DetectorResult:
        x, n, p0, phi = window.events, window.total, window.baseline_rate, window.dispersion
        rate = x / n if n else 0.0
        p1 = design_rate(p0, self.odds_ratio, self.min_increase)
        # Whether this window alone would have alarmed (its own evidence passes the
        # threshold, or its p-value the per-window alpha): what a severity is confident of.
        alone = llr >= self.threshold or self._improbable(p_value)
        return self._result(
            score=peak,
            threshold=self.threshold,
            detected=detected,
            n_seen=self._n_seen,
            p_value=p_value,
            # Cohen's h: the arcsine distance of two proportions (0.2 small, 0.8 large).
            effect_size=2.0 * math.asin(math.sqrt(rate)) - 2.0 * math.asin(math.sqrt(p0)),
            evidence=Evidence(
                test="rate_cusum",
                values=(
                    ("rate", rate),
                    ("events", float(x)),
                    ("total", float(n)),
                    ("baseline_rate", p0),
                    ("design_rate", p1),
                    ("dispersion", max(phi, 1.0)),
                    ("window_llr", llr),
                    ("window_alone", float(alone)),
                    ("cusum", self._sum),
                    ("alarms", float(alarms)),
                ),
            ),
        )

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        level = 0.05 if constant is None else min(max(float(constant), 0.0), 1.0)

        def stream(rng: np.random.Generator, n: int) -> list[RateWindow]:
            if constant is not None:
                return [RateWindow(0, 100, max(level, 0.01)) for _ in range(n)]
            return [RateWindow(int(x), 200, 0.05) for x in rng.binomial(200, 0.05, n)]

        def shifted(rng: np.random.Generator, n: int) -> list[RateWindow]:
            return [RateWindow(int(x), 200, 0.05) for x in rng.binomial(200, 0.5, n)]

        invalid = (
            {"threshold": 0.0},
            {"odds_ratio": 1.0},
            {"min_increase": 1.0},
            {"window_alpha": 0.5},
        )
        return ContractExample(cls(threshold=math.log(1e4)), stream, shifted, 0, invalid)

    def _get_state(self) -> dict[str, Any]:
        return {"n_seen": self._n_seen, "sum": self._sum, "firing": self._firing}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._sum = float(state["sum"])
        self._firing = bool(state["firing"])


def scaled_llr(events: int, total: int, p0: float, p1: float, rho: float) -> float:
    """The binomial log-likelihood ratio of ``events`` of ``total`` (rate ``p1`` against
    ``p0``, both kept off 0 and 1), scaled by :func:`evidence_scale` for the correlation
    ``rho``. The scale's inputs are rounded up to two significant digits (a larger window
    or correlation only gives a smaller scale), so a stream's scales are computed once."""
    x, n = events, total
    ratio = x * math.log(p1 / p0) + (n - x) * math.log((1.0 - p1) / (1.0 - p0))
    if rho == 0.0:
        return ratio
    return ratio * evidence_scale(int(_up(n)), _sig(p0), _sig(p1), _up(rho))


def intraclass(dispersion: float, total: int) -> float:
    """The beta-binomial correlation ``rho`` that gives a window of ``total`` the variance
    ``dispersion`` times binomial: ``1 + (total - 1) rho = dispersion`` (0: binomial)."""
    if dispersion <= 1.0 or total <= 1:
        return 0.0
    return min((dispersion - 1.0) / (total - 1), _MAX_RHO)


@functools.lru_cache(maxsize=4096)
def evidence_scale(total: int, p0: float, p1: float, rho: float) -> float:
    """The largest ``c`` in (0, 1] with ``E[exp(c L)] <= 1`` for the binomial likelihood
    ratio ``L`` of a window of ``total`` drawn from a beta-binomial null (rate ``p0``,
    correlation ``rho``): what keeps Wald's bound, and so the run length, when windows
    vary more than binomially.

    ``c = 1`` for binomial windows (the exact likelihood ratio). The quasi-likelihood's
    ``c = 1 / dispersion`` is not enough at the budget's small error rates (a
    beta-binomial's heavy tail made it 1.8x too many alarms at dispersion 3), and a
    beta-binomial likelihood ratio turns wrong when ``rho`` is overestimated; ``c`` from
    the moment generating function is neither: a larger ``rho`` (the beta-binomials
    increase in convex order with it) only gives a smaller ``c``, fewer false alarms.
    """
    if rho <= 0.0 or total < 2:
        return 1.0
    up, down = math.log(p1 / p0), math.log((1.0 - p1) / (1.0 - p0))
    k = 1.0 / rho - 1.0
    x = np.arange(total + 1)
    log_pmf = stats.betabinom.logpmf(x, total, p0 * k, (1.0 - p0) * k)

    def log_mgf(c: float) -> float:
        terms = log_pmf + c * (up - down) * x
        top = float(terms.max())  # numpy, not scipy's logsumexp: 15x less overhead per call
        return top + math.log(float(np.exp(terms - top).sum())) + c * total * down

    if log_mgf(1.0) <= 0.0:
        return 1.0
    low, high = 0.0, 1.0  # log_mgf(low) <= 0 < log_mgf(high); convex, 0 at c = 0
    for _ in range(24):  # to 6e-8: far below what the rounding of the inputs moves
        mid = (low + high) / 2
        if log_mgf(mid) <= 0.0:
            low = mid
        else:
            high = mid
    return low


def _clamp(rate: float) -> float:
    """A rate kept :data:`_EPS` away from 0 and 1, where log-likelihoods stay finite."""
    return min(max(rate, _EPS), 1.0 - _EPS)


def _up(value: float) -> float:
    """``value`` rounded up to two significant digits."""
    if value <= 0:
        return value
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step - 1e-9) * step


def _sig(value: float) -> float:
    return float(f"{value:.3g}")


def window_p_value(events: int, total: int, baseline: float, dispersion: float = 1.0) -> float:
    """One window's upper-tail p-value of ``events`` of ``total`` under the baseline rate:
    a beta-binomial tail with the window's dispersion (binomial without one). At equal
    variance its tail is heavier than a binomial's with shrunk counts, which at the
    1e-6 levels of the budget is the difference between calibrated and 9x too many."""
    if total <= 0 or events <= 0:
        return 1.0
    p0 = _clamp(baseline)
    rho = intraclass(dispersion, total)
    if rho == 0.0:
        # P(X >= x) = P(X > x - 1): the C ufunc, ~50x faster than scipy.stats' frozen sf.
        return float(special.bdtrc(events - 1, total, p0))
    k = 1.0 / rho - 1.0
    return _beta_binomial_tail(events, total, p0 * k, (1.0 - p0) * k)


def _beta_binomial_tail(events: int, total: int, a: float, b: float) -> float:
    """``P(X >= events)`` for ``X ~ BetaBinomial(total, a, b)``, summed over the tail's
    terms in log space: 50x cheaper than scipy's frozen ``sf`` (the early looks ask for it
    every second), and exact where ``1 - cdf`` rounds a tail under 1e-16 to 0."""
    x = np.arange(events, total + 1, dtype=np.float64)
    log_pmf = (
        special.gammaln(total + 1.0)
        - special.gammaln(x + 1.0)
        - special.gammaln(total - x + 1.0)
        + special.betaln(x + a, total - x + b)
        - special.betaln(a, b)
    )
    return float(min(np.exp(log_pmf).sum(), 1.0))


def _check(window: RateWindow) -> None:
    if window.total < 0 or not 0 <= window.events <= window.total:
        raise InputError(
            f"a RateWindow needs 0 <= events <= total, got {window.events} of {window.total}"
        )
    if not 0.0 <= window.baseline_rate <= 1.0 or math.isnan(window.baseline_rate):
        raise InputError(f"baseline_rate {window.baseline_rate!r} must be in [0, 1]")
    for phi in (window.dispersion, window.window_dispersion):
        if phi is not None and (math.isnan(phi) or phi <= 0):
            raise InputError(f"dispersion {phi!r} must be positive")
