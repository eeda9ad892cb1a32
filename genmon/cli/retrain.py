"""``genmon retrain``: ask for, approve and follow retraining jobs, and ask why none ran.

The retrain room (policy, triggers, Kafka clients) is imported inside the commands so
``genmon --help`` stays instant.
"""

from __future__ import annotations

from typing import Any

import click

from genmon.cli._common import (
    current_user,
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
    when,
)
from genmon.settings import get_settings

ACTIVE = ("pending_approval", "queued", "running", "evaluating")
STATUSES = (
    "active",
    "all",
    *ACTIVE,
    "promoted",
    "rejected",
    "failed",
    "cancelled",
    "rolled_back",
)


@click.group()
def retrain() -> None:
    """Ask for, approve and follow retraining jobs; see why nothing retrained."""


@retrain.command("request")
@click.argument("model_id")
@click.option("--reason", required=True, help="Why; kept on the job and in its audit trail.")
@click.option("--by", "actor", default=None, help="Who asks; default: your user name.")
@click.option(
    "--direct",
    is_flag=True,
    help="Store the job in the database now instead of publishing the request to "
    "<prefix>.retrain for a retrain worker to store.",
)
@json_option()
@database_option
def retrain_request(
    model_id: str, reason: str, actor: str | None, direct: bool, as_json: bool, url: str | None
) -> None:
    """Ask for a job that fine-tunes MODEL_ID on its labelled examples (a manual trigger)."""
    from genmon.db import session_scope
    from genmon.retrain.exceptions import RetrainError
    from genmon.retrain.policy import load_policy
    from genmon.retrain.triggers import base_version, manual_request, not_registered, store_request

    settings = get_settings()
    engine = engine_for(url)
    with session_scope(engine) as session:
        base = base_version(session, model_id)
    if base is None:
        raise RetrainError(not_registered(model_id))
    policy = load_policy(settings.retrain.policy_file)
    model_policy = policy.for_model(model_id)
    if not model_policy.triggers.manual:
        raise RetrainError(
            f"manual requests are off for {model_id} (triggers.manual in {model_policy.source})"
        )
    request = manual_request(model_id, base, reason, actor or current_user())
    out: dict[str, Any] = {"job_id": request.job_id, "trigger_key": request.trigger_key}
    if direct:
        decision = store_request(engine, policy, request)
        out.update(outcome=decision.outcome.value, reason=decision.reason)
    else:
        _publish(settings, request)
        out.update(outcome="published", topic=settings.topic("retrain"))
    if as_json:
        echo_json(out)
        return
    click.echo(request.job_id)
    if direct:
        click.echo(f"{out['outcome']}: {out['reason']}", err=True)


def _publish(settings: Any, request: Any) -> None:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from genmon import kafka_config
    from genmon.retrain.exceptions import RetrainError
    from genmon.schemas.codec import encode

    bootstrap = settings.kafka.bootstrap_servers
    try:
        producer = KafkaProducer(**kafka_config.client_config(settings.kafka, producer=True))
        try:
            topic = settings.topic("retrain")
            producer.send(topic, key=request.model_id.encode(), value=encode(request)).get(30)
        finally:
            producer.close(timeout=10)
    except KafkaError as exc:
        if kafka_config.is_auth_failure(exc):
            raise kafka_config.auth_failure(settings.kafka, exc) from None
        raise RetrainError(
            f"cannot publish the request to Kafka at {bootstrap} ({exc}); start it with "
            "`genmon infra up`, or store the job without Kafka: add --direct"
        ) from exc


@retrain.command("approve")
@click.argument("job_id")
@click.option("--by", "actor", default=None, help="Who approves; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@database_option
def retrain_approve(job_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Let a job waiting in pending_approval be claimed by a retrain worker."""
    from genmon.retrain.triggers import approve

    job = approve(engine_for(url), job_id, actor or current_user(), reason)
    click.echo(f"{job.job_id}: {job.status.value}")


@retrain.command("cancel")
@click.argument("job_id")
@click.option("--by", "actor", default=None, help="Who cancels; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@database_option
def retrain_cancel(job_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Cancel a job that has not ended; a running one's worker stops its training."""
    from genmon.retrain.queue import cancel

    was = cancel(engine_for(url), job_id, actor or current_user(), reason)
    click.echo(f"{job_id}: cancelled (was {was.value})")


@retrain.command("list")
@click.option("--model", default=None, help="Only this model id.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    default="all",
    show_default=True,
    help="active = pending_approval, queued, running or evaluating.",
)
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option()
@database_option
def retrain_list(
    model: str | None, status: str, limit: int, as_json: bool, url: str | None
) -> None:
    """Retraining jobs, newest first."""
    from sqlmodel import col, select

    from genmon.db import session_scope
    from genmon.schemas.events import RetrainStatus
    from genmon.schemas.tables import RetrainJob, RetrainJobPublic

    query = select(RetrainJob).order_by(col(RetrainJob.created_at).desc()).limit(limit)
    if status == "active":
        query = query.where(col(RetrainJob.status).in_([RetrainStatus(s) for s in ACTIVE]))
    elif status != "all":
        query = query.where(RetrainJob.status == RetrainStatus(status))
    if model:
        query = query.where(RetrainJob.model_id == model)
    with session_scope(engine_for(url)) as session:
        jobs = session.exec(query).all()
    if as_json:
        echo_json([RetrainJobPublic.model_validate(j).model_dump(mode="json") for j in jobs])
        return
    if not jobs:
        click.echo("no retrain jobs" + (f" for {model}" if model else ""))
        return
    rows = [
        [
            j.job_id,
            j.status.value,
            j.model_id,
            j.trigger,
            f"{j.attempts}/{j.max_attempts}",
            when(j.created_at),
            _progress(j.progress),
            str(j.verdict.get("decision", "-")),
        ]
        for j in jobs
    ]
    header = ["JOB", "STATUS", "MODEL", "TRIGGER", "ATTEMPTS", "CREATED", "PROGRESS", "VERDICT"]
    echo_table(rows, header)


def _progress(progress: dict[str, Any]) -> str:
    if "step" not in progress:
        return "-"
    total = progress.get("total")
    loss = progress.get("loss")
    out = f"{progress['step']}/{total}" if total else str(progress["step"])
    return out + (f" loss {loss:.4g}" if isinstance(loss, int | float) else "")


@retrain.command("show")
@click.argument("job_id")
@json_option()
@database_option
def retrain_show(job_id: str, as_json: bool, url: str | None) -> None:
    """One job: trigger, progress, attempts, verdict and audit trail."""
    from sqlmodel import col, select

    from genmon.db import session_scope
    from genmon.retrain.exceptions import JobNotFound
    from genmon.schemas.retrain import RetrainDecision, RetrainJobAudit
    from genmon.schemas.tables import RetrainJob, RetrainJobPublic

    with session_scope(engine_for(url)) as session:
        job = session.get(RetrainJob, job_id)
        if job is None:
            raise JobNotFound(job_id)
        trail = session.exec(
            select(RetrainJobAudit)
            .where(RetrainJobAudit.job_id == job_id)
            .order_by(col(RetrainJobAudit.id))
        ).all()
        decision = session.exec(
            select(RetrainDecision).where(RetrainDecision.job_id == job_id)
        ).first()
    if as_json:
        public = RetrainJobPublic.model_validate(job).model_dump(mode="json")
        public["requested_by"], public["approved_by"] = job.requested_by, job.approved_by
        public["context"], public["error"] = job.context, job.error
        public["decision"] = decision.model_dump(mode="json") if decision else None
        public["audit"] = [row.model_dump(mode="json") for row in trail]
        echo_json(public)
        return
    click.echo(f"retrain job {job.job_id}: {job.status.value}")
    click.echo(f"  model {job.model_id} from {job.base_version}; trigger {job.trigger_key or '-'}")
    click.echo(f"  reason: {job.reason or '-'}")
    click.echo(
        f"  requested by {job.requested_by}"
        + (f", approved by {job.approved_by}" if job.approved_by else "")
        + f"; created {when(job.created_at)}, started {when(job.started_at)},"
        f" finished {when(job.finished_at)}"
    )
    click.echo(
        f"  attempts {job.attempts} of {job.max_attempts}; progress {_progress(job.progress)}"
    )
    if job.hold_reason:
        click.echo(f"  held: {job.hold_reason}")
    if job.candidate_version or job.artifact_uri:
        click.echo(f"  candidate {job.candidate_version or '-'} at {job.artifact_uri or '-'}")
    if job.verdict:
        click.echo(f"Verdict: {job.verdict.get('decision', '-')}")
        for reason in job.verdict.get("reasons", []):
            click.echo(f"  - {reason}")
    if job.error:
        click.echo(f"Error: {job.error}")
    click.echo("Audit trail:")
    for row in trail:
        step = f"{row.from_status or '-'} -> {row.to_status}"
        click.echo(f"  {when(row.at)}  {step:<28} {row.actor:<14} {row.reason}")


@retrain.command("why")
@click.argument("model_id")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@json_option()
@database_option
def retrain_why(model_id: str, limit: int, as_json: bool, url: str | None) -> None:
    """MODEL_ID's latest retrain decisions, with their reasons: why did nothing retrain?"""
    from genmon.retrain.triggers import explain

    decisions = explain(engine_for(url), model_id, limit)
    if as_json:
        echo_json([d.model_dump(mode="json") for d in decisions])
        return
    if not decisions:
        click.echo(
            f"no retrain decisions for {model_id}: no incident of it reached a retrain worker"
            " (`genmon worker --role retrain` running?) and nobody asked"
            f" (`genmon retrain request {model_id} --reason ...`)"
        )
        return
    rows = [
        [when(d.at), d.outcome.value, d.trigger_key, d.job_id or "-", d.reason] for d in decisions
    ]
    echo_table(rows, ["AT", "OUTCOME", "TRIGGER", "JOB", "REASON"])
