"""Embedding drift tested at every look (a sub-sample or a window) at a per-look false-alarm
probability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
from genmon.detectors.anomaly._common import changes_after
from genmon.detectors.drift._common import as_matrix, decode_array, encode_array
from genmon.detectors.drift._novelty import NoveltyRate, NoveltyResult
from genmon.detectors.exceptions import InputError, InvalidParameterError

_FLOAT16_MAX = 6.0e4  # rows are stored as float16 (max 65504) while the basis is collected
_MAX_SCALE = 1024  # the ring of the last max(scales) windows is part of the state
_FOUND = ("n", "scale_windows", "scale_rows", "residual", "t2", "t2_p", "q_z", "q_p", "tests")
_STATE = ["reference_rows", "reference_windows", "phi", "q_between", "components"]
_STATE += ["candidate_windows", "refreshes", "refused_refreshes"]


def _f32(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32 precision, held as float64 (what the state stores)."""
    return values.astype(np.float32).astype(np.float64)


@dataclass
class _Sums:
    """Sufficient statistics of projected windows: rows, windows, sum n_i^2, S1, S2, B, and
    the residual's sum q, sum q^2 and sum n_i qbar_i^2 (``q``)."""

    k: int
    rows: int = 0
    windows: int = 0
    n2: int = 0
    s1: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)
    b: np.ndarray = field(init=False)
    q: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.s1, self.q = np.zeros(self.k), np.zeros(3)
        self.s2, self.b = np.zeros((self.k, self.k)), np.zeros((self.k, self.k))

    def add(self, z: np.ndarray, total: np.ndarray, q: np.ndarray) -> None:
        """Add one window ``z`` (n x k) whose column sums are ``total``; ``q`` its residuals."""
        n, q_sum = len(z), float(q.sum())
        self.rows, self.windows, self.n2 = self.rows + n, self.windows + 1, self.n2 + n * n
        self.s1 += total
        self.s2 += z.T @ z
        self.b += total[:, None] * (total / n)  # n * mean mean^T
        self.q += (q_sum, float(q @ q), q_sum * q_sum / n)

    def to_state(self) -> dict[str, Any]:
        arrays = {key: encode_array(getattr(self, key)) for key in ("s1", "s2", "b", "q")}
        return {"rows": self.rows, "windows": self.windows, "n2": self.n2, **arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Sums:
        sums = cls(len(decode_array(state["s1"])), state["rows"], state["windows"], state["n2"])
        sums.s1, sums.s2, sums.b, sums.q = (decode_array(state[k]) for k in ("s1", "s2", "b", "q"))
        return sums


@register
class EmbeddingShiftDrift(Detector):
    """Hotelling T^2 and residual Q of recent windows' mean embedding against healthy windows.

    One ``update(batch)`` is one *look*: the sampled embeddings (n x d) of one stretch of
    time, a sub-sample of a few seconds in genmon's worker (``embedding.flush_interval_s``)
    or a closed window; "window" below means a look. The first windows fit a PCA basis
    (``basis_rows`` rows kept as float16, relative to the first window's mean, then
    dropped); the next ones build the reference from sufficient
    statistics of the ``k = components`` projected coordinates (row covariance ``C``, scatter
    of window means) and of each row's residual ``q = |(x - mu) - V V^T (x - mu)|^2`` (SPE,
    Jackson & Mudholkar): texts that move out of the top-``k`` subspace (a new language or
    domain) are invisible to T^2 but raise q.

    Every later window is tested at each scale ``m`` of ``scales``: the pooled mean of the
    last ``m`` windows (a ring of their sums), once they hold ``min_window_rows`` rows, by
    T^2 (``chi2(k)``) and by its mean q, upward, with Box's ``g chi2(h)`` matched to the null
    mean and variance (it keeps q's right skew). Long scales see small sustained shifts, and
    low-traffic streams, that single windows cannot. Each of the ``2 len(scales)`` tests has
    size ``alpha / (4 len(scales))``, and the novelty test below ``alpha / 2``: the expected
    number of alarm windows per window is at most the sum of the sizes whatever their
    correlation (linearity of expectation), so
    ``alpha`` stays the false-alarm probability *per window* although the scales overlap,
    and a budget stated in time divides into windows without alpha spending. A shift keeps
    firing while it lasts, and for up to ``max(scales)`` windows after (one incident).
    ``score`` is ``-log10`` of the Bonferroni-adjusted p-value, ``effect_size`` the larger
    standardized shift (Mahalanobis distance of the means, mean q's excess) in SDs of texts.

    Why a between-window term: real traffic clusters in time (topic and language mix), so
    window means scatter more than ``C / n``. A scalar dispersion ``phi`` (reported) assumes
    the excess is even over the ``k`` directions and proportional to ``1 / n``; mixtures
    concentrate it in a few directions and add it whatever ``n`` (on the clustered null of
    the tests it raised 3.4 to 8.9 times the configured alarms). So along each principal
    direction ``j`` of the whitened between-window scatter the null variance of ``m``
    windows' mean (``N_m`` rows, window effects independent) is ``1/N_m + 1/N + s_j
    (sum_m n_i^2 / N_m^2 + sum n_i^2 / N^2)``, ``s_j`` a random-effects variance at its 95 %
    upper bound (``W - 1`` degrees of freedom), never below the pooled one, so a short
    reference does not underestimate it. q gets the same term from its own scatter. Window
    effects that persist over several windows (a mix drifting for hours) would make the long
    scales alarm more than their share: on six-hour replays of real traces every scale's
    p-values stayed conservative (none below 0.01 at m = 4 or 16).

    Novelty (:mod:`~genmon.detectors.drift._novelty`): each text whose residual q is above
    the ``novelty_quantile`` of the latest healthy ones is flagged, and the share flagged
    is tested look after look by CUSUMs designed for large rises. A new topic in one app of
    four moves the mean a quarter of the way, which the window-to-window variance hides for
    many minutes; most of its texts are flagged one by one.

    Refresh: tested, undetected windows accumulate into a candidate; after
    ``refresh_windows`` of them (or earlier, by :meth:`refresh_now`, once it holds what a
    first reference needs) it replaces the reference (same basis) only if the mean of
    all windows tested meanwhile, scored as the longest scale would, stays within half the
    critical T^2 and q excess; otherwise it is discarded and counted (``refused_refreshes``),
    so a slow drift is not learned away. Zero-variance directions and residuals get floors,
    so a constant stream never fires. State is O(d k + k^2 + k max(scales)) after the basis
    (the basis and the ring held at float32 precision, so they store in half the bytes and a
    restored detector computes exactly what the live one does), ~2.7 bytes per row and
    dimension before.

    >>> rng = np.random.default_rng(0)
    >>> det = EmbeddingShiftDrift(alpha=1e-6, components=4, basis_rows=100)
    >>> [det.update(rng.normal(size=(50, 8))).detected for _ in range(25)].count(True)
    0
    >>> det.update(rng.normal(size=(50, 8)) + 0.8).detected
    True

    References
    ----------
    - Hotelling, H. (1931). The generalization of Student's ratio. Ann. Math. Stat. 2, 360-378.
    - Jackson, J. E. & Mudholkar, G. S. (1979). Control procedures for residuals associated
      with principal component analysis. Technometrics 21, 341-349.
    - Box, G. E. P. (1954). Some theorems on quadratic forms applied in the study of
      analysis of variance problems I. Ann. Math. Stat. 25, 290-302.
    - McCullagh, P. & Nelder, J. A. (1989). Generalized Linear Models, 2nd ed., ch. 4.5 and
      9 (quasi-likelihood; dispersion estimated by Pearson's X^2 over its degrees of freedom).
    - Searle, S. R., Casella, G., McCulloch, C. E. (1992). Variance Components (the
      method-of-moments between-group variance for unbalanced groups).
    """

    name = "embedding_shift"
    kind = DetectorKind.DRIFT
    #: 2: the basis and the ring are stored as float32. 3: the novelty test's residuals.
    state_version = 3

    def __init__(
        self,
        alpha: float = 1e-6,
        components: int = 16,
        basis_rows: int = 256,
        reference_windows: int = 20,
        min_reference_rows: int = 1000,
        min_window_rows: int = 20,
        refresh_windows: int = 1440,
        scales: Sequence[int] = (1, 4, 16),
        novelty_quantile: float = 0.99,
    ) -> None:
        self.alpha = float(alpha)
        check_param("alpha", self.alpha, low=0.0, high=0.5, low_open=True, high_open=True)
        self.components = int(components)
        check_param("components", self.components, low=1)
        self.basis_rows = int(basis_rows)
        check_param("basis_rows", self.basis_rows, low=2)
        self.reference_windows = int(reference_windows)
        check_param("reference_windows", self.reference_windows, low=2)
        self.min_reference_rows = int(min_reference_rows)
        check_param("min_reference_rows", self.min_reference_rows, low=2)
        self.min_window_rows = int(min_window_rows)
        check_param("min_window_rows", self.min_window_rows, low=1)
        self.refresh_windows = int(refresh_windows)
        check_param("refresh_windows", self.refresh_windows, low=2)
        self.scales = tuple(sorted({int(m) for m in scales}))
        if not self.scales:
            raise InvalidParameterError("scales must name at least one scale (in windows)")
        for m in self.scales:
            check_param("scales", m, low=1, high=_MAX_SCALE)
        self.novelty_quantile = float(novelty_quantile)
        check_param("novelty_quantile", self.novelty_quantile, low=0.5, high=1.0, high_open=True)
        self.reset()

    def reset(self) -> None:
        self._lags = np.array(self.scales) - 1  # ring rows, newest first, ending each scale
        self._n_seen = 0
        self._origin: np.ndarray | None = None  # first window's mean; basis rows are relative
        self._rows = np.empty((0, 0), dtype=np.float16)
        self._mu: np.ndarray | None = None
        self._basis: np.ndarray | None = None  # d x k principal directions
        self._ref: _Sums | None = None
        self._candidate: _Sums | None = None  # healthy tested windows since the last refresh
        # Per window: 1, rows n, n^2, projected sums (k), q sum. The ring holds the last
        # max(scales) tested windows; _tested sums every window tested since the last refresh.
        self._ring = np.zeros((0, 0))
        self._tested = np.zeros(0)
        self._ready = False  # the reference is complete and windows are tested
        self._refreshes = 0
        self._refused = 0
        self._novelty = NoveltyRate(self.novelty_quantile)
        # Derived from the reference by _fit() (recomputed, not stored, by _set_state).
        self._k = self.components
        self._m = np.zeros(0)
        self._project = np.zeros((0, 0))  # rotation x whitening: C^-1/2 along the scatter's axes
        self._between = np.zeros(0)  # between-window variance per axis, whitened units
        self._inv_n, self._ref_n2 = 1.0, 0.0  # 1 / N and sum n_i^2 / N^2 of the reference
        self._phi = 1.0
        self._q = np.array([1.0, 1.0, 0.0])  # residual's mean, variance, between-window share
        # T^2's whitened axes and q side by side: (k+1) x (k+1) map from projected means and
        # mean q, its centre, and the variances per row and per window (random effects).
        self._lift, self._centre = np.zeros((0, 0)), np.zeros(0)
        self._row_var, self._win_var, self._var0 = np.zeros(0), np.zeros(0), np.zeros(0)

    def update(self, batch: Any) -> DetectorResult:
        dim = None if self._origin is None else len(self._origin)
        x = as_matrix(batch, dim, "embedding window")
        self._n_seen += len(x)
        if self._mu is None:
            return self._collect_basis(x)
        assert self._basis is not None and self._ref is not None
        r = x - self._mu  # float64
        z = r @ self._basis
        e = r - z @ self._basis.T
        q, total = np.einsum("ij,ij->i", e, e), z.sum(0)
        if self._ready:
            return self._test(z, total, q)
        self._ref.add(z, total, q)
        self._novelty.learn(q)
        if self._ref.windows < self.reference_windows or self._ref.rows < self.min_reference_rows:
            return self._idle(f"reference: {self._ref.windows} windows, {self._ref.rows} rows")
        self._ready = True
        self._fit()
        self._novelty.fit()
        return self._idle("reference complete; testing from the next window")

    def _test(self, z: np.ndarray, total: np.ndarray, q: np.ndarray) -> DetectorResult:
        assert self._candidate is not None
        n = len(z)
        row = _f32(np.concatenate(([1.0, n, n * n], total, [q.sum()])))
        self._ring = np.concatenate((self._ring[1:], row[None]))
        pooled = self._pools()
        if not len(pooled):
            return self._idle(f"{n} rows; no scale holds min_window_rows: not tested")
        self._tested += row
        t, d, v, p = self._p_values(pooled)
        first = int(np.argmin(p))
        # Half the per-look alpha for the mean tests, half for the share of novel texts.
        detected = bool(p[first] < self.alpha / (4 * len(self.scales)))
        novel = self._novelty.test(q, self.alpha / 2)
        if not detected and not (novel and novel.detected):
            self._candidate.add(z, total, q)
            self._novelty.learn(q)
            if self._candidate.windows >= self.refresh_windows:
                self._refresh()
        return self._report(n, pooled, first, t, d, v, p, detected, novel)

    def _report(
        self,
        n: int,
        pooled: np.ndarray,
        first: int,
        t: Any,
        d: Any,
        v: Any,
        p: Any,
        hit: bool,
        novel: NoveltyResult | None,
    ) -> DetectorResult:
        """The result of the most significant test ``first`` (T^2's first, then q's) and
        of the novelty test (its share of novel texts in ``novelty_share``)."""
        stat, best = divmod(first, len(pooled))
        tests = 2 * len(self.scales)
        p_t, p_q = float(p[best]), float(p[len(pooled) + best])
        # Bonferroni over the mean tests at half the alpha, and the novelty charts' bound
        # (an alarm at sum S has p <= k exp(-S) per look, at the other half): detected
        # exactly when the p-value is below alpha.
        p_adj = min(1.0, min(p_t, p_q) * 2 * tests)
        if novel is not None:
            p_adj = min(p_adj, 2 * novel.p_value)
        windows, rows = int(pooled[best, 0]), int(pooled[best, 1])
        shift, excess = d[best, :-1], float(d[best, -1])
        found = (n, windows, rows, stat, t[best], p_t, excess / math.sqrt(v[best]), p_q, tests)
        values = tuple(zip(_FOUND, map(float, found), strict=True))
        what = "residual Q" if stat else "Hotelling T^2"
        note = f"{what} over the last {windows} windows ({rows} rows)"
        if novel is not None:
            values += (
                ("novelty_share", novel.share),
                ("novelty_null", novel.null),
                ("novelty_cusum", novel.cusum),
                ("novelty_detected", float(novel.detected)),
            )
            if novel.detected and not hit:
                note = f"novel texts: {novel.share:.0%} of {n} (null {novel.null:.0%})"
        return self._result(
            score=max(0.0, -math.log10(max(p_adj, 1e-300))),
            threshold=-math.log10(self.alpha),
            detected=hit or bool(novel and novel.detected),
            n_seen=self._n_seen,
            p_value=p_adj,
            effect_size=max(math.sqrt(shift @ shift), excess / math.sqrt(self._q[1])),
            evidence=self._evidence(values, note),
        )

    def _pools(self) -> np.ndarray:
        """Ring sums (windows, rows, sum n_i^2, sums, q sum) of the scales whose windows have
        all been seen (the ring starts as zero rows) and hold ``min_window_rows``."""
        pooled = np.cumsum(self._ring[::-1], 0)[self._lags]
        if self._ring[0, 0] and pooled[0, 1] >= self.min_window_rows:
            return pooled  # the usual case: every scale complete and large enough
        return pooled[(pooled[:, 0] > self._lags) & (pooled[:, 1] >= self.min_window_rows)]

    def _p_values(self, pooled: np.ndarray) -> tuple[Any, Any, Any, np.ndarray]:
        """T^2, the shifts ``d`` (whitened means, then mean q's excess), the null variance of
        mean q and the p-values (T^2's for each row of ``pooled``, then q's) of pooled sums
        (windows, rows, sum n_i^2, projected sums, q sum)."""
        inv = 1.0 / pooled[:, 1:2]
        d = (pooled[:, 3:] * inv) @ self._lift - self._centre
        var = inv * self._row_var + (pooled[:, 2:3] * inv * inv) * self._win_var + self._var0
        t, v, mean = (d[:, :-1] ** 2 / var[:, :-1]).sum(1), var[:, -1], self._q[0]
        h = 2.0 * mean * mean / v  # Box: mean q ~ g chi2(h) with g = v / (2 mean)
        p_q = special.chdtrc(h, (d[:, -1] + mean) * h / mean)
        return t, d, v, np.concatenate((special.chdtrc(self._k, t), p_q))

    def _collect_basis(self, x: np.ndarray) -> DetectorResult:
        if self._origin is None:
            self._origin = x.mean(0, dtype=np.float64)
        rel = x - self._origin
        if np.abs(rel).max() > _FLOAT16_MAX:
            raise InputError("embedding values vary by more than 6e4; normalise the embeddings")
        rows = rel.astype(np.float16)
        self._rows = np.concatenate([self._rows, rows]) if self._rows.size else rows
        if len(self._rows) < self.basis_rows:
            return self._idle(f"basis: {len(self._rows)} of {self.basis_rows} rows")
        kept = self._rows.astype(np.float64)
        centre = kept.mean(0)
        k = min(self.components, kept.shape[1], len(kept) - 1)
        self._basis = _f32(np.linalg.svd(kept - centre, full_matrices=False)[2][:k].T)
        self._mu = self._origin + centre
        self._rows = np.empty((0, 0), dtype=np.float16)
        self._ref, self._candidate, self._tested = _Sums(k), _Sums(k), np.zeros(k + 4)
        self._ring = np.zeros((self.scales[-1], k + 4))
        return self._idle("basis fitted; collecting the reference")

    def _fit(self) -> None:
        """Reference mean, whitening and between-window variances from the sufficient sums."""
        assert self._ref is not None and self._mu is not None
        r, k = self._ref, self._ref.k
        self._k, big_n, df = k, r.rows, r.windows - 1
        self._m = r.s1 / big_n
        self._inv_n, self._ref_n2 = 1.0 / big_n, r.n2 / big_n**2
        cov = (r.s2 - big_n * np.outer(self._m, self._m)) / (big_n - 1)
        lam, vec = np.linalg.eigh((cov + cov.T) / 2)
        scale = float(self._mu @ self._mu) / len(self._mu)
        floor = 1e-10 * max(lam[-1], 0.0) + 1e-15 * scale
        whiten = (vec / np.sqrt(np.maximum(lam, floor + 1e-300))).T
        between = whiten @ (r.b - big_n * np.outer(self._m, self._m)) @ whiten.T
        g, rot = np.linalg.eigh((between + between.T) / 2)
        self._project = rot.T @ whiten
        x2, effective = float(g.sum()), big_n - r.n2 / big_n  # effective > 0 for W >= 2
        pooled_ucb = x2 / stats.chi2.ppf(0.05, k * df)
        self._phi = max(1.0, pooled_ucb)
        pooled = max(0.0, k * df * pooled_ucb - k * df) / (k * effective)
        self._between = np.maximum(self._excess(g, df, effective), pooled)
        self._fit_q(float(np.trace(cov)), len(self._mu) * scale)
        self._lift = np.zeros((k + 1, k + 1))
        self._lift[:k, :k], self._lift[k, k] = self._project.T, 1.0
        self._centre = np.append(self._project @ self._m, self._q[0])
        self._row_var = np.append(np.ones(k), self._q[1])
        self._win_var = np.append(self._between, self._q[1] * self._q[2])
        self._var0 = self._inv_n * self._row_var + self._ref_n2 * self._win_var

    @staticmethod
    def _excess(g: np.ndarray, df: int, effective: float) -> np.ndarray:
        """Between-window variance (per unit of row variance) from the scatter ``g`` of window
        means: the 95 % upper bound of ``g`` less its expectation without window effects."""
        return np.maximum(0.0, df * g / stats.chi2.ppf(0.05, df) - df) / effective

    def _fit_q(self, spread: float, scale: float) -> None:
        """The residual's reference mean, row variance and between-window share, floored."""
        assert self._ref is not None
        r = self._ref
        q_sum, q_sq, q_between = r.q
        mean = q_sum / r.rows
        floor = 1e-10 * (spread + max(mean, 0.0)) + 1e-15 * scale + 1e-100
        var = max((q_sq - r.rows * mean * mean) / (r.rows - 1), floor * floor)
        g = np.array([(q_between - r.rows * mean * mean) / var])
        share = float(self._excess(g, r.windows - 1, r.rows - r.n2 / r.rows)[0])
        self._q = np.array([max(mean, floor), var, share])

    def refresh_now(self) -> bool | None:
        """Replace the reference by the candidate now (a refresh asked for by the clock,
        the scheduler's ``reference-refresh``) if the candidate holds as many windows and
        rows as a first reference needs, through the same gate as a refresh after
        ``refresh_windows``: ``True`` when replaced, ``False`` when refused (the candidate
        is dropped), ``None`` when not ready or the candidate is too small (nothing
        changes)."""
        cand = self._candidate
        if not self._ready or cand is None:
            return None
        if cand.windows < self.reference_windows or cand.rows < self.min_reference_rows:
            return None
        before = self._refreshes
        self._refresh()
        return self._refreshes > before

    def _refresh(self) -> None:
        assert self._ref is not None and self._candidate is not None
        cand, tested = self._candidate, self._tested
        # The gate judges every tested window, detected ones included: without them the mean
        # is biased toward the reference, and a drift that alarms on one window in ten would
        # pass the gate and be learned away. It scores their mean as the longest scale would
        # (max(scales) windows of their sizes), at half its critical shift.
        t, d, v, _ = self._p_values(tested[None] * (self.scales[-1] / tested[0]))
        each, mean = self.alpha / (2 * len(self.scales)), self._q[0]
        h = 2.0 * mean * mean / v[0]
        critical = mean / h * special.chdtri(h, each) - mean  # the alarm's excess of mean q
        if t[0] <= special.chdtri(self._k, each) / 2.0 and d[0, -1] <= critical / 2.0:
            self._ref = cand
            self._refreshes += 1
            self._fit()
            self._novelty.fit()
        else:
            self._refused += 1
        self._candidate, self._tested = _Sums(cand.k), np.zeros(cand.k + 4)

    def _idle(self, note: str) -> DetectorResult:
        return self._result(
            score=0.0,
            threshold=-math.log10(self.alpha),
            detected=False,
            n_seen=self._n_seen,
            evidence=self._evidence((), note),
        )

    def _evidence(self, values: tuple[tuple[str, float], ...], note: str) -> Evidence:
        if self._ready:
            assert self._ref is not None and self._candidate is not None
            ref, cand = self._ref, self._candidate
            found = [ref.rows, ref.windows, self._phi, self._q[2], self._k, cand.windows]
            found += [self._refreshes, self._refused]
            values += tuple(zip(_STATE, map(float, found), strict=True))
        return Evidence(test="hotelling_t2_and_residual_q", values=values, notes=(note,))

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> np.ndarray:
            if constant is not None:
                return np.full((n, 6), constant, dtype=np.float32)
            return rng.normal(size=(n, 6)).astype(np.float32)

        def jumped(rng: np.random.Generator, n: int) -> np.ndarray:
            return rng.normal(5.0, 1.0, size=(n, 6)).astype(np.float32)

        params: dict[str, Any] = {"basis_rows": 12, "reference_windows": 3, "min_window_rows": 5}
        det = cls(alpha=1e-3, components=3, min_reference_rows=12, refresh_windows=6, **params)
        bad: list[tuple[str, Any]] = [("alpha", 0.5), ("components", 0), ("basis_rows", 1)]
        bad += [("reference_windows", 1), ("min_reference_rows", 1), ("min_window_rows", 0)]
        bad += [("refresh_windows", 1), ("scales", []), ("scales", [0, 4]), ("scales", [2000])]
        invalid = tuple({name: value} for name, value in bad)
        # The reference is learned from the stream, so the shift comes after 24 rows.
        return ContractExample(det, stream, changes_after(stream, jumped, 24), 24, invalid)

    def _get_state(self) -> dict[str, Any]:
        def enc(a: np.ndarray | None) -> dict[str, Any] | None:
            return None if a is None else encode_array(a)

        return {
            "n_seen": self._n_seen,
            "origin": enc(self._origin),
            "rows": encode_array(self._rows),
            "mu": enc(self._mu),
            "basis": enc(None if self._basis is None else self._basis.astype(np.float32)),
            "reference": None if self._ref is None else self._ref.to_state(),
            "candidate": None if self._candidate is None else self._candidate.to_state(),
            "tested": encode_array(self._tested),
            "ring": encode_array(self._ring.astype(np.float32)),
            "ready": self._ready,
            "refreshes": self._refreshes,
            "refused": self._refused,
            "novelty": self._novelty.to_state(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        def dec(a: Any) -> np.ndarray | None:
            return None if a is None else decode_array(a)

        self._n_seen = int(state["n_seen"])
        self._origin, self._mu, basis = (dec(state[k]) for k in ("origin", "mu", "basis"))
        self._basis = None if basis is None else basis.astype(np.float64)
        self._rows = decode_array(state["rows"])
        self._ref = None if state["reference"] is None else _Sums.from_state(state["reference"])
        cand = state["candidate"]
        self._candidate = None if cand is None else _Sums.from_state(cand)
        self._tested = decode_array(state["tested"])
        self._ring = decode_array(state["ring"]).astype(np.float64)
        self._ready = bool(state["ready"])
        self._refreshes, self._refused = int(state["refreshes"]), int(state["refused"])
        self._novelty.set_state(state["novelty"])
        if self._ready:
            self._fit()
