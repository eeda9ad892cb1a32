"""Announcing alias moves: the ``<prefix>.models`` topic and signed webhooks.

Each :class:`~genmon.schemas.events.ModelEvent` the registry returns is

- published on ``settings.topic("models")`` keyed by its model id (so one model's events
  stay in order on one partition; ``acks=all``, flushed before :meth:`announce` returns),
  which followers (``genmon models follow``, ``Monitor.follow``) replay and follow;
- POSTed to every ``webhook`` destination of ``settings.notify`` (inline ones and those
  of ``notify.destinations_file``), as the event's JSON plus ``schema``
  (``genmon.model_event/v1``), ``idempotency_key`` and ``event`` (``model.<action>``),
  signed the way incident pages are (Standard Webhooks, :mod:`genmon.incidents.signing`) with
  the destination's ``secret``; ``webhook-id`` is the event id.

Delivery is **at least once**: a failed send is retried with exponential backoff, and a
retry after a timeout may deliver a second copy. Receivers and followers drop repeats by
``event_id`` (the ``webhook-id`` header). An announcement that still fails is logged with
the destination's *name* (never its URL, which may carry a token) and reported in the
:class:`AnnounceReport`; the alias has moved regardless, and ``genmon models announce
MODEL`` publishes the current aliases again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import httpx
from kafka import KafkaProducer
from kafka.errors import KafkaError

from genmon import kafka_config
from genmon.incidents.destinations import IDEMPOTENCY_HEADER, WebhookDestination, scrub_secrets
from genmon.incidents.retry import RETRYABLE_STATUS
from genmon.incidents.routing import load_notify_settings
from genmon.incidents.signing import signed_headers
from genmon.schemas.codec import encode
from genmon.schemas.events import ModelEvent
from genmon.settings import Settings

__all__ = [
    "MODEL_EVENT_SCHEMA",
    "WEBHOOK_ENVELOPE",
    "AnnounceReport",
    "ModelAnnouncer",
    "webhook_body",
]

log = logging.getLogger(__name__)

MODEL_EVENT_SCHEMA = "genmon.model_event/v1"
#: Keys of a webhook body that are not the event's own (drop them to validate a ModelEvent).
WEBHOOK_ENVELOPE = ("schema", "idempotency_key", "event")
_ERROR_BODY_CHARS = 200
_KAFKA_TIMEOUT_MS = 10_000


@dataclass
class AnnounceReport:
    """What one :meth:`ModelAnnouncer.announce` reached."""

    published: int = 0
    """Events the broker acknowledged on the models topic."""
    delivered: dict[str, int] = field(default_factory=dict)
    """Events each webhook destination accepted (2xx), by destination name."""
    failures: list[str] = field(default_factory=list)
    """One line per send that failed every try (destination names only, no secrets)."""

    @property
    def ok(self) -> bool:
        return not self.failures


def webhook_body(event: ModelEvent) -> bytes:
    """The JSON a webhook destination receives for ``event`` (the signed bytes): the
    event's fields, plus ``schema``, ``idempotency_key`` and ``event`` (``model.<action>``)
    that :data:`WEBHOOK_ENVELOPE` names."""
    payload = {
        **event.model_dump(mode="json"),
        "schema": MODEL_EVENT_SCHEMA,
        "idempotency_key": event.event_id,
        "event": f"model.{event.action}",
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class ModelAnnouncer:
    """Publishes :class:`ModelEvent` s to the models topic and the webhook destinations.

    Args:
        settings: Kafka, topic prefix and ``notify`` destinations.
        attempts: tries per send (topic and each webhook) before it counts as failed.
        backoff_s: first pause between tries; doubles each time.
        producer, http: injected clients (tests); otherwise made on first use and closed
            by :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        producer: KafkaProducer | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.topic("models")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        notify = load_notify_settings(settings.notify)
        self.destinations = [
            WebhookDestination(d) for d in notify.destinations if d.type == "webhook"
        ]
        self._timeout_s = notify.timeout_s
        self._producer = producer
        self._owns_producer = producer is None
        self._http = http
        self._owns_http = http is None

    def announce(self, events: ModelEvent | Iterable[ModelEvent]) -> AnnounceReport:
        """Publish ``events`` (in order) on the topic, then POST each to every webhook."""
        batch = [events] if isinstance(events, ModelEvent) else list(events)
        report = AnnounceReport(delivered={d.name: 0 for d in self.destinations})
        if not batch:
            return report
        self._publish(batch, report)
        for destination in self.destinations:
            for event in batch:
                self._post(destination, event, report)
        return report

    # ---------------------------------------------------------------- the topic

    def _publish(self, batch: list[ModelEvent], report: AnnounceReport) -> None:
        error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                producer = self._kafka()
                futures = [
                    producer.send(self.topic, key=e.model_id.encode(), value=encode(e))
                    for e in batch
                ]
                producer.flush(timeout=_KAFKA_TIMEOUT_MS / 1000)
                for future in futures:
                    future.get(timeout=_KAFKA_TIMEOUT_MS / 1000)
                report.published += len(batch)
                return
            except (KafkaError, OSError) as exc:
                error = exc
                self._pause(attempt)
        message = f"topic {self.topic}: {len(batch)} events not published: {error!r}"
        log.error("announcing model events failed: %s", message)
        report.failures.append(message)

    def _kafka(self) -> KafkaProducer:
        if self._producer is None:
            kafka = self.settings.kafka
            self._producer = KafkaProducer(
                **kafka_config.client_config(
                    kafka,
                    producer=True,
                    client_id="genmon-model-announcer",
                    enable_idempotence=kafka.acks == "all",
                    max_block_ms=_KAFKA_TIMEOUT_MS,
                    request_timeout_ms=_KAFKA_TIMEOUT_MS,
                )
            )
        return self._producer

    # ---------------------------------------------------------------- webhooks

    def _post(
        self, destination: WebhookDestination, event: ModelEvent, report: AnnounceReport
    ) -> None:
        body = webhook_body(event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "genmon-notifier/1",
            IDEMPOTENCY_HEADER: event.event_id,
        }
        timeout = destination.settings.timeout_s or self._timeout_s
        why = ""
        for attempt in range(self.attempts):
            if destination.settings.secret is not None:
                # Signed per try: the timestamp inside the signature must be fresh.
                headers.update(signed_headers(destination.settings.secret, event.event_id, body))
            try:
                response = self._client().post(
                    destination.url, content=body, headers=headers, timeout=timeout
                )
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
                self._pause(attempt)
                continue
            if 200 <= response.status_code < 300:
                report.delivered[destination.name] += 1
                return
            why = f"HTTP {response.status_code}: {response.text[:_ERROR_BODY_CHARS]}"
            if response.status_code not in RETRYABLE_STATUS:
                break
            self._pause(attempt)
        message = scrub_secrets(
            f"webhook {destination.name}: {event.model_id} {event.alias.value} -> "
            f"{event.version} (event {event.event_id}) not delivered: {why}",
            destination.secrets(),
        )
        log.error("announcing a model event failed: %s", message)
        report.failures.append(message)

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(follow_redirects=False)
        return self._http

    def _pause(self, attempt: int) -> None:
        if attempt + 1 < self.attempts:
            time.sleep(self.backoff_s * 2**attempt)

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Close the clients this announcer made (injected ones stay open)."""
        if self._producer is not None and self._owns_producer:
            self._producer.close(timeout=5)
            self._producer = None
        if self._http is not None and self._owns_http:
            self._http.close()
            self._http = None

    def __enter__(self) -> ModelAnnouncer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self.destinations) or "no webhooks"
        return f"<ModelAnnouncer {self.topic}; {names}>"
