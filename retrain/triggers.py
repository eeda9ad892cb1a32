"""From a trigger to at most one retrain job, and a recorded reason whenever there is none.

**Keys.** Each trigger has a key, and the job it asks for is named by the key alone
(:func:`genmon.schemas.job_id_for`): ``incident:<incident id>:<episode>`` (the episode is
the incident's ``reopen_count``: a reopening may ask again), ``volume:<model>:<mark>``
(``mark`` = total labelled examples // ``new_examples``) and ``manual:<request id>``. A
redelivered finding, a replayed request or two workers racing name the same job.

**Two steps.** :func:`decide_incident` / :func:`decide_volume` (the retrain agent, on an
incident event or a periodic check) turn a trigger into a :class:`RetrainRequest` or record
why not; the request goes through ``<prefix>.retrain`` to :func:`store_request`, which
writes the decision (unique on the key) and the job (its id from the key) in one
transaction. The decide step records only *negative* outcomes, so a request lost between
the two steps is asked again on redelivery instead of being remembered as done.

**Final or not.** A decision under the trigger's key is final: the model is not registered
("not retrainable"), the incident is a rollout watch's (its regression rolls the challenger
back; :mod:`genmon.retrain.rollout`), no trigger of the policy matches, the incident was
resolved first, or :func:`store_request` refused or stored it. What time may change (too
few firings yet, the cool-down, too few examples) is recorded under ``<key>~<what>:<state>``,
once per state, and the agent decides the open incident again on its next check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from genmon.db import session_scope
from genmon.retrain.exceptions import JobNotFound, JobStateError
from genmon.retrain.policy import ModelPolicy, RetrainPolicy
from genmon.retrain.rollout import ROLLOUT_DETECTOR
from genmon.retrain.usable import too_few
from genmon.schemas.events import (
    IncidentStatus,
    ModelAlias,
    RetrainRequest,
    RetrainStatus,
    TriggerKind,
    job_id_for,
    new_id,
    utcnow,
)
from genmon.schemas.incidents import Incident
from genmon.schemas.retrain import (
    DecisionOutcome,
    ModelAliasRow,
    RegisteredModel,
    RetrainDecision,
    RetrainJobAudit,
)
from genmon.schemas.tables import LabelledExample, RetrainJob

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
#: Transitions of an incident that may start a job (acknowledged and resolved never do).
DECIDING_TRANSITIONS = frozenset({"opened", "updated", "escalated", "reopened"})
#: Why an incident of the rollout watch starts no job.
NOT_ON_ROLLOUTS = (
    "a rollout's regression rolls the challenger back; it is not retrained on"
    " (the champion, which did not regress, keeps serving)"
)


# -- keys and requests ----------------------------------------------------------------------
def incident_key(incident_id: str, episode: int) -> str:
    return f"incident:{incident_id}:{episode}"


def volume_key(model_id: str, mark: int) -> str:
    return f"volume:{model_id}:{mark}"


def manual_key(request_id: str) -> str:
    return f"manual:{request_id}"


def not_registered(model_id: str) -> str:
    """The reason an unregistered model's trigger queues nothing, with what to run."""
    return (
        f"not retrainable: model {model_id} is not registered"
        f" (genmon models register {model_id} --base PATH)"
    )


def _request(
    model_id: str, base: str, key: str, kind: TriggerKind, **fields: Any
) -> RetrainRequest:
    return RetrainRequest(
        job_id=job_id_for(key),
        model_id=model_id,
        base_version=base,
        trigger=kind,
        trigger_key=key,
        **fields,
    )


def incident_trigger(
    incident: Incident, base_version: str, policy: ModelPolicy, trigger: int
) -> RetrainRequest:
    """The request of ``incident``'s current episode, matched by ``triggers.incidents[trigger]``."""
    matched = policy.triggers.incidents[trigger]
    context = {
        "kind": incident.kind.value,
        "detector": incident.detector,
        "signal": incident.signal,
        "segment": incident.segment,
        "segment_attributes": segment_attributes(incident.segment),
        "severity": incident.severity.value,
        "finding_count": incident.finding_count,
        "episode": incident.reopen_count,
        "title": incident.title,
        "policy_trigger": matched.name or f"triggers.incidents[{trigger}]",
    }
    return _request(
        incident.model_id,
        base_version,
        incident_key(incident.id, incident.reopen_count),
        TriggerKind.INCIDENT,
        reason=f"incident {incident.id}: {incident.title}"[:1024],
        incident_id=incident.id,
        min_examples=max(1, policy.guards.min_examples_per_class),
        context=context,
    )


def volume_trigger(
    model_id: str, base_version: str, mark: int, new_examples: int, policy: ModelPolicy
) -> RetrainRequest:
    """The request of ``model_id``'s data-volume ``mark``."""
    return _request(
        model_id,
        base_version,
        volume_key(model_id, mark),
        TriggerKind.VOLUME,
        reason=f"{new_examples} new labelled examples since the last job",
        min_examples=max(1, policy.guards.min_examples_per_class),
        context={"new_examples": new_examples, "mark": mark},
    )


def manual_request(
    model_id: str,
    base_version: str,
    reason: str,
    requested_by: str = "genmon",
    request_id: str | None = None,
) -> RetrainRequest:
    """A person's request (``genmon retrain request``): a new key for every request."""
    key = manual_key(request_id or new_id())
    fields = {"reason": reason, "requested_by": requested_by}
    return _request(model_id, base_version, key, TriggerKind.MANUAL, **fields)


def segment_attributes(segment: str | None) -> dict[str, str]:
    """``"model_version=v1,locale=de"`` -> ``{"model_version": "v1", "locale": "de"}``."""
    pairs = (part.partition("=") for part in (segment or "").split(",") if "=" in part)
    return {key: value for key, _, value in pairs}


# -- what the guards read -------------------------------------------------------------------
def base_version(session: Session, model_id: str) -> str | None:
    """The version a job tunes from: the champion, else the registered serving version."""
    alias = session.get(ModelAliasRow, (model_id, ModelAlias.CHAMPION.value))
    if alias is not None:
        return alias.version
    model = session.get(RegisteredModel, model_id)
    return model.serving_version if model is not None else None


def _latest_job(session: Session, model_id: str) -> RetrainJob | None:
    query = (
        select(RetrainJob)
        .where(RetrainJob.model_id == model_id, RetrainJob.status != RetrainStatus.CANCELLED)
        .order_by(col(RetrainJob.created_at).desc())
        .limit(1)
    )
    return session.exec(query).first()


def _cooldown(session: Session, policy: ModelPolicy, now: datetime) -> tuple[str, str] | None:
    """``(reason, latest job id)`` while the model's cool-down runs."""
    latest = _latest_job(session, policy.model_id)
    wait_s = policy.guards.cooldown_s
    if latest is None or now - latest.created_at >= timedelta(seconds=wait_s):
        return None
    ago = (now - latest.created_at).total_seconds()
    return (
        f"cool-down: job {latest.job_id} of {policy.model_id} was created {ago:.0f} s ago;"
        f" guards.cooldown_s is {wait_s:g} s ({policy.source})",
        latest.job_id,
    )


# -- recording ------------------------------------------------------------------------------
def _decision(session: Session, key: str) -> RetrainDecision | None:
    return session.exec(select(RetrainDecision).where(RetrainDecision.trigger_key == key)).first()


def _record(session: Session, **values: Any) -> None:
    """A negative decision, once per key (a racing twin's copy is dropped)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    row = RetrainDecision(**values)
    data = row.model_dump(exclude={"id"})
    session.exec(insert(RetrainDecision).values(**data).on_conflict_do_nothing())
    log.info("retrain %s %s: %s: %s", row.model_id, row.trigger_key, row.outcome, row.reason)


# -- deciding -------------------------------------------------------------------------------
def _held(
    session: Session, policy: ModelPolicy, now: datetime, *, automatic: bool
) -> tuple[str, str, str] | None:
    """``(reason, guard, state)`` of the first guard holding a new job back, if any. The
    cool-down holds automatic triggers only: a person asking is never held by it."""
    if automatic and (held := _cooldown(session, policy, now)):
        return held[0], "cooldown", held[1]
    if few := too_few(session, policy):
        return few[0], "examples", str(few[1])
    return None


def decide_incident(
    engine: Engine, policy: RetrainPolicy, incident_id: str, *, clock: Clock = utcnow
) -> RetrainRequest | None:
    """The request the incident's current episode makes, or ``None`` with the reason
    recorded (see the module docstring for which reasons are final)."""
    with session_scope(engine) as session:
        incident = session.get(Incident, incident_id)
        if incident is None:
            log.warning("incident %s is not in the database; nothing to decide", incident_id)
            return None
        key = incident_key(incident.id, incident.reopen_count)
        if _decision(session, key) is not None:
            return None
        at = clock()
        judged = _judge_incident(session, policy, incident, at)
        if isinstance(judged, RetrainRequest):
            return judged
        outcome, reason, state, details = judged
        _record(
            session,
            model_id=incident.model_id,
            trigger="incident",
            incident_id=incident.id,
            trigger_key=key + (f"~{state}" if state else ""),
            outcome=outcome,
            reason=reason,
            details={"final": not state, **details},
            at=at,
        )
    return None


def _judge_incident(
    session: Session, policy: RetrainPolicy, incident: Incident, now: datetime
) -> RetrainRequest | tuple[DecisionOutcome, str, str, dict[str, Any]]:
    """The request, or ``(outcome, reason, state, details)``; ``state`` (what may change)
    is empty for a final decision."""
    if incident.detector.split("#", 1)[0] == ROLLOUT_DETECTOR:
        return DecisionOutcome.IGNORED, NOT_ON_ROLLOUTS, "", {"detector": ROLLOUT_DETECTOR}
    if incident.status is IncidentStatus.RESOLVED:
        reason = "the incident was resolved before the retrain agent decided on it"
        return DecisionOutcome.IGNORED, reason, "", {}
    base = base_version(session, incident.model_id)
    if base is None:
        return (
            DecisionOutcome.REFUSED,
            not_registered(incident.model_id),
            "",
            {"guard": "registered"},
        )
    model_policy = policy.for_model(incident.model_id)
    index, why = model_policy.match_incident(incident)
    if index is None:
        return DecisionOutcome.IGNORED, why, "", {}
    trigger = model_policy.triggers.incidents[index]
    name = trigger.name or f"triggers.incidents[{index}]"
    details: dict[str, Any] = {"trigger": index, "trigger_name": name}
    if incident.finding_count < trigger.after_firings:
        reason = (
            f"waiting: {name} fires after {trigger.after_firings} findings; the incident has"
            f" {incident.finding_count} so far"
        )
        return DecisionOutcome.IGNORED, reason, f"firings:{incident.finding_count}", details
    held = _held(session, model_policy, now, automatic=True)
    if held is not None:
        reason = held[0] + "; decided again while the incident stays open"
        state = f"{held[1]}:{held[2]}"
        return DecisionOutcome.REFUSED, reason, state, {**details, "guard": held[1]}
    return incident_trigger(incident, base, model_policy, index)


def open_undecided(engine: Engine, limit: int = 500) -> list[str]:
    """Open incidents of registered models with no final decision for their episode: the
    agent decides them again (more firings, a cool-down over, corrections arrived)."""
    with session_scope(engine) as session:
        registered = select(RegisteredModel.model_id)
        query = (
            select(Incident.id, Incident.reopen_count)
            .where(
                Incident.status != IncidentStatus.RESOLVED, col(Incident.model_id).in_(registered)
            )
            .order_by(col(Incident.opened_at))
            .limit(limit)
        )
        rows = session.exec(query).all()
        keys = {incident_key(i, episode): i for i, episode in rows}
        decided = session.exec(
            select(RetrainDecision.trigger_key).where(
                col(RetrainDecision.trigger_key).in_(list(keys))
            )
        ).all()
    return [incident_id for key, incident_id in keys.items() if key not in set(decided)]


def decide_volume(
    engine: Engine, policy: RetrainPolicy, model_id: str, *, clock: Clock = utcnow
) -> RetrainRequest | None:
    """The model's data-volume request once ``new_examples`` labelled examples arrived
    since its latest job; ``None`` before (nothing recorded: it is no decision yet)."""
    model_policy = policy.for_model(model_id)
    volume = model_policy.triggers.volume
    if volume is None:
        return None
    with session_scope(engine) as session:
        base = base_version(session, model_id)
        if base is None:
            return None
        latest = _latest_job(session, model_id)
        total_query = select(func.count()).where(LabelledExample.model_id == model_id)
        total = int(session.exec(total_query).one())
        new = total
        if latest is not None:
            new_query = total_query.where(LabelledExample.created_at > latest.created_at)
            new = int(session.exec(new_query).one())
        if new < volume.new_examples:
            return None
        mark = total // volume.new_examples
        if _decision(session, volume_key(model_id, mark)) is not None:
            return None
        return volume_trigger(model_id, base, mark, new, model_policy)


# -- storing --------------------------------------------------------------------------------
def store_request(
    engine: Engine, policy: RetrainPolicy, request: RetrainRequest, *, clock: Clock = utcnow
) -> RetrainDecision:
    """Decide ``request`` once: its decision (unique on the trigger key) and, when the
    guards let it through, its job (id from the key), in one transaction. A redelivered
    request, or a twin stored concurrently by another worker, gets the decision already
    made; the losing transaction's unique violation is how a race ends."""
    key = request.trigger_key or manual_key(request.job_id)
    try:
        with session_scope(engine) as session:
            existing = _decision(session, key)
            if existing is not None:
                return existing
            decision = RetrainDecision(
                model_id=request.model_id,
                trigger=request.trigger.value,
                trigger_key=key,
                outcome=DecisionOutcome.REFUSED,
                incident_id=request.incident_id,
                at=clock(),
            )
            session.add(decision)
            session.flush()  # claims the key first: a concurrent twin blocks, then fails here
            _judge_request(session, policy, request, decision)
            return decision
    except IntegrityError:
        with Session(engine) as session:
            existing = _decision(session, key)
        if existing is None:
            raise
        return existing


def _judge_request(
    session: Session, policy: RetrainPolicy, request: RetrainRequest, decision: RetrainDecision
) -> None:
    """Fill in ``decision``; add the job and its first audit row when it passes."""
    model_id, now = request.model_id, decision.at
    base = base_version(session, model_id)
    model_policy = policy.for_model(model_id)
    refusal: tuple[str, str] | None = None
    if base is None:
        refusal = not_registered(model_id), "registered"
    elif request.trigger is TriggerKind.MANUAL and not model_policy.triggers.manual:
        refusal = f"manual requests are off (triggers.manual in {model_policy.source})", "manual"
    elif request.trigger is TriggerKind.VOLUME and model_policy.triggers.volume is None:
        refusal = f"no volume trigger in {model_policy.source}", "volume"
    elif held := _held(
        session, model_policy, now, automatic=request.trigger is not TriggerKind.MANUAL
    ):
        refusal = held[0], held[1]
    if refusal is not None:
        decision.reason, decision.details = refusal[0], {"guard": refusal[1]}
        session.add(decision)
        return
    assert base is not None
    job = _job(session, model_policy, request, decision.trigger_key, base, now)
    pending = job.status is RetrainStatus.PENDING_APPROVAL
    decision.job_id = job.job_id
    decision.outcome = DecisionOutcome.PENDING_APPROVAL if pending else DecisionOutcome.ENQUEUED
    decision.reason = (
        f"waits for approval (guards.require_approval): genmon retrain approve {job.job_id}"
        if pending
        else f"queued job {job.job_id} on {base}: {request.reason}"
    )[:1024]
    decision.details = {"base_version": base, "requested_by": request.requested_by}
    session.add(decision)
    session.add(
        RetrainJobAudit(
            job_id=job.job_id,
            to_status=job.status.value,
            actor=request.requested_by,
            reason=decision.reason,
            at=now,
        )
    )


def _job(
    session: Session,
    policy: ModelPolicy,
    request: RetrainRequest,
    key: str,
    base: str,
    now: datetime,
) -> RetrainJob:
    since = request.examples_since  # none: the job starts after the last promoted job
    guards = policy.guards
    job = RetrainJob(
        job_id=job_id_for(key),
        model_id=request.model_id,
        base_version=base,
        reason=request.reason[:1024],
        incident_id=request.incident_id,
        trigger=request.trigger.value,
        trigger_key=key,
        context=dict(request.context),
        requested_by=request.requested_by,
        status=RetrainStatus.PENDING_APPROVAL if guards.require_approval else RetrainStatus.QUEUED,
        max_attempts=guards.max_attempts,
        created_at=now,
        updated_at=now,
        params={
            "min_examples": guards.min_examples_per_class,
            "examples_since": since.isoformat() if since else None,
            "trainer": policy.training.trainer,
            "strategy": policy.training.strategy,
            "training": dict(policy.training.params),
            "gate": policy.gate.model_dump(mode="json"),
            "rollout": policy.rollout.model_dump(mode="json"),
            "policy": policy.source,
        },
    )
    session.add(job)
    session.flush()
    return job


def approve(engine: Engine, job_id: str, actor: str, reason: str = "") -> RetrainJob:
    """``pending_approval`` -> ``queued``: a worker may claim it now (audited)."""
    with session_scope(engine) as session:
        now = utcnow()
        moved = session.exec(
            sa.update(RetrainJob)
            .where(
                col(RetrainJob.job_id) == job_id,
                col(RetrainJob.status) == RetrainStatus.PENDING_APPROVAL,
            )
            .values(status=RetrainStatus.QUEUED, approved_by=actor, updated_at=now)
        )
        job = session.get(RetrainJob, job_id, populate_existing=True)
        if job is None:
            raise JobNotFound(job_id)
        if not moved.rowcount:
            raise JobStateError(
                f"retrain job {job_id} is {job.status.value}, not pending_approval: there is"
                f" nothing to approve (`genmon retrain show {job_id}`)"
            )
        said = f"approved by {actor}" + (f": {reason}" if reason else "")
        session.add(
            RetrainJobAudit(
                job_id=job_id,
                from_status=RetrainStatus.PENDING_APPROVAL.value,
                to_status=RetrainStatus.QUEUED.value,
                actor=actor,
                reason=said,
                at=now,
            )
        )
        decision = session.exec(
            select(RetrainDecision).where(RetrainDecision.job_id == job_id)
        ).first()
        if decision is not None:
            decision.outcome = DecisionOutcome.ENQUEUED
            decision.reason = f"{decision.reason}; {said}"[:1024]
            session.add(decision)
        return job


def explain(engine: Engine, model_id: str, limit: int = 20) -> list[RetrainDecision]:
    """The model's latest decisions, newest first: "why did nothing retrain?"."""
    with session_scope(engine) as session:
        query = (
            select(RetrainDecision)
            .where(RetrainDecision.model_id == model_id)
            .order_by(col(RetrainDecision.at).desc(), col(RetrainDecision.id).desc())
            .limit(limit)
        )
        return list(session.exec(query).all())
