"""Where one data subject's data is: the pieces erasure and export share.

- :func:`subject_matcher`: the subject's ``labelled_example`` rows, read in batches,
  give the request ids and texts to look for (:class:`~genmon.privacy.matching.SubjectMatcher`).
- :func:`text_columns` and :func:`scan_column`: every JSON and text column of every
  table genmon's migrations create (but the subject's own rows and the audit), read a
  batch of rows at a time by primary key, so nothing is missed when a later change
  copies user text somewhere new.
- :func:`subject_datasets`: built datasets holding the subject's examples, recorded on
  a job or left in the store's job layout.
- :func:`trained_versions`: model versions whose job's dataset held them, and every
  version tuned from one of those (a child starts from its parent's adapter).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, col, select

from genmon.privacy.datasets import job_folders, matching_examples
from genmon.privacy.matching import SubjectMatcher
from genmon.retrain.artifacts import ArtifactStore
from genmon.schemas.tables import LabelledExample, ModelVersion, RetrainJob

#: Tables whose columns are not scanned: the subject's own rows go whole, and the audit
#: and opt-out tables hold no text.
SKIPPED_TABLES = frozenset({"labelled_example", "erasure_audit", "subject_opt_out"})


def subject_rows(engine: Engine, subject_id: str, batch: int) -> Iterator[LabelledExample]:
    """The subject's labelled examples, ``batch`` rows at a time by id."""
    last = 0
    while True:
        with Session(engine) as session:
            rows = list(
                session.exec(
                    select(LabelledExample)
                    .where(LabelledExample.subject_id == subject_id, col(LabelledExample.id) > last)
                    .order_by(col(LabelledExample.id))
                    .limit(batch)
                )
            )
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].id or last


def subject_matcher(engine: Engine, subject_id: str, batch: int) -> tuple[SubjectMatcher, int]:
    """The matcher of the subject's data, and how many labelled examples they have."""
    matcher = SubjectMatcher.for_subject(subject_id)
    count = 0
    for row in subject_rows(engine, subject_id, batch):
        matcher.add_row(row)
        count += 1
    return matcher, count


# -- columns ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextColumns:
    """A table's primary key and its JSON and text columns."""

    table: sa.Table
    key: sa.Column[Any]
    columns: tuple[sa.Column[Any], ...]


def table_metadata() -> sa.MetaData:
    from genmon.db import OPTIONAL_TABLE_MODULES, TABLE_MODULES

    for module in (*TABLE_MODULES, *OPTIONAL_TABLE_MODULES):
        try:
            importlib.import_module(module)
        except ImportError:  # an optional room that is not installed
            continue
    return SQLModel.metadata


def text_columns(engine: Engine) -> list[TextColumns]:
    """Every table of genmon's that exists in ``engine``'s database, with its JSON and
    text columns (tables without any are left out)."""
    present = set(sa.inspect(engine).get_table_names())
    found = []
    for table in table_metadata().sorted_tables:
        if table.name in SKIPPED_TABLES or table.name not in present:
            continue
        columns = tuple(c for c in table.columns if isinstance(c.type, sa.Text | sa.JSON))
        keys = list(table.primary_key.columns)
        if columns and len(keys) == 1:
            found.append(TextColumns(table, keys[0], columns))
    return found


def scan_column_batches(
    engine: Engine, spec: TextColumns, batch: int
) -> Iterator[list[sa.Row[Any]]]:
    """The rows of ``spec.table`` (key and text columns), ``batch`` at a time by key."""
    last: Any = None
    while True:
        query = sa.select(spec.key, *spec.columns).order_by(spec.key).limit(batch)
        if last is not None:
            query = query.where(spec.key > last)
        with engine.connect() as connection:
            rows = list(connection.execute(query))
        if rows:
            yield rows
        if len(rows) < batch:
            return
        last = rows[-1][0]


# -- datasets and versions -------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectDataset:
    """A built dataset holding some of the subject's examples."""

    uri: str
    job_id: str | None
    examples: dict[str, list[dict[str, Any]]]
    """The subject's examples per split file."""

    @property
    def count(self) -> int:
        return sum(len(found) for found in self.examples.values())


def subject_datasets(
    engine: Engine, store: ArtifactStore, matcher: SubjectMatcher
) -> list[SubjectDataset]:
    """Every dataset, recorded on a job or found in the store's job layout, holding one
    of the subject's examples."""
    candidates: dict[str, str | None] = {}
    with Session(engine) as session:
        query = select(RetrainJob.job_id, RetrainJob.dataset_uri).where(
            col(RetrainJob.dataset_uri).is_not(None)
        )
        for job_id, uri in session.exec(query):
            if uri:
                candidates[uri.rstrip("/")] = job_id
    for folder in job_folders(store, ["dataset"]):
        candidates.setdefault(folder.uri.rstrip("/"), folder.job_id)
    found = []
    for uri, job_id in sorted(candidates.items()):
        examples = matching_examples(store, uri, matcher)
        if examples:
            found.append(SubjectDataset(uri, job_id, examples))
    return found


def trained_versions(engine: Engine, job_ids: set[str]) -> list[dict[str, Any]]:
    """Versions trained on the datasets of ``job_ids`` (``via: dataset``), then every
    version tuned from one of them, however far down (``via: parent <version>``)."""
    if not job_ids:
        return []
    with Session(engine) as session:
        rows = list(session.exec(select(ModelVersion).order_by(col(ModelVersion.id))))
    listed: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row.job_id in job_ids:
            listed[(row.model_id, row.version)] = _version_json(row, "dataset")
    grew = True
    while grew:
        grew = False
        for row in rows:
            key = (row.model_id, row.version)
            parent = (row.model_id, row.parent_version or "")
            if key not in listed and parent in listed:
                listed[key] = _version_json(row, f"parent {row.parent_version}")
                grew = True
    return sorted(listed.values(), key=lambda v: (v["model_id"], v["created_at"], v["version"]))


def _version_json(row: ModelVersion, via: str) -> dict[str, Any]:
    return {
        "model_id": row.model_id,
        "version": row.version,
        "status": row.status.value,
        "job_id": row.job_id,
        "dataset_hash": row.dataset_hash,
        "created_at": row.created_at.isoformat(),
        "via": via,
    }
