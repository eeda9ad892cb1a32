"""Windowed MMD two-sample test on embeddings, with a permutation p-value."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, check_param, register
from genmon.detectors.drift._common import check_sigma, median_sigma, rbf
from genmon.detectors.drift._windowed import EmbeddingDrift, embedding_example


@register
class MMDDrift(EmbeddingDrift):
    """Kernel two-sample test between the last ``window_size`` embeddings and a reference.

    The statistic is the unbiased squared MMD with a Gaussian kernel (bandwidth by the
    median heuristic on the reference unless ``sigma`` is given); its p-value comes from
    ``n_permutations`` random relabellings of the pooled sample, all evaluated with one
    matrix product. ``score`` is ``-log10(p)`` against ``-log10(alpha)``;
    ``effect_size`` is the squared MMD. Cost per test is O((N + W)^2 d) for N reference
    and W window rows, so this suits periodic reports; use
    :class:`~genmon.detectors.drift.online_mmd.OnlineMMDDrift` per event.

    >>> rng = np.random.default_rng(0)
    >>> d = MMDDrift(rng.normal(size=(200, 8)), window_size=100, min_samples=50)
    >>> d.update(rng.normal(size=(100, 8))).detected
    False
    >>> d.update(rng.normal(0.5, 1.0, size=(100, 8))).detected
    True

    References
    ----------
    - Gretton, A. et al. (2012). A kernel two-sample test. JMLR 13, 723-773.
    """

    name = "mmd_drift"

    def __init__(
        self,
        reference: Any,
        window_size: int = 500,
        min_samples: int = 50,
        alpha: float = 0.01,
        n_permutations: int = 500,
        sigma: float | None = None,
        seed: int = 0,
    ) -> None:
        self._set_alpha(alpha)
        self.n_permutations = int(n_permutations)
        check_param("n_permutations", self.n_permutations, low=int(np.ceil(1 / self.alpha)))
        self.sigma = check_sigma(sigma)
        self.seed = int(seed)
        self._init_window(reference, window_size, min_samples)

    def _prepare(self) -> None:
        self._sigma = self.sigma or median_sigma(self.reference)
        self._k_ref = rbf(self.reference, self.reference, self._sigma)

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        n, m = len(self.reference), len(window)
        k_wr = rbf(window, self.reference, self._sigma)
        k = np.block([[self._k_ref, k_wr.T], [k_wr, rbf(window, window, self._sigma)]])
        np.fill_diagonal(k, 0.0)
        rng = np.random.default_rng([self.seed, self._n_seen])
        labels = np.zeros((self.n_permutations + 1, n + m), dtype=np.float32)
        labels[0, :n] = 1.0  # row 0 is the observed split
        keys = rng.random((self.n_permutations, n + m))
        labels[1:][np.arange(self.n_permutations)[:, None], np.argsort(keys, 1)[:, :n]] = 1.0
        row = k.sum(1, dtype=np.float64)
        total = row.sum()
        within_ref = np.einsum("pi,ip->p", labels, k @ labels.T, dtype=np.float64)
        ref_all = labels.astype(np.float64) @ row
        within_win = total - 2.0 * ref_all + within_ref
        between = ref_all - within_ref
        mmd2 = within_ref / (n * (n - 1)) + within_win / (m * (m - 1)) - 2.0 * between / (n * m)
        p_value = (1.0 + np.count_nonzero(mmd2[1:] >= mmd2[0])) / (1.0 + self.n_permutations)
        return self._p_value_result(p_value, float(mmd2[0]), "mmd_permutation")

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return embedding_example(
            cls, constant, window_size=40, min_samples=30, alpha=0.01, n_permutations=200
        )
