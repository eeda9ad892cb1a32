"""The mixture sequential probability ratio test (mSPRT) for "the challenger's rate is higher".

A rollout is looked at after every closed window, so a fixed-horizon test would be
peeked at dozens of times and its false-alarm rate would grow with every look. The mSPRT
gives *always-valid* p-values instead: ``P(p_t <= alpha for some t) <= alpha`` under the
null, however often and whenever one looks (Robbins 1970; Johari, Koomen, Pekelis & Walsh
2017/2022).

The statistic (normal approximation, two independent binomial arms)
--------------------------------------------------------------------
Challenger ``x_c`` events in ``n_c`` observations, champion ``x_b`` in ``n_b``;
``theta = p_c - p_b`` and its estimate ``d = x_c/n_c - x_b/n_b``. Under the null
``theta = 0`` the variance of ``d`` is, with the *pooled* rate ``p = (x_c+x_b)/(n_c+n_b)``,

    V = p (1 - p) (1/n_c + 1/n_b).

The pooled rate is the null's own estimate (the unpooled one is near zero for an arm with
no events yet, which would turn one early event into a spurious "significant" jump).

The standardised difference is not the Wald/score ``d / sqrt(V)`` but the *signed root of
the likelihood-ratio statistic* of the 2x2 table,

    z = sign(d) sqrt(G2),   G2 = 2 sum_cells O log(O / E)   (E from the pooled rate),

which is also ``N(0, 1)`` to first order (``z = d / sqrt(V) + O(n^-1/2)``) but follows the
normal's tails far more closely when events are few (Barndorff-Nielsen & Cox 1994, ch. 6):
with a 1 % rate and 20 challenger observations per look, the score ``z`` (even with
Yates' correction) crossed ``p <= 0.001`` three times as often as it should, the signed
root never more often than nominal (``tests/detectors/test_rollout_watch.py`` checks it).

In information time ``I = 1/V`` the score ``S = z sqrt(I)`` (``= d / V`` to first order)
is approximately Brownian motion with drift ``theta``, whose likelihood ratio against
``theta = 0`` is ``exp(theta S - theta^2 I / 2)``. Mixing it over a half-normal prior on
``theta >= 0`` (density ``2 N(0, tau^2)`` on the positive half line) gives, with
``rho = tau^2 / (V + tau^2)``,

    Lambda = 2 Phi(z sqrt(rho)) sqrt(1 - rho) exp(rho z^2 / 2).

For that Brownian motion ``Lambda`` is a nonnegative martingale with mean 1 at
``theta = 0``, and a supermartingale for every ``theta < 0`` (each component's
``exp(theta' S - theta'^2 I/2)`` with ``theta' >= 0`` is), so by Ville's inequality
``P(sup_t Lambda_t >= 1/alpha) <= alpha`` for the whole one-sided null "the challenger is
not worse". The always-valid p-value is the running minimum
``p_t = min(p_{t-1}, 1 / Lambda_t)``. Without the ``2 Phi`` factor and with a full normal
prior this is Johari et al.'s two-sided statistic
``sqrt(V/(V+tau^2)) exp(tau^2 d^2 / (2 V (V + tau^2)))``; the one-sided mixture puts no
mass on improvements, which no rollout acts on, and needs 5-10 % fewer observations.
Looking only after whole windows samples the path, which can only lower the chance of
crossing; the seeded nulls of the tests and of ``bench/rollout`` measure the rest of the
approximation.

References
----------
- Robbins, H. (1970). Statistical methods related to the law of the iterated logarithm.
  Annals of Mathematical Statistics 41(5), 1397-1409.
- Johari, R., Koomen, P., Pekelis, L. & Walsh, D. (2017). Peeking at A/B tests: why it
  matters, and what to do about it. KDD 2017, 1517-1525.
- Johari, R., Koomen, P., Pekelis, L. & Walsh, D. (2022). Always valid inference:
  continuous monitoring of A/B tests. Operations Research 70(3), 1806-1821.
- Barndorff-Nielsen, O. E. & Cox, D. R. (1994). Inference and Asymptotics. Chapman &
  Hall (the signed root of the likelihood ratio and its normal approximation).
- Ville, J. (1939). Etude critique de la notion de collectif. Gauthier-Villars.

>>> p = always_valid_p(160, 1000, 900, 9000, tau=0.05)
>>> p < 0.001
True
>>> always_valid_p(100, 1000, 900, 9000, tau=0.05) > 0.5
True
>>> round(mixture_boundary(1e-4, 0.05, 0.05), 2)  # a test looked at once needs 1.64
2.86
"""

from __future__ import annotations

import functools
import math

from scipy import optimize

from genmon.detectors._base import check_param
from genmon.detectors._stats import z_quantile

_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)


def _log_ndtr(x: float) -> float:
    """``log Phi(x)``, accurate in both tails (``erfc`` keeps the relative precision)."""
    if x > 0:
        return math.log1p(-0.5 * math.erfc(x / _SQRT2))
    tail = 0.5 * math.erfc(-x / _SQRT2)
    return math.log(tail) if tail > 0.0 else -math.inf


def _log_mixture_ratio(z: float, rho: float) -> float:
    """``log Lambda`` of the module docstring for a standardised difference ``z``."""
    return _LN2 + _log_ndtr(z * math.sqrt(rho)) + 0.5 * math.log1p(-rho) + 0.5 * rho * z * z


def _xlogx_over(o: float, e: float) -> float:
    return o * math.log(o / e) if o > 0.0 else 0.0


def _signed_root(x_c: float, n_c: float, x_b: float, n_b: float) -> tuple[float, float]:
    """``(z, V)`` of the module docstring; ``V = 0`` when the table says nothing."""
    if n_c <= 0 or n_b <= 0:
        return 0.0, 0.0
    pooled = (x_c + x_b) / (n_c + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_b)
    if variance <= 0.0:
        return 0.0, 0.0
    g2 = 2.0 * (
        _xlogx_over(x_c, n_c * pooled)
        + _xlogx_over(n_c - x_c, n_c * (1.0 - pooled))
        + _xlogx_over(x_b, n_b * pooled)
        + _xlogx_over(n_b - x_b, n_b * (1.0 - pooled))
    )
    d = x_c / n_c - x_b / n_b
    return math.copysign(math.sqrt(max(g2, 0.0)), d) if d else 0.0, variance


def always_valid_p(
    x_c: int, n_c: int, x_b: int, n_b: int, tau: float, previous_p: float = 1.0
) -> float:
    """The always-valid p-value of "challenger rate > champion rate" after this look.

    ``min(previous_p, 1 / Lambda)`` with ``Lambda`` the one-sided normal-mixture ratio of
    the module docstring (pooled-variance null, signed-root likelihood-ratio ``z``).
    ``previous_p`` is the value after the previous look of the same comparison (1.0 before
    the first): the running minimum is what stays valid under continuous monitoring. An
    empty arm, or a pooled rate of 0 or 1 (no events at all, or only events), is no
    evidence: the previous value is returned.
    """
    if tau <= 0.0:
        raise ValueError(f"tau={tau!r} must be positive; use default_tau(...)")
    z, variance = _signed_root(x_c, n_c, x_b, n_b)
    if variance <= 0.0:
        return min(previous_p, 1.0)
    rho = tau * tau / (variance + tau * tau)
    log_ratio = _log_mixture_ratio(z, rho)
    p = math.exp(-log_ratio) if log_ratio > 0.0 else 1.0
    return min(previous_p, p, 1.0)


def mixture_boundary(variance: float, tau: float, alpha: float) -> float:
    """The standardised difference ``z`` at which ``1/Lambda`` reaches ``alpha``.

    ``variance`` is the null variance ``V`` of the difference at the look. ``log Lambda``
    increases with ``z >= 0``, so the root is unique; it lies between the boundary of the
    two-sided mixture at ``2 alpha`` (``2 Phi <= 2``) and at ``alpha`` (``2 Phi >= 1``),
    both in closed form, ``z^2 = (2 log(1/a) + log(1/(1 - rho))) / rho``; Newton's method
    from the lower one converges in a few steps.
    """
    check_param("variance", variance, low=0.0, low_open=True)
    check_param("tau", tau, low=0.0, low_open=True)
    check_param("alpha", alpha, low=0.0, high=0.5, low_open=True, high_open=True)
    return _boundary(variance, tau, alpha)


def _boundary(variance: float, tau: float, alpha: float) -> float:
    rho = tau * tau / (variance + tau * tau)
    target = math.log(1.0 / alpha)
    extra = -math.log1p(-rho)
    low = math.sqrt(max(0.0, 2.0 * math.log(1.0 / (2.0 * alpha)) + extra) / rho)
    high = math.sqrt((2.0 * target + extra) / rho)
    z, root_rho = low, math.sqrt(rho)
    for _ in range(50):
        g = _log_mixture_ratio(z, rho) - target
        x = z * root_rho
        # d/dz log Phi(x) = sqrt(rho) phi(x) / Phi(x), computed in logs for large x.
        hazard = math.exp(-0.5 * x * x - 0.5 * math.log(2 * math.pi) - _log_ndtr(x))
        step = g / (root_rho * hazard + rho * z)
        z = min(max(z - step, low), high)
        if abs(step) < 1e-10:
            break
    return z


def default_tau(baseline_rate: float, min_regression: float) -> float:
    """The mixture's spread ``tau`` on the scale of the difference of rates.

    ``tau = min_regression``, the smallest regression of interest ``delta``. Written in
    ``r = V / tau^2``, the squared two-sided boundary is
    ``(1 + r)(2 log(1/alpha) + log(1 + 1/r))``, flat near its minimum at ``r ~ 1/z^2``. A
    regression of ``delta`` is caught with the planned power once
    ``V ~ delta^2 / (z_boundary + z_power)^2``, which ``tau = delta`` puts in that flat
    part whatever the baseline rate (``V`` and the planned sample scale together): the
    planned sample is within 4 % of its minimum over ``tau`` for alpha from 0.001 to 0.05
    and baselines from 1 % to 10 % (measured with :func:`challenger_samples_needed`).
    ``baseline_rate`` only caps ``tau`` at the largest increase still possible,
    ``1 - baseline_rate``. Johari et al. (2022) fit ``tau`` to past experiments instead; a
    rollout's smallest regression of interest is the prior its policy states.

    The watch fixes every signal's ``tau`` before it sees data (``baseline_rate = 0``):
    a mixture chosen from the data it then tests would no longer be a martingale.

    >>> default_tau(0.10, 0.05)
    0.05
    """
    check_param("baseline_rate", baseline_rate, low=0.0, high=1.0, high_open=True)
    check_param("min_regression", min_regression, low=0.0, high=1.0, low_open=True, high_open=True)
    return min(min_regression, 1.0 - baseline_rate)


def challenger_samples_needed(
    baseline_rate: float,
    min_regression: float,
    share: float,
    alpha: float,
    power: float,
    tau: float,
) -> int:
    """Challenger observations after which the mSPRT rejects with probability >= ``power``
    when the challenger's rate is ``baseline_rate + min_regression``.

    The champion gets ``k = (1 - share) / share`` times as many. With ``n`` challenger
    observations, ``p1 = p0 + delta`` and the pooled rate ``pbar = (k p0 + p1) / (k + 1)``,
    the boundary is ``b = mixture_boundary(pbar (1 - pbar)(1 + 1/k) / n, tau, alpha)``; the
    statistic crosses it when the observed difference exceeds ``d*``, the difference at
    which the signed root of the table (champion at its expected ``k n p0`` events) equals
    ``b``. The observed difference is about ``N(delta, v1 / n)`` with
    ``v1 = p1 (1 - p1) + p0 (1 - p0) / k``, so the power at ``n`` is
    ``Phi((delta - d*(n)) / sqrt(v1 / n))``; ``n`` is the smallest count where it reaches
    ``power`` (Brent's method on ``n``, from the Wald approximation ``d* = b sqrt(v0/n)``).
    Counting only the crossing at the last look ignores earlier crossings: the power is at
    least ``power`` (the seeded replays of ``bench/rollout`` measure it).
    """
    check_param("baseline_rate", baseline_rate, low=0.0, high=1.0, high_open=True)
    check_param("min_regression", min_regression, low=0.0, high=1.0, low_open=True, high_open=True)
    check_param("share", share, low=0.0, high=1.0, low_open=True, high_open=True)
    check_param("alpha", alpha, low=0.0, high=0.5, low_open=True, high_open=True)
    check_param("power", power, low=0.5, high=1.0, low_open=True, high_open=True)
    check_param("tau", tau, low=0.0, low_open=True)
    return _samples_needed(baseline_rate, min_regression, share, alpha, power, tau)


@functools.lru_cache(maxsize=4096)
def _samples_needed(
    p0: float, delta: float, share: float, alpha: float, power: float, tau: float
) -> int:
    p1 = min(p0 + delta, 1.0 - 1e-9)
    delta = p1 - p0
    k = (1.0 - share) / share
    pbar = (k * p0 + p1) / (k + 1.0)
    v0 = max(pbar * (1.0 - pbar) * (1.0 + 1.0 / k), 1e-12)
    v1 = p1 * (1.0 - p1) + p0 * (1.0 - p0) / k
    z_power = z_quantile(2.0 * power - 1.0)

    def gap(n: float) -> float:
        b = _boundary(v0 / n, tau, alpha)
        return delta - _crossing_difference(p0, n, k, b) - z_power * math.sqrt(v1 / n)

    low = 1.0
    high = max(
        2.0, ((_boundary(v0, tau, alpha) * math.sqrt(v0) + z_power * math.sqrt(v1)) / delta) ** 2
    )
    while gap(high) < 0.0:
        low, high = high, high * 2.0
        if high > 1e15:
            return math.ceil(high)
    if gap(low) >= 0.0:
        return 1
    return max(1, math.ceil(optimize.brentq(gap, low, high, xtol=0.5)))


def _crossing_difference(p0: float, n: float, k: float, boundary: float) -> float:
    """The challenger-minus-champion difference at which the signed root reaches
    ``boundary``, with ``n`` challenger observations and the champion at ``k n p0``."""
    champion_n = k * n

    def excess(d: float) -> float:
        return _signed_root(n * (p0 + d), n, champion_n * p0, champion_n)[0] - boundary

    top = 1.0 - p0 - 1e-12
    if excess(top) < 0.0:
        return top
    return float(optimize.brentq(excess, 0.0, top, xtol=1e-9))
