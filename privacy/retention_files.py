"""Retention of the artifact store: datasets, checkpoints and adapters of ended jobs.

Only genmon's own layout is touched (``jobs/<job>/epoch-<n>/<kind>``,
:mod:`genmon.privacy.datasets`), and only folders of jobs that ended (promoted, rejected,
failed, cancelled, rolled back) before the cut-off: a queued or running job may still
read its dataset and resume from its checkpoint. A registered base model is never under
that layout, so it is never touched either.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.db import session_scope
from genmon.privacy.datasets import JobFolder, job_folders, remove, same_uri
from genmon.retrain.artifacts import ArtifactStore
from genmon.retrain.queue import TERMINAL
from genmon.schemas.events import RolloutStatus
from genmon.schemas.retrain import ModelAliasRow, RegisteredModel, Rollout
from genmon.schemas.tables import ModelVersion, ModelVersionStatus, RetrainJob

#: Job ids asked for in one query.
_CHUNK = 500


def _ended_before(session: Session, job_ids: Iterable[str], limit: datetime) -> set[str]:
    """Those of ``job_ids`` whose job ended before ``limit``."""
    ended_at = sa.func.coalesce(col(RetrainJob.finished_at), col(RetrainJob.updated_at))
    ids = sorted(set(job_ids))
    found: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        query = select(RetrainJob.job_id).where(
            col(RetrainJob.job_id).in_(ids[start : start + _CHUNK]),
            col(RetrainJob.status).in_(TERMINAL),
            ended_at < limit,
        )
        found.update(session.exec(query))
    return found


def _recorded_datasets(session: Session, limit: datetime) -> dict[str, str]:
    """Job id -> recorded dataset of the jobs that ended before ``limit``."""
    ended_at = sa.func.coalesce(col(RetrainJob.finished_at), col(RetrainJob.updated_at))
    query = select(RetrainJob.job_id, RetrainJob.dataset_uri).where(
        col(RetrainJob.status).in_(TERMINAL),
        ended_at < limit,
        col(RetrainJob.dataset_uri).is_not(None),
    )
    return {job_id: uri for job_id, uri in session.exec(query) if uri}


def expire_datasets(
    engine: Engine, store: ArtifactStore, limit: datetime, now: datetime, dry_run: bool
) -> int:
    """Remove the dataset folders of jobs that ended before ``limit``; how many."""
    found = job_folders(store, ["dataset"])
    with Session(engine) as session:
        recorded = _recorded_datasets(session, limit)
        ended = _ended_before(session, [f.job_id for f in found], limit) | set(recorded)
    folders = [f for f in found if f.job_id in ended]
    for job_id, uri in recorded.items():
        if not any(same_uri(uri, f.uri) for f in folders):
            folders.append(JobFolder(job_id, "dataset", uri))
    if dry_run:
        return len(folders)
    removed = sum(1 for folder in folders if remove(store, folder.uri))
    at = now.isoformat()
    for job_id in sorted({f.job_id for f in folders}):
        with session_scope(engine) as session:
            job = session.get(RetrainJob, job_id)
            if job is None:
                continue
            note = {
                "at": at,
                "uri": job.dataset_uri or (job.metrics.get("dataset_expired") or {}).get("uri"),
            }
            job.metrics = {**job.metrics, "dataset_expired": note}
            job.dataset_uri = None
            session.add(job)
    return removed


def protected_artifacts(session: Session) -> set[str]:
    """Artifacts of the versions that serve or may serve again: active, a model's serving
    version, any alias's (champion, challenger, previous), a watching rollout's."""
    keep: set[tuple[str, str]] = set()
    for model_id, version in session.exec(select(ModelAliasRow.model_id, ModelAliasRow.version)):
        keep.add((model_id, version))
    for model_id, version in session.exec(
        select(RegisteredModel.model_id, RegisteredModel.serving_version)
    ):
        keep.add((model_id, version))
    watching = select(Rollout).where(Rollout.status == RolloutStatus.WATCHING)
    for rollout in session.exec(watching):
        keep.update({(rollout.model_id, rollout.champion), (rollout.model_id, rollout.challenger)})
    uris: set[str] = set()
    for row in session.exec(select(ModelVersion)):
        if row.status == ModelVersionStatus.ACTIVE or (row.model_id, row.version) in keep:
            uris.add(row.artifact_uri.rstrip("/"))
    return uris


def expire_artifacts(
    engine: Engine, store: ArtifactStore, limit: datetime, now: datetime, dry_run: bool
) -> int:
    """Remove checkpoints and adapters of jobs that ended before ``limit``, but for an
    adapter :func:`protected_artifacts` names; how many folders."""
    found = job_folders(store, ["checkpoints", "adapter"])
    with Session(engine) as session:
        ended = _ended_before(session, [f.job_id for f in found], limit)
        protected = protected_artifacts(session)
    folders = [f for f in found if f.job_id in ended and f.uri.rstrip("/") not in protected]
    if dry_run:
        return len(folders)
    removed = [folder for folder in folders if remove(store, folder.uri)]
    _note_expired(engine, removed, now)
    return len(removed)


def _note_expired(engine: Engine, removed: list[JobFolder], now: datetime) -> None:
    """Each job, and each version whose adapter went, keeps a note of it."""
    at = now.isoformat()
    by_job: dict[str, list[JobFolder]] = {}
    for folder in removed:
        by_job.setdefault(folder.job_id, []).append(folder)
    for job_id, folders in sorted(by_job.items()):
        with session_scope(engine) as session:
            job = session.get(RetrainJob, job_id)
            if job is not None:
                note: dict[str, Any] = {"at": at, "folders": sorted(f.kind for f in folders)}
                job.metrics = {**job.metrics, "artifacts_expired": note}
                session.add(job)
            for folder in folders:
                if folder.kind != "adapter":
                    continue
                for version in session.exec(
                    select(ModelVersion).where(ModelVersion.job_id == job_id)
                ):
                    if same_uri(version.artifact_uri, folder.uri):
                        version.eval_metrics = {
                            **version.eval_metrics,
                            "artifact_expired": {"at": at},
                        }
                        session.add(version)
