"""Past the retry horizon: dead notifications, and an incident about their destination.

A notification not delivered within ``notify.retry_horizon_s`` (6 h by default) of being
queued, or requeued by ``genmon notify retry``, is dead, and so is every row still queued
after it for the same incident and destination: a receiver never gets a resolve whose
trigger died. ``genmon notify retry --all-dead`` requeues them together, in their
order. The dispatcher sweeps once per poll interval (:func:`expire_undelivered`); a
sweep that finds nothing costs one read.

Each destination that lost notifications this way gets an incident of its own, opened
in the same transaction: model ``genmon``, detector ``notify``, signal
``destination_unreachable``, segment the destination's name, severity ``error``, titled
"destination X unreachable for 6 h, N pages undelivered". It is paged through the routes
to every destination *but* X (where the routes name no other, to every other configured
destination; with none, it is only recorded), and resolves itself when X answers again
(:func:`resolve_unreachable`). Further losses while it is open update it quietly.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from genmon.db import session_scope
from genmon.incidents._txn import write_transaction
from genmon.incidents.exceptions import IncidentError
from genmon.incidents.grouping import open_incident
from genmon.incidents.outbox import kill_chain_after
from genmon.schemas.events import Finding, FindingKind, Severity
from genmon.schemas.incidents import DestinationState, Notification, NotificationStatus
from genmon.settings import NotifySettings

log = logging.getLogger(__name__)

MODEL = "genmon"
DETECTOR = "notify"
SIGNAL = "destination_unreachable"
_RACE_RETRIES = 3


class FindingSink(Protocol):
    """Applies a finding in the caller's transaction (an IncidentManager does)."""

    def apply_in(self, session: Session, finding: Finding) -> object: ...


class Resolver(Protocol):
    def resolve(self, incident_id: str, actor: str, reason: str = "") -> object: ...


def _started(row: type[Notification]) -> sa.ColumnElement[datetime]:
    """When a row's retry horizon began: its requeue, else its queueing."""
    return sa.func.coalesce(row.requeued_at, row.created_at)


def _expired(cutoff: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        Notification.status == NotificationStatus.PENDING, _started(Notification) <= cutoff
    )


def expire_undelivered(
    engine: Engine,
    now: datetime,
    config: NotifySettings,
    sink_for: Callable[[str], FindingSink],
) -> int:
    """Make dead what the horizon has passed, and raise each destination's incident
    through ``sink_for(destination)``, in one transaction; returns how many rows died."""
    cutoff = now - timedelta(seconds=config.retry_horizon_s)
    with session_scope(engine) as session:
        if session.exec(select(Notification.id).where(_expired(cutoff)).limit(1)).first() is None:
            return 0
    lost = _expire_and_raise(engine, now, cutoff, config, sink_for)
    for destination, count in sorted(lost.items()):
        log.error(
            "%d notifications to %s undelivered after %s: dead; requeue them with "
            "`genmon notify retry --all-dead` once it is back",
            count,
            destination,
            _duration(config.retry_horizon_s),
        )
    return sum(lost.values())


def _expire_and_raise(
    engine: Engine,
    now: datetime,
    cutoff: datetime,
    config: NotifySettings,
    sink_for: Callable[[str], FindingSink],
) -> Counter[str]:
    """The sweep's transaction, tried again when another dispatcher opened the same
    destination's incident first (the retry sees it)."""
    for attempt in range(1, _RACE_RETRIES + 1):
        try:
            with write_transaction(engine) as session:
                lost = _expire(session, now, cutoff, config.retry_horizon_s)
                for destination in sorted(lost):
                    finding = unreachable_finding(session, destination, now, config)
                    sink_for(destination).apply_in(session, finding)
            return lost
        except IntegrityError:
            log.debug("retry horizon sweep raced another dispatcher (%d)", attempt)
    log.warning("retry horizon sweep lost %d races in a row; the next one tries again", attempt)
    return Counter()


def _expire(session: Session, now: datetime, cutoff: datetime, horizon_s: float) -> Counter[str]:
    """Dead rows past the horizon, then the rows queued after them; counts per destination."""
    reason = sa.literal(f"undelivered after {_duration(horizon_s)}; last error: ") + (
        sa.func.coalesce(Notification.last_error, "none (its destination was paused)")
    )
    expired = session.exec(
        sa.update(Notification)
        .where(_expired(cutoff))
        .values(status=NotificationStatus.DEAD, lease_until=None, last_error=reason)
        .returning(Notification.id, Notification.incident_id, Notification.destination)
        .execution_options(synchronize_session=False)
    ).all()
    lost: Counter[str] = Counter()
    first_of_chain: dict[tuple[str, str], int] = {}
    for row_id, incident_id, destination in expired:
        lost[destination] += 1
        if incident_id is None:  # the digest: a chain of its own, nothing queued after it
            continue
        chain = (incident_id, destination)
        first_of_chain[chain] = min(row_id, first_of_chain.get(chain, row_id))
    for (_, destination), row_id in sorted(first_of_chain.items()):
        lost[destination] += kill_chain_after(
            session,
            row_id,
            f"notification {row_id} before it in this chain was undelivered after "
            f"{_duration(horizon_s)}",
        )
    return lost


def unreachable_fingerprint(destination: str) -> str:
    """The fingerprint of ``destination``'s unreachable incident."""
    return _finding(destination, 0.0, 1.0, "", {}).fingerprint


def unreachable_finding(
    session: Session, destination: str, now: datetime, config: NotifySettings
) -> Finding:
    """The finding that opens (or updates) ``destination``'s unreachable incident."""
    state = session.get(DestinationState, destination)
    since = state.failing_since if state is not None else None
    dead = _dead_pages(session, destination)
    down_s = (now - since).total_seconds() if since is not None else config.retry_horizon_s
    title = (
        f"destination {destination} unreachable for {_duration(down_s)}, {dead} pages undelivered"
    )
    evidence = {
        "destination": destination,
        "undelivered": dead,
        "failing_since": since.isoformat() if since is not None else None,
        "last_error": state.last_error if state is not None else None,
        "retry_horizon_s": config.retry_horizon_s,
        "next_step": "fix the destination, then `genmon notify retry --all-dead`",
    }
    finding = _finding(destination, down_s / 3600, config.retry_horizon_s / 3600, title, evidence)
    return finding.model_copy(
        update={"window_start": now - timedelta(seconds=down_s), "window_end": now}
    )


def _finding(
    destination: str, score: float, threshold: float, title: str, evidence: dict[str, object]
) -> Finding:
    return Finding(
        model_id=MODEL,
        detector=DETECTOR,
        kind=FindingKind.ANOMALY,
        signal=SIGNAL,
        segment=destination,
        score=score,
        threshold=threshold,
        detected=True,
        severity=Severity.ERROR,
        title=title or None,
        evidence=evidence,
    )


def resolve_unreachable(engine: Engine, resolver: Resolver, destination: str) -> bool:
    """Resolve ``destination``'s unreachable incident, if one is open: it answers again."""
    with session_scope(engine) as session:
        incident = open_incident(session, unreachable_fingerprint(destination))
        incident_id = incident.id if incident is not None else None
        dead = _dead_pages(session, destination)
    if incident_id is None:
        return False
    reason = f"destination {destination} answers again"
    if dead:
        reason += f"; {dead} dead pages wait for `genmon notify retry --all-dead`"
    try:
        resolver.resolve(incident_id, actor="genmon", reason=reason)
    except IncidentError:
        return False  # resolved meanwhile, by someone or another dispatcher
    return True


def _duration(seconds: float) -> str:
    """``6 h``, ``90 min``, ``45 s``: how long, for a title."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _dead_pages(session: Session, destination: str) -> int:
    """How many of ``destination``'s pages are dead (the unreachable incident's count)."""
    dead: int = session.exec(
        select(func.count())
        .select_from(Notification)
        .where(Notification.destination == destination)
        .where(Notification.status == NotificationStatus.DEAD)
    ).one()
    return dead
