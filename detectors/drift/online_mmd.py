"""Online MMD drift on embeddings, calibrated to an expected run time between false alarms."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, register
from genmon.detectors.drift._common import (
    decode_array,
    encode_array,
    ert_thresholds,
    median_sigma,
    random_subsets,
    rbf,
)
from genmon.detectors.drift._online import OnlineKernelDrift, online_example

_BOOT_CHUNK = 128  # bootstraps per vectorised step: bounds the (b x 2W x 2W) gather


@register
class OnlineMMDDrift(OnlineKernelDrift):
    """Sliding-window kernel two-sample test against a fixed reference, one test per embedding.

    After each new embedding the squared MMD (unbiased, Gaussian kernel) between the
    last ``window_size`` embeddings and a sub-reference is compared with a threshold.
    Thresholds are calibrated once, at construction, so that on a stationary stream
    the expected number of tested updates between false alarms is ``ert``: the
    stationary statistic trajectory is simulated by ``n_bootstraps`` random splits of
    the reference into a sub-reference and ``2 * window_size - 1`` pseudo-test points,
    and the threshold for the ``k``-th overlapping window is the ``1 - 1/ert``
    quantile among the splits that have not yet crossed (Cobb et al., 2022; the same
    scheme as alibi-detect's ``MMDDriftOnline``). Kernel matrices are computed once
    and the window statistic is updated incrementally, O(window_size + reference) per
    embedding, vectorised over a batch.

    ``n_bootstraps`` defaults to ``max(1000, 2 * ert / (1 - 1/ert) ** window_size)``,
    the smallest number that leaves two expected exceedances per quantile; fewer is
    refused. Configuration costs O(reference^2 d + n_bootstraps * window_size^2).

    Warm-up: nothing is tested until the window holds ``window_size`` embeddings.
    After a detection the window empties and warm-up starts again, so a persistent
    shift fires about once per ``window_size`` updates rather than on every update.
    The reference is fixed; refresh it on a schedule with :meth:`set_reference`.

    >>> rng = np.random.default_rng(0)
    >>> d = OnlineMMDDrift(rng.normal(size=(300, 4)), window_size=20, ert=200, seed=1)
    >>> d.update(rng.normal(size=(100, 4))).detected
    False
    >>> d.update(rng.normal(1.0, 1.0, size=(100, 4))).detected
    True

    References
    ----------
    - Cobb, O., Van Looveren, A., Klaise, J. (2022). Sequential multivariate change
      detection with calibrated and memoryless false detection rates. AISTATS.
    - Gretton, A. et al. (2012). A kernel two-sample test. JMLR 13, 723-773.
    """

    name = "online_mmd"

    def __init__(
        self,
        reference: Any,
        window_size: int = 64,
        ert: float = 1000.0,
        n_bootstraps: int | None = None,
        sigma: float | None = None,
        seed: int = 0,
    ) -> None:
        self._init_online(reference, window_size, ert, n_bootstraps, sigma, seed)

    def _calibrate(self) -> None:
        # Centring (in float64, exact for a constant reference) keeps float32 distances precise.
        self._center = self.reference.astype(np.float64).mean(0).astype(np.float32)
        ref, w = self.reference - self._center, self.window_size
        n, ext = len(ref), 2 * w - 1
        m = n - ext
        rng = np.random.default_rng(self.seed)
        self._sigma = self.sigma or median_sigma(ref)
        k = rbf(ref, ref, self._sigma)
        np.fill_diagonal(k, 0.0)
        row = k.sum(1, dtype=np.float64)
        total = row.sum()
        mmd = np.empty((self.n_bootstraps, w))
        for lo in range(0, self.n_bootstraps, _BOOT_CHUNK):
            b = min(_BOOT_CHUNK, self.n_bootstraps - lo)
            y = random_subsets(rng, n, ext, b)
            g = k[y[:, :, None], y[:, None, :]]
            cum = np.zeros((b, ext, ext + 1))
            g.cumsum(2, dtype=np.float64, out=cum[:, :, 1:])
            g_rows = cum[:, :, -1]
            cross = row[y] - g_rows  # sum over the sub-reference of k(x, y_j)
            kxx = (total - 2.0 * cross.sum(1) - g_rows.sum(1)) / (m * (m - 1))
            # Slide the pseudo-test window: drop row s's band to its right, add row e's
            # band to its left; each band sum is a difference of the row cumsums.
            s = np.arange(w)
            e = s + w
            leave = cum[:, s[:-1], e[:-1]] - cum[:, s[:-1], s[:-1] + 1]
            enter = cum[:, e[:-1], e[:-1]] - cum[:, e[:-1], s[1:]]
            kyy = np.empty((b, w))
            kyy[:, 0] = g[:, :w, :w].sum((1, 2), dtype=np.float64)
            kyy[:, 1:] = kyy[:, :1] + 2.0 * np.cumsum(enter - leave, 1)
            cross_cum = np.concatenate([np.zeros((b, 1)), cross.cumsum(1)], 1)
            kxy = cross_cum[:, e] - cross_cum[:, s]
            mmd[lo : lo + b] = kxx[:, None] + kyy / (w * (w - 1)) - 2.0 * kxy / (m * w)
        self._thresholds = ert_thresholds(mmd, self.ert)
        live = rng.permutation(n)[:m]
        self._ref_sub = np.ascontiguousarray(ref[live])
        self._kxx = float(k[np.ix_(live, live)].sum(dtype=np.float64) / (m * (m - 1)))

    def _clear_window(self) -> None:
        self._window = np.empty((0, self.reference.shape[1]), dtype=np.float32)
        self._cross = np.empty(0)  # per window point: sum of k(x, y) over the sub-reference
        self._forward = np.empty(0)  # per window point: sum of k(y, y') over later window points
        self._pairs = 0.0  # sum of k over unordered pairs in the window
        self._cross_sum = 0.0
        self._tested = 0  # full windows tested since the last (re)start

    def _window_fill(self) -> int:
        return len(self._window)

    def _evidence_values(self) -> tuple[tuple[str, float], ...]:
        return (("reference_size", float(len(self._ref_sub))), ("sigma", self._sigma))

    def _reference_terms(self, chunk: np.ndarray) -> np.ndarray:
        centred = chunk - self._center
        return rbf(centred, self._ref_sub, self._sigma).sum(1, dtype=np.float64)

    def _consume(
        self, chunk: np.ndarray, reference_terms: np.ndarray
    ) -> tuple[int, float | None, float]:
        chunk = chunk - self._center
        w, n_old, b = self.window_size, len(self._window), len(chunk)
        seq = np.concatenate([self._window, chunk])
        t = np.arange(n_old, n_old + b)
        # Only pairs less than w apart enter a window: blocks of w rows against 2w columns.
        bands = np.zeros(b)
        forward = np.concatenate([self._forward, np.zeros(b)])
        for r0 in range(0, b, w):
            r1 = min(b, r0 + w)
            c0, c1 = max(0, n_old + r0 - w + 1), n_old + r1 - 1
            if c1 <= c0:
                continue
            block = rbf(chunk[r0:r1], seq[c0:c1], self._sigma)
            offset = t[r0:r1, None] - np.arange(c0, c1)[None, :]
            block *= (offset >= 1) & (offset <= w - 1)
            bands[r0:r1] = block.sum(1, dtype=np.float64)
            forward[c0:c1] += block.sum(0, dtype=np.float64)
        cross = np.concatenate([self._cross, reference_terms])
        leaving = t - w
        has_leaver = leaving >= 0
        drop_f = np.where(has_leaver, forward[np.maximum(leaving, 0)], 0.0)
        drop_c = np.where(has_leaver, cross[np.maximum(leaving, 0)], 0.0)
        pairs = self._pairs + np.cumsum(bands - drop_f)
        cross_sum = self._cross_sum + np.cumsum(cross[n_old:] - drop_c)
        full = t >= w - 1
        m = len(self._ref_sub)
        stat = self._kxx + 2.0 * pairs / (w * (w - 1)) - 2.0 * cross_sum / (m * w)
        hit, last_stat, thr = self._first_detection(stat, full)
        if hit >= 0:
            return hit, last_stat, thr
        keep = slice(max(0, len(seq) - w), len(seq))
        self._window = seq[keep]
        self._cross, self._forward = cross[keep], forward[keep]
        self._pairs, self._cross_sum = float(pairs[-1]), float(cross_sum[-1])
        self._tested = int(self._tested + full.sum())
        self._n_seen += b
        return -1, last_stat, thr

    def _window_state(self) -> dict[str, Any]:
        return {
            "window": encode_array(self._window),
            "cross": encode_array(self._cross),
            "forward": encode_array(self._forward),
            "pairs": self._pairs,
            "cross_sum": self._cross_sum,
        }

    def _set_window_state(self, state: dict[str, Any]) -> None:
        self._window = decode_array(state["window"])
        self._cross = decode_array(state["cross"])
        self._forward = decode_array(state["forward"])
        self._pairs, self._cross_sum = float(state["pairs"]), float(state["cross_sum"])

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        invalid = ({"window_size": 1}, {"ert": 1.0}, {"n_bootstraps": 50}, {"sigma": -1.0})
        return online_example(cls, constant, invalid, window_size=10, ert=100, sigma=1.0)
