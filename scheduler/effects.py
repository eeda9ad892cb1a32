"""What one tick enqueues. The scheduler never does the work itself: each effect is a row
another part of genmon acts on, keyed by the tick so that doing it twice is harmless.

- **retrain**: a :class:`~genmon.schemas.events.RetrainRequest` (trigger ``schedule``,
  key ``schedule:<model>:<trigger>:<fire time>``) stored through
  :func:`genmon.retrain.triggers.store_request`, the path every trigger takes: the guards
  (cool-down, minimum examples, approval) apply and a ``retrain_decision`` row says what
  came of it; a retrain worker claims the job.
- **retention**: :func:`genmon.privacy.retention.run_retention` (deletes are the
  enqueued work here: bounded, idempotent statements).
- **reference refresh**: the tick's ``schedule_fire`` row (schedule
  :data:`~genmon.schemas.governance.REFERENCE_REFRESH_SCHEDULE`) *is* the durable
  request. Every detection worker reads the latest fire time about once a minute
  (:mod:`genmon.streams.detection.reference_refresh`) and, at each model's next closed
  window, replaces every baseline's reference (rates, latencies) by its candidate when
  that holds ``detectors.baseline_warmup_windows`` healthy windows and is not worse than
  the learning limit; an embedding drift series does the same at its next sample when its
  candidate holds what a first reference needs. Smaller candidates keep growing; the
  request counts as applied either way (``refreshed_at`` in the detector state).
- **digest**: one notification in the incidents outbox (:mod:`genmon.scheduler.digest`),
  delivered, retried and signed by the dispatcher like every page.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from genmon.db import session_scope
from genmon.retrain.policy import RetrainPolicy
from genmon.retrain.triggers import base_version, store_request
from genmon.scheduler.schedules import Action, Schedule
from genmon.schemas.events import RetrainRequest, TriggerKind, job_id_for
from genmon.schemas.retrain import RegisteredModel
from genmon.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
#: The actor of what the scheduler enqueues (audit rows, decisions).
ACTOR = "scheduler"
#: How far back the digest looks.
DIGEST_PERIOD = timedelta(days=1)


def schedule_key(model_id: str, trigger_name: str, fire_time: datetime) -> str:
    """The trigger key of a scheduled retrain: the same tick always names the same job."""
    return f"schedule:{model_id}:{trigger_name}:{fire_time.isoformat()}"


def retrain_request(
    schedule: Schedule, fire_time: datetime, base: str, policy: RetrainPolicy
) -> RetrainRequest:
    """The request a retrain schedule's tick makes."""
    assert schedule.model_id is not None and schedule.trigger_name is not None
    key = schedule_key(schedule.model_id, schedule.trigger_name, fire_time)
    guards = policy.for_model(schedule.model_id).guards
    return RetrainRequest(
        job_id=job_id_for(key),
        model_id=schedule.model_id,
        base_version=base,
        trigger=TriggerKind.SCHEDULE,
        trigger_key=key,
        reason=f"schedule {schedule.trigger_name} ({schedule.cron}) at {fire_time.isoformat()}",
        min_examples=max(1, guards.min_examples_per_class),
        requested_by=ACTOR,
        context={
            "schedule": schedule.name,
            "cron": schedule.cron,
            "fire_time": fire_time.isoformat(),
            "policy_trigger": schedule.trigger_name,
        },
    )


def enqueue_retrain(
    engine: Engine, policy: RetrainPolicy, schedule: Schedule, fire_time: datetime, clock: Clock
) -> dict[str, Any]:
    """Store the tick's request; the decision says whether a job was queued and why not."""
    assert schedule.model_id is not None
    with session_scope(engine) as session:
        base = base_version(session, schedule.model_id)
    # An unregistered model's request is refused (and recorded) by store_request itself.
    request = retrain_request(schedule, fire_time, base or "unregistered", policy)
    decision = store_request(engine, policy, request, clock=clock)
    return {
        "status": "done",
        "trigger_key": decision.trigger_key,
        "outcome": decision.outcome.value,
        "job_id": decision.job_id,
        "reason": decision.reason,
    }


def run_retention_now(engine: Engine, settings: Settings, now: datetime) -> dict[str, Any]:
    """Run retention (genmon.privacy), or say it is not installed."""
    try:
        from genmon.privacy.retention import run_retention
    except ModuleNotFoundError as exc:
        if exc.name not in {"genmon.privacy.retention", "genmon.privacy"}:
            raise
        log.warning("scheduler: genmon.privacy.retention is not installed; retention skipped")
        return {"status": "skipped", "reason": "genmon.privacy.retention is not installed"}
    report = run_retention(engine, settings, now=now)
    return {"status": "done", "report": _jsonable(report)}


def _jsonable(value: Any) -> Any:
    """A report as JSON: its ``to_json()``, dataclasses and pydantic models as dicts, the
    rest as is or as text."""
    if callable(getattr(value, "to_json", None)):
        return _jsonable(value.to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def request_reference_refresh(engine: Engine) -> dict[str, Any]:
    """The refresh request: the tick's own row, naming the models it concerns."""
    with session_scope(engine) as session:
        models = sorted(session.exec(select(RegisteredModel.model_id)).all())
    return {"status": "requested", "request": "reference_refresh", "models": models}


def run_effect(
    engine: Engine,
    settings: Settings,
    policy: RetrainPolicy,
    schedule: Schedule,
    fire_time: datetime,
    clock: Clock,
) -> dict[str, Any]:
    """Enqueue what ``schedule``'s tick at ``fire_time`` asks for; what was done."""
    if schedule.action is Action.RETRAIN:
        return enqueue_retrain(engine, policy, schedule, fire_time, clock)
    if schedule.action is Action.RETENTION:
        return run_retention_now(engine, settings, clock())
    if schedule.action is Action.REFERENCE_REFRESH:
        return request_reference_refresh(engine)
    from genmon.scheduler.digest import send_digest

    return send_digest(engine, settings, fire_time - DIGEST_PERIOD, fire_time)


__all__ = [
    "ACTOR",
    "DIGEST_PERIOD",
    "enqueue_retrain",
    "request_reference_refresh",
    "retrain_request",
    "run_effect",
    "run_retention_now",
    "schedule_key",
]
