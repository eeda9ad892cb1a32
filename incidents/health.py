"""Destination health: a destination that is down is paused and probed, not burned through.

Kept in table ``destination_state``, shared by every dispatcher (and shown by ``genmon
notify status``):

- **failures**: a delivery that failed because of its destination (a transport error,
  408, 425, 5xx; a 429 only asks to slow down, which the rate limiter and
  ``Retry-After`` handle) counts against it. Any answer from the receiver (a 2xx, or a
  4xx refusal of one notification) shows it is up.
- **pause**: after ``notify.pause_after_failures`` failures in a row the destination is
  paused: its other notifications stay pending and their tries are not used. At
  ``paused_until`` one *probe* goes out (the oldest notification that may go, under the
  usual lease); claiming it moves ``paused_until`` to the lease's end with a
  conditional UPDATE, so there is one probe at a time however many dispatchers run. A
  failed probe pauses the destination again for the backoff of its ``probe_failures``
  (``backoff_initial_s`` doubling up to ``backoff_max_s``, jittered).
- **resume**: an answer ends the pause: the counts are reset, its backlog is coalesced
  for vendors that want it (:func:`~genmon.incidents.ordering.coalesce_queue`) and its
  waiting notifications are due at once, in order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, func, select

from genmon.incidents.delivery import Claimed, DeliveryResult
from genmon.incidents.ordering import coalesce_queue, is_head
from genmon.incidents.retry import THROTTLE_STATUS, backoff_s
from genmon.schemas.incidents import DestinationState, Notification, NotificationStatus
from genmon.settings import NotifySettings


class Verdict(StrEnum):
    """What one delivery says about its destination."""

    ANSWERED = "answered"
    FAILED = "failed"


def verdict(result: DeliveryResult) -> Verdict | None:
    """Whether ``result`` shows the destination up, down, or says nothing about it."""
    if result.outcome == "delivered":
        return Verdict.ANSWERED
    if result.outcome == "retry":
        return None if result.status_code in THROTTLE_STATUS else Verdict.FAILED
    # A refusal is an answer; a row dead without one (destination not configured) is not.
    return Verdict.ANSWERED if result.status_code is not None else None


# --- what the claim reads ------------------------------------------------------------------


def not_paused(destination: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    """The destination of this column is not paused (probes are claimed apart)."""
    paused = (
        sa.select(DestinationState.destination)
        .where(DestinationState.destination == destination)
        .where(DestinationState.paused_until.is_not(None))
        .exists()
    )
    return ~paused


def probes_due(session: Session, now: datetime) -> list[str]:
    """Paused destinations whose next probe may go out now."""
    return list(
        session.exec(
            select(DestinationState.destination)
            .where(DestinationState.paused_until <= now)
            .order_by(DestinationState.destination)
        ).all()
    )


def take_probe(session: Session, destination: str, now: datetime, lease_until: datetime) -> bool:
    """Take ``destination``'s probe token until ``lease_until``; False if another did."""
    result = session.exec(
        sa.update(DestinationState)
        .where(DestinationState.destination == destination)
        .where(DestinationState.paused_until <= now)
        .values(paused_until=lease_until, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def give_back_probe(session: Session, destination: str, now: datetime) -> None:
    """The probe token taken for a row that could not be claimed after all."""
    session.exec(
        sa.update(DestinationState)
        .where(DestinationState.destination == destination)
        .where(DestinationState.paused_until.is_not(None))
        .values(paused_until=now)
        .execution_options(synchronize_session=False)
    )


def next_probe_at(session: Session) -> datetime | None:
    """The earliest probe of a paused destination that has a row ready to send."""
    row = aliased(Notification)
    waiting = (
        sa.select(row.id)
        .where(row.destination == DestinationState.destination)
        .where(row.status == NotificationStatus.PENDING)
        .where(is_head(row))
        .exists()
    )
    return session.exec(
        select(func.min(DestinationState.paused_until))
        .where(DestinationState.paused_until.is_not(None))
        .where(waiting)
    ).one()


# --- what the outcomes write ---------------------------------------------------------------


def record(
    session: Session,
    outcomes: Sequence[tuple[Claimed, DeliveryResult]],
    now: datetime,
    config: NotifySettings,
    rng: random.Random,
    coalescing: Collection[str] = (),
) -> list[str]:
    """Count a round's failures and answers per destination; returns those that resumed.

    Deliveries of one round ran concurrently, so their order says nothing: one answer
    among them shows the destination up.
    """
    answered: set[str] = set()
    failed: dict[str, list[tuple[Claimed, DeliveryResult]]] = defaultdict(list)
    for item, result in outcomes:
        seen = verdict(result)
        if seen is Verdict.ANSWERED:
            answered.add(item.destination)
        elif seen is Verdict.FAILED:
            failed[item.destination].append((item, result))
    resumed = [
        destination
        for destination in sorted(answered)
        if _resume(session, destination, now, destination in coalescing)
    ]
    for destination, failures in sorted(failed.items()):
        if destination not in answered:
            _count_failures(session, destination, failures, now, config, rng)
    return resumed


def _resume(session: Session, destination: str, now: datetime, coalesce: bool) -> bool:
    """End a failing streak or a pause: reset, coalesce the backlog, make it due now."""
    ended = session.exec(
        sa.update(DestinationState)
        .where(DestinationState.destination == destination)
        .where(
            sa.or_(
                DestinationState.consecutive_failures > 0,
                DestinationState.paused_until.is_not(None),
            )
        )
        .values(
            consecutive_failures=0,
            probe_failures=0,
            failing_since=None,
            paused_until=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if not ended.rowcount:
        return False
    if coalesce:
        coalesce_queue(session, destination)
    session.exec(
        sa.update(Notification)
        .where(Notification.destination == destination)
        .where(Notification.status == NotificationStatus.PENDING)
        .where(Notification.next_attempt_at > now)
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return True


def _count_failures(
    session: Session,
    destination: str,
    failures: Sequence[tuple[Claimed, DeliveryResult]],
    now: datetime,
    config: NotifySettings,
    rng: random.Random,
) -> None:
    """Add ``failures`` to the streak; pause at the threshold, or again after a probe."""
    _ensure_row(session, destination, now)
    error = next((result.error for _, result in reversed(failures) if result.error), None)
    count, paused_until, probe_failures = session.exec(
        sa.update(DestinationState)
        .where(DestinationState.destination == destination)
        .values(
            consecutive_failures=DestinationState.consecutive_failures + len(failures),
            failing_since=sa.func.coalesce(DestinationState.failing_since, now),
            last_error=error,
            updated_at=now,
        )
        .returning(
            DestinationState.consecutive_failures,
            DestinationState.paused_until,
            DestinationState.probe_failures,
        )
    ).one()
    if any(item.probe for item, _ in failures) and paused_until is not None:
        probe_failures += 1  # the probe failed: pause again, for longer
    elif paused_until is None and count >= config.pause_after_failures:
        probe_failures = 0  # the streak reached the threshold: pause
    else:
        return  # still under the threshold, or a straggler of a paused destination
    delay = backoff_s(probe_failures + 1, config, rng)
    session.exec(
        sa.update(DestinationState)
        .where(DestinationState.destination == destination)
        .values(paused_until=now + timedelta(seconds=delay), probe_failures=probe_failures)
        .execution_options(synchronize_session=False)
    )


def _ensure_row(session: Session, destination: str, now: datetime) -> None:
    """The destination's state row, created healthy when missing (a concurrent creation
    by another dispatcher is fine)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.exec(
        insert(DestinationState)
        .values(destination=destination, consecutive_failures=0, probe_failures=0, updated_at=now)
        .on_conflict_do_nothing(index_elements=["destination"])
    )


# --- what on-call sees ---------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationStatus:
    """One destination as ``genmon notify status`` shows it."""

    destination: str
    state: str
    """``ok``, ``failing`` (under the pause threshold) or ``paused``."""
    consecutive_failures: int
    failing_since: datetime | None
    next_probe_at: datetime | None
    pending: int
    dead: int
    last_error: str | None


def statuses(session: Session, configured: Collection[str]) -> list[DestinationStatus]:
    """Every configured destination, and every other one that has state or rows."""
    states = {state.destination: state for state in session.exec(select(DestinationState))}
    counts: dict[str, dict[NotificationStatus, int]] = defaultdict(dict)
    for destination, status, count in session.exec(
        select(Notification.destination, Notification.status, func.count())
        .where(Notification.status.in_(_COUNTED))
        .group_by(Notification.destination, Notification.status)
    ):
        counts[destination][status] = count
    names = sorted({*configured, *states, *counts})
    return [_status(name, states.get(name), counts.get(name, {})) for name in names]


_COUNTED = (NotificationStatus.PENDING, NotificationStatus.DELIVERING, NotificationStatus.DEAD)


def _status(
    name: str, state: DestinationState | None, counts: dict[NotificationStatus, int]
) -> DestinationStatus:
    failures = state.consecutive_failures if state else 0
    paused_until = state.paused_until if state else None
    if paused_until is not None:
        label = "paused"
    elif failures:
        label = "failing"
    else:
        label = "ok"
    return DestinationStatus(
        destination=name,
        state=label,
        consecutive_failures=failures,
        failing_since=state.failing_since if state else None,
        next_probe_at=paused_until,
        pending=counts.get(NotificationStatus.PENDING, 0)
        + counts.get(NotificationStatus.DELIVERING, 0),
        dead=counts.get(NotificationStatus.DEAD, 0),
        last_error=state.last_error if state else None,
    )
