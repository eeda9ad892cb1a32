"""What ``genmon schedule list`` shows and what ``genmon schedule fire`` does."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from genmon.exceptions import ConfigurationError
from genmon.retrain.policy import RetrainPolicy
from genmon.scheduler import fires
from genmon.scheduler.lease import current_lease
from genmon.scheduler.schedules import utc_second
from genmon.scheduler.service import current_schedules, fire
from genmon.settings import Settings

#: The holder of a tick fired by hand: ``manual:<user>``.
MANUAL = "manual:"


def describe(
    settings: Settings, engine: Engine, policy: RetrainPolicy, now: datetime
) -> dict[str, Any]:
    """Every schedule with its cron, next run and last fire, and who leads now."""
    last = fires.last_fires(engine)
    lease = current_lease(engine)
    rows = []
    for schedule in current_schedules(settings, engine, policy):
        latest = last.get(schedule.name)
        rows.append(
            {
                "name": schedule.name,
                "cron": schedule.cron,
                "timezone": settings.scheduler.timezone,
                "action": schedule.action.value,
                "model_id": schedule.model_id,
                "next_run": schedule.next_after(now),
                "last_fire": latest.fire_time if latest else None,
                "last_holder": latest.holder if latest else None,
                "last_result": latest.result if latest else None,
            }
        )
    return {
        "enabled": settings.scheduler.enabled,
        "leader": {"holder": lease.holder, "epoch": lease.epoch, "until": lease.expires_at},
        "schedules": rows,
    }


def fire_by_hand(
    settings: Settings, engine: Engine, policy: RetrainPolicy, name: str, actor: str, now: datetime
) -> dict[str, Any]:
    """Enqueue one tick of ``name`` at ``now`` (to the second), recorded with ``actor``."""
    schedules = {s.name: s for s in current_schedules(settings, engine, policy)}
    schedule = schedules.get(name)
    if schedule is None:
        known = ", ".join(sorted(schedules)) or "none"
        raise ConfigurationError(
            f"no schedule named {name!r} (known: {known}); see `genmon schedule list`"
        )
    fire_time = utc_second(now)
    holder = f"{MANUAL}{actor}"
    result = fire(engine, settings, policy, schedule, fire_time, holder=holder, epoch=0)
    if result is None:
        return {"schedule": name, "fire_time": fire_time, "fired": False}
    return {"schedule": name, "fire_time": fire_time, "fired": True, "result": result}


__all__ = ["MANUAL", "describe", "fire_by_hand"]
