"""Sending one claimed notification, and saying how it went: delivered, retry or dead.

Pages go over HTTP to their destination (:mod:`~genmon.incidents.destinations` renders
them); the rows of :data:`~genmon.schemas.incidents.INCIDENTS_TOPIC_DESTINATION` go to
the ``<prefix>.incidents`` topic (:mod:`~genmon.incidents.publisher`). Nothing here
touches the database: the dispatcher claims the rows before (:mod:`.outbox`) and records
each :class:`DeliveryResult` after, so a slow receiver holds up no transaction.

Every copy of a row is sent with the same ``Idempotency-Key``, which receivers use to
drop a copy sent again after a crash. Errors are stored and logged with the
destination's secrets (URL tokens, HMAC keys) scrubbed out.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import httpx
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from genmon.exceptions import ConfigurationError
from genmon.incidents.destinations import Destination, Message, scrub_secrets
from genmon.incidents.publisher import IncidentTopicPublisher
from genmon.incidents.retry import RETRYABLE_STATUS, parse_retry_after
from genmon.schemas.codec import encode
from genmon.schemas.events import IncidentEvent
from genmon.schemas.incidents import INCIDENTS_TOPIC_DESTINATION
from genmon.settings import Settings

_ERROR_BODY_CHARS = 200


@dataclass(frozen=True)
class Channels:
    """Where one run delivers: pages over HTTP, incident events to the incidents topic."""

    http: httpx.AsyncClient
    topic: IncidentTopicPublisher


@dataclass(frozen=True)
class Claimed:
    """A notification row claimed under a lease: what its delivery needs to know."""

    id: int
    incident_id: str | None
    """``None`` for the daily digest (about no one incident)."""
    destination: str
    event: str
    idempotency_key: str
    payload: dict
    attempt: int
    probe: bool = False
    """Sent as the probe of a paused destination (:mod:`~genmon.incidents.health`)."""


@dataclass(frozen=True)
class DeliveryResult:
    """How one attempt went; the dispatcher turns it into the row's next state."""

    outcome: str  # delivered, retry, dead
    status_code: int | None
    error: str | None
    duration_ms: float
    retry_after_s: float | None = None


@asynccontextmanager
async def open_channels(
    settings: Settings, client: httpx.AsyncClient | None = None
) -> AsyncIterator[Channels]:
    """The HTTP client and the topic producer of one run; both live in its event loop.

    A caller's ``client`` is used and left open; otherwise one is made and closed here.
    """
    timeout_s = settings.notify.timeout_s
    http = (
        _Borrowed(client)
        if client is not None
        else httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
    )
    topic = IncidentTopicPublisher(settings, timeout_s)
    try:
        async with http as opened:
            yield Channels(opened, topic)
    finally:
        await topic.close()


async def deliver(
    channels: Channels,
    item: Claimed,
    destinations: Mapping[str, Destination],
    timeout_s: float,
    clock: Callable[[], datetime],
) -> DeliveryResult:
    """Send ``item`` to its destination (or the incidents topic) once.

    ``timeout_s`` applies where the destination sets none; ``clock`` reads a
    ``Retry-After`` given as an HTTP date.
    """
    if item.destination == INCIDENTS_TOPIC_DESTINATION:
        return await publish(channels.topic, item)
    destination = destinations.get(item.destination)
    if destination is None:
        return DeliveryResult(
            "dead",
            None,
            f"destination {item.destination!r} is not configured any more; add it back "
            "and requeue with `genmon notify retry`",
            0.0,
        )
    try:
        request = destination.render(
            Message(item.idempotency_key, item.event, item.payload, item.incident_id)
        )
    except ConfigurationError as exc:  # e.g. a digest queued for a pages-only destination
        return DeliveryResult("dead", None, str(exc), 0.0)
    started = time.perf_counter()
    try:
        timeout = destination.settings.timeout_s or timeout_s
        response = await channels.http.post(
            request.url, content=request.body, headers=request.headers, timeout=timeout
        )
    except httpx.HTTPError as exc:
        secrets = destination.secrets()
        message = scrub_secrets(f"{type(exc).__name__}: {exc}", secrets)
        return DeliveryResult("retry", None, message, _ms(started))
    duration = _ms(started)
    code = response.status_code
    if 200 <= code < 300:
        return DeliveryResult("delivered", code, None, duration)
    excerpt = scrub_secrets(response.text[:_ERROR_BODY_CHARS], destination.secrets())
    retry_after = parse_retry_after(response.headers.get("Retry-After"), clock())
    if code in RETRYABLE_STATUS:
        return DeliveryResult("retry", code, f"HTTP {code}: {excerpt}", duration, retry_after)
    return DeliveryResult("dead", code, f"HTTP {code} is not retryable: {excerpt}", duration)


async def publish(topic: IncidentTopicPublisher, item: Claimed) -> DeliveryResult:
    """Publish an incident event row to the incidents topic, keyed by its incident."""
    try:
        event = IncidentEvent.model_validate(item.payload)
    except ValidationError as exc:
        return DeliveryResult("dead", None, f"not an incident event: {exc}", 0.0)
    started = time.perf_counter()
    try:
        await topic.send(event.incident_id.encode(), encode(event))
    except (KafkaError, OSError, TimeoutError) as exc:
        error = f"{topic.topic}: {type(exc).__name__}: {exc}"
        return DeliveryResult("retry", None, error, _ms(started))
    return DeliveryResult("delivered", None, None, _ms(started))


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
