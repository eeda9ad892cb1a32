"""The outbox table as the dispatcher's work queue: claim due rows, record their outcomes.

The manager writes ``notification`` rows (:mod:`~genmon.incidents.notifications`); the
dispatcher uses these functions to take them in turn and to settle them. Guarantees:

- **at least once, keyed**: a row is claimed with a conditional UPDATE and a lease, so
  several dispatchers may run; a crash mid-delivery lets the lease expire and the row is
  sent again *with the same* ``Idempotency-Key``, which receivers use to drop the copy;
- **in order per incident and destination**: a row is only eligible when no earlier row
  of the same incident and destination is still pending or in flight, so a resolve never
  overtakes its trigger (a dead row no longer blocks the ones after it);
- **rate limits** (:mod:`~genmon.incidents.rate_limit`): a row whose destination has no
  token left stays pending, unclaimed, and says how long until one is;
- **silences at delivery time**: a page is checked against the silences once more when it
  is due, so a silence added after it was queued still holds it back (the row becomes
  ``suppressed`` with the silence's id; :mod:`~genmon.incidents.silences` has the rules,
  shared with the manager);
- **delivery log**: one ``delivery_attempt`` row per attempt, written with the row's next
  state (:mod:`~genmon.incidents.retry` decides when a failed one is tried again).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from genmon.db import session_scope
from genmon.incidents._txn import write_transaction
from genmon.incidents.delivery import Claimed, DeliveryResult
from genmon.incidents.rate_limit import TokenBucket
from genmon.incidents.retry import retry_in_s
from genmon.incidents.silences import ActiveSilences, follow_up_silenced_by
from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    INCIDENTS_TOPIC_DESTINATION,
    DeliveryAttempt,
    Notification,
    NotificationStatus,
)
from genmon.settings import NotifySettings

log = logging.getLogger(__name__)

_ACTIVE = (NotificationStatus.PENDING, NotificationStatus.DELIVERING)


@dataclass(frozen=True)
class ClaimRound:
    """What one claim took, and what it held back."""

    claimed: list[Claimed]
    rate_wait: float | None
    """Seconds until a rate-limited destination has a token again; None if none was hit."""
    rate_limited: int
    suppressed: int


# --- which rows are due --------------------------------------------------------------------


def _is_head(row: type[Notification]) -> sa.ColumnElement[bool]:
    """No earlier row of the same incident and destination is still pending or in flight."""
    earlier = aliased(Notification)
    blocked = (
        sa.select(earlier.id)
        .where(earlier.incident_id == row.incident_id)
        .where(earlier.destination == row.destination)
        .where(earlier.id < row.id)
        .where(earlier.status.in_(_ACTIVE))
        .exists()
    )
    return ~blocked


def _ready_at(row: type[Notification]) -> sa.ColumnElement[datetime]:
    """When a row may be (re)claimed: its next attempt, or its lease's end if in flight."""
    return sa.case(
        (row.status == NotificationStatus.DELIVERING, row.lease_until),
        else_=row.next_attempt_at,
    )


def _due_query(now: datetime, limit: int) -> sa.Select:
    row = aliased(Notification)
    return (
        select(row)
        .where(row.status.in_(_ACTIVE))
        .where(row.next_attempt_at <= now)
        .where(
            sa.or_(
                row.status == NotificationStatus.PENDING,
                row.lease_until < now,
            )
        )
        .where(_is_head(row))
        .order_by(row.id)
        .limit(limit)
    )


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    """Still waiting for delivery: pending, or in flight under an expired lease."""
    return sa.and_(
        Notification.status.in_(_ACTIVE),
        sa.or_(
            Notification.status == NotificationStatus.PENDING,
            Notification.lease_until < now,
        ),
    )


# --- claiming ------------------------------------------------------------------------------


def claim_due(
    engine: Engine,
    now: datetime,
    lease_until: datetime,
    limit: int,
    buckets: Mapping[str, TokenBucket],
) -> ClaimRound:
    """Lease up to ``limit`` due rows that a token bucket allows and no silence holds back.

    Silenced rows become ``suppressed`` in the same write transaction.
    """
    rate_wait: float | None = None
    rate_limited = suppressed = 0
    # Read without the write lock: a poll that finds nothing must not hold up the
    # agent. The UPDATEs below re-check every condition, so a stale read is harmless.
    with session_scope(engine) as session:
        candidates = session.execute(_due_query(now, limit)).scalars().all()
        silenced = _silenced(session, candidates, now) if candidates else {}
    allowed: list[Notification] = []
    for row in candidates:
        if row.id in silenced:
            continue
        bucket = buckets.get(row.destination)
        if bucket is not None and not bucket.try_take():
            rate_limited += 1
            wait = bucket.wait_s()
            rate_wait = wait if rate_wait is None else min(rate_wait, wait)
            continue
        allowed.append(row)
    if not allowed and not silenced:
        return ClaimRound([], rate_wait, rate_limited, suppressed)
    with write_transaction(engine) as session:
        for row_id, silence_id in silenced.items():
            result = session.execute(
                sa.update(Notification)
                .where(Notification.id == row_id)
                .where(_claimable(now))
                .values(
                    status=NotificationStatus.SUPPRESSED,
                    silenced_by=silence_id,
                    lease_until=None,
                )
                .execution_options(synchronize_session=False)
            )
            suppressed += int(result.rowcount or 0)
        if not allowed:
            return ClaimRound([], rate_wait, rate_limited, suppressed)
        # One conditional UPDATE for the round; RETURNING says which rows are ours
        # (another dispatcher may have claimed some since the SELECT).
        taken = session.execute(
            sa.update(Notification)
            .where(Notification.id.in_([row.id for row in allowed]))
            .where(_claimable(now))
            .values(
                status=NotificationStatus.DELIVERING,
                lease_until=lease_until,
                attempts=Notification.attempts + 1,
            )
            .returning(Notification.id, Notification.attempts)
            .execution_options(synchronize_session=False)
        ).all()
        attempts = {row_id: attempt for row_id, attempt in taken}
        claimed = [
            Claimed(
                id=row.id,
                incident_id=row.incident_id,
                destination=row.destination,
                event=row.event.value,
                idempotency_key=row.idempotency_key,
                payload=row.payload,
                attempt=attempts[row.id],
            )
            for row in allowed
            if row.id in attempts
        ]
    return ClaimRound(claimed, rate_wait, rate_limited, suppressed)


def _silenced(session: Session, rows: Sequence[Notification], now: datetime) -> dict[int, str]:
    """Due pages that a silence holds back now, with its id (rules in silences.py)."""
    pages = [row for row in rows if row.destination != INCIDENTS_TOPIC_DESTINATION]
    if not pages:
        return {}
    active = ActiveSilences.load(session, now)
    silenced: dict[int, str] = {}
    for row in pages:
        if row.event in ANNOUNCEMENTS:
            silence = active.matching(row.payload.get("labels", {}))
            silence_id = silence.id if silence is not None else None
        else:
            silence_id = follow_up_silenced_by(
                session, row.incident_id, row.destination, before_id=row.id
            )
        if silence_id is not None:
            log.info(
                "notification %s to %s suppressed when due: silence %s",
                row.idempotency_key,
                row.destination,
                silence_id,
            )
            silenced[row.id] = silence_id
    return silenced


def next_due_s(engine: Engine, now: datetime, rate_wait: float | None) -> float | None:
    """Seconds until a row is due (or its lease ends), or until a rate limit lets go."""
    row = aliased(Notification)
    with session_scope(engine) as session:
        next_at = session.execute(
            sa.select(sa.func.min(_ready_at(row)))
            .where(row.status.in_(_ACTIVE))
            .where(_is_head(row))
        ).scalar()
    if next_at is None:
        return rate_wait
    if isinstance(next_at, str):  # SQLite returns CASE results untyped
        next_at = datetime.fromisoformat(next_at)
    if next_at.tzinfo is None:
        next_at = next_at.replace(tzinfo=UTC)
    due = max((next_at - now).total_seconds(), 0.0)
    if rate_wait is None:
        return due
    # Rows due now were held back by a rate limit: they wait for a token.
    return rate_wait if due <= 0 else min(due, rate_wait)


# --- recording -----------------------------------------------------------------------------


def record_outcomes(
    engine: Engine,
    outcomes: Sequence[tuple[Claimed, DeliveryResult]],
    now: datetime,
    config: NotifySettings,
    rng: random.Random,
    buckets: Mapping[str, TokenBucket],
) -> list[NotificationStatus]:
    """Write a round's outcomes and delivery log in one transaction; returns the new states."""
    statuses = []
    with write_transaction(engine) as session:
        for item, result in outcomes:
            bucket = buckets.get(item.destination)
            status, values = _next_state(item, result, now, config, rng, bucket)
            statuses.append(status)
            session.exec(
                sa.update(Notification)
                .where(Notification.id == item.id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.add(
                DeliveryAttempt(
                    notification_id=item.id,
                    attempt=item.attempt,
                    outcome="dead" if status is NotificationStatus.DEAD else result.outcome,
                    status_code=result.status_code,
                    error=result.error,
                    duration_ms=result.duration_ms,
                    at=now,
                )
            )
    for (item, result), status in zip(outcomes, statuses, strict=True):
        if status is NotificationStatus.DEAD:
            log.error(
                "notification %s to %s is dead after %d attempts: %s",
                item.idempotency_key,
                item.destination,
                item.attempt,
                result.error,
            )
        elif status is NotificationStatus.PENDING:
            log.warning(
                "notification %s to %s failed (attempt %d), retrying: %s",
                item.idempotency_key,
                item.destination,
                item.attempt,
                result.error,
            )
    return statuses


def _next_state(
    item: Claimed,
    result: DeliveryResult,
    now: datetime,
    config: NotifySettings,
    rng: random.Random,
    bucket: TokenBucket | None,
) -> tuple[NotificationStatus, dict[str, object]]:
    """The row's status and column values after ``result``: delivered, pending again, dead."""
    values: dict[str, object] = {
        "lease_until": None,
        "last_status_code": result.status_code,
        "last_error": result.error,
    }
    if result.outcome == "delivered":
        values.update(status=NotificationStatus.DELIVERED, delivered_at=now)
        return NotificationStatus.DELIVERED, values
    if result.outcome == "retry":
        delay = retry_in_s(item.attempt, result.retry_after_s, config, rng, bucket)
        if delay is not None:
            values.update(
                status=NotificationStatus.PENDING,
                next_attempt_at=now + timedelta(seconds=delay),
            )
            return NotificationStatus.PENDING, values
    values["status"] = NotificationStatus.DEAD
    return NotificationStatus.DEAD, values
