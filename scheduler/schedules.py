"""What the scheduler runs, and when: schedules, their cron triggers and due ticks.

A :class:`Schedule` is a name, a cron expression (in ``scheduler.timezone``) and what a
tick enqueues. The names are the keys of ``schedule_fire``:

- ``retrain:<model>:<trigger>`` per registered model and ``triggers.schedule`` entry of
  its retrain policy (``<trigger>`` is the entry's ``name``, else ``schedule[<i>]``);
- ``retention`` (``scheduler.retention_cron``);
- ``reference-refresh`` (``scheduler.reference_refresh_cron``, when set);
- ``digest`` (``scheduler.digest_cron``, when it and ``scheduler.digest_destination`` are
  set).

The cron arithmetic is APScheduler's :class:`~apscheduler.triggers.cron.CronTrigger`.
The misfire grace and coalescing are applied here (:func:`due_tick`), against the
scheduler's clock, not by APScheduler's in-memory job store: a tick is due when it is the
*latest* tick in ``(now - misfire_grace_s, now]`` (older ones coalesce into it) and has not
been handled. That rule is also what fires a tick missed while no leader ran, once, when a
leader starts (see :mod:`genmon.scheduler.service`).
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from apscheduler.triggers.cron import CronTrigger

from genmon.exceptions import ConfigurationError
from genmon.retrain.policy import RetrainPolicy
from genmon.schemas.governance import REFERENCE_REFRESH_SCHEDULE
from genmon.settings import SchedulerSettings

RETENTION = "retention"
REFERENCE_REFRESH = REFERENCE_REFRESH_SCHEDULE
DIGEST = "digest"
RETRAIN_PREFIX = "retrain:"


class Action(StrEnum):
    """What a tick enqueues."""

    RETRAIN = "retrain"
    RETENTION = "retention"
    REFERENCE_REFRESH = "reference_refresh"
    DIGEST = "digest"


@dataclass(frozen=True)
class Schedule:
    """One named cron schedule; ``model_id``/``trigger`` for retrain schedules."""

    name: str
    cron: str
    action: Action
    trigger: CronTrigger
    model_id: str | None = None
    trigger_name: str | None = None

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after ``moment`` (UTC)."""
        found = self.trigger.get_next_fire_time(None, moment + timedelta(microseconds=1))
        return None if found is None else found.astimezone(UTC)


def cron_trigger(expression: str, timezone: str, where: str) -> CronTrigger:
    """A crontab expression (``m h dom mon dow``) as a trigger, or a configuration error
    naming ``where`` it came from."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"scheduler.timezone {timezone!r} is not a known time zone ({exc}); use an IANA"
            " name such as UTC or Europe/Berlin"
        ) from exc
    try:
        return CronTrigger.from_crontab(expression, timezone=zone)
    except ValueError as exc:
        raise ConfigurationError(
            f"{where}: {expression!r} is not a cron expression ({exc}); use five fields,"
            " 'minute hour day-of-month month day-of-week', e.g. '0 3 * * *'"
        ) from exc


def retrain_schedule_name(model_id: str, trigger_name: str) -> str:
    return f"{RETRAIN_PREFIX}{model_id}:{trigger_name}"


def build_schedules(
    config: SchedulerSettings, policy: RetrainPolicy, models: Iterable[str]
) -> list[Schedule]:
    """Every schedule now: the fixed ones of ``config`` and the retrain ones of each
    registered model in ``models``, by name."""
    zone = config.timezone
    found: list[Schedule] = []
    fixed = (
        (RETENTION, config.retention_cron, Action.RETENTION, "scheduler.retention_cron"),
        (
            REFERENCE_REFRESH,
            config.reference_refresh_cron,
            Action.REFERENCE_REFRESH,
            "scheduler.reference_refresh_cron",
        ),
        (
            DIGEST,
            config.digest_cron if config.digest_destination else None,
            Action.DIGEST,
            "scheduler.digest_cron",
        ),
    )
    for name, cron, action, where in fixed:
        if cron:
            found.append(Schedule(name, cron, action, cron_trigger(cron, zone, where)))
    for model_id in sorted(set(models)):
        model_policy = policy.for_model(model_id)
        for index, entry in enumerate(model_policy.triggers.schedule):
            trigger_name = entry.name or f"schedule[{index}]"
            where = f"triggers.schedule[{index}] of {model_policy.source}"
            found.append(
                Schedule(
                    retrain_schedule_name(model_id, trigger_name),
                    entry.cron,
                    Action.RETRAIN,
                    cron_trigger(entry.cron, zone, where),
                    model_id=model_id,
                    trigger_name=trigger_name,
                )
            )
    return found


def ticks_between(schedule: Schedule, after: datetime, until: datetime) -> list[datetime]:
    """The ticks in ``(after, until]`` (UTC), oldest first."""
    ticks: list[datetime] = []
    tick = schedule.next_after(after)
    while tick is not None and tick <= until:
        ticks.append(tick)
        tick = schedule.next_after(tick)
    return ticks


def due_tick(
    schedule: Schedule, now: datetime, grace_s: float, handled: datetime | None = None
) -> datetime | None:
    """The tick to fire at ``now``: the latest in ``(now - grace_s, now]`` later than
    ``handled`` (the last tick this leader fired or found fired), else ``None``.

    Looking only from ``handled`` on keeps a steady leader's look cheap; a tick exactly
    ``grace_s`` old is out of grace. A grace of zero fires only a tick at ``now`` itself.
    """
    low = now - timedelta(seconds=grace_s)
    if grace_s == 0:
        low = now - timedelta(microseconds=1)
    if handled is not None:
        low = max(low, handled)
    ticks = ticks_between(schedule, low, now)
    return ticks[-1] if ticks else None


def utc_second(moment: datetime) -> datetime:
    """``moment`` in UTC, to the whole second (a tick's name in ``schedule_fire``)."""
    return moment.astimezone(UTC).replace(microsecond=0)


__all__ = [
    "DIGEST",
    "REFERENCE_REFRESH",
    "RETENTION",
    "Action",
    "Schedule",
    "build_schedules",
    "cron_trigger",
    "due_tick",
    "retrain_schedule_name",
    "ticks_between",
    "utc_second",
]
