"""Error analysis as evidence: what the affected requests of a firing finding look like.

When a quality or feedback detector fires on a closed window, the runner hands the
window's examples of that signal (:mod:`genmon.streams.windows.exemplars`) to
:meth:`ErrorAnalyzer.explain`. It turns each example (prompt, response and note) into a
vector, groups them with :class:`~genmon.detectors.ExampleClusterer` (k-means, k chosen by
silhouette; one cluster when the best silhouette is under :data:`MIN_SILHOUETTE`) and
attaches the
:data:`MAX_CLUSTERS` largest clusters to the result with
:func:`~genmon.detectors.attach_clusters`. The finding's evidence then has:

- ``clusters``: largest first, each with ``size`` (examples in it), up to three
  ``representatives`` (``prompt → response [note]``, cut to :data:`DISPLAY_CHARS`),
  ``centroid_distance``, ``request_ids`` (the request of each representative) and
  ``subject_ids`` (its pseudonymous subject id as the example stores it, or ``None``), so
  an erasure by subject id finds the incident snapshots that show the subject's texts;
- ``error_analysis``: ``signal`` (which examples), ``examples`` (how many were
  clustered), ``vectors`` (``all-MiniLM-L6-v2 (<backend>)`` or ``tfidf``) and, when TF-IDF
  stood in for the encoder, ``fallback`` (why).

Vectors come from the bundled sentence encoder, loaded once per process and shared with
the embedding stage (:func:`~genmon.streams.embedding.encoder.shared_encoder`). With
``embedding.enabled=false``, or when the encoder cannot load, scikit-learn's TF-IDF of
the same texts is clustered instead, so the evidence is there either way. The texts are
the examples' own: redacted when they were taken (``detectors.redact_exemplars``).
Clustering at most ``detectors.exemplars_per_window`` examples takes a few milliseconds;
the worker runs the detectors off the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from genmon.detectors import DetectorResult, ExampleClusterer, attach_clusters
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.streams.embedding.encoder import TextEncoder

log = logging.getLogger(__name__)

#: Which examples explain which signal (the runner's signal names).
EXAMPLES_OF_SIGNAL = {
    "error_rate": "error",
    "refusal_rate": "refusal",
    "empty_rate": "empty",
    "truncated_rate": "truncated",
    "negative_feedback": "negative_feedback",
}
#: Clusters attached to one finding (the largest).
MAX_CLUSTERS = 5
#: Representatives per cluster.
REPRESENTATIVES = 3
#: Longest representative text; prompt and response get about half each.
DISPLAY_CHARS = 200
ENCODER_NAME = "all-MiniLM-L6-v2"
#: Least silhouette for more than one cluster. Kaufman & Rousseeuw's 0.25 is for
#: low-dimensional data; short texts vary mostly by topic, which keeps silhouettes of
#: text vectors low: two scripted kinds of refusal (different prompts each) score 0.18
#: (MiniLM) and 0.20 (TF-IDF) at k=2, eleven refusals of one kind at most 0.06.
MIN_SILHOUETTE = 0.1


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def display_text(example: Mapping[str, Any]) -> str:
    """``prompt → response [note]``, each part cut so the whole fits DISPLAY_CHARS."""
    note = f"[{_cut(example['note'], 40)}]" if example["note"] else ""
    room = DISPLAY_CHARS - len(note) - 4
    prompt, response = example["prompt"].strip(), example["response"].strip()
    if prompt and response:
        half = room // 2
        text = f"{_cut(prompt, half)} → {_cut(response, room - half)}"
    else:
        text = _cut(prompt or response, room)
    return f"{text} {note}".strip() or "(empty)"


def embedding_text(example: Mapping[str, Any]) -> str:
    return "\n".join(part for part in (example["prompt"], example["response"], example["note"]))


def tfidf_vectors(texts: Sequence[str]) -> np.ndarray:
    """TF-IDF rows (words, sublinear tf); all zeros when no text has a word."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        matrix = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    except ValueError:  # empty vocabulary: every text is blank or punctuation
        return np.zeros((len(texts), 1))
    return np.asarray(matrix.toarray())


class ErrorAnalyzer:
    """Clusters a firing finding's examples and attaches the clusters to its result.

    ``encoder_factory`` builds the sentence encoder on first use (default: the process's
    shared one for ``settings.embedding``); it is not called when the embedding stage is
    disabled. A factory that fails is not retried in this process.
    """

    def __init__(
        self,
        settings: Settings,
        encoder_factory: Callable[[], TextEncoder] | None = None,
    ) -> None:
        self.use_encoder = settings.embedding.enabled
        self._factory = encoder_factory or (lambda: _shared(settings))
        self._encoder: TextEncoder | None = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()
        self.clusterer = ExampleClusterer(
            min_silhouette=MIN_SILHOUETTE,
            n_representatives=REPRESENTATIVES,
            max_chars=DISPLAY_CHARS,
            seed=0,
        )

    def explain(
        self, result: DetectorResult, signal: str, examples: Sequence[Mapping[str, Any]]
    ) -> tuple[DetectorResult, dict[str, Any]]:
        """``result`` with the largest clusters of ``examples``, and the extra evidence.

        ``examples`` are :class:`~genmon.streams.windows.exemplars.ExampleRecord` (windows closed
        before subject ids have none). The extra evidence is ``{"error_analysis": {...},
        "request_ids": [[...], ...], "subject_ids": [[...], ...]}``, ``request_ids[i]``
        and ``subject_ids[i]`` holding the request and subject of each representative of
        cluster ``i``.
        """
        texts = [embedding_text(e) for e in examples]
        shown = [display_text(e) for e in examples]
        vectors, how = self._vectors(texts)
        clusters = self.clusterer.cluster(vectors, shown)[:MAX_CLUSTERS]
        # A representative is a text: the first example that shows it stands for it.
        first_example: dict[str, Mapping[str, Any]] = {}
        for text, example in zip(shown, examples, strict=True):
            first_example.setdefault(text, example)
        analysis = {"signal": signal, "examples": len(examples), **how}
        shown_by = [[first_example[text] for text in c.representatives] for c in clusters]
        return attach_clusters(result, clusters), {
            "error_analysis": analysis,
            "request_ids": [[e["request_id"] for e in cluster] for cluster in shown_by],
            "subject_ids": [[e.get("subject_id") for e in cluster] for cluster in shown_by],
        }

    def _vectors(self, texts: list[str]) -> tuple[np.ndarray, dict[str, str]]:
        if not self.use_encoder:
            return tfidf_vectors(texts), {"vectors": "tfidf", "fallback": "embedding disabled"}
        encoder = self._load()
        if encoder is None:
            reason = f"encoder unavailable: {self._unavailable}"
            return tfidf_vectors(texts), {"vectors": "tfidf", "fallback": reason}
        try:
            vectors = encoder.encode(texts)
        except Exception as exc:
            log.warning("error analysis: encoding failed (%s); clustering TF-IDF instead", exc)
            reason = f"encoding failed: {type(exc).__name__}: {exc}"
            return tfidf_vectors(texts), {"vectors": "tfidf", "fallback": reason}
        return vectors, {"vectors": f"{ENCODER_NAME} ({encoder.backend})"}

    def _load(self) -> TextEncoder | None:
        with self._lock:
            if self._encoder is None and self._unavailable is None:
                try:
                    self._encoder = self._factory()
                except Exception as exc:
                    self._unavailable = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "error analysis: the sentence encoder cannot load (%s); clustering "
                        "TF-IDF vectors instead for the rest of this process",
                        self._unavailable,
                    )
            return self._encoder


def _shared(settings: Settings) -> TextEncoder:
    from genmon.streams.embedding.encoder import shared_encoder

    return shared_encoder(settings.embedding)
