"""genmon's own heartbeat, so on-call hears when genmon itself is down.

Pages say that a model misbehaves; nothing genmon sends can say that genmon stopped. So
the dispatcher also sends an always-firing heartbeat, every ``notify.watchdog_interval_s``
(default 60 s; 0 turns it off), to each destination that can watch for its absence, and
the receiver's dead man's switch fires when it stops coming:

- ``alertmanager`` destinations get Prometheus' *Watchdog* pattern: an alert named
  ``Watchdog`` (``severity: none``) that is always firing, in the same version-4 webhook
  payload as genmon's pages, re-posted every interval with ``endsAt``
  :data:`ENDS_AFTER_INTERVALS` intervals ahead, so it ends by itself once genmon stops
  re-posting it, labelled ``deployment: <kafka.topic_prefix>``. Route
  ``alertname="Watchdog"`` to your dead-man's-switch receiver, as for Prometheus' own;
- any destination with a ``heartbeat_url`` (a PagerDuty heartbeat, healthchecks.io,
  Cronitor, Dead Man's Snitch...) gets that URL pinged: a POST of a small JSON body
  (``schema: genmon.heartbeat/v1``), or a GET when the URL answers 405 to a POST.

Nothing else gets one: a heartbeat to a Slack channel, a PagerDuty Events API key or a
webhook that does not expect one would be a page every minute. ``watchdog: false`` on a
destination turns its heartbeat off.

A request with a body is signed like a webhook delivery when the destination has a
``secret`` (:mod:`~genmon.incidents.signing`), each beat with a fresh delivery id.

**What a beat means.** It goes out only while the dispatcher is working: the dispatcher
starts the watchdog once it has read the outbox, stops it when it stops (``genmon worker``
stopping, ``genmon notify dispatch`` interrupted), and holds beats back while it has not
read the outbox for a while (``healthy``), as when the database is away: genmon cannot
page then, which is what the dead man's switch is there to say. Several dispatchers
(workers) send the same alert; it ends only when every one has stopped.

A failed beat is never fatal: it is logged once per ``worker.log_repeat_interval_s`` per
destination with a count, its error with the destination's secrets scrubbed, and counted
in ``genmon_watchdog_heartbeats{destination, outcome}`` when a registry is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
from prometheus_client import CollectorRegistry, Counter

from genmon.exceptions import ConfigurationError
from genmon.incidents.destinations import IDEMPOTENCY_HEADER, Request, scrub_secrets
from genmon.incidents.signing import signed_headers
from genmon.schemas.events import utcnow
from genmon.settings import DestinationSettings, Settings

log = logging.getLogger(__name__)

WATCHDOG_ALERTNAME = "Watchdog"
HEARTBEAT_SCHEMA = "genmon.heartbeat/v1"
#: An Alertmanager Watchdog alert's ``endsAt`` is this many intervals ahead: a late or
#: lost beat or two is absorbed, and the alert ends soon after genmon stops.
ENDS_AFTER_INTERVALS = 3
_USER_AGENT = "genmon-notifier/1"
_ERROR_BODY_CHARS = 200

Kind = Literal["alertmanager", "heartbeat_url"]
#: One counter per registry, however many watchdogs (dispatchers) a process builds.
_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def heartbeat_counter(registry: CollectorRegistry) -> Counter:
    """``genmon_watchdog_heartbeats{destination, outcome}`` of ``registry``."""
    counter = _COUNTERS.get(registry)
    if counter is None:
        counter = _COUNTERS[registry] = Counter(
            "genmon_watchdog_heartbeats",
            "genmon's own heartbeats (Watchdog alert, heartbeat URL), by destination and"
            " outcome (sent, failed, held while the dispatcher was unhealthy)",
            ["destination", "outcome"],
            registry=registry,
        )
    return counter


@dataclass(frozen=True)
class Target:
    """One heartbeat: a destination and what it gets (the Watchdog alert or a URL ping)."""

    destination: DestinationSettings
    kind: Kind

    @property
    def name(self) -> str:
        """The destination's name, with ``/heartbeat_url`` for its ping (logs, metrics)."""
        suffix = "" if self.kind == "alertmanager" else "/heartbeat_url"
        return f"{self.destination.name}{suffix}"

    @property
    def url(self) -> str:
        secret = (
            self.destination.url if self.kind == "alertmanager" else self.destination.heartbeat_url
        )
        assert secret is not None
        return secret.get_secret_value()

    def secrets(self) -> list[str]:
        """Strings scrubbed from anything logged about this target."""
        destination = self.destination
        found = (
            destination.url,
            destination.secret,
            destination.routing_key,
            destination.heartbeat_url,
        )
        return [secret.get_secret_value() for secret in found if secret is not None]


def watchdog_targets(destinations: Iterable[DestinationSettings]) -> list[Target]:
    """The heartbeats these destinations take (see the module's docstring)."""
    targets = []
    for destination in destinations:
        if not destination.watchdog:
            continue
        if destination.type == "alertmanager":
            targets.append(Target(destination, "alertmanager"))
        if destination.heartbeat_url is not None:
            targets.append(Target(destination, "heartbeat_url"))
    return targets


def rfc3339(moment: datetime) -> str:
    """``2026-01-01T00:00:00Z`` (Alertmanager's form; seconds are enough for a heartbeat)."""
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def watchdog_alert_body(
    receiver: str,
    labels: Mapping[str, str],
    *,
    starts_at: datetime,
    now: datetime,
    interval_s: float,
    key: str,
) -> dict[str, Any]:
    """Alertmanager's version-4 webhook payload of the always-firing Watchdog alert."""
    labels = {"alertname": WATCHDOG_ALERTNAME, "severity": "none", **labels}
    annotations = {
        "summary": "genmon is running and can page",
        "description": (
            "Always firing while genmon's notification dispatcher runs, re-sent every "
            f"{interval_s:g} s. If it stops arriving, genmon is down or cannot page: "
            "check `genmon worker` and `genmon notify list --status dead`."
        ),
        "interval_s": f"{interval_s:g}",
        "idempotency_key": key,
    }
    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()
    alert = {
        "status": "firing",
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(starts_at),
        "endsAt": rfc3339(now + timedelta(seconds=ENDS_AFTER_INTERVALS * interval_s)),
        "generatorURL": "",
        "fingerprint": fingerprint[:16],
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{WATCHDOG_ALERTNAME}"}}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": receiver,
        "groupLabels": {"alertname": WATCHDOG_ALERTNAME},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "alerts": [alert],
    }


def heartbeat_body(
    destination: str, labels: Mapping[str, str], *, now: datetime, interval_s: float, key: str
) -> dict[str, Any]:
    """The JSON of a heartbeat URL ping: when the next one is due at the latest."""
    return {
        "schema": HEARTBEAT_SCHEMA,
        "idempotency_key": key,
        "destination": destination,
        "sent_at": rfc3339(now),
        "interval_s": interval_s,
        "expires_at": rfc3339(now + timedelta(seconds=ENDS_AFTER_INTERVALS * interval_s)),
        "labels": dict(labels),
    }


@dataclass
class _Streak:
    """Failed (or held back) beats in a row, logged at most once per interval."""

    count: int = 0
    unlogged: int = 0
    logged_at: float | None = None


class Watchdog:
    """Sends the heartbeats of ``destinations`` every ``interval_s`` in an asyncio task.

    ``healthy`` says whether a beat may go out now (the dispatcher: it read the outbox
    recently); ``clock`` stamps the payloads; ``monotonic`` and ``sleep`` pace the beats
    (fakes in tests). ``labels`` are added to the Watchdog alert and the ping's body.
    """

    def __init__(
        self,
        destinations: Iterable[DestinationSettings],
        interval_s: float,
        *,
        timeout_s: float = 10.0,
        labels: Mapping[str, str] | None = None,
        healthy: Callable[[], bool] | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log_every_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ConfigurationError(
                "a watchdog needs interval_s > 0; set notify.watchdog_interval_s, or 0 for none"
            )
        self.targets = watchdog_targets(destinations)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.labels = dict(labels or {})
        self.healthy = healthy or (lambda: True)
        self.clock, self.monotonic, self.sleep = clock, monotonic, sleep
        self.log_every_s = log_every_s
        self.started_at: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._use_get: set[str] = set()
        self._failures: dict[str, _Streak] = {}
        self._held = _Streak()
        self._counter = heartbeat_counter(registry) if registry is not None else None

    @classmethod
    def from_settings(
        cls, settings: Settings, destinations: Iterable[DestinationSettings], **kwargs: Any
    ) -> Watchdog | None:
        """The watchdog of these settings, or None (interval 0, or no destination takes one)."""
        notify = settings.notify
        if notify.watchdog_interval_s <= 0 or not watchdog_targets(destinations):
            return None
        kwargs.setdefault("timeout_s", notify.timeout_s)
        kwargs.setdefault("log_every_s", settings.worker.log_repeat_interval_s)
        kwargs.setdefault("labels", {"deployment": settings.kafka.topic_prefix})
        return cls(destinations, notify.watchdog_interval_s, **kwargs)

    # --- running -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, client: httpx.AsyncClient) -> None:
        """Beat now and every interval in a task of the running loop, until :meth:`stop`."""
        if self.running:
            return
        self.started_at = self.started_at or self.clock()
        self._task = asyncio.get_running_loop().create_task(
            self._run(client), name="genmon-watchdog"
        )
        names = ", ".join(target.name for target in self.targets)
        log.info("watchdog: heartbeat every %g s to %s", self.interval_s, names)

    async def stop(self) -> None:
        """Stop beating; returns once no more beats can go out."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than awaiting the task: a cancellation of the caller itself still
        # propagates, and the task's own CancelledError is not raised here.
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("watchdog: the heartbeat task had failed", exc_info=task.exception())

    async def _run(self, client: httpx.AsyncClient) -> None:
        due = self.monotonic()
        while True:
            await self.beat(client)
            due += self.interval_s
            now = self.monotonic()
            if due < now:  # a beat took longer than the interval: skip, never burst
                due = now
            await self.sleep(due - now)

    async def beat(self, client: httpx.AsyncClient) -> int:
        """One round: every target once, concurrently; returns how many were delivered."""
        if not self.healthy():
            self._hold()
            return 0
        if self._held.count:
            log.info("watchdog: beating again after holding back %d beats", self._held.count)
            self._held = _Streak()
        now = self.clock()
        results = await asyncio.gather(*(self._send(client, t, now) for t in self.targets))
        return sum(results)

    # --- one target ----------------------------------------------------------------------

    def render(self, target: Target, now: datetime, *, method: str = "POST") -> Request:
        """The request of ``target``'s beat at ``now`` (a fresh delivery id each time)."""
        key = f"watchdog-{uuid.uuid4().hex}"
        destination = target.destination
        headers = {"User-Agent": _USER_AGENT, IDEMPOTENCY_HEADER: key}
        if method == "GET":
            return Request(target.url, b"", headers)
        if target.kind == "alertmanager":
            starts_at = self.started_at or now
            document = watchdog_alert_body(
                destination.name,
                self.labels,
                starts_at=starts_at,
                now=now,
                interval_s=self.interval_s,
                key=key,
            )
        else:
            document = heartbeat_body(
                destination.name, self.labels, now=now, interval_s=self.interval_s, key=key
            )
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        headers["Content-Type"] = "application/json"
        if destination.secret is not None:
            headers.update(signed_headers(destination.secret, key, body))
        return Request(target.url, body, headers)

    async def _send(self, client: httpx.AsyncClient, target: Target, now: datetime) -> bool:
        timeout = target.destination.timeout_s or self.timeout_s
        try:
            method = "GET" if target.name in self._use_get else "POST"
            response = await self._request(client, target, now, method, timeout)
            if response.status_code == 405 and method == "POST" and target.kind != "alertmanager":
                log.info("watchdog: %s takes no POST; pinging it with GET", target.name)
                self._use_get.add(target.name)
                response = await self._request(client, target, now, "GET", timeout)
        except Exception as exc:  # never fatal: the next beat tries again
            self._failed(target, scrub_secrets(f"{type(exc).__name__}: {exc}", target.secrets()))
            return False
        if 200 <= response.status_code < 300:
            self._delivered(target)
            return True
        excerpt = scrub_secrets(response.text[:_ERROR_BODY_CHARS], target.secrets())
        self._failed(target, f"HTTP {response.status_code}: {excerpt}")
        return False

    async def _request(
        self, client: httpx.AsyncClient, target: Target, now: datetime, method: str, timeout: float
    ) -> httpx.Response:
        request = self.render(target, now, method=method)
        content = request.body or None
        return await client.request(
            method, request.url, content=content, headers=request.headers, timeout=timeout
        )

    # --- what it says about itself -------------------------------------------------------

    def _count(self, destination: str, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(destination, outcome).inc()

    def _delivered(self, target: Target) -> None:
        self._count(target.destination.name, "sent")
        failures = self._failures.pop(target.name, None)
        if failures is not None:
            log.info(
                "watchdog: heartbeat to %s delivered again after %d failed beats",
                target.name,
                failures.count,
            )

    def _failed(self, target: Target, error: str) -> None:
        self._count(target.destination.name, "failed")
        failures = self._failures.setdefault(target.name, _Streak())
        failures.count += 1
        now = self.monotonic()
        if failures.logged_at is not None and now - failures.logged_at < self.log_every_s:
            failures.unlogged += 1
            return
        more = f" (and {failures.unlogged} more since the last report)" if failures.unlogged else ""
        # The name is part of the template: genmon.logs counts repeats per template, and
        # each destination's failures must show (this already logs once per interval).
        name = target.name.replace("%", "%%")
        log.warning(
            f"watchdog: heartbeat to {name} failed%s: %s; its dead man's switch fires if "
            "this lasts: check the destination's url/heartbeat_url (`genmon config`)",
            more,
            error,
        )
        failures.logged_at, failures.unlogged = now, 0

    def _hold(self) -> None:
        for target in self.targets:
            self._count(target.destination.name, "held")
        held = self._held
        held.count += 1
        now = self.monotonic()
        if held.logged_at is None or now - held.logged_at >= self.log_every_s:
            log.warning(
                "watchdog: heartbeat held back (%d beats so far): the dispatcher has not read "
                "the outbox lately; is the database reachable? (`genmon notify list`)",
                held.count,
            )
            held.logged_at = now
