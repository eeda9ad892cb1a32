"""Refreshing references by the clock: the scheduler's ``reference-refresh`` ticks, as the
detection runner honours them.

The scheduler (:mod:`genmon.scheduler`) records each tick of ``scheduler.reference_refresh_cron``
as a ``schedule_fire`` row of schedule
:data:`~genmon.schemas.governance.REFERENCE_REFRESH_SCHEDULE`: that row is the durable
request, whichever worker reads it and whenever. :class:`RefreshRequests` reads the
latest fire time every :data:`POLL_S` seconds, in a thread of its own (the runner may
judge on the worker's event loop, which a slow database must not hold up); with no
refresh cron, or no database to read (a SQLite file that does not exist), there is
nothing to honour and nothing is read.

A model's detector state remembers the latest request it applied (``refreshed_at``, ms
since the epoch; a state stored before this field applies the latest request once). At
its next closed window after a later one, :func:`refresh_model` replaces each of the
model's baselines by its candidate when that holds ``detectors.baseline_warmup_windows``
windows, under the same "not worse" limit as a refresh by size
(:meth:`~genmon.detectors.calibration.baselines.RateBaseline.refresh_now`); a smaller
candidate is left to grow. An embedding drift series does the same at its next sample
(:meth:`~genmon.detectors.EmbeddingShiftDrift.refresh_now`: once its candidate holds what
a first reference needs). Either way the request counts as applied: the next one is the
next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, func, select

from genmon.detectors import EmbeddingShiftDrift
from genmon.exceptions import GenmonError
from genmon.schemas.governance import REFERENCE_REFRESH_SCHEDULE, ScheduleFire
from genmon.settings import Settings
from genmon.streams.detection.observations import ModelBaselines, accept_limit

log = logging.getLogger(__name__)

#: Seconds between two reads of the latest refresh request.
POLL_S = 60.0
#: Key of the latest request applied, in a model's (or embedding series') state.
REFRESHED_AT = "refreshed_at"

Reader = Callable[[], datetime | None]


class LatestFire:
    """Reads the latest ``reference-refresh`` fire time from ``url`` (engine made once)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None

    def __call__(self) -> datetime | None:
        parsed = make_url(self.url)
        database = parsed.database
        local = parsed.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        if local and not Path(str(database)).exists():
            return None  # no database yet: nothing was ever requested
        if self._engine is None:
            from genmon.db import make_engine

            self._engine = make_engine(self.url)
        query = select(func.max(ScheduleFire.fire_time)).where(
            ScheduleFire.schedule == REFERENCE_REFRESH_SCHEDULE
        )
        with Session(self._engine) as session:
            return session.exec(query).one()


class RefreshRequests:
    """The latest refresh request, read in the background every ``poll_s`` seconds."""

    def __init__(
        self,
        read: Reader,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read, self.poll_s, self.clock = read, poll_s, clock
        self._latest_ms: int | None = None
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RefreshRequests | None:
        """Requests from ``settings.database.url``; ``None`` without a refresh cron
        (``scheduler.reference_refresh_cron``): no tick is ever recorded then."""
        if not settings.scheduler.reference_refresh_cron:
            return None
        return cls(LatestFire(settings.database.url))

    def latest_ms(self) -> int | None:
        """The latest request known (ms since the epoch); starts a read in the background
        when one is due, and never waits for it."""
        with self._lock:
            busy = self._thread is not None and self._thread.is_alive()
            if not busy and self.clock() >= self._next:
                self._next = self.clock() + self.poll_s
                self._thread = threading.Thread(
                    target=self.read_now, name="genmon-reference-refresh", daemon=True
                )
                self._thread.start()
            return self._latest_ms

    def read_now(self) -> int | None:
        """Read the latest request now (in the caller's thread); the latest known."""
        try:
            fired = self.read()
        except (GenmonError, SQLAlchemyError) as exc:
            if not self._failing:
                log.warning("reference refresh: cannot read the scheduler's requests: %s", exc)
            self._failing = True
            return self._latest_ms
        self._failing = False
        with self._lock:
            self._next = max(self._next, self.clock() + self.poll_s)
            if fired is not None:
                fired_ms = round(fired.timestamp() * 1000)
                self._latest_ms = max(self._latest_ms or fired_ms, fired_ms)
            return self._latest_ms


def due(state: dict[str, Any], requested: int | None) -> bool:
    """Whether ``state`` has yet to apply the request of ``requested`` (ms)."""
    return requested is not None and int(state.get(REFRESHED_AT, -1)) < requested


def refresh_model(
    requests: RefreshRequests | None,
    state: dict[str, Any],
    baselines: ModelBaselines,
    settings: Settings,
    model_id: str,
) -> None:
    """At a closed window: if a request is due, replace the model's references by their
    candidates where large enough (see the module docstring) and mark it applied."""
    requested = requests.latest_ms() if requests is not None else None
    if requested is None or not due(state, requested):
        return
    verdicts = baselines.refresh_now(lambda signal: accept_limit(settings, signal))
    state[REFRESHED_AT] = requested
    log.info(
        "model %s: references refreshed by the clock: %s",
        model_id,
        dict(verdicts) or "no candidate large enough",
    )


def refresh_series(
    requests: RefreshRequests | None, state: dict[str, Any], detector: EmbeddingShiftDrift
) -> None:
    """At an embedding sample: if a request is due, refresh the series' drift reference
    (when its candidate is large enough) and mark it applied."""
    requested = requests.latest_ms() if requests is not None else None
    if requested is not None and due(state, requested):
        detector.refresh_now()
        state[REFRESHED_AT] = requested


__all__ = [
    "POLL_S",
    "REFRESHED_AT",
    "LatestFire",
    "RefreshRequests",
    "due",
    "refresh_model",
    "refresh_series",
]
