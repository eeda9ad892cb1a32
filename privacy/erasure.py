"""Erasure by data subject: the subject's text leaves every place genmon stored it.

:func:`erase_subject` works in this order, so that an erasure interrupted anywhere and run
again still finds everything (it needs the subject's rows to recognise their copies, so
the rows go last):

1. an ``erasure_audit`` row is written (sha256 of the subject id, who asked, when);
2. the subject's ``labelled_example`` rows are read (:mod:`genmon.privacy.subject`):
   their request ids and texts are what the copies are recognised by;
3. built datasets holding the subject's examples are found, and the model versions
   trained on them listed (before anything changes);
4. those datasets are rewritten without the examples (``erased`` in the manifest); a job
   not yet running whose recorded dataset changed is reset to build a new one from the
   database on its next attempt (dataset, checkpoint and adapter unset);
5. every JSON and text column of every other table (incident evidence and notes,
   notification payloads, gate samples in verdicts and version metrics, ...) is
   scrubbed: the subject's exemplars and texts become
   :data:`~genmon.privacy.matching.ERASED`, the incident itself stays;
6. the subject's ``labelled_example`` rows are deleted, in batches;
7. the audit row gets the counts per place and the versions.

**Not here.** genmon persists no embedding or reservoir outside Kafka: the embedding
stage's reservoirs live in worker memory, the texts it samples cross
``<prefix>.embed-requests``, and detector states (drift references: moments and projected
vectors, no text) live in the workers' Faust tables, whose changelog topics Kafka compacts.
Window records (with their exemplars), inference, feedback, dead-letter, findings and
the other genmon topics keep records for ``kafka.retention_ms``: that is the erasure
horizon on Kafka, and a finding computed from a window still on a topic may bring an
exemplar back until then (erase again after the horizon to be sure).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.incidents._txn import write_transaction
from genmon.privacy.datasets import rewrite_without
from genmon.privacy.matching import SubjectMatcher, scrub, subject_hash
from genmon.privacy.subject import (
    TextColumns,
    subject_datasets,
    subject_matcher,
    text_columns,
    trained_versions,
)
from genmon.schemas.events import RetrainStatus, utcnow
from genmon.schemas.governance import ErasureAudit
from genmon.schemas.tables import LabelledExample, RetrainJob
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore

log = logging.getLogger("genmon.privacy.erasure")

#: Where erasure cannot reach, said in every report.
KAFKA_NOTE = (
    "Kafka topics (inference, feedback, deadletter, findings, windows, embed-requests, "
    "examples-retry) and the workers' table changelogs keep records until kafka.retention_ms "
    "or compaction removes them: that is the erasure horizon there"
)
#: Jobs whose recorded dataset may be replaced by a new one built on the next attempt.
NOT_STARTED = (RetrainStatus.PENDING_APPROVAL, RetrainStatus.QUEUED)
#: Jobs a worker holds now: their dataset is in its memory; cancel and requeue them.
RUNNING = (RetrainStatus.RUNNING, RetrainStatus.EVALUATING)


@dataclass
class ErasureReport:
    """What one erasure removed, by place, and the versions trained on the subject."""

    subject_hash: str
    counts: dict[str, int] = field(default_factory=dict)
    """``labelled_example`` rows, ``<table>.<column>`` items blanked, ``datasets``
    rewritten and ``dataset_examples`` removed from them."""
    model_versions: list[dict[str, Any]] = field(default_factory=list)
    running_jobs: list[str] = field(default_factory=list)
    """Jobs training on the subject's data right now: cancel and queue them again."""
    notes: list[str] = field(default_factory=list)
    audit_id: int | None = None

    @property
    def found(self) -> bool:
        """Whether anything of the subject's was held (False: erased already, or never)."""
        return any(self.counts.values()) or bool(self.model_versions)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject_hash": self.subject_hash,
            "found": self.found,
            "counts": dict(sorted(self.counts.items())),
            "model_versions": list(self.model_versions),
            "running_jobs": list(self.running_jobs),
            "notes": list(self.notes),
            "audit_id": self.audit_id,
        }


def check_subject(subject_id: str) -> str:
    if not subject_id or not subject_id.strip():
        raise ConfigurationError("a subject id is required: pass --subject ID")
    return subject_id


def start_audit(engine: Engine, action: str, subject_id: str, requested_by: str) -> int:
    with session_scope(engine) as session:
        row = ErasureAudit(
            action=action, subject_hash=subject_hash(subject_id), requested_by=requested_by
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def finish_audit(
    engine: Engine, audit_id: int, counts: dict[str, Any], versions: list[dict[str, Any]]
) -> None:
    with session_scope(engine) as session:
        row = session.get(ErasureAudit, audit_id)
        if row is not None:
            row.counts, row.model_versions, row.finished_at = counts, versions, utcnow()
            session.add(row)


def erase_subject(
    engine: Engine,
    settings: Settings,
    subject_id: str,
    *,
    requested_by: str,
    store: ArtifactStore | None = None,
) -> ErasureReport:
    """Remove ``subject_id``'s text everywhere genmon stored it (see the module docstring).

    Idempotent: a second call finds nothing (``report.found`` is False) and changes
    nothing but the audit, which records every request."""
    from genmon.retrain.artifacts import ArtifactStore

    check_subject(subject_id)
    batch = settings.retention.batch_size
    store = store or ArtifactStore(settings.retrain.artifacts_uri)
    now = utcnow()
    report = ErasureReport(subject_hash=subject_hash(subject_id), notes=[KAFKA_NOTE])
    report.audit_id = start_audit(engine, "erase", subject_id, requested_by)
    matcher, rows = subject_matcher(engine, subject_id, batch)
    datasets = subject_datasets(engine, store, matcher)
    report.model_versions = trained_versions(engine, {d.job_id for d in datasets if d.job_id})
    erased_by_job: dict[str, int] = {}
    for dataset in datasets:
        removed = rewrite_without(store, dataset.uri, matcher, now)
        if removed:
            report.counts["datasets"] = report.counts.get("datasets", 0) + 1
            report.counts["dataset_examples"] = report.counts.get("dataset_examples", 0) + removed
            if dataset.job_id:
                erased_by_job[dataset.job_id] = erased_by_job.get(dataset.job_id, 0) + removed
    report.running_jobs = _mark_jobs(engine, erased_by_job, now)
    for spec in text_columns(engine):
        for name, count in _scrub_table(engine, spec, matcher, batch).items():
            report.counts[name] = count
    report.counts["labelled_example"] = _delete_rows(engine, subject_id, batch)
    if report.counts["labelled_example"] != rows:
        log.info(
            "erasure: %d rows read, %d deleted (new rows arrived meanwhile)",
            rows,
            report.counts["labelled_example"],
        )
    report.counts = {name: count for name, count in report.counts.items() if count}
    finish_audit(engine, report.audit_id, report.counts, report.model_versions)
    return report


def _mark_jobs(engine: Engine, erased: dict[str, int], now: datetime) -> list[str]:
    """Note the erasure on each job whose dataset changed; a job not started yet is
    reset to build its dataset again. Returns the jobs running now."""
    running = []
    for job_id, count in sorted(erased.items()):
        with session_scope(engine) as session:
            job = session.get(RetrainJob, job_id)
            if job is None:
                continue
            if job.status in RUNNING:
                running.append(job_id)
                continue
            note: dict[str, Any] = {"count": count, "at": now.isoformat()}
            if job.status in NOT_STARTED:
                note["rebuild"] = True
                job.dataset_uri = job.dataset_hash = None
                job.checkpoint_uri, job.checkpoint_step, job.artifact_uri = None, None, None
            job.metrics = {**job.metrics, "dataset_erased": note}
            session.add(job)
    return running


def _scrub_table(
    engine: Engine, spec: TextColumns, matcher: SubjectMatcher, batch: int
) -> dict[str, int]:
    """Blank the subject's content in ``spec``'s columns, a batch of rows per transaction
    (rows locked while they are rewritten, on PostgreSQL); items blanked per column."""
    counts: dict[str, int] = {}
    last: Any = None
    while True:
        query = sa.select(spec.key, *spec.columns).order_by(spec.key).limit(batch)
        if last is not None:
            query = query.where(spec.key > last)
        with write_transaction(engine) as session:
            rows = list(session.execute(query.with_for_update()))
            for row in rows:
                changed: dict[str, Any] = {}
                for column, value in zip(spec.columns, row[1:], strict=True):
                    if value is None:
                        continue
                    new, count = scrub(value, matcher)
                    if count:
                        changed[column.name] = new
                        name = f"{spec.table.name}.{column.name}"
                        counts[name] = counts.get(name, 0) + count
                if changed:
                    session.execute(spec.table.update().where(spec.key == row[0]).values(**changed))
        if len(rows) < batch:
            return counts
        last = rows[-1][0]


def _delete_rows(engine: Engine, subject_id: str, batch: int) -> int:
    removed = 0
    while True:
        with write_transaction(engine) as session:
            ids = list(
                session.exec(
                    select(LabelledExample.id)
                    .where(LabelledExample.subject_id == subject_id)
                    .order_by(col(LabelledExample.id))
                    .limit(batch)
                )
            )
            if ids:
                session.exec(sa.delete(LabelledExample).where(col(LabelledExample.id).in_(ids)))
        removed += len(ids)
        if len(ids) < batch:
            return removed
