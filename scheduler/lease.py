"""The scheduler's leader lease: one row of ``scheduler_lease``, on the database's clock.

Every process that may run the scheduler calls :meth:`LeaderLease.hold` every
``lease_s / 3``; one transaction reads the row and

- inserts it when there is none (the first process leads, epoch 1);
- renews it when this process holds it and it has not lapsed (``expires_at`` moves to the
  database's now + ``lease_s``);
- takes it over when it lapsed, whoever held it: a new term, so ``epoch`` goes up (a
  former leader's late write names an old epoch and can be recognised);
- leaves it alone otherwise: another process leads, this one stands by.

Times are set and compared on the *database* clock (:func:`genmon.retrain.queue.db_now`,
as the retrain queue's leases are), never a process's, so machines with skewed clocks
still agree on who leads. On PostgreSQL the row is locked (``FOR UPDATE``) and two first
inserts race on the primary key (the loser stands by); on SQLite one writer at a time
holds the write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError, ProgrammingError

from genmon.db import safe_url
from genmon.exceptions import ConfigurationError, DatabaseError
from genmon.retrain.queue import db_now
from genmon.schemas.governance import SchedulerLease

log = logging.getLogger(__name__)

LEASES = cast(sa.Table, SchedulerLease.__table__)
#: The one lease's name (a row per name would allow several independent schedulers).
LEASE_NAME = "scheduler"


@dataclass(frozen=True)
class LeaseState:
    """Who leads, in which term, until when (database clock); ``leader``: this process."""

    holder: str | None
    epoch: int
    expires_at: datetime | None
    leader: bool


@contextmanager
def _write(engine: Engine) -> Iterator[Connection]:
    """One write transaction (SQLite: the write lock first, so a read never fails to
    upgrade halfway); database failures become a :class:`DatabaseError` saying what to run."""
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            conn.commit()
    except (OperationalError, ProgrammingError, InternalError) as exc:
        reason = " ".join(str(getattr(exc, "orig", exc)).split())
        raise DatabaseError(
            f"scheduler lease on {safe_url(engine.url)} failed: {reason}; check that the "
            "database is running (`genmon infra up --postgres`) and migrated "
            "(`genmon db upgrade`)"
        ) from exc


class LeaderLease:
    """One process's handle on the scheduler lease; ``holder`` names it in the row."""

    def __init__(self, engine: Engine, holder: str, lease_s: float, name: str = LEASE_NAME) -> None:
        if lease_s <= 0:
            raise ConfigurationError(
                f"scheduler.lease_s must be positive, got {lease_s}; set scheduler.lease_s"
            )
        self.engine, self.holder, self.lease_s, self.name = engine, holder, lease_s, name

    def hold(self) -> LeaseState:
        """Acquire, renew or take over the lease if this process may; the state after."""
        try:
            with _write(self.engine) as conn:
                return self._hold(conn)
        except IntegrityError:  # a twin inserted the first row at the same time
            return self.current()

    def _hold(self, conn: Connection) -> LeaseState:
        now = db_now(conn)
        expires = now + timedelta(seconds=self.lease_s)
        query = sa.select(LEASES).where(LEASES.c.name == self.name)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            values = {"holder": self.holder, "epoch": 1, "acquired_at": now, "expires_at": expires}
            conn.execute(sa.insert(LEASES).values(name=self.name, **values))
            log.info("scheduler: %s leads (epoch 1)", self.holder)
            return LeaseState(self.holder, 1, expires, True)
        if row.holder == self.holder and row.expires_at > now:
            conn.execute(
                sa.update(LEASES)
                .where(LEASES.c.name == self.name, LEASES.c.epoch == row.epoch)
                .values(expires_at=expires)
            )
            return LeaseState(self.holder, row.epoch, expires, True)
        if row.expires_at <= now:
            epoch = row.epoch + 1
            conn.execute(
                sa.update(LEASES)
                .where(LEASES.c.name == self.name, LEASES.c.epoch == row.epoch)
                .values(holder=self.holder, epoch=epoch, acquired_at=now, expires_at=expires)
            )
            log.info(
                "scheduler: %s leads (epoch %d) after the lease of %s lapsed",
                self.holder,
                epoch,
                row.holder,
            )
            return LeaseState(self.holder, epoch, expires, True)
        return LeaseState(row.holder, row.epoch, row.expires_at, False)

    def release(self) -> bool:
        """Let the lease lapse now if this process holds it (a graceful stop), so a standby
        takes over at its next poll instead of after ``lease_s``."""
        with _write(self.engine) as conn:
            now = db_now(conn)
            result = conn.execute(
                sa.update(LEASES)
                .where(
                    LEASES.c.name == self.name,
                    LEASES.c.holder == self.holder,
                    LEASES.c.expires_at > now,
                )
                .values(expires_at=now)
            )
        return bool(result.rowcount)

    def current(self) -> LeaseState:
        """The lease as it is, without touching it."""
        return current_lease(self.engine, self.holder, self.name)


def current_lease(engine: Engine, holder: str | None = None, name: str = LEASE_NAME) -> LeaseState:
    """Who leads now (``holder`` is ``None`` when nobody does: no row, or it lapsed)."""
    with engine.connect() as conn:
        now = db_now(conn)
        row = conn.execute(sa.select(LEASES).where(LEASES.c.name == name)).first()
    if row is None:
        return LeaseState(None, 0, None, False)
    if row.expires_at <= now:
        return LeaseState(None, row.epoch, row.expires_at, False)
    return LeaseState(row.holder, row.epoch, row.expires_at, row.holder == holder)


__all__ = ["LEASE_NAME", "LeaderLease", "LeaseState", "current_lease"]
