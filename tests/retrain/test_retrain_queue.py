"""The retrain job queue on the real databases: claims, leases, fencing, attempts, holds,
cancel and the audit trail (:mod:`genmon.retrain.queue`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from genmon.db import session_scope
from genmon.exceptions import DatabaseError
from genmon.retrain.exceptions import JobNotFound, JobStateError, RetrainError
from genmon.retrain.queue import (
    JOBS,
    JobQueue,
    Lease,
    _write,
    audit_trail,
    cancel,
    db_now,
    get_job,
)
from genmon.schemas.events import RetrainStatus
from genmon.schemas.tables import RetrainJob

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LONG_LEASE_S = 300.0
SHORT_LEASE_S = 0.3


def add_jobs(engine: Engine, count: int, **fields: object) -> list[str]:
    """``count`` queued jobs, oldest first (``created_at`` one second apart)."""
    ids = [f"job-{i}" for i in range(count)]
    with session_scope(engine) as session:
        for i, job_id in enumerate(ids):
            values = {"created_at": T0 + timedelta(seconds=i), **fields}
            session.add(RetrainJob(job_id=job_id, model_id="chat", base_version="v1", **values))
    return ids


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def wait_expired(engine: Engine, job_id: str) -> None:
    """Until the database's own clock passes the job's lease."""
    expires = get_job(engine, job_id).lease_expires_at
    assert expires is not None

    def passed() -> bool:
        with engine.connect() as conn:
            return db_now(conn) > expires

    wait_until(passed)


def statuses(engine: Engine, job_id: str) -> list[tuple[str | None, str, str, int]]:
    return [
        (row.from_status, row.to_status, row.actor, row.lease_epoch)
        for row in audit_trail(engine, job_id)
    ]


def test_claim_takes_the_oldest_job_and_audits_it(engine: Engine) -> None:
    first, second = add_jobs(engine, 2)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)

    lease = queue.claim()

    assert lease == Lease(job_id=first, owner="w1", epoch=1)
    job = get_job(engine, first)
    assert (job.status, job.attempts, job.lease_owner) == (RetrainStatus.RUNNING, 1, "w1")
    assert job.started_at is not None and job.lease_expires_at is not None
    # The lease runs on the database clock: lease_s after the claim's database time.
    assert job.heartbeat_at is not None
    assert job.lease_expires_at - job.heartbeat_at == timedelta(seconds=LONG_LEASE_S)
    assert statuses(engine, first) == [("queued", "running", "w1", 1)]
    assert get_job(engine, second).status == RetrainStatus.QUEUED

    assert queue.update(lease, progress={"step": 3, "loss": 1.5})
    assert queue.update(lease, status=RetrainStatus.EVALUATING, reason="trained")
    assert queue.finish(lease, RetrainStatus.REJECTED, verdict={"decision": "reject"})
    job = get_job(engine, first)
    assert (job.status, job.progress["step"], job.verdict) == (
        RetrainStatus.REJECTED,
        3,
        {"decision": "reject"},
    )
    assert job.finished_at is not None
    assert [row[:2] for row in statuses(engine, first)] == [
        ("queued", "running"),
        ("running", "evaluating"),
        ("evaluating", "rejected"),
    ]
    # A finished job is nobody's: every fenced write is refused.
    assert not queue.update(lease, progress={"step": 4})
    assert not queue.renew(lease)


def test_concurrent_claimers_each_get_a_different_job(engine: Engine) -> None:
    ids = add_jobs(engine, 8)
    barrier = threading.Barrier(4)
    claimed: list[Lease] = []
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        queue = JobQueue(engine, name, LONG_LEASE_S)
        try:
            barrier.wait()
            while (lease := queue.claim()) is not None:
                claimed.append(lease)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(lease.job_id for lease in claimed) == ids
    for job_id in ids:
        (row,) = statuses(engine, job_id)
        owner = next(lease.owner for lease in claimed if lease.job_id == job_id)
        assert row == ("queued", "running", owner, 1)


@pytest.mark.postgres
def test_postgres_claim_skips_a_row_another_claimer_holds(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite has one writer at a time")
    first, second = add_jobs(engine, 2)
    with engine.connect() as other:
        # Another claimer's transaction has the oldest row locked and has not committed.
        other.execute(sa.select(JOBS).where(JOBS.c.job_id == first).with_for_update())
        lease = JobQueue(engine, "w1", LONG_LEASE_S).claim()
        other.rollback()
    assert lease is not None and lease.job_id == second


@pytest.mark.postgres
def test_postgres_ends_a_transaction_a_paused_worker_left_open(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no server to end a transaction")
    (job_id,) = add_jobs(engine, 1)
    paused = JobQueue(engine, "paused", SHORT_LEASE_S)
    assert paused.claim() is not None
    other = JobQueue(engine, "other", LONG_LEASE_S)
    taken: list[Lease] = []

    def claimed() -> bool:
        lease = other.claim()
        taken.extend([lease] if lease is not None else [])
        return lease is not None

    with (
        pytest.raises(DatabaseError, match="idle-in-transaction"),
        _write(engine, SHORT_LEASE_S) as conn,
    ):
        # The row locked, as by a heartbeat paused between its UPDATE and COMMIT...
        conn.execute(sa.select(JOBS).where(JOBS.c.job_id == job_id).with_for_update())
        # ... and still another worker takes the job once the lease is over.
        wait_until(claimed, timeout_s=30.0)
    assert taken == [Lease(job_id=job_id, owner="other", epoch=2)]


def test_an_expired_lease_writes_nothing_and_is_taken_over(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1)
    slow = JobQueue(engine, "slow", SHORT_LEASE_S)
    lease = slow.claim()
    assert lease is not None
    assert slow.update(lease, progress={"step": 1})
    wait_expired(engine, job_id)

    # Expired, not yet taken over: the fence already refuses every write.
    assert not slow.update(lease, progress={"step": 2})
    assert not slow.renew(lease)
    assert not slow.check(lease)

    fast = JobQueue(engine, "fast", LONG_LEASE_S)
    takeover = fast.claim()
    assert takeover == Lease(job_id=job_id, owner="fast", epoch=2)
    job = get_job(engine, job_id)
    assert (job.attempts, job.lease_owner, job.progress) == (2, "fast", {"step": 1})

    # The paused worker resumes: none of its writes lands, the new owner's do.
    assert not slow.update(lease, progress={"step": 99})
    assert not slow.finish(lease, RetrainStatus.PROMOTED)
    assert not slow.fail(lease, "boom")
    assert not slow.release(lease)
    assert fast.update(takeover, progress={"step": 2})
    assert get_job(engine, job_id).progress == {"step": 2}
    (_, took) = audit_trail(engine, job_id)
    assert (took.from_status, took.to_status, took.actor, took.lease_epoch) == (
        "running",
        "running",
        "fast",
        2,
    )
    assert "took over from slow (epoch 1)" in took.reason


def test_the_same_owner_with_an_old_epoch_is_fenced(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1)
    queue = JobQueue(engine, "w1", SHORT_LEASE_S)
    old = queue.claim()
    assert old is not None
    wait_expired(engine, job_id)
    new = queue.claim()
    assert new == Lease(job_id=job_id, owner="w1", epoch=2)
    assert not queue.update(old, progress={"stale": True})
    assert queue.update(new, progress={"fresh": True})


def test_renew_extends_the_lease_from_the_database_clock(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1)
    queue = JobQueue(engine, "w1", 2.0)
    lease = queue.claim()
    assert lease is not None
    before = get_job(engine, job_id).lease_expires_at
    assert queue.renew(lease)
    job = get_job(engine, job_id)
    assert job.lease_expires_at is not None and before is not None
    assert job.lease_expires_at > before
    assert job.heartbeat_at is not None
    assert job.lease_expires_at - job.heartbeat_at == timedelta(seconds=2.0)


def test_failures_requeue_until_max_attempts_then_fail_with_the_errors(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1, max_attempts=2)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)

    first = queue.claim()
    assert first is not None and queue.fail(first, "CUDA out of memory")
    job = get_job(engine, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (RetrainStatus.QUEUED, 1, None)
    assert not queue.update(first, progress={"step": 1})

    second = queue.claim()
    assert second == Lease(job_id=job_id, owner="w1", epoch=2)
    assert queue.fail(second, "dataset empty")
    job = get_job(engine, job_id)
    assert (job.status, job.attempts) == (RetrainStatus.FAILED, 2)
    assert job.error is not None
    assert "attempt 1: CUDA out of memory" in job.error
    assert "attempt 2: dataset empty" in job.error
    assert job.finished_at is not None
    assert queue.claim() is None
    assert [row[:2] for row in statuses(engine, job_id)] == [
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "failed"),
    ]


def test_a_lease_expiring_on_the_last_attempt_fails_the_job(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1, max_attempts=1)
    queue = JobQueue(engine, "dead", SHORT_LEASE_S)
    assert queue.claim() is not None
    wait_expired(engine, job_id)

    assert JobQueue(engine, "w2", LONG_LEASE_S).claim() is None
    job = get_job(engine, job_id)
    assert job.status == RetrainStatus.FAILED
    assert job.error is not None and "lease of dead expired on attempt 1 of 1" in job.error
    assert statuses(engine, job_id)[-1][:3] == ("running", "failed", "w2")


def test_the_running_limit_holds_a_job_with_its_reason(engine: Engine) -> None:
    first, second = add_jobs(engine, 2)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)
    lease = queue.claim(max_running=1)
    assert lease is not None and lease.job_id == first

    assert queue.claim(max_running=1) is None
    held = get_job(engine, second)
    assert held.status == RetrainStatus.QUEUED
    assert held.hold_reason is not None and "the limit is 1" in held.hold_reason
    assert queue.claim(max_running=1) is None
    # One audit row per hold, not one per refused claim.
    assert [row.reason for row in audit_trail(engine, second)] == [f"held: {held.hold_reason}"]

    assert queue.finish(lease, RetrainStatus.REJECTED)
    after = queue.claim(max_running=1)
    assert after is not None and after.job_id == second
    assert get_job(engine, second).hold_reason is None


def test_the_running_limit_holds_under_concurrent_claims(engine: Engine) -> None:
    add_jobs(engine, 6)
    barrier = threading.Barrier(4)
    claimed: list[Lease] = []

    def claimer(name: str) -> None:
        queue = JobQueue(engine, name, LONG_LEASE_S)
        barrier.wait()
        for _ in range(3):
            lease = queue.claim(max_running=2)
            if lease is not None:
                claimed.append(lease)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 2


def test_the_daily_device_budget_holds_a_job_with_its_reason(engine: Engine) -> None:
    (spent,) = add_jobs(engine, 1)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)
    lease = queue.claim()
    assert lease is not None
    assert queue.update(lease, device_seconds=5400.0)  # 1.5 device-hours today
    assert queue.finish(lease, RetrainStatus.REJECTED)
    with session_scope(engine) as session:
        session.add(RetrainJob(job_id="next", model_id="chat", base_version="v1", created_at=T0))

    assert queue.claim(daily_device_hours=1.0) is None
    reason = get_job(engine, "next").hold_reason
    assert reason is not None and "1.50 of 1 device-hours" in reason
    assert audit_trail(engine, "next")[-1].reason == f"held: {reason}"

    lease = queue.claim(daily_device_hours=2.0)
    assert lease is not None and lease.job_id == "next"
    assert spent != "next"


def test_release_gives_the_attempt_back(engine: Engine) -> None:
    (job_id,) = add_jobs(engine, 1)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)
    lease = queue.claim()
    assert lease is not None
    assert queue.update(lease, checkpoint_step=10, checkpoint_uri="file:///ckpt/10")
    assert queue.release(lease)
    job = get_job(engine, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (RetrainStatus.QUEUED, 0, None)
    assert job.checkpoint_step == 10
    again = JobQueue(engine, "w2", LONG_LEASE_S).claim()
    assert again == Lease(job_id=job_id, owner="w2", epoch=2)
    assert not queue.update(lease, progress={"step": 11})


def test_cancel_fences_the_running_worker(engine: Engine) -> None:
    running, queued = add_jobs(engine, 2)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)
    lease = queue.claim()
    assert lease is not None and lease.job_id == running

    assert cancel(engine, running, "alice", "wrong data") == RetrainStatus.RUNNING
    assert cancel(engine, queued, "alice") == RetrainStatus.QUEUED
    assert not queue.renew(lease)
    assert not queue.update(lease, progress={"step": 1})
    job = get_job(engine, running)
    assert (job.status, job.lease_epoch) == (RetrainStatus.CANCELLED, 2)
    assert statuses(engine, running)[-1] == ("running", "cancelled", "alice", 2)
    assert queue.claim() is None
    with pytest.raises(JobStateError, match="already ended cancelled"):
        cancel(engine, running, "alice")
    with pytest.raises(JobNotFound, match="genmon retrain list"):
        cancel(engine, "nope", "alice")


def test_update_refuses_the_queues_own_columns(engine: Engine) -> None:
    add_jobs(engine, 1)
    queue = JobQueue(engine, "w1", LONG_LEASE_S)
    lease = queue.claim()
    assert lease is not None
    with pytest.raises(RetrainError, match="belong to the queue"):
        queue.update(lease, lease_epoch=7)
    with pytest.raises(RetrainError, match="no column"):
        queue.update(lease, colour="red")
    with pytest.raises(JobStateError, match="terminal status"):
        queue.finish(lease, RetrainStatus.RUNNING)
