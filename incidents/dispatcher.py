"""Deliver the outbox: claim due notifications, deliver them, record how it went.

The manager writes ``notification`` rows in the same transaction as the incident change;
this dispatcher (``genmon notify dispatch``, or a task inside ``genmon worker``) delivers
them: pages over HTTP, and the rows of
:data:`~genmon.schemas.incidents.INCIDENTS_TOPIC_DESTINATION` to the ``<prefix>.incidents``
topic of its own settings (:mod:`~genmon.incidents.publisher`). The pieces:

- :mod:`~genmon.incidents.outbox`: claiming rows under a lease, in order per incident and
  destination, checking silences once more when a page is due, and recording each
  attempt (at least once, with the same ``Idempotency-Key`` every time);
- :mod:`~genmon.incidents.delivery`: one attempt, over HTTP or to the topic;
- :mod:`~genmon.incidents.retry`: backoff with jitter, ``Retry-After``;
- :mod:`~genmon.incidents.health`: a destination that keeps failing is paused and
  probed, its queue waiting with its tries intact;
- :mod:`~genmon.incidents.expiry`: past ``notify.retry_horizon_s`` rows are dead, and an
  incident about their destination is paged elsewhere;
- :mod:`~genmon.incidents.rate_limit`: a token bucket per destination.

This module runs them: :meth:`Dispatcher.run` as a pipeline for the worker,
:meth:`Dispatcher.drain` and :meth:`Dispatcher.dispatch_once` in rounds for the CLI and
tests. **Silences that end**: every poll interval (and every round of ``genmon notify
dispatch --once``) it has the manager page again wherever a silence that has ended (or
was expired early) held back a still-open incident
(:meth:`~genmon.incidents.manager.IncidentManager.repeat_unsilenced_pages`), so such a
page goes out within a poll interval of the silence's end, once, however many
dispatchers run. The retry horizon is swept on the same beat.

**The watchdog.** While :meth:`Dispatcher.run` runs, it also sends genmon's own
always-firing heartbeat (:mod:`~genmon.incidents.watchdog`) every
``notify.watchdog_interval_s`` to the destinations that take one, so their dead man's
switch fires when genmon stops. It starts once the outbox has been read, is held back
while the outbox has not been read lately, and stops with the run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from genmon.exceptions import DatabaseError
from genmon.incidents import delivery, expiry, outbox
from genmon.incidents.delivery import Channels, Claimed, DeliveryResult
from genmon.incidents.destinations import Destination, build_destination
from genmon.incidents.manager import IncidentManager
from genmon.incidents.ordering import COALESCING_TYPES
from genmon.incidents.rate_limit import TokenBucket
from genmon.incidents.routing import Router
from genmon.incidents.watchdog import Watchdog
from genmon.schemas.events import utcnow
from genmon.schemas.incidents import NotificationStatus
from genmon.settings import NotifySettings, Settings, get_settings

log = logging.getLogger(__name__)


@dataclass
class DispatchReport:
    """What a round (or a drain, summed) did, for the CLI and the tests."""

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    rate_limited: int = 0
    suppressed: int = 0
    unsilenced: int = 0
    """Triggers queued because a silence that held an open incident back has ended."""
    expired: int = 0
    """Rows made dead because the retry horizon passed (counted in ``dead`` too)."""
    wait_s: float | None = field(default=None, repr=False)

    def add(self, other: DispatchReport) -> None:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.rate_limited += other.rate_limited
        self.suppressed += other.suppressed
        self.unsilenced += other.unsilenced
        self.expired += other.expired


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
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``registry``: where the watchdog counts its heartbeats (the worker's metrics)."""
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
        self.router = router
        # Destinations whose backlog is coalesced when they come back (ordering.py).
        self.coalescing = frozenset(
            name for name, cfg in router.destinations.items() if cfg.type in COALESCING_TYPES
        )
        # Queues the pages of silences that have ended; it routes nothing itself.
        self.incidents = IncidentManager(engine, self.settings, router=router, clock=clock)
        self._wake: asyncio.Event | None = None
        # The heartbeat of genmon itself; None when off or no destination takes one.
        self.watchdog = Watchdog.from_settings(
            self.settings,
            router.destinations.values(),
            healthy=self._healthy,
            clock=clock,
            registry=registry,
        )
        self._polled_at: float | None = None

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
        outcomes: asyncio.Queue[tuple[Claimed, DeliveryResult]] = asyncio.Queue()
        in_flight: set[asyncio.Task[None]] = set()
        semaphore = asyncio.Semaphore(self.config.concurrency)
        most_in_flight = self.config.concurrency * 4
        next_unsilence_check = 0.0

        async def deliver(channels: Channels, item: Claimed) -> None:
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
                                await asyncio.to_thread(self._housekeeping, report)
                            claimed, rate_wait = await asyncio.to_thread(self._claim, report, room)
                            self._polled(channels)
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
                if self.watchdog is not None:
                    await self.watchdog.stop()
                if in_flight:
                    await asyncio.gather(*in_flight, return_exceptions=True)
                await outcomes.join()
                recorder.cancel()

    def _polled(self, channels: Channels) -> None:
        """The outbox was read: the watchdog may beat (and starts on the first read)."""
        self._polled_at = time.monotonic()
        if self.watchdog is not None and not self.watchdog.running:
            self.watchdog.start(channels.http)

    def _healthy(self) -> bool:
        """Whether the outbox was read lately: a poll interval or two, a delivery's
        timeout while the pipeline is full, and a beat's interval of slack."""
        if self._polled_at is None:
            return False
        config = self.config
        stale_s = max(config.watchdog_interval_s, 2 * config.poll_interval_s) + config.timeout_s
        return time.monotonic() - self._polled_at <= stale_s

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
    async def _channels(self, client: httpx.AsyncClient | None = None) -> AsyncIterator[Channels]:
        """The HTTP client and the topic producer of one run; both live in its event loop."""
        client = client if client is not None else self.client
        async with delivery.open_channels(self.settings, client) as channels:
            yield channels

    async def dispatch_once(self, client: httpx.AsyncClient | None = None) -> DispatchReport:
        """One round: claim what is due and allowed, deliver it concurrently, log it."""
        async with self._channels(client) as channels:
            return await self._round(channels)

    async def _round(self, channels: Channels) -> DispatchReport:
        report = DispatchReport()
        await asyncio.to_thread(self._housekeeping, report)
        report.dead += report.expired
        claimed, rate_wait = await asyncio.to_thread(self._claim, report)
        report.claimed = len(claimed)
        semaphore = asyncio.Semaphore(self.config.concurrency)

        async def deliver(item: Claimed) -> DeliveryResult:
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

    # --- the outbox and the channels ----------------------------------------------------

    def _housekeeping(self, report: DispatchReport) -> None:
        """Once per poll interval: pages of silences that ended, and the retry horizon."""
        report.unsilenced += self.incidents.repeat_unsilenced_pages()
        report.expired += expiry.expire_undelivered(
            self.engine, self.clock(), self.config, self._avoiding
        )

    def _avoiding(self, destination: str) -> IncidentManager:
        """A manager that pages about ``destination`` everywhere but there."""
        return IncidentManager(
            self.engine, self.settings, router=self.router.avoiding(destination), clock=self.clock
        )

    def _claim(
        self, report: DispatchReport, limit: int | None = None
    ) -> tuple[list[Claimed], float | None]:
        """Lease what is due and allowed; counts what rate limits and silences held back."""
        now = self.clock()
        lease = now + timedelta(seconds=self.config.lease_s + self.config.timeout_s)
        size = min(limit or self.batch_size, self.batch_size)
        taken = outbox.claim_due(self.engine, now, lease, size, self.buckets)
        report.rate_limited += taken.rate_limited
        report.suppressed += taken.suppressed
        return taken.claimed, taken.rate_wait

    def _next_due_s(self, rate_wait: float | None) -> float | None:
        return outbox.next_due_s(self.engine, self.clock(), rate_wait)

    async def _deliver(self, channels: Channels, item: Claimed) -> DeliveryResult:
        return await delivery.deliver(
            channels, item, self.destinations, self.config.timeout_s, self.clock
        )

    def _record(self, outcomes: list[tuple[Claimed, DeliveryResult]]) -> list[NotificationStatus]:
        """Write a round's outcomes and delivery log in one transaction; a destination
        that answers again has its unreachable incident resolved."""
        settled = outbox.record_outcomes(
            self.engine,
            outcomes,
            self.clock(),
            self.config,
            self.rng,
            self.buckets,
            self.coalescing,
        )
        for destination in settled.resumed:
            try:
                expiry.resolve_unreachable(self.engine, self.incidents, destination)
            except DatabaseError as exc:  # the outcomes are recorded; on-call can resolve it
                log.warning("could not resolve %s's unreachable incident: %s", destination, exc)
        return settled.statuses
