"""Order per incident and destination: what may go now, and what a later page replaces.

A *chain* is the notifications of one incident for one destination, in the order the
manager queued them (their ids). A row of no incident (the daily digest: ``incident_id``
null) is a chain of its own, since SQL's ``NULL = NULL`` is not true: it waits for no
row and no row waits for it. Three rules keep every receiver's view in that order:

- **the head rule**: a row may be claimed only while no earlier row of its chain is
  undelivered: pending (due, or waiting for a retry) or in flight (claimed by any
  dispatcher, not yet settled). :func:`is_head` is checked by the claim's conditional
  UPDATE itself, not only by the read before it, so a stale read or a second dispatcher
  cannot send a resolve while its trigger is still on the wire. Dead, suppressed and
  superseded rows do not block: they are settled.
- **coalescing per vendor**: when a destination comes back from an outage with several
  transitions of one chain queued, a row that a later queued row makes pointless is
  *superseded* instead of sent (:func:`coalesce_queue`); a healthy destination gets
  every transition, and requeued dead rows go in order. Triggers and resolves always
  go, in order: an "opened" the receiver never got goes first, so PagerDuty (whose
  ``resolve`` needs a ``trigger`` with the same ``dedup_key`` before it) and
  Alertmanager receivers see the alert fire, then resolve. For those two
  (:data:`COALESCING_TYPES`), an update is superseded by a later update, trigger or
  resolve (each carries the whole incident), and an acknowledge by a later resolve or
  trigger (:func:`supersedes`). Slack is a message log people read, and genmon's
  webhook promises every transition with its ``sequence``: nothing of theirs is
  superseded.
- **requeueing never reorders**: a dead row whose chain has a later row delivered or in
  flight would reach the receiver after it (an "opened" after its "resolved"); it is
  superseded instead of requeued (:func:`gone_out_after`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import aliased
from sqlmodel import Session

from genmon.schemas.incidents import Notification, NotificationEvent, NotificationStatus

#: Statuses of a row that still has to reach its destination; they block later rows.
UNDELIVERED = (NotificationStatus.PENDING, NotificationStatus.DELIVERING)
#: Destination types whose queued transitions are coalesced (see the module's docstring).
COALESCING_TYPES = frozenset({"pagerduty", "alertmanager"})

_SUPERSEDED_BY: dict[NotificationEvent, frozenset[NotificationEvent]] = {
    NotificationEvent.UPDATE: frozenset(
        {NotificationEvent.UPDATE, NotificationEvent.TRIGGER, NotificationEvent.RESOLVE}
    ),
    NotificationEvent.ACKNOWLEDGE: frozenset(
        {NotificationEvent.RESOLVE, NotificationEvent.TRIGGER}
    ),
}


def supersedes(earlier: NotificationEvent, later: NotificationEvent) -> bool:
    """Whether a queued ``later`` row makes ``earlier`` pointless, for a coalescing vendor."""
    return later in _SUPERSEDED_BY.get(earlier, frozenset())


def _same_chain(row: type[Notification], other: type[Notification]) -> sa.ColumnElement[bool]:
    return sa.and_(other.incident_id == row.incident_id, other.destination == row.destination)


def is_head(row: type[Notification]) -> sa.ColumnElement[bool]:
    """No earlier row of the same incident and destination is pending or in flight."""
    earlier = aliased(Notification)
    blocked = (
        sa.select(earlier.id)
        .where(_same_chain(row, earlier))
        .where(earlier.id < row.id)
        .where(earlier.status.in_(UNDELIVERED))
        .exists()
    )
    return ~blocked


def gone_out_after(row: type[Notification]) -> sa.ColumnElement[bool]:
    """A later row of the same chain was delivered or is in flight: ``row`` would overtake
    nothing any more, it would arrive after it."""
    later = aliased(Notification)
    return (
        sa.select(later.id)
        .where(_same_chain(row, later))
        .where(later.id > row.id)
        .where(later.status.in_((NotificationStatus.DELIVERED, NotificationStatus.DELIVERING)))
        .exists()
    )


def coalesce_queue(session: Session, destination: str) -> int:
    """Supersede the queued rows of ``destination`` that a later queued row of their chain
    makes pointless (the destination's type must coalesce); returns how many.

    Run when a destination comes back from an outage, before its backlog goes out.
    """
    later = aliased(Notification)
    superseded = 0
    for earlier_event, later_events in _SUPERSEDED_BY.items():
        replaced = (
            sa.select(later.id)
            .where(_same_chain(Notification, later))
            .where(later.id > Notification.id)
            .where(later.status == NotificationStatus.PENDING)
            .where(later.event.in_(later_events))
            .exists()
        )
        result = session.exec(
            sa.update(Notification)
            .where(Notification.destination == destination)
            .where(Notification.status == NotificationStatus.PENDING)
            .where(Notification.event == earlier_event)
            .where(replaced)
            .values(
                status=NotificationStatus.SUPERSEDED,
                last_error=(
                    f"superseded: a later {'/'.join(sorted(e.value for e in later_events))} "
                    f"of this incident was queued while {destination} was down"
                ),
            )
            .execution_options(synchronize_session=False)
        )
        superseded += int(result.rowcount or 0)
    return superseded
