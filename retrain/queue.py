"""The retrain job queue: claims, leases, epoch fencing, attempts, holds and the audit trail.

The queue is the ``retrain_job`` table itself, so any number of workers on any machines
that share the database can serve it, and a job's state survives every one of them.

- **Claim.** On PostgreSQL a worker picks the oldest claimable row with
  ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers pass each other instead of
  queueing on one row; on SQLite one claimer at a time holds the write lock
  (``BEGIN IMMEDIATE``). Claimable: ``queued`` jobs, and ``running``/``evaluating`` jobs
  whose lease expired (their worker died or hung). A claim counts an attempt and bumps
  ``lease_epoch``.
- **Lease.** ``lease_expires_at`` is set and compared on the *database* clock, never a
  worker's, so machines with skewed clocks still agree on who holds a job. A heartbeat
  renews it (:meth:`JobQueue.renew`).
- **Fencing.** Every later write is ``UPDATE ... WHERE job_id AND lease_epoch AND
  lease_owner AND lease_expires_at > now``: a worker paused past its lease (GC, a stopped
  VM, a network partition) and then resumed matches no row and can change nothing, even
  if it never noticed that it was paused.
- **Attempts.** :meth:`JobQueue.fail` requeues a job, or ends it ``failed`` with the error
  once ``max_attempts`` claims were spent; a lease that expires on the last attempt fails
  the job at the next claim.
- **Holds.** A claim refused by the running limit or the daily device-hours budget records
  why on the job (``hold_reason``), so "why is it still queued?" has an answer.
- **Audit.** Every status change is one ``retrain_job_audit`` row with actor and epoch.
- **Remote runs** (:mod:`genmon.retrain.backends`: Ray Jobs, Kubernetes Jobs). A worker
  that hands its attempt to a cluster records ``backend`` and ``remote_id`` (fenced, before
  submitting), then only *supervises*: it renews its lease and polls the run. The run's
  own writes hold a lease with ``remote_id`` set, fenced on ``(job_id, lease_epoch,
  remote_id)`` and an active status, **not** on the owner or the lease's expiry: its
  supervisor may die and be replaced without the run being fenced out. Every real
  takeover still fences it, because each one moves what it checks: a new attempt's claim
  bumps the epoch (and clears ``remote_id``), a cancel bumps the epoch, a requeue or an
  end leaves the active states.
- **Adoption.** A claim that meets an active job whose lease expired *and* whose
  ``remote_id`` is set adopts it instead of starting an attempt: the epoch, the attempt
  count and ``remote_id`` stay, only the lease (owner, expiry) moves to the claimer, with a
  ``running -> running`` audit row; guards do not hold it (it is already running). The
  adopter then looks the run up: alive, it supervises it; ended or lost, it settles the
  attempt by the normal rules (:meth:`JobQueue.fail`); never submitted (its worker died
  between recording and submitting), it submits under the *same* id, which the cluster
  refuses if the first submission did go through: one submission per attempt.
  :meth:`JobQueue.let_go` is a supervisor's graceful stop: the lease lapses at once so
  another worker adopts the run, which goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import InternalError, OperationalError, ProgrammingError

from genmon.db import safe_url
from genmon.exceptions import DatabaseError
from genmon.retrain.exceptions import JobNotFound, JobStateError, RetrainError
from genmon.schemas.events import RetrainStatus
from genmon.schemas.retrain import RetrainJobAudit
from genmon.schemas.tables import RetrainJob

log = logging.getLogger(__name__)

JOBS = cast(sa.Table, RetrainJob.__table__)
AUDIT = cast(sa.Table, RetrainJobAudit.__table__)

#: A worker holds a job in these states (and only while its lease is unexpired).
ACTIVE = (RetrainStatus.RUNNING, RetrainStatus.EVALUATING)
#: A job in these states is over; nothing claims or renews it.
TERMINAL = (
    RetrainStatus.PROMOTED,
    RetrainStatus.REJECTED,
    RetrainStatus.FAILED,
    RetrainStatus.CANCELLED,
    RetrainStatus.ROLLED_BACK,
)
#: Columns only the queue writes: a fenced ``update`` may not touch the lease itself.
QUEUE_COLUMNS = frozenset(
    {"job_id", "lease_owner", "lease_epoch", "lease_expires_at", "attempts", "max_attempts"}
)
#: Transaction-scoped advisory lock that serialises claims on PostgreSQL when a guard
#: (running limit, budget) counts jobs: two claimers must not both see "one slot left".
CLAIM_LOCK_KEY = 0x67656E72657472  # "genretr"
MAX_TEXT = 1024
#: What a fenced state change writes: the new status, other columns, the audit reason.
Change = tuple[RetrainStatus, Mapping[str, Any], str]


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one job: every write it makes is fenced on all three fields."""

    job_id: str
    owner: str
    epoch: int
    #: Set on the lease a remote run holds (its submission id / Job name): its writes are
    #: fenced on ``(job_id, epoch, remote_id)`` and not on the owner or the expiry, so a
    #: supervisor that dies and is replaced (adoption) does not fence the run out.
    remote_id: str | None = None


#: Shortest idle-in-transaction timeout a queue transaction gets on PostgreSQL.
MIN_IDLE_S = 5.0


@contextmanager
def _write(engine: Engine, idle_s: float | None = None) -> Iterator[Connection]:
    """One write transaction; on SQLite it takes the write lock first (``BEGIN IMMEDIATE``)
    so a read-then-write never fails to upgrade its lock halfway.

    On PostgreSQL a transaction left idle for ``idle_s`` is ended by the server: a worker
    paused in the middle of one (the very case fencing is for) would otherwise keep its
    row locked and stall every claimer of that job until it continued. SQLite has no such
    remedy: there a process stopped inside a write holds the one write lock. The timeout is
    at least :data:`MIN_IDLE_S`: on a busy machine a healthy worker can pause that long
    between two statements of one transaction, and ending it would fail a sound claim.
    """
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql" and idle_s is not None:
                ms = int(max(idle_s, MIN_IDLE_S) * 1000)
                conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {ms}")
            yield conn
            conn.commit()
    except (OperationalError, ProgrammingError, InternalError) as exc:
        reason = " ".join(str(getattr(exc, "orig", exc)).split())
        raise DatabaseError(
            f"retrain queue on {safe_url(engine.url)} failed: {reason}; check that the "
            "database is running (`genmon infra up --postgres`) and migrated "
            "(`genmon db upgrade`)"
        ) from exc


def db_now(conn: Connection) -> datetime:
    """The database's clock (UTC, aware): leases are set and compared on it alone."""
    if conn.dialect.name == "postgresql":
        # clock_timestamp(), not now(): a claim may have waited on a lock since BEGIN.
        value = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    elif conn.dialect.name == "sqlite":
        raw = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        value = datetime.fromisoformat(str(raw))
    else:
        value = conn.execute(sa.select(sa.func.current_timestamp())).scalar_one()
    if value.tzinfo is None:
        return cast(datetime, value).replace(tzinfo=UTC)
    return cast(datetime, value).astimezone(UTC)


def _fence(lease: Lease, now: datetime) -> sa.ColumnElement[bool]:
    if lease.remote_id is not None:
        return sa.and_(
            JOBS.c.job_id == lease.job_id,
            JOBS.c.lease_epoch == lease.epoch,
            JOBS.c.remote_id == lease.remote_id,
            JOBS.c.status.in_(ACTIVE),
        )
    return sa.and_(
        JOBS.c.job_id == lease.job_id,
        JOBS.c.lease_epoch == lease.epoch,
        JOBS.c.lease_owner == lease.owner,
        JOBS.c.lease_expires_at > now,
        JOBS.c.status.in_(ACTIVE),
    )


def _status(value: Any) -> str:
    return value.value if isinstance(value, RetrainStatus) else str(value)


def audit(
    conn: Connection,
    job_id: str,
    from_status: RetrainStatus | str | None,
    to_status: RetrainStatus | str,
    actor: str,
    epoch: int,
    reason: str,
    at: datetime,
) -> None:
    """One ``retrain_job_audit`` row, written in the caller's transaction (so a state change
    and its audit row commit together or not at all)."""
    conn.execute(
        sa.insert(AUDIT).values(
            job_id=job_id,
            from_status=None if from_status is None else _status(from_status),
            to_status=_status(to_status),
            actor=actor[:256],
            lease_epoch=epoch,
            reason=reason,
            at=at,
        )
    )


class JobQueue:
    """One worker's handle on the queue: ``owner`` names it in leases and audit rows."""

    def __init__(self, engine: Engine, owner: str, lease_s: float) -> None:
        if lease_s <= 0:
            raise RetrainError(f"lease_s must be positive, got {lease_s}; set retrain.lease_s")
        self.engine = engine
        self.owner = owner
        self.lease_s = lease_s

    # --- claiming ---------------------------------------------------------------------

    def claim(
        self, *, max_running: int | None = None, daily_device_hours: float | None = None
    ) -> Lease | None:
        """Take the oldest claimable job, or ``None`` (nothing to do, or a guard holds it)."""
        postgres = self.engine.dialect.name == "postgresql"
        with _write(self.engine, self.lease_s) as conn:
            if postgres and (max_running is not None or daily_device_hours is not None):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))
            now = db_now(conn)
            self._fail_exhausted(conn, now, skip_locked=postgres)
            row = self._candidate(conn, now, skip_locked=postgres)
            if row is None:
                return None
            if _adoptable(row):  # already running on a cluster: no guard holds it
                return self._adopt(conn, row, now)
            held = _hold_reason(conn, now, max_running, daily_device_hours)
            if held is not None:
                self._hold(conn, row, held, now)
                return None
            return self._take(conn, row, now)

    def _claimable(self, now: datetime) -> sa.ColumnElement[bool]:
        expired = sa.and_(JOBS.c.status.in_(ACTIVE), JOBS.c.lease_expires_at <= now)
        return sa.or_(JOBS.c.status == RetrainStatus.QUEUED, expired)

    def _candidate(self, conn: Connection, now: datetime, *, skip_locked: bool) -> Row[Any] | None:
        # Remote runs to adopt come first: a guard holding a queued job must not leave
        # a running one unsupervised.
        remote_first = sa.case((JOBS.c.remote_id.is_(None), 1), else_=0)
        query = (
            sa.select(JOBS)
            .where(self._claimable(now))
            .order_by(remote_first, JOBS.c.created_at, JOBS.c.job_id)
            .limit(1)
        )
        if skip_locked:
            query = query.with_for_update(skip_locked=True)
        return conn.execute(query).first()

    def _fail_exhausted(self, conn: Connection, now: datetime, *, skip_locked: bool) -> None:
        """Jobs whose lease expired on their last attempt end ``failed``, not claimed again
        (a remote run is adopted instead: it may be alive; the adopter settles it)."""
        query = sa.select(JOBS).where(
            JOBS.c.status.in_(ACTIVE),
            JOBS.c.lease_expires_at <= now,
            JOBS.c.attempts >= JOBS.c.max_attempts,
            JOBS.c.remote_id.is_(None),
        )
        if skip_locked:
            query = query.with_for_update(skip_locked=True)
        for row in conn.execute(query).all():
            error = (
                f"the lease of {row.lease_owner} expired on attempt {row.attempts} of "
                f"{row.max_attempts}: its worker died, hung or lost the database; see that "
                "worker's log, then `genmon retrain request` the model again"
            )
            values = {
                "error": _previous_error(row.error) + error,
                "finished_at": now,
                "lease_expires_at": None,
            }
            _apply(conn, row, RetrainStatus.FAILED, values, self.owner, row.lease_epoch, error, now)
            log.warning("retrain job %s failed: %s", row.job_id, error)

    def _hold(self, conn: Connection, row: Row[Any], reason: str, now: datetime) -> None:
        if row.hold_reason == reason:
            return
        values = {"hold_reason": reason}
        _apply(conn, row, row.status, values, self.owner, row.lease_epoch, f"held: {reason}", now)
        log.info("retrain job %s held: %s", row.job_id, reason)

    def _take(self, conn: Connection, row: Row[Any], now: datetime) -> Lease | None:
        epoch = row.lease_epoch + 1
        attempt = row.attempts + 1
        taken = conn.execute(
            sa.update(JOBS)
            .where(JOBS.c.job_id == row.job_id, JOBS.c.lease_epoch == row.lease_epoch)
            .values(
                status=RetrainStatus.RUNNING,
                lease_owner=self.owner,
                lease_epoch=epoch,
                lease_expires_at=now + timedelta(seconds=self.lease_s),
                heartbeat_at=now,
                attempts=attempt,
                started_at=sa.func.coalesce(JOBS.c.started_at, now),
                updated_at=now,
                hold_reason=None,
                remote_id=None,  # a new attempt: the last attempt's remote run is fenced
            )
        )
        if taken.rowcount != 1:  # only if the row was not locked: another claim won
            return None
        if row.status == RetrainStatus.QUEUED:
            why = f"claimed (attempt {attempt} of {row.max_attempts})"
        else:
            why = (
                f"took over from {row.lease_owner} (epoch {row.lease_epoch}) after its lease "
                f"expired (attempt {attempt} of {row.max_attempts})"
            )
        audit(conn, row.job_id, row.status, RetrainStatus.RUNNING, self.owner, epoch, why, now)
        log.info("retrain job %s: %s by %s", row.job_id, why, self.owner)
        return Lease(job_id=row.job_id, owner=self.owner, epoch=epoch)

    def _adopt(self, conn: Connection, row: Row[Any], now: datetime) -> Lease | None:
        """Supervise the remote run of an expired job: the lease moves, the epoch, the
        attempt and ``remote_id`` (what the run is fenced on) stay."""
        adopted = conn.execute(
            sa.update(JOBS)
            .where(
                JOBS.c.job_id == row.job_id,
                JOBS.c.lease_epoch == row.lease_epoch,
                JOBS.c.remote_id == row.remote_id,
            )
            .values(
                lease_owner=self.owner,
                lease_expires_at=now + timedelta(seconds=self.lease_s),
                heartbeat_at=now,
                updated_at=now,
                hold_reason=None,
            )
        )
        if adopted.rowcount != 1:
            return None
        why = (
            f"adopted {row.backend} run {row.remote_id} from {row.lease_owner} after its "
            f"lease expired (attempt {row.attempts} of {row.max_attempts})"
        )
        audit(conn, row.job_id, row.status, row.status, self.owner, row.lease_epoch, why, now)
        log.info("retrain job %s: %s by %s", row.job_id, why, self.owner)
        return Lease(job_id=row.job_id, owner=self.owner, epoch=row.lease_epoch)

    # --- fenced writes ----------------------------------------------------------------

    def renew(self, lease: Lease) -> bool:
        """Extend the lease by ``lease_s`` from the database's now; ``False``: it is lost."""
        with _write(self.engine, self.lease_s) as conn:
            now = db_now(conn)
            expires = now + timedelta(seconds=self.lease_s)
            result = conn.execute(
                sa.update(JOBS)
                .where(_fence(lease, now))
                .values(lease_expires_at=expires, heartbeat_at=now)
            )
            return result.rowcount == 1

    def update(self, lease: Lease, **columns: Any) -> bool:
        """Write ``columns`` on the job if ``lease`` still holds it; ``False`` if not.

        A ``status`` among the columns is a state change and gets its audit row
        (``reason`` then goes into that row, not onto the job).
        """
        reason = str(columns.pop("reason", ""))
        _check_columns(columns)
        if "status" in columns:
            status = RetrainStatus(columns.pop("status"))
            return self._change(lease, lambda row, now: (status, columns, reason))
        with _write(self.engine, self.lease_s) as conn:
            now = db_now(conn)
            values = {"updated_at": now, **columns}
            result = conn.execute(sa.update(JOBS).where(_fence(lease, now)).values(values))
            return result.rowcount == 1

    def check(self, lease: Lease) -> bool:
        """Whether ``lease`` still holds the job (a fenced no-op write, so it also waits for
        and sees a concurrent takeover)."""
        return self.update(lease)

    def finish(self, lease: Lease, status: RetrainStatus, **columns: Any) -> bool:
        """End the job in a terminal ``status`` (promoted, rejected, failed, cancelled)."""
        status = RetrainStatus(status)
        if status not in TERMINAL:
            raise JobStateError(
                f"finish() takes a terminal status ({', '.join(s.value for s in TERMINAL)}), "
                f"got {status.value}; use update(status=...) for running/evaluating"
            )
        reason = str(columns.pop("reason", "")) or f"finished {status.value}"
        _check_columns(columns)
        return self._change(
            lease,
            lambda row, now: (
                status,
                {"finished_at": now, "lease_expires_at": None, **columns},
                reason,
            ),
        )

    def fail(self, lease: Lease, error: str) -> bool:
        """The attempt failed: requeue the job, or end it ``failed`` after ``max_attempts``."""

        def decide(row: Row[Any], now: datetime) -> Change:
            of = f"attempt {row.attempts} of {row.max_attempts}"
            values = {
                "error": _previous_error(row.error) + f"attempt {row.attempts}: {error}",
                "lease_expires_at": None,
            }
            if row.attempts >= row.max_attempts:
                return RetrainStatus.FAILED, {**values, "finished_at": now}, f"{of}: {error}"
            values["lease_owner"] = None
            return RetrainStatus.QUEUED, values, f"{of} failed, requeued: {error}"

        return self._change(lease, decide, level=logging.WARNING)

    def release(self, lease: Lease, reason: str = "worker shutting down") -> bool:
        """Give the job back (a graceful stop): queued again, the attempt not counted, so
        another worker resumes it from its last checkpoint at once."""
        return self._change(
            lease,
            lambda row, now: (
                RetrainStatus.QUEUED,
                {
                    "attempts": max(row.attempts - 1, 0),
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
                f"released: {reason}",
            ),
        )

    def let_go(self, lease: Lease, reason: str = "worker shutting down") -> bool:
        """Stop supervising a remote run that goes on (a graceful stop): the lease lapses
        now, so another worker adopts the run at once; status, epoch and attempt stay."""
        return self._change(
            lease,
            lambda row, now: (
                RetrainStatus(row.status),
                {"lease_expires_at": now},
                f"let go of {row.backend} run {row.remote_id}: {reason}",
            ),
        )

    def _change(
        self,
        lease: Lease,
        decide: Callable[[Row[Any], datetime], Change],
        *,
        level: int = logging.INFO,
    ) -> bool:
        """A fenced state change: lock the row if ``lease`` holds it, write what ``decide``
        makes of it, and its audit row, in one transaction."""
        with _write(self.engine, self.lease_s) as conn:
            now = db_now(conn)
            query = sa.select(JOBS).where(_fence(lease, now)).with_for_update()
            row = conn.execute(query).first()
            if row is None:
                return False
            status, values, reason = decide(row, now)
            _apply(conn, row, status, values, self.owner, lease.epoch, reason, now)
        log.log(
            level,
            "retrain job %s: %s -> %s: %s",
            lease.job_id,
            _status(row.status),
            status.value,
            reason,
        )
        return True


def _apply(
    conn: Connection,
    row: Row[Any],
    status: RetrainStatus,
    values: Mapping[str, Any],
    actor: str,
    epoch: int,
    reason: str,
    now: datetime,
) -> None:
    """Write ``values`` and ``status`` on the locked ``row``, and the audit row of it."""
    changed = {**values, "status": status, "updated_at": now}
    conn.execute(sa.update(JOBS).where(JOBS.c.job_id == row.job_id).values(changed))
    audit(conn, row.job_id, row.status, status, actor, epoch, reason, now)


def _adoptable(row: Row[Any]) -> bool:
    """An active job with a remote run: its claim is an adoption, not a new attempt."""
    return row.remote_id is not None and row.status in ACTIVE


def _check_columns(columns: Mapping[str, Any]) -> None:
    unknown = sorted(set(columns) - set(JOBS.c.keys()))
    if unknown:
        raise RetrainError(f"retrain_job has no column(s) {unknown}; see genmon.schemas.tables")
    reserved = sorted(set(columns) & QUEUE_COLUMNS)
    if reserved:
        raise RetrainError(
            f"{reserved} belong to the queue (claim/renew/release set them), not to update()"
        )


def _previous_error(error: str | None) -> str:
    """Earlier attempts' errors stay on the row (the last ~1000 characters of them)."""
    return f"{error[-MAX_TEXT:]}\n" if error else ""


def _hold_reason(
    conn: Connection, now: datetime, max_running: int | None, daily_device_hours: float | None
) -> str | None:
    """Why a claim must wait now, or ``None``: the running limit, then the device budget."""
    if max_running is not None:
        running = conn.execute(
            sa.select(sa.func.count())
            .select_from(JOBS)
            .where(JOBS.c.status.in_(ACTIVE), JOBS.c.lease_expires_at > now)
        ).scalar_one()
        if running >= max_running:
            return (
                f"{running} job(s) running, the limit is {max_running} "
                "(policy guards.max_running): it starts when one ends"
            )
    if daily_device_hours is not None:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used_s = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(JOBS.c.device_seconds), 0.0)).where(
                JOBS.c.updated_at >= day
            )
        ).scalar_one()
        used_h = float(used_s) / 3600.0
        if used_h >= daily_device_hours:
            return (
                f"today's device budget is spent: {used_h:.2f} of {daily_device_hours:g} "
                "device-hours since 00:00 UTC (policy guards.daily_device_hours): it starts "
                "tomorrow, or raise the budget"
            )
    return None


# --- reading and operator actions ---------------------------------------------------------


def get_job(engine: Engine, job_id: str) -> RetrainJob:
    """The job's row as it is now."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(JOBS).where(JOBS.c.job_id == job_id)).first()
    if row is None:
        raise JobNotFound(job_id)
    return RetrainJob.model_validate(dict(row._mapping))


def audit_trail(engine: Engine, job_id: str) -> list[RetrainJobAudit]:
    """The job's state changes, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(AUDIT).where(AUDIT.c.job_id == job_id).order_by(AUDIT.c.id)
        ).all()
    return [RetrainJobAudit.model_validate(dict(row._mapping)) for row in rows]


def cancel(engine: Engine, job_id: str, actor: str, reason: str = "") -> RetrainStatus:
    """Cancel a job that has not ended; returns the status it had.

    A running job's epoch moves on, which fences its worker: the next heartbeat or write
    fails and the worker kills its training process.
    """
    with _write(engine) as conn:
        now = db_now(conn)
        row = conn.execute(sa.select(JOBS).where(JOBS.c.job_id == job_id).with_for_update()).first()
        if row is None:
            raise JobNotFound(job_id)
        if row.status in TERMINAL:
            raise JobStateError(
                f"retrain job {job_id} already ended {_status(row.status)}; nothing to cancel"
            )
        epoch = row.lease_epoch + 1 if row.status in ACTIVE else row.lease_epoch
        values = {
            "lease_epoch": epoch,
            "lease_owner": None,
            "lease_expires_at": None,
            "finished_at": now,
        }
        why = reason or f"cancelled by {actor}"
        _apply(conn, row, RetrainStatus.CANCELLED, values, actor, epoch, why, now)
    return RetrainStatus(row.status)


__all__ = [
    "ACTIVE",
    "TERMINAL",
    "JobQueue",
    "Lease",
    "audit",
    "audit_trail",
    "cancel",
    "db_now",
    "get_job",
]
