"""Claiming a tick: one ``schedule_fire`` row per (schedule, fire time), inserted first.

The unique key on (schedule, fire_time) is what makes a tick's effect happen once: two
leaders (one paused past its lease and resumed, or clocks that disagree) both try to
insert the row, and the one whose insert fails with the unique violation does nothing.
The row then records what the tick did (``result``), for ``genmon schedule list``.

**Exactly once across a crash.** The claim comes *before* the effect, in its own
transaction: the effects are written by functions of other rooms that open their own
transactions (:func:`genmon.retrain.triggers.store_request` takes an engine), so the two
cannot share one. Instead every effect is idempotent by its own key (a retrain's trigger
key is unique, the digest's notification has its idempotency key, retention deletes what
is due, a reference refresh is the row itself), and a tick whose leader died between
the claim and the recorded result is *stranded*: its row still says ``claimed``. The
leader re-runs stranded ticks at its first tick after each lease poll
(:func:`stranded`, :func:`reclaim`): those of an earlier term (their leader's lease is
gone, since this one leads), its own (a tick runs one at a time, so none of its own is
in flight then), and those fired by hand once ``scheduler.lease_s`` old. Re-running an
effect that had in fact happened finds it done by its key. :func:`reclaim` moves the row
to the new term first, and :func:`record` writes only for the row's holder, so a former
leader that resumes late cannot overwrite what the new one recorded.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from genmon.db import session_scope
from genmon.schemas.governance import ScheduleFire

log = logging.getLogger(__name__)

CLAIMED = "claimed"


def claim(
    engine: Engine, schedule: str, fire_time: datetime, holder: str, epoch: int
) -> int | None:
    """Insert the tick's row; its id, or ``None`` when the tick was claimed already."""
    row = ScheduleFire(
        schedule=schedule,
        fire_time=fire_time,
        holder=holder,
        epoch=epoch,
        result={"status": CLAIMED},
    )
    try:
        with session_scope(engine) as session:
            session.add(row)
            session.flush()
            fire_id = row.id
    except IntegrityError:
        log.info("scheduler: %s at %s was fired already", schedule, fire_time.isoformat())
        return None
    return fire_id


def was_fired(engine: Engine, schedule: str, fire_time: datetime) -> bool:
    with Session(engine) as session:
        query = select(func.count()).where(
            ScheduleFire.schedule == schedule, ScheduleFire.fire_time == fire_time
        )
        return bool(session.exec(query).one())


def record(
    engine: Engine,
    fire_id: int,
    result: dict[str, Any],
    holder: str | None = None,
    epoch: int | None = None,
) -> bool:
    """What the tick did, on its row (only while ``holder`` in ``epoch`` holds the row,
    when given: a tick re-run by a newer leader is that leader's to record)."""
    statement = sa.update(ScheduleFire).where(col(ScheduleFire.id) == fire_id)
    if holder is not None:
        statement = statement.where(col(ScheduleFire.holder) == holder)
    if epoch is not None:
        statement = statement.where(col(ScheduleFire.epoch) == epoch)
    with session_scope(engine) as session:
        done = session.exec(statement.values(result=result))
    if not done.rowcount:
        log.warning("scheduler: tick %d was taken over by a newer leader; not recorded", fire_id)
    return bool(done.rowcount)


def _claimed() -> sa.ColumnElement[bool]:
    return col(ScheduleFire.result)["status"].as_string() == CLAIMED


def stranded(engine: Engine, manual_before: datetime) -> list[ScheduleFire]:
    """Ticks left ``claimed`` that the leader re-runs, oldest first: every one of a
    leader (the caller leads, and runs none of its own now), and those fired by hand
    (epoch 0) before ``manual_before`` (a ``genmon schedule fire`` may still be at work)."""
    query = (
        select(ScheduleFire)
        .where(_claimed())
        .where(sa.or_(col(ScheduleFire.epoch) > 0, col(ScheduleFire.fired_at) < manual_before))
        .order_by(col(ScheduleFire.fire_time), col(ScheduleFire.id))
    )
    with Session(engine) as session:
        return list(session.exec(query).all())


def reclaim(engine: Engine, row: ScheduleFire, holder: str, epoch: int) -> bool:
    """Move a stranded tick to ``holder``'s term if it is still as read; whether it did
    (another leader, or the late original, may have settled it since)."""
    with session_scope(engine) as session:
        done = session.exec(
            sa.update(ScheduleFire)
            .where(col(ScheduleFire.id) == row.id)
            .where(col(ScheduleFire.holder) == row.holder)
            .where(col(ScheduleFire.epoch) == row.epoch)
            .where(_claimed())
            .values(holder=holder, epoch=epoch)
        )
    return bool(done.rowcount)


def last_fires(engine: Engine) -> dict[str, ScheduleFire]:
    """The latest row of every schedule that ever fired, by schedule name."""
    latest = (
        select(ScheduleFire.schedule, func.max(ScheduleFire.fire_time).label("at"))
        .group_by(col(ScheduleFire.schedule))
        .subquery()
    )
    query = select(ScheduleFire).join(
        latest,
        sa.and_(
            col(ScheduleFire.schedule) == latest.c.schedule,
            col(ScheduleFire.fire_time) == latest.c.at,
        ),
    )
    with Session(engine) as session:
        return {row.schedule: row for row in session.exec(query).all()}


def fires_of(engine: Engine, schedule: str) -> list[ScheduleFire]:
    """Every row of ``schedule``, oldest tick first."""
    with Session(engine) as session:
        query = (
            select(ScheduleFire)
            .where(ScheduleFire.schedule == schedule)
            .order_by(col(ScheduleFire.fire_time))
        )
        return list(session.exec(query).all())


__all__ = [
    "CLAIMED",
    "claim",
    "fires_of",
    "last_fires",
    "reclaim",
    "record",
    "stranded",
    "was_fired",
]
