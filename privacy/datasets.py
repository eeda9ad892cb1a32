"""Datasets and other job folders in the artifact store, as retention and erasure see them.

A retrain job writes under ``jobs/<job>/epoch-<n>/`` (:class:`genmon.retrain.job.JobRun`):
``dataset/`` (``train.jsonl``, ``eval.jsonl``, ``manifest.json``), ``checkpoints/`` and
``adapter/``. The job row records one dataset (``dataset_uri``), but an attempt that lost
its lease after writing its dataset and before recording it leaves one more: so the
folders are found by listing that layout, not only by reading the rows.

A dataset rewritten for an erasure keeps its layout and stays readable by
:func:`genmon.retrain.dataset.read_dataset`: the manifest gets the new ``content_hash``
and sizes, and ``erased: {count, by_split, at}``. The manifest is written last, as
:func:`~genmon.retrain.dataset.write_dataset` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from genmon.privacy.matching import SubjectMatcher
from genmon.retrain.artifacts import ArtifactStore

#: The example files of a dataset, in the order their hash covers them.
SPLITS = ("train.jsonl", "eval.jsonl")
MANIFEST = "manifest.json"
#: Folders an attempt of a job leaves, under ``jobs/<job>/epoch-<n>/``.
JOB_FOLDERS = ("dataset", "checkpoints", "adapter")


@dataclass(frozen=True)
class JobFolder:
    """One folder an attempt of a job left in the store."""

    job_id: str
    kind: str
    """``dataset``, ``checkpoints`` or ``adapter``."""
    uri: str


def same_uri(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def job_folders(store: ArtifactStore, kinds: Iterable[str] = JOB_FOLDERS) -> list[JobFolder]:
    """Every ``jobs/<job>/epoch-<n>/<kind>`` folder in ``store``, sorted."""
    found: list[JobFolder] = []
    root = store.root.rstrip("/")
    for kind in kinds:
        for path in sorted(store.fs.glob(f"{root}/jobs/*/epoch-*/{kind}")):
            rel = str(path)[len(root) :].strip("/")
            parts = rel.split("/")
            if len(parts) == 4 and store.fs.isdir(path):
                found.append(JobFolder(job_id=parts[1], kind=kind, uri=store.uri(rel)))
    return found


def _fs(store: ArtifactStore, uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **store.storage_options)
    return fs, str(path)


def remove(store: ArtifactStore, uri: str) -> bool:
    """Delete the folder (or file) at ``uri``; False when there was nothing."""
    fs, path = _fs(store, uri)
    path = path.rstrip("/")
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def _read(store: ArtifactStore, uri: str) -> str | None:
    fs, path = _fs(store, uri)
    if not fs.exists(path):
        return None
    return bytes(fs.cat_file(path)).decode("utf-8")


def _write(uri: str, text: str, storage_options: dict[str, Any]) -> None:
    """Replace the file at ``uri`` (whole or not at all on a local disk)."""
    parent, name = uri.rstrip("/").rsplit("/", 1)
    ArtifactStore(parent, storage_options).put_text(name, text)


def matching_examples(
    store: ArtifactStore, uri: str, matcher: SubjectMatcher
) -> dict[str, list[dict[str, Any]]]:
    """The subject's examples in the dataset at ``uri``, per split file."""
    found: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        text = _read(store, f"{uri.rstrip('/')}/{split}")
        examples = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
        hits = [example for example in examples if matcher.example_hits(example)]
        if hits:
            found[split] = hits
    return found


def rewrite_without(store: ArtifactStore, uri: str, matcher: SubjectMatcher, now: datetime) -> int:
    """Rewrite the dataset at ``uri`` without the subject's examples; how many went.

    Nothing is written when none of its examples is the subject's (a second erasure
    changes nothing). The manifest's per-label and per-segment ``counts`` stay those of
    the build (``erased.by_split`` says how many left each split since)."""
    from genmon.retrain.dataset import FORMAT, hash_content
    from genmon.retrain.examples import SftExample

    base = uri.rstrip("/")
    kept: dict[str, list[str]] = {}
    by_split: dict[str, int] = {}
    for split in SPLITS:
        text = _read(store, f"{base}/{split}") or ""
        lines = [line for line in text.splitlines() if line.strip()]
        mine = [matcher.example_hits(json.loads(line)) for line in lines]
        by_split[split.removesuffix(".jsonl")] = sum(mine)
        # the other lines stay byte for byte as the builder wrote them
        kept[split] = [line for line, hit in zip(lines, mine, strict=True) if not hit]
    removed = sum(by_split.values())
    if removed == 0:
        return 0
    for split, lines in kept.items():
        _write(f"{base}/{split}", "".join(line + "\n" for line in lines), store.storage_options)
    manifest_text = _read(store, f"{base}/{MANIFEST}")
    if manifest_text is None:  # an interrupted write: no manifest to keep in step
        return removed
    manifest = json.loads(manifest_text)
    train, evaluation = (
        [SftExample.from_json(json.loads(line)) for line in kept[split]] for split in SPLITS
    )
    before = manifest.get("erased") or {}
    earlier = before.get("by_split") or {}
    sizes = dict(manifest.get("sizes") or {})
    sizes.update(examples=len(train) + len(evaluation), train=len(train), eval=len(evaluation))
    manifest.update(
        content_hash=hash_content(
            train, evaluation, manifest.get("strategy"), layout=manifest.get("format", FORMAT)
        ),
        sizes=sizes,
        erased={
            "count": int(before.get("count", 0)) + removed,
            "by_split": {k: int(earlier.get(k, 0)) + n for k, n in by_split.items()},
            "at": now.isoformat(),
        },
    )
    text = json.dumps(manifest, indent=2, sort_keys=True)
    _write(f"{base}/{MANIFEST}", text, store.storage_options)
    return removed
