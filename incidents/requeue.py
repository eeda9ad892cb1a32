"""Requeueing dead notifications (``genmon notify retry``) without ever reordering.

A requeued row keeps its id, its idempotency key and so its place in its chain (the
notifications of one incident for one destination): the head rule of
:mod:`~genmon.incidents.ordering` sends the chain in its original order again. Tries
start from zero and the retry horizon from now (``requeued_at``).

A dead row whose chain has a later row delivered or in flight is not requeued: it would
reach the receiver after that row (an "opened" after its "resolved", leaving a receiver
showing a resolved incident as open for good). It becomes ``superseded`` instead, and
the command says how many. The requeue takes turns with the dispatchers' claims
(:func:`~genmon.incidents.outbox.claims_lock`), so no claim slips in between.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from genmon.incidents._txn import write_transaction
from genmon.incidents.ordering import gone_out_after
from genmon.incidents.outbox import claims_lock
from genmon.schemas.incidents import Notification, NotificationStatus


@dataclass(frozen=True)
class Requeued:
    """What a requeue did."""

    requeued: int
    superseded: int
    """Dead rows left out: a later row of their chain already went out."""


def requeue_dead(engine: Engine, now: datetime, ids: Collection[int] | None = None) -> Requeued:
    """Requeue the dead rows (those of ``ids`` only, when given), in their order."""

    def dead() -> sa.ColumnElement[bool]:
        condition = Notification.status == NotificationStatus.DEAD
        return sa.and_(condition, Notification.id.in_(ids)) if ids is not None else condition

    with write_transaction(engine) as session:
        claims_lock(session)
        superseded = session.exec(
            sa.update(Notification)
            .where(dead())
            .where(gone_out_after(Notification))
            .values(
                status=NotificationStatus.SUPERSEDED,
                last_error="not requeued: a later notification of this incident already "
                "reached this destination, and this one would arrive after it",
            )
            .execution_options(synchronize_session=False)
        )
        requeued = session.exec(
            sa.update(Notification)
            .where(dead())
            .values(
                status=NotificationStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                requeued_at=now,
                lease_until=None,
            )
            .execution_options(synchronize_session=False)
        )
    return Requeued(int(requeued.rowcount or 0), int(superseded.rowcount or 0))
