"""Relevance proxy: cosine similarity of prompt and response embeddings, and its drift."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, check_param, register
from genmon.detectors.anomaly._common import changes_after
from genmon.detectors.exceptions import InputError
from genmon.detectors.quality._two_sample import ReferenceSampleDetector


def pair_similarity(prompts: Any, responses: Any) -> np.ndarray:
    """Row-wise cosine similarity of two (n x d) embedding matrices (0 for a zero vector).

    >>> pair_similarity([[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]).round(3).tolist()
    [1.0, 0.707]
    """
    p = np.atleast_2d(np.asarray(prompts, dtype=float))
    r = np.atleast_2d(np.asarray(responses, dtype=float))
    if p.shape != r.shape or p.ndim != 2 or p.shape[0] == 0:
        raise InputError(
            "prompt and response embeddings must be two non-empty n x d matrices of the same "
            f"shape; got {p.shape} and {r.shape}"
        )
    if not (np.isfinite(p).all() and np.isfinite(r).all()):
        raise InputError("embeddings contain NaN or infinite values; drop those rows first")
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
    dots = np.einsum("ij,ij->i", p, r)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


@register
class RelevanceDetector(ReferenceSampleDetector):
    """Alarms when answers drift away from their prompts in embedding space.

    A batch is a pair ``(prompt_embeddings, response_embeddings)`` of n x d matrices (rows
    aligned) or a 1-D array of ready-made similarities. The similarity distribution of each
    batch is KS-tested against the reference (one-sided, lower, by default) and must also
    lose at least ``min_drop`` in mean similarity. Similarity is a *proxy* for relevance:
    off-topic, templated or empty answers score low; a correct but terse answer can too, so
    the detector watches the distribution, not single answers.

    >>> rng = np.random.default_rng(0)
    >>> prompts = rng.normal(size=(300, 16))
    >>> answers = prompts + rng.normal(scale=0.8, size=(300, 16))
    >>> d = RelevanceDetector(reference_size=200, window_size=100, min_samples=50)
    >>> d.update((prompts[:200], answers[:200])).detected
    False
    >>> d.update((prompts[200:], answers[200:])).detected
    False
    >>> r = d.update((prompts[200:], rng.normal(size=(100, 16))))
    >>> r.detected, r.effect_size < -0.5
    (True, True)

    References: N. Reimers and I. Gurevych, "Sentence-BERT", EMNLP 2019 (cosine similarity of
    sentence embeddings); S. Es et al., "RAGAS: Automated Evaluation of Retrieval Augmented
    Generation", EACL 2024 (answer relevance as prompt-answer embedding similarity).
    """

    name = "relevance"

    def __init__(
        self,
        reference_size: int = 500,
        window_size: int = 200,
        min_samples: int = 30,
        alpha: float = 0.01,
        min_drop: float = 0.05,
        alternative: str = "less",
    ) -> None:
        check_param("min_drop", min_drop, low=0.0, high=2.0)
        self._init_common(reference_size, window_size, min_samples, alpha, alternative)
        self.min_drop = float(min_drop)
        self.reset()

    def _values(self, batch: Any) -> np.ndarray:
        if isinstance(batch, tuple) and len(batch) == 2:
            return pair_similarity(*batch)
        sims = np.atleast_1d(np.asarray(batch, dtype=float))
        if sims.ndim != 1 or sims.size == 0:
            raise InputError(
                "RelevanceDetector.update() takes (prompt_embeddings, response_embeddings) as a "
                f"tuple or a 1-D array of similarities; got shape {sims.shape}"
            )
        if not np.all(np.isfinite(sims)) or np.any(np.abs(sims) > 1.0 + 1e-6):
            raise InputError("similarities must be finite cosines in [-1, 1]")
        return sims

    def _effect(self, window: np.ndarray, reference: np.ndarray) -> tuple[float, bool]:
        change = float(window.mean() - reference.mean())
        moved = {"less": -change, "greater": change}.get(self.alternative, abs(change))
        return change, moved >= self.min_drop

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        level = 0.6 if constant is None else float(np.clip(constant, -1.0, 1.0))

        def stream(rng: np.random.Generator, n: int) -> np.ndarray:
            if constant is not None:
                return np.full(n, level)
            return np.clip(rng.normal(level, 0.1, n), -1.0, 1.0)

        def off_topic(rng: np.random.Generator, n: int) -> np.ndarray:
            return np.clip(rng.normal(0.1, 0.1, n), -1.0, 1.0)

        detector = cls(reference_size=60, window_size=40, min_samples=20)
        invalid = ({"min_drop": -0.1}, {"window_size": 1}, {"alternative": "down"})
        return ContractExample(detector, stream, changes_after(stream, off_topic, 60), 60, invalid)
