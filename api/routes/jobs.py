"""``/v1/jobs``: retrain jobs (list, detail with audit trail) and the operator's actions
on them, approve and cancel, as ``genmon retrain approve|cancel`` do them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlmodel import col, select

from genmon.api.auth import audited
from genmon.api.payloads import JobCancelled, JobDetail, ReasonBody, job_audit
from genmon.api.routes._common import BODY, OperateCaller, ReadCaller, actor, answers, problems
from genmon.db import session_scope
from genmon.retrain.exceptions import JobNotFound
from genmon.retrain.queue import audit_trail, cancel
from genmon.retrain.triggers import approve
from genmon.schemas.events import Identifier, RetrainStatus
from genmon.schemas.tables import RetrainJob, RetrainJobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[Identifier, Path()]


def _links(expression: str) -> dict[str, tuple[str, str]]:
    """Links from an answer holding a job id to the operations on that job."""
    return {op: ("job_id", expression) for op in ("getJob", "approveJob", "cancelJob")}


def detail(request: Request, job_id: str) -> JobDetail:
    engine = request.app.state.engine
    with answers():
        with session_scope(engine) as session:
            job = session.get(RetrainJob, job_id)
            if job is None:
                raise JobNotFound(job_id)
        trail = audit_trail(engine, job_id)
    public = RetrainJobPublic.model_validate(job).model_dump()
    return JobDetail(
        **public,
        requested_by=job.requested_by,
        approved_by=job.approved_by,
        context=job.context,
        audit=job_audit(trail),
    )


@router.get(
    "",
    response_model=list[RetrainJobPublic],
    responses=problems(links=_links("$response.body#/0/job_id")),
    summary="List retrain jobs",
    operation_id="listJobs",
)
def list_jobs(
    request: Request,
    _caller: ReadCaller,
    model_id: Identifier | None = None,
    status: Annotated[list[RetrainStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RetrainJobPublic]:
    """Newest first; ``status`` may repeat."""
    query = select(RetrainJob).order_by(col(RetrainJob.created_at).desc(), col(RetrainJob.job_id))
    if model_id is not None:
        query = query.where(RetrainJob.model_id == model_id)
    if status:
        query = query.where(col(RetrainJob.status).in_(status))
    with answers(), session_scope(request.app.state.engine) as session:
        return [RetrainJobPublic.model_validate(j) for j in session.exec(query.limit(limit))]


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    responses=problems(404, links=_links("$response.body#/job_id")),
    summary="One retrain job with its audit trail",
    operation_id="getJob",
)
def get_job(request: Request, job_id: JobId, _caller: ReadCaller) -> JobDetail:
    return detail(request, job_id)


@router.post(
    "/{job_id}/approve",
    response_model=JobDetail,
    responses=problems(*BODY, 404, 409),
    summary="Approve a job waiting in pending_approval",
    operation_id="approveJob",
)
def approve_job(
    request: Request, job_id: JobId, caller: OperateCaller, body: ReasonBody | None = None
) -> JobDetail:
    audited(request, "job.approve", job_id)
    with answers():
        approve(request.app.state.engine, job_id, actor(caller), body.reason if body else "")
    return detail(request, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=JobCancelled,
    responses=problems(*BODY, 404, 409),
    summary="Cancel a job that has not ended",
    operation_id="cancelJob",
)
def cancel_job(
    request: Request, job_id: JobId, caller: OperateCaller, body: ReasonBody | None = None
) -> JobCancelled:
    """A running job's worker is fenced off and stops its training."""
    audited(request, "job.cancel", job_id)
    with answers():
        was = cancel(request.app.state.engine, job_id, actor(caller), body.reason if body else "")
    return JobCancelled(job_id=job_id, status=RetrainStatus.CANCELLED, was=was)
