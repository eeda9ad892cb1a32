"""The outbox table as the dispatcher's work queue: claim due rows, record their outcomes.

The manager writes ``notification`` rows (:mod:`~genmon.incidents.notifications`); the
dispatcher uses these functions to take them in turn and to settle them. Guarantees:

- **at least once, keyed**: a row is claimed with a conditional UPDATE and a lease, so
  several dispatchers may run; a crash mid-delivery lets the lease expire and the row is
  sent again *with the same* ``Idempotency-Key``, which receivers use to drop the copy;
- **in order per incident and destination** (:mod:`~genmon.incidents.ordering`): the
  claim's UPDATE itself requires that no earlier row of the same incident and
  destination is pending, retrying or in flight, so a resolve never overtakes its
  trigger, not even while the trigger is on the wire from another dispatcher. A row of
  no incident (the daily digest) is a chain of its own: nothing waits for it. Claims
  and requeues take turns (:func:`claims_lock`), so a requeued row cannot slip behind a
  later one being claimed;
- **paused destinations** (:mod:`~genmon.incidents.health`): their rows are not claimed,
  except one probe at a time when the pause says so;
- **rate limits** (:mod:`~genmon.incidents.rate_limit`): a row whose destination has no
  token left stays pending, unclaimed, and says how long until one is;
- **silences at delivery time**: a page is checked against the silences once more when it
  is due, so a silence added after it was queued still holds it back (the row becomes
  ``suppressed`` with the silence's id; :mod:`~genmon.incidents.silences` has the rules,
  shared with the manager);
- **delivery log**: one ``delivery_attempt`` row per attempt, written with the row's next
  state and the destination's health (:mod:`~genmon.incidents.retry` decides when a
  failed one is tried again; past the retry horizon :mod:`~genmon.incidents.expiry`
  makes it dead).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from genmon.db import session_scope
from genmon.incidents import health
from genmon.incidents._txn import write_transaction
from genmon.incidents.delivery import Claimed, DeliveryResult
from genmon.incidents.ordering import UNDELIVERED, is_head
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

#: Key of the PostgreSQL advisory lock that claims and requeues take in turn.
_CLAIMS_LOCK = 0x67656E6D6F6E  # "genmon"


@dataclass(frozen=True)
class ClaimRound:
    """What one claim took, and what it held back."""

    claimed: list[Claimed]
    rate_wait: float | None
    """Seconds until a rate-limited destination has a token again; None if none was hit."""
    rate_limited: int
    suppressed: int


@dataclass(frozen=True)
class DueRows:
    """What a claim read, before its write: rows due, probes, silenced pages."""

    rows: list[Notification]
    probes: list[Notification] = field(default_factory=list)
    """The oldest row that may go of each paused destination whose probe is due."""
    silenced: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settled:
    """What recording a round's outcomes did."""

    statuses: list[NotificationStatus]
    resumed: list[str]
    """Destinations that answered again after failing (their pause is over)."""


def claims_lock(session: Session) -> None:
    """Take turns with every other claim and requeue, on PostgreSQL, until the commit.

    A statement sees what was committed when it started: without turns, a requeue of an
    earlier row and the claim of a later one could each miss the other. SQLite has one
    writer at a time already.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(_CLAIMS_LOCK)))


# --- which rows are due --------------------------------------------------------------------


def _claimable(row: type[Notification], now: datetime) -> sa.ColumnElement[bool]:
    """Still waiting for delivery: pending, or in flight under an expired lease."""
    return sa.and_(
        row.status.in_(UNDELIVERED),
        sa.or_(row.status == NotificationStatus.PENDING, row.lease_until < now),
    )


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
        .where(_claimable(row, now))
        .where(row.next_attempt_at <= now)
        .where(is_head(row))
        .where(health.not_paused(row.destination))
        .order_by(row.id)
        .limit(limit)
    )


def _probe_query(destination: str, now: datetime) -> sa.Select:
    """The oldest row of a paused destination that may go; its own backoff is moot."""
    row = aliased(Notification)
    return (
        select(row)
        .where(row.destination == destination)
        .where(_claimable(row, now))
        .where(is_head(row))
        .order_by(row.id)
        .limit(1)
    )


def read_due(engine: Engine, now: datetime, limit: int) -> DueRows:
    """Read what may be claimed at ``now``, without the write lock.

    A poll that finds nothing must not hold up the agent; :func:`take_due` re-checks every
    condition in its UPDATEs, so a stale read is harmless.
    """
    with session_scope(engine) as session:
        rows = list(session.execute(_due_query(now, limit)).scalars().all())
        probes = []
        for destination in health.probes_due(session, now):
            probe = session.execute(_probe_query(destination, now)).scalars().first()
            if probe is not None:
                probes.append(probe)
        due = [*rows, *probes]
        silenced = _silenced(session, due, now) if due else {}
    return DueRows(rows, probes, silenced)


# --- claiming ------------------------------------------------------------------------------


def claim_due(
    engine: Engine,
    now: datetime,
    lease_until: datetime,
    limit: int,
    buckets: Mapping[str, TokenBucket],
) -> ClaimRound:
    """Lease up to ``limit`` due rows that a token bucket allows and no silence holds back,
    plus the probe of each paused destination whose probe is due.

    Silenced rows become ``suppressed`` in the same write transaction.
    """
    return take_due(engine, read_due(engine, now, limit), now, lease_until, buckets)


def take_due(
    engine: Engine,
    due: DueRows,
    now: datetime,
    lease_until: datetime,
    buckets: Mapping[str, TokenBucket],
) -> ClaimRound:
    """Claim what :func:`read_due` found, re-checking it all in conditional UPDATEs."""
    probe_ids = {row.id for row in due.probes}
    # A destination paused between the two reads may have a row in both: it is a probe.
    rows = [row for row in due.rows if row.id not in probe_ids]
    unsilenced = [row for row in [*rows, *due.probes] if row.id not in due.silenced]
    allowed, rate_wait, rate_limited = _rate_allowed(unsilenced, buckets)
    if not allowed and not due.silenced:
        return ClaimRound([], rate_wait, rate_limited, 0)
    with write_transaction(engine) as session:
        claims_lock(session)
        suppressed = _suppress(session, due.silenced, now)
        regular = [row.id for row in allowed if row.id not in probe_ids]
        attempts = _take(session, regular, now, lease_until, probe=False)
        for row in allowed:
            if row.id in probe_ids:
                attempts.update(_take_probe(session, row, now, lease_until))
    claimed = [
        _claimed(row, attempts[row.id], row.id in probe_ids)
        for row in allowed
        if row.id in attempts
    ]
    return ClaimRound(claimed, rate_wait, rate_limited, suppressed)


def _rate_allowed(
    rows: Sequence[Notification], buckets: Mapping[str, TokenBucket]
) -> tuple[list[Notification], float | None, int]:
    """The rows whose destination has a token, the shortest wait for one, how many wait."""
    allowed: list[Notification] = []
    rate_wait: float | None = None
    rate_limited = 0
    for row in rows:
        bucket = buckets.get(row.destination)
        if bucket is not None and not bucket.try_take():
            rate_limited += 1
            wait = bucket.wait_s()
            rate_wait = wait if rate_wait is None else min(rate_wait, wait)
            continue
        allowed.append(row)
    return allowed, rate_wait, rate_limited


def _take(
    session: Session,
    ids: Sequence[int | None],
    now: datetime,
    lease_until: datetime,
    *,
    probe: bool,
) -> dict[int, int]:
    """Lease the rows of ``ids`` that are still claimable heads; returns id -> attempt.

    One conditional UPDATE; RETURNING says which rows are ours (another dispatcher may
    have claimed some since the read, or settled an earlier row of their chain).
    """
    if not ids:
        return {}
    statement = (
        sa.update(Notification)
        .where(Notification.id.in_(ids))
        .where(_claimable(Notification, now))
        .where(is_head(Notification))
    )
    if not probe:
        statement = statement.where(health.not_paused(Notification.destination))
    taken = session.execute(
        statement.values(
            status=NotificationStatus.DELIVERING,
            lease_until=lease_until,
            attempts=Notification.attempts + 1,
        )
        .returning(Notification.id, Notification.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return {row_id: attempt for row_id, attempt in taken}


def _take_probe(
    session: Session, row: Notification, now: datetime, lease_until: datetime
) -> dict[int, int]:
    """Take the destination's probe token, then the row; the token goes back if the row
    is gone."""
    if not health.take_probe(session, row.destination, now, lease_until):
        return {}
    taken = _take(session, [row.id], now, lease_until, probe=True)
    if not taken:
        health.give_back_probe(session, row.destination, now)
    return taken


def _claimed(row: Notification, attempt: int, probe: bool) -> Claimed:
    assert row.id is not None
    return Claimed(
        id=row.id,
        incident_id=row.incident_id,
        destination=row.destination,
        event=row.event.value,
        idempotency_key=row.idempotency_key,
        payload=row.payload,
        attempt=attempt,
        probe=probe,
    )


def _suppress(session: Session, silenced: Mapping[int, str], now: datetime) -> int:
    """Mark the rows a silence holds back when due; returns how many were still claimable."""
    suppressed = 0
    for row_id, silence_id in silenced.items():
        result = session.exec(
            sa.update(Notification)
            .where(Notification.id == row_id)
            .where(_claimable(Notification, now))
            .values(
                status=NotificationStatus.SUPPRESSED,
                silenced_by=silence_id,
                lease_until=None,
            )
            .execution_options(synchronize_session=False)
        )
        suppressed += int(result.rowcount or 0)
    return suppressed


def _silenced(session: Session, rows: Sequence[Notification], now: datetime) -> dict[int, str]:
    """Due pages that a silence holds back now, with its id (rules in silences.py)."""
    # The digest (no incident) has no labels for a silence to match: it always goes.
    pages = [
        row
        for row in rows
        if row.destination != INCIDENTS_TOPIC_DESTINATION and row.incident_id is not None
    ]
    if not pages:
        return {}
    active = ActiveSilences.load(session, now)
    silenced: dict[int, str] = {}
    for row in pages:
        assert row.id is not None
        if row.event in ANNOUNCEMENTS:
            silence = active.matching(row.payload.get("labels", {}))
            silence_id = silence.id if silence is not None else None
        else:
            assert row.incident_id is not None
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
    """Seconds until a row is due (or its lease ends), a paused destination's probe is,
    or a rate limit lets go."""
    row = aliased(Notification)
    with session_scope(engine) as session:
        next_at = session.execute(
            sa.select(sa.func.min(_ready_at(row)))
            .where(row.status.in_(UNDELIVERED))
            .where(is_head(row))
            # A paused destination's rows wait for its probe, but a lease ends anyway.
            .where(
                sa.or_(
                    row.status == NotificationStatus.DELIVERING,
                    health.not_paused(row.destination),
                )
            )
        ).scalar()
        probe_at = health.next_probe_at(session)
    times = [_aware(value) for value in (next_at, probe_at) if value is not None]
    if not times:
        return rate_wait
    due = max((min(times) - now).total_seconds(), 0.0)
    if rate_wait is None:
        return due
    # Rows due now were held back by a rate limit: they wait for a token.
    return rate_wait if due <= 0 else min(due, rate_wait)


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite returns CASE results untyped
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --- recording -----------------------------------------------------------------------------


def record_outcomes(
    engine: Engine,
    outcomes: Sequence[tuple[Claimed, DeliveryResult]],
    now: datetime,
    config: NotifySettings,
    rng: random.Random,
    buckets: Mapping[str, TokenBucket],
    coalescing: Collection[str] = (),
) -> Settled:
    """Write a round's outcomes, delivery log and destination health in one transaction.

    ``coalescing`` names the destinations whose backlog is coalesced when they come back
    (:mod:`~genmon.incidents.ordering`).
    """
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
            if status is NotificationStatus.DEAD and result.outcome == "retry":
                kill_chain_after(
                    session,
                    item.id,
                    f"notification {item.id} before it in this chain is dead after "
                    f"{item.attempt} tries (notify.max_attempts)",
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
        resumed = health.record(session, outcomes, now, config, rng, coalescing)
    _log_outcomes(outcomes, statuses)
    for destination in resumed:
        log.warning("destination %s answers again: its queued notifications go out", destination)
    return Settled(statuses, resumed)


def kill_chain_after(session: Session, notification_id: int, reason: str) -> int:
    """Make dead the rows still queued after ``notification_id`` in its chain: sent
    without it they would tell the receiver a story with its start missing (a resolve
    without its trigger). ``genmon notify retry`` requeues them together, in order."""
    head = aliased(Notification)
    dead_head = (
        sa.select(head.id)
        .where(head.id == notification_id)
        .where(head.incident_id == Notification.incident_id)
        .where(head.destination == Notification.destination)
        .exists()
    )
    result = session.exec(
        sa.update(Notification)
        .where(Notification.id > notification_id)
        .where(Notification.status == NotificationStatus.PENDING)
        .where(dead_head)
        .values(status=NotificationStatus.DEAD, lease_until=None, last_error=reason)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def _log_outcomes(
    outcomes: Sequence[tuple[Claimed, DeliveryResult]], statuses: Sequence[NotificationStatus]
) -> None:
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
                "notification %s to %s failed (attempt %d%s), retrying: %s",
                item.idempotency_key,
                item.destination,
                item.attempt,
                ", probe" if item.probe else "",
                result.error,
            )


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
        delay = retry_in_s(
            item.attempt, result.retry_after_s, config, rng, bucket, capped=not item.probe
        )
        if delay is not None:
            values.update(
                status=NotificationStatus.PENDING,
                next_attempt_at=now + timedelta(seconds=delay),
            )
            return NotificationStatus.PENDING, values
    values["status"] = NotificationStatus.DEAD
    return NotificationStatus.DEAD, values
