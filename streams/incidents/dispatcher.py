"""Deliver the outbox: retries with backoff and jitter, rate limits, dead letters, a log.

The manager writes ``notification`` rows in the same transaction as the incident change;
this dispatcher (``genmon notify dispatch``, or a task inside ``genmon worker``) delivers
them: pages over HTTP, and the rows of
:data:`~genmon.schemas.incidents.INCIDENTS_TOPIC_DESTINATION` to the ``<prefix>.incidents``
topic of its own settings (:mod:`~genmon.streams.incidents.publisher`). Guarantees:

- **at least once, keyed**: a row is claimed with a conditional UPDATE and a lease, so
  several dispatchers may run; a crash mid-delivery lets the lease expire and the row is
  sent again *with the same* ``Idempotency-Key``, which receivers use to drop the copy;
- **in order per incident and destination**: a row is only eligible when no earlier row
  of the same incident and destination is still pending or in flight, so a resolve never
  overtakes its trigger (a dead row no longer blocks the ones after it);
- **retries**: transport errors, 408, 425, 429 and 5xx are retried after an exponential
  backoff with equal jitter (``backoff_initial_s * 2**(attempt-1)``, capped at
  ``backoff_max_s``, then a random value between half and all of it); a ``Retry-After``
  header (seconds or HTTP date, capped at ``retry_after_max_s``) is honoured and also
  pauses that destination. Other 4xx answers are permanent. After ``max_attempts`` the
  row is ``dead``: visible in ``genmon notify list --status dead``;
- **rate limit** per destination: a token bucket of ``rate_per_s`` and ``burst``;
- **silences at delivery time**: a page is checked against the silences once more when it
  is due, so a silence added after it was queued still holds it back (the row becomes
  ``suppressed`` with the silence's id; :mod:`~genmon.streams.incidents.silences` has
  the rules, shared with the manager);
- **silences that end**: every poll interval (and every round of ``genmon notify dispatch
  --once``) it has the manager page again wherever a silence that has ended (or was
  expired early) held back a still-open incident
  (:meth:`~genmon.streams.incidents.manager.IncidentManager.repeat_unsilenced_pages`), so
  such a page goes out within a poll interval of the silence's end, once, however many
  dispatchers run;
- **delivery log**: one ``delivery_attempt`` row per attempt.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import sqlalchemy as sa
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from genmon.db import session_scope
from genmon.exceptions import DatabaseError
from genmon.schemas.events import IncidentEvent, utcnow
from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    INCIDENTS_TOPIC_DESTINATION,
    DeliveryAttempt,
    Notification,
    NotificationStatus,
)
from genmon.settings import NotifySettings, Settings, get_settings
from genmon.streams.codec import encode
from genmon.streams.incidents._txn import write_transaction
from genmon.streams.incidents.destinations import (
    Destination,
    Message,
    build_destination,
    scrub_secrets,
)
from genmon.streams.incidents.manager import IncidentManager
from genmon.streams.incidents.publisher import IncidentTopicPublisher
from genmon.streams.incidents.routing import Router
from genmon.streams.incidents.silences import ActiveSilences, follow_up_silenced_by

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_ACTIVE = (NotificationStatus.PENDING, NotificationStatus.DELIVERING)
_ERROR_BODY_CHARS = 200


class TokenBucket:
    """``rate`` deliveries per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.paused_until = 0.0

    def _refill(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return now

    def try_take(self) -> bool:
        now = self._refill()
        if now < self.paused_until or self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_s(self) -> float:
        """Seconds until :meth:`try_take` can succeed."""
        now = self._refill()
        return max(self.paused_until - now, (1 - self.tokens) / self.rate, 0.0)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)


@dataclass
class DispatchReport:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    rate_limited: int = 0
    suppressed: int = 0
    unsilenced: int = 0
    """Triggers queued because a silence that held an open incident back has ended."""
    wait_s: float | None = field(default=None, repr=False)

    def add(self, other: DispatchReport) -> None:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.rate_limited += other.rate_limited
        self.suppressed += other.suppressed
        self.unsilenced += other.unsilenced


@dataclass(frozen=True)
class _Channels:
    """Where one run delivers: pages over HTTP, incident events to the incidents topic."""

    http: httpx.AsyncClient
    topic: IncidentTopicPublisher


@dataclass(frozen=True)
class _Claimed:
    id: int
    incident_id: str
    destination: str
    event: str
    idempotency_key: str
    payload: dict
    attempt: int


@dataclass(frozen=True)
class _Result:
    outcome: str  # delivered, retry, dead
    status_code: int | None
    error: str | None
    duration_ms: float
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - now).total_seconds(), 0.0)


class Dispatcher:
    """Delivers due notifications of the outbox to their destinations."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings | None = None,
        *,
        router: Router | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        batch_size: int = 200,
    ) -> None:
        self.engine = engine
        self.settings = settings or get_settings()
        self.config: NotifySettings = self.settings.notify
        router = router or Router(self.config)
        self.destinations: dict[str, Destination] = {
            name: build_destination(cfg) for name, cfg in router.destinations.items()
        }
        self.client = client
        self.clock = clock
        # The buckets follow the dispatcher's clock so Retry-After pauses and backoff
        # schedules are measured on one time line.
        self.buckets = {
            name: TokenBucket(cfg.rate_per_s, cfg.burst, lambda: self.clock().timestamp())
            for name, cfg in router.destinations.items()
        }
        self.rng = rng or random.Random()
        self.batch_size = batch_size
        # Queues the pages of silences that have ended; it routes nothing itself.
        self.incidents = IncidentManager(engine, self.settings, router=router, clock=clock)
        self._wake: asyncio.Event | None = None

    # --- running -------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the outbox now (the manager calls this after queueing)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Deliver until ``stop`` is set (or forever).

        A pipeline rather than rounds: claiming, HTTP delivery and recording overlap, so
        a notification waits neither for a slow delivery of another incident nor for the
        previous round's bookkeeping. Rows in flight are leased, which keeps each
        incident's later notifications behind them.
        """
        stop = stop or asyncio.Event()
        self._wake = asyncio.Event()
        wake = self._wake
        outcomes: asyncio.Queue[tuple[_Claimed, _Result]] = asyncio.Queue()
        in_flight: set[asyncio.Task[None]] = set()
        semaphore = asyncio.Semaphore(self.config.concurrency)
        most_in_flight = self.config.concurrency * 4
        next_unsilence_check = 0.0

        async def deliver(channels: _Channels, item: _Claimed) -> None:
            async with semaphore:
                result = await self._deliver(channels, item)
            outcomes.put_nowait((item, result))

        async def record_outcomes() -> None:
            while True:
                batch = [await outcomes.get()]
                while not outcomes.empty():
                    batch.append(outcomes.get_nowait())
                try:
                    await asyncio.to_thread(self._record, batch)
                except DatabaseError as exc:
                    # Not recorded: the leases expire and the rows are sent again, with
                    # the same idempotency keys.
                    log.warning("could not record %d deliveries: %s", len(batch), exc)
                for _ in batch:
                    outcomes.task_done()
                wake.set()  # the next notifications of these incidents are due now

        async with self._channels() as channels:
            recorder = asyncio.create_task(record_outcomes())
            try:
                while not stop.is_set():
                    wake.clear()
                    timeout = self.config.poll_interval_s
                    room = most_in_flight - len(in_flight)
                    if room > 0:
                        try:
                            report = DispatchReport()
                            # A busy loop comes round often: once per poll interval is enough.
                            if time.monotonic() >= next_unsilence_check:
                                next_unsilence_check = time.monotonic() + timeout
                                await asyncio.to_thread(self.incidents.repeat_unsilenced_pages)
                            claimed, rate_wait = await asyncio.to_thread(self._claim, report, room)
                            for item in claimed:
                                task = asyncio.create_task(deliver(channels, item))
                                in_flight.add(task)
                                task.add_done_callback(in_flight.discard)
                            if claimed or report.suppressed:
                                continue
                            due = await asyncio.to_thread(self._next_due_s, rate_wait)
                            if due is not None:
                                timeout = min(timeout, max(due, 0.01))
                        except DatabaseError as exc:
                            # The database is away (restart, failover): rows stay queued.
                            log.warning("outbox unavailable, retrying: %s", exc)
                    await self._sleep(wake, stop, timeout)
            finally:
                if in_flight:
                    await asyncio.gather(*in_flight, return_exceptions=True)
                await outcomes.join()
                recorder.cancel()

    @staticmethod
    async def _sleep(wake: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
        waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()

    async def drain(self, timeout_s: float = 30.0) -> DispatchReport:
        """Deliver until nothing is due (retries scheduled later are left); for the CLI."""
        total = DispatchReport()
        deadline = time.monotonic() + timeout_s
        async with self._channels() as channels:
            while time.monotonic() < deadline:
                report = await self._round(channels)
                total.add(report)
                if report.claimed or report.suppressed:
                    continue
                if report.wait_s is None or time.monotonic() + report.wait_s > deadline:
                    break
                await asyncio.sleep(report.wait_s)
        return total

    @asynccontextmanager
    async def _channels(self, client: httpx.AsyncClient | None = None) -> AsyncIterator[_Channels]:
        """The HTTP client and the topic producer of one run; both live in its event loop."""
        client = client if client is not None else self.client
        http = (
            _Borrowed(client)
            if client is not None
            else httpx.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False)
        )
        topic = IncidentTopicPublisher(self.settings, self.config.timeout_s)
        try:
            async with http as opened:
                yield _Channels(opened, topic)
        finally:
            await topic.close()

    async def dispatch_once(self, client: httpx.AsyncClient | None = None) -> DispatchReport:
        """One round: claim what is due and allowed, deliver it concurrently, log it."""
        async with self._channels(client) as channels:
            return await self._round(channels)

    async def _round(self, channels: _Channels) -> DispatchReport:
        report = DispatchReport()
        report.unsilenced = await asyncio.to_thread(self.incidents.repeat_unsilenced_pages)
        claimed, rate_wait = await asyncio.to_thread(self._claim, report)
        report.claimed = len(claimed)
        semaphore = asyncio.Semaphore(self.config.concurrency)

        async def deliver(item: _Claimed) -> _Result:
            async with semaphore:
                return await self._deliver(channels, item)

        results = await asyncio.gather(*(deliver(item) for item in claimed))
        if claimed:
            statuses = await asyncio.to_thread(
                self._record, list(zip(claimed, results, strict=True))
            )
            for status in statuses:
                if status is NotificationStatus.DELIVERED:
                    report.delivered += 1
                elif status is NotificationStatus.DEAD:
                    report.dead += 1
                else:
                    report.retried += 1
        if not claimed:
            report.wait_s = await asyncio.to_thread(self._next_due_s, rate_wait)
        return report

    # --- claiming ------------------------------------------------------------------------

    @staticmethod
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

    @staticmethod
    def _ready_at(row: type[Notification]) -> sa.ColumnElement[datetime]:
        """When a row may be (re)claimed: its next attempt, or its lease's end if in flight."""
        return sa.case(
            (row.status == NotificationStatus.DELIVERING, row.lease_until),
            else_=row.next_attempt_at,
        )

    def _due_query(self, now: datetime, limit: int) -> sa.Select:
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
            .where(self._is_head(row))
            .order_by(row.id)
            .limit(limit)
        )

    @staticmethod
    def _claimable(now: datetime) -> sa.ColumnElement[bool]:
        """Still waiting for delivery: pending, or in flight under an expired lease."""
        return sa.and_(
            Notification.status.in_(_ACTIVE),
            sa.or_(
                Notification.status == NotificationStatus.PENDING,
                Notification.lease_until < now,
            ),
        )

    def _claim(
        self, report: DispatchReport, limit: int | None = None
    ) -> tuple[list[_Claimed], float | None]:
        now = self.clock()
        lease = now + timedelta(seconds=self.config.lease_s + self.config.timeout_s)
        rate_wait: float | None = None
        # Read without the write lock: a poll that finds nothing must not hold up the
        # agent. The UPDATEs below re-check every condition, so a stale read is harmless.
        with session_scope(self.engine) as session:
            query = self._due_query(now, min(limit or self.batch_size, self.batch_size))
            candidates = session.execute(query).scalars().all()
            silenced = self._silenced(session, candidates, now) if candidates else {}
        allowed: list[Notification] = []
        for row in candidates:
            if row.id in silenced:
                continue
            bucket = self.buckets.get(row.destination)
            if bucket is not None and not bucket.try_take():
                report.rate_limited += 1
                wait = bucket.wait_s()
                rate_wait = wait if rate_wait is None else min(rate_wait, wait)
                continue
            allowed.append(row)
        if not allowed and not silenced:
            return [], rate_wait
        with write_transaction(self.engine) as session:
            for row_id, silence_id in silenced.items():
                suppressed = session.execute(
                    sa.update(Notification)
                    .where(Notification.id == row_id)
                    .where(self._claimable(now))
                    .values(
                        status=NotificationStatus.SUPPRESSED,
                        silenced_by=silence_id,
                        lease_until=None,
                    )
                    .execution_options(synchronize_session=False)
                )
                report.suppressed += int(suppressed.rowcount or 0)
            if not allowed:
                return [], rate_wait
            # One conditional UPDATE for the round; RETURNING says which rows are ours
            # (another dispatcher may have claimed some since the SELECT).
            taken = session.execute(
                sa.update(Notification)
                .where(Notification.id.in_([row.id for row in allowed]))
                .where(self._claimable(now))
                .values(
                    status=NotificationStatus.DELIVERING,
                    lease_until=lease,
                    attempts=Notification.attempts + 1,
                )
                .returning(Notification.id, Notification.attempts)
                .execution_options(synchronize_session=False)
            ).all()
            attempts = {row_id: attempt for row_id, attempt in taken}
            claimed = [
                _Claimed(
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
        return claimed, rate_wait

    @staticmethod
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

    def _next_due_s(self, rate_wait: float | None) -> float | None:
        row = aliased(Notification)
        with session_scope(self.engine) as session:
            ready = self._ready_at(row)
            next_at = session.execute(
                sa.select(sa.func.min(ready))
                .where(row.status.in_(_ACTIVE))
                .where(self._is_head(row))
            ).scalar()
        if next_at is None:
            return rate_wait
        if isinstance(next_at, str):  # SQLite returns CASE results untyped
            next_at = datetime.fromisoformat(next_at)
        if next_at.tzinfo is None:
            next_at = next_at.replace(tzinfo=UTC)
        due = max((next_at - self.clock()).total_seconds(), 0.0)
        if rate_wait is None:
            return due
        # Rows due now were held back by a rate limit: they wait for a token.
        return rate_wait if due <= 0 else min(due, rate_wait)

    # --- delivering ----------------------------------------------------------------------

    async def _deliver(self, channels: _Channels, item: _Claimed) -> _Result:
        if item.destination == INCIDENTS_TOPIC_DESTINATION:
            return await self._publish(channels.topic, item)
        destination = self.destinations.get(item.destination)
        if destination is None:
            return _Result(
                "dead",
                None,
                f"destination {item.destination!r} is not configured any more; add it back "
                "and requeue with `genmon notify retry`",
                0.0,
            )
        started = time.perf_counter()
        try:
            request = destination.render(
                Message(item.idempotency_key, item.event, item.payload, item.incident_id)
            )
            timeout = destination.settings.timeout_s or self.config.timeout_s
            response = await channels.http.post(
                request.url, content=request.body, headers=request.headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            secrets = destination.secrets()
            message = scrub_secrets(f"{type(exc).__name__}: {exc}", secrets)
            return _Result("retry", None, message, _ms(started))
        duration = _ms(started)
        code = response.status_code
        if 200 <= code < 300:
            return _Result("delivered", code, None, duration)
        excerpt = scrub_secrets(response.text[:_ERROR_BODY_CHARS], destination.secrets())
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock())
        if code in RETRYABLE_STATUS:
            return _Result("retry", code, f"HTTP {code}: {excerpt}", duration, retry_after)
        return _Result("dead", code, f"HTTP {code} is not retryable: {excerpt}", duration)

    @staticmethod
    async def _publish(topic: IncidentTopicPublisher, item: _Claimed) -> _Result:
        try:
            event = IncidentEvent.model_validate(item.payload)
        except ValidationError as exc:
            return _Result("dead", None, f"not an incident event: {exc}", 0.0)
        started = time.perf_counter()
        try:
            await topic.send(item.incident_id.encode(), encode(event))
        except (KafkaError, OSError, TimeoutError) as exc:
            error = f"{topic.topic}: {type(exc).__name__}: {exc}"
            return _Result("retry", None, error, _ms(started))
        return _Result("delivered", None, None, _ms(started))

    def _backoff_s(self, attempt: int) -> float:
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (attempt - 1))
        return base / 2 + self.rng.uniform(0, base / 2)

    def _record(self, outcomes: list[tuple[_Claimed, _Result]]) -> list[NotificationStatus]:
        """Write a round's outcomes and delivery log in one transaction."""
        now = self.clock()
        statuses = []
        with write_transaction(self.engine) as session:
            for item, result in outcomes:
                status, values = self._next_state(item, result, now)
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
        self, item: _Claimed, result: _Result, now: datetime
    ) -> tuple[NotificationStatus, dict[str, object]]:
        values: dict[str, object] = {
            "lease_until": None,
            "last_status_code": result.status_code,
            "last_error": result.error,
        }
        if result.outcome == "delivered":
            values.update(status=NotificationStatus.DELIVERED, delivered_at=now)
            return NotificationStatus.DELIVERED, values
        if result.outcome == "retry" and item.attempt < self.config.max_attempts:
            delay = self._backoff_s(item.attempt)
            if result.retry_after_s is not None:
                honoured = min(result.retry_after_s, self.config.retry_after_max_s)
                delay = max(delay, honoured)
                bucket = self.buckets.get(item.destination)
                if bucket is not None:
                    bucket.pause(honoured)
            values.update(
                status=NotificationStatus.PENDING, next_attempt_at=now + timedelta(seconds=delay)
            )
            return NotificationStatus.PENDING, values
        values["status"] = NotificationStatus.DEAD
        return NotificationStatus.DEAD, values


class _Borrowed:
    """A caller's client used as a context manager without closing it."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
