"""The one scheduler across processes: a lease loop on every process, APScheduler on one.

Every process that runs it (``genmon worker --role retrain`` when
``scheduler.enabled``, or ``genmon schedule run``) polls the leader lease
(:mod:`genmon.scheduler.lease`) every ``scheduler.lease_s / 3``:

- the **leader** runs an APScheduler 3.x ``BackgroundScheduler`` whose one job, every
  ``scheduler.tick_s`` (``coalesce=True``, ``max_instances=1``), compares the clock with
  every schedule (:mod:`genmon.scheduler.schedules`) and fires what is due;
- a **standby** does not start APScheduler; it takes over once the leader's lease lapses;
- a leader whose renewal fails (the lease was taken, or the database did not answer)
  shuts APScheduler down at once, and stops firing anyway once ``lease_s`` has passed
  since its last renewal began (a process paused past its lease fires nothing when it
  resumes).

**Once per tick.** Each fire first inserts ``schedule_fire(schedule, fire_time)``
(:mod:`genmon.scheduler.fires`); a second leader (after a pause, or with a skewed clock)
loses on the unique key and does nothing. Every effect is keyed by the tick as well, so
a tick whose leader died between its claim and its recorded result is re-run by the
next leader (or by the same one, at its first tick after a lease poll) and happens once.

**Missed ticks.** APScheduler's job store lives in memory, so its own misfire handling
cannot see a tick that passed while no leader ran. The schedules are judged here instead:
a tick is due when it is the latest in ``(now - scheduler.misfire_grace_s, now]`` and this
leader has not handled it. A new leader starts with nothing handled, so the latest tick
within the grace of each schedule is tried once: if no ``schedule_fire`` row has it, it
fires (a missed tick, once); if one has, the claim fails and nothing happens. Older
missed ticks coalesce into it; ticks older than the grace are skipped.

**The clock.** Fire times come from ``clock`` (the wall clock unless a test injects
another): tests move it to drive ticks without waiting for minutes. The lease keeps the
database's clock.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from genmon.db import session_scope
from genmon.exceptions import GenmonError
from genmon.retrain.policy import RetrainPolicy
from genmon.scheduler import fires
from genmon.scheduler.effects import Clock, run_effect
from genmon.scheduler.lease import LeaderLease, LeaseState
from genmon.scheduler.schedules import Schedule, build_schedules, due_tick, utc_second
from genmon.schemas.events import utcnow
from genmon.schemas.retrain import RegisteredModel
from genmon.settings import Settings

log = logging.getLogger(__name__)

TICK_JOB = "genmon-scheduler-tick"


def default_holder() -> str:
    """``host:pid:random``: unique per process, readable in the lease row."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def registered_models(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return sorted(session.exec(select(RegisteredModel.model_id)).all())


def current_schedules(settings: Settings, engine: Engine, policy: RetrainPolicy) -> list[Schedule]:
    """The schedules as they stand: settings, policy and the models registered now."""
    return build_schedules(settings.scheduler, policy, registered_models(engine))


def fire(
    engine: Engine,
    settings: Settings,
    policy: RetrainPolicy,
    schedule: Schedule,
    fire_time: datetime,
    *,
    holder: str,
    epoch: int,
    clock: Clock = utcnow,
) -> dict[str, Any] | None:
    """Claim the tick, then enqueue its effect; what it did, or ``None`` if it was claimed
    already. An effect that fails is recorded on the tick's row (not retried by clock); a
    process that dies before recording it leaves the row ``claimed``, and the leader
    re-runs it (:func:`rerun_stranded`)."""
    fire_time = utc_second(fire_time)
    fire_id = fires.claim(engine, schedule.name, fire_time, holder, epoch)
    if fire_id is None:
        return None
    return _effect(engine, settings, policy, schedule, fire_time, fire_id, holder, epoch, clock)


def _effect(
    engine: Engine,
    settings: Settings,
    policy: RetrainPolicy,
    schedule: Schedule,
    fire_time: datetime,
    fire_id: int,
    holder: str,
    epoch: int,
    clock: Clock,
    expected: tuple[type[BaseException], ...] = (GenmonError, SQLAlchemyError),
) -> dict[str, Any]:
    """Run a claimed tick's effect and record it on the tick's row."""
    try:
        result = run_effect(engine, settings, policy, schedule, fire_time, clock)
    except expected as exc:
        log.error("scheduler: %s at %s failed: %s", schedule.name, fire_time.isoformat(), exc)
        result = {"status": "failed", "error": str(exc)[:2000]}
    fires.record(engine, fire_id, result, holder, epoch)
    log.info("scheduler: %s at %s: %s", schedule.name, fire_time.isoformat(), result)
    return result


def rerun_stranded(
    engine: Engine,
    settings: Settings,
    policy: RetrainPolicy,
    schedules: list[Schedule],
    *,
    holder: str,
    epoch: int,
    clock: Clock = utcnow,
) -> list[tuple[str, datetime]]:
    """Re-run the ticks left ``claimed`` by a leader that died before recording them
    (see :mod:`genmon.scheduler.fires`); what was re-run. Only the leader calls this."""
    by_name = {schedule.name: schedule for schedule in schedules}
    manual_before = utcnow() - timedelta(seconds=settings.scheduler.lease_s)
    done: list[tuple[str, datetime]] = []
    for row in fires.stranded(engine, manual_before):
        assert row.id is not None
        previous = (row.holder, row.epoch)
        if not fires.reclaim(engine, row, holder, epoch):
            continue
        log.warning(
            "scheduler: %s at %s was left claimed by %s (epoch %d); running it again",
            row.schedule,
            row.fire_time.isoformat(),
            *previous,
        )
        schedule = by_name.get(row.schedule)
        if schedule is None:
            reason = f"schedule {row.schedule} is gone (configuration or model changed)"
            fires.record(engine, row.id, {"status": "skipped", "reason": reason}, holder, epoch)
            continue
        # Anything may go wrong a second time: it is recorded, never re-run a third time.
        _effect(
            engine,
            settings,
            policy,
            schedule,
            row.fire_time,
            row.id,
            holder,
            epoch,
            clock,
            expected=(Exception,),
        )
        done.append((row.schedule, row.fire_time))
    return done


class Scheduler:
    """One process's scheduler: :meth:`start` the lease loop, :meth:`stop` it."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        policy: RetrainPolicy,
        *,
        clock: Clock = utcnow,
        holder: str | None = None,
    ) -> None:
        self.settings, self.engine, self.policy, self.clock = settings, engine, policy, clock
        self.config = settings.scheduler
        self.lease = LeaderLease(engine, holder or default_holder(), self.config.lease_s)
        self.state: LeaseState | None = None
        self.schedules: list[Schedule] = []
        self._aps: BackgroundScheduler | None = None
        #: Latest tick handled (fired or found fired) per schedule, this term.
        self._handled: dict[str, datetime] = {}
        #: ``time.monotonic()`` until which this process surely holds the lease.
        self._valid_until = 0.0
        #: Set by every lease poll that leads: the next tick re-runs stranded ticks.
        self._recover = threading.Event()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self.lease.holder

    @property
    def leading(self) -> bool:
        """APScheduler runs here and the lease has not lapsed since its last renewal."""
        return self._aps is not None and time.monotonic() < self._valid_until

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll the lease in a thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="genmon-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the lease loop and APScheduler, and let the lease go for a standby."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._lock:
            self._stop_aps("stopping")
        try:
            if self.lease.release():
                log.info("scheduler: %s released the lease", self.holder)
        except GenmonError as exc:
            log.warning("scheduler: could not release the lease (%s); it lapses anyway", exc)

    def run(self) -> None:
        """Poll the lease in this thread until :meth:`request_stop`, then :meth:`stop`."""
        try:
            self._run()
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Make :meth:`run` return (safe in a signal handler)."""
        self._stop.set()

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def _run(self) -> None:
        interval = self.config.lease_s / 3
        log.info("scheduler: %s polls the lease every %.3g s", self.holder, interval)
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                log.exception("scheduler: the lease loop failed; trying again")
            self._stop.wait(interval)

    # -- the lease --------------------------------------------------------------------------
    def poll_once(self) -> LeaseState | None:
        """Hold the lease once: start APScheduler on becoming leader, stop it on losing."""
        began = time.monotonic()
        try:
            state = self.lease.hold()
        except GenmonError as exc:
            log.warning("scheduler: renewing the lease failed: %s", exc)
            state = None
        with self._lock:
            self.state = state
            if state is None or not state.leader:
                self._valid_until = 0.0
                self._stop_aps("the lease is lost" if state is not None else "no database")
                return state
            self._valid_until = began + self.config.lease_s
            self._recover.set()
            try:
                self._refresh_schedules()
            except (GenmonError, SQLAlchemyError) as exc:
                log.warning("scheduler: reading the schedules failed: %s", exc)
            if self._aps is None and not self._stop.is_set():
                self._start_aps(state)
        return state

    def _start_aps(self, state: LeaseState) -> None:
        self._handled.clear()  # a new term: the latest tick within grace is tried once
        aps = BackgroundScheduler(timezone=self.config.timezone)
        aps.add_job(
            self.tick,
            "interval",
            seconds=self.config.tick_s,
            id=TICK_JOB,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
            next_run_time=datetime.now(tz=aps.timezone),
        )
        aps.start()
        self._aps = aps
        log.info(
            "scheduler: %s leads (epoch %d): %d schedule(s)",
            self.holder,
            state.epoch,
            len(self.schedules),
        )

    def _stop_aps(self, why: str) -> None:
        if self._aps is None:
            return
        self._aps.shutdown(wait=False)
        self._aps = None
        log.warning("scheduler: %s stopped scheduling: %s", self.holder, why)

    def _refresh_schedules(self) -> None:
        """Schedules of models registered since: their earlier ticks are not theirs."""
        found = current_schedules(self.settings, self.engine, self.policy)
        known = {s.name for s in self.schedules}
        if self._aps is not None:
            now = self.clock()
            for schedule in found:
                if schedule.name not in known:
                    self._handled[schedule.name] = now
        self.schedules = found

    # -- ticks ------------------------------------------------------------------------------
    def tick(self) -> list[tuple[str, datetime]]:
        """Fire every schedule that is due now (the APScheduler job); what was fired."""
        with self._lock:
            if not self.leading or self.state is None:
                return []
            epoch, schedules = self.state.epoch, list(self.schedules)
        fired: list[tuple[str, datetime]] = []
        if self._recover.is_set():
            # Ticks run one at a time: none of this leader's own is in flight now.
            self._recover.clear()
            try:
                fired += rerun_stranded(
                    self.engine,
                    self.settings,
                    self.policy,
                    schedules,
                    holder=self.holder,
                    epoch=epoch,
                    clock=self.clock,
                )
            except (GenmonError, SQLAlchemyError) as exc:
                self._recover.set()
                log.warning("scheduler: re-running stranded ticks failed (%s); next tick", exc)
        grace = self.config.misfire_grace_s
        for schedule in schedules:
            now = self.clock()
            due = due_tick(schedule, now, grace, self._handled.get(schedule.name))
            if due is None:
                continue
            if not self.leading:  # the lease went while ticking
                break
            try:
                result = fire(
                    self.engine,
                    self.settings,
                    self.policy,
                    schedule,
                    due,
                    holder=self.holder,
                    epoch=epoch,
                    clock=self.clock,
                )
            except (GenmonError, SQLAlchemyError) as exc:
                log.warning("scheduler: claiming %s failed (%s); next tick", schedule.name, exc)
                continue
            self._handled[schedule.name] = due
            if result is not None:
                fired.append((schedule.name, utc_second(due)))
        return fired


def run_scheduler(
    settings: Settings,
    *,
    clock: Clock = utcnow,
    holder: str | None = None,
    loglevel: str | None = None,
) -> None:
    """``genmon schedule run``: the scheduler alone, in the foreground, until SIGTERM or
    SIGINT (a standby until it leads)."""
    from genmon import db
    from genmon.retrain.policy import load_policy
    from genmon.retrain.runner import configure_logging

    configure_logging(settings, loglevel)
    policy = load_policy(settings.retrain.policy_file)
    db.upgrade(settings.database.url)
    engine = db.make_engine(settings.database.url)
    scheduler = Scheduler(settings, engine, policy, clock=clock, holder=holder)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("scheduler: %s, stopping", signal.Signals(signum).name)
        scheduler.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()


@contextmanager
def scheduler_running(settings: Settings) -> Iterator[Scheduler | None]:
    """The scheduler for the block's duration, when ``scheduler.enabled`` (the retrain
    worker runs its work inside this)."""
    if not settings.scheduler.enabled:
        yield None
        return
    from genmon import db
    from genmon.retrain.policy import load_policy

    engine = db.make_engine(settings.database.url)
    scheduler = Scheduler(settings, engine, load_policy(settings.retrain.policy_file))
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()
        engine.dispose()


__all__ = [
    "Scheduler",
    "current_schedules",
    "default_holder",
    "fire",
    "registered_models",
    "rerun_stranded",
    "run_scheduler",
    "scheduler_running",
]
