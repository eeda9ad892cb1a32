"""Export by data subject: everything genmon holds about one subject, as JSON.

The same places an erasure looks at (:mod:`genmon.privacy.erasure`), read and changed in
none: the subject's labelled examples, the pieces of other rows that are theirs
(exemplars in incident evidence and notification payloads, gate samples, ...), the
built datasets holding their examples, the model versions trained on them and whether
they opted out of training. Each export is audited (action ``export``, counts only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from genmon.privacy.erasure import KAFKA_NOTE, check_subject, finish_audit, start_audit
from genmon.privacy.matching import found_in, subject_hash
from genmon.privacy.optout import opt_out_status
from genmon.privacy.subject import (
    scan_column_batches,
    subject_datasets,
    subject_rows,
    text_columns,
    trained_versions,
)
from genmon.schemas.tables import LabelledExamplePublic
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore


def export_subject(
    engine: Engine,
    settings: Settings,
    subject_id: str,
    *,
    requested_by: str,
    store: ArtifactStore | None = None,
) -> dict[str, Any]:
    """Everything held about ``subject_id`` (JSON-ready), audited as an export."""
    from genmon.privacy.matching import SubjectMatcher
    from genmon.retrain.artifacts import ArtifactStore

    check_subject(subject_id)
    batch = settings.retention.batch_size
    store = store or ArtifactStore(settings.retrain.artifacts_uri)
    audit_id = start_audit(engine, "export", subject_id, requested_by)
    matcher = SubjectMatcher.for_subject(subject_id)
    examples = []
    for row in subject_rows(engine, subject_id, batch):
        matcher.add_row(row)
        examples.append(LabelledExamplePublic.model_validate(row).model_dump(mode="json"))
    elsewhere = []
    for spec in text_columns(engine):
        for rows in scan_column_batches(engine, spec, batch):
            for row in rows:
                for column, value in zip(spec.columns, row[1:], strict=True):
                    pieces = found_in(value, matcher) if value is not None else []
                    if pieces:
                        elsewhere.append(
                            {
                                "table": spec.table.name,
                                "key": str(row[0]),
                                "column": column.name,
                                "found": pieces,
                            }
                        )
    datasets = subject_datasets(engine, store, matcher)
    versions = trained_versions(engine, {d.job_id for d in datasets if d.job_id})
    counts = {
        "labelled_example": len(examples),
        "elsewhere": len(elsewhere),
        "datasets": len(datasets),
        "dataset_examples": sum(d.count for d in datasets),
    }
    finish_audit(engine, audit_id, counts, versions)
    return {
        "subject_hash": subject_hash(subject_id),
        "labelled_examples": examples,
        "elsewhere": elsewhere,
        "datasets": [{"uri": d.uri, "job_id": d.job_id, "examples": d.examples} for d in datasets],
        "model_versions": versions,
        "opt_out": opt_out_status(engine, subject_id),
        "counts": counts,
        "notes": [KAFKA_NOTE],
        "audit_id": audit_id,
    }
