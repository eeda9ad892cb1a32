"""The API's Kafka producer: events accepted over HTTP go to the SDK's topics, as the SDK
would send them.

One :class:`IngestProducer` per API process (on ``app.state.ingest_producer``, made by
the ingest routes' startup hook). It speaks the SDK's wire: the value is
:func:`genmon.schemas.codec.encode`, the key the model id (one model's events stay in
order on one partition), and the headers ``genmon-producer`` (a uuid per process) and
``genmon-seq`` (0, 1, 2, ... per topic and model: :class:`genmon.sequences.Sequences`,
as in :class:`genmon.Monitor`), so the worker's count of gaps, reorders and
duplicates holds for HTTP-sent events too. Numbers are taken and records handed to the
client under one lock, so concurrent requests cannot put a model's numbers out of order
on its partition. Events that were numbered and then not delivered (a broker outage,
the 503 of :meth:`IngestProducer.send`) show as a gap: they were lost, even when the
caller resends them (a resent event gets new numbers).

TLS, SASL and ``acks`` come from ``settings.kafka`` (:mod:`genmon.kafka_config`),
idempotent with ``acks=all`` as every genmon producer. The client starts on first use
(the API serves its pages with the broker down) and again after a failed start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from genmon import kafka_config
from genmon.schemas.codec import HEADER_PRODUCER, HEADER_SEQ
from genmon.sequences import Sequences
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: The event kinds HTTP ingest writes, and the topic kind each goes to.
KINDS: Final = ("inference", "feedback")
#: A batch holds many events; one event is at most 256 KiB (``MAX_EVENT_BYTES``).
_MAX_BATCH_BYTES: Final = 1024 * 1024
#: Little lingering: a request waits for its acknowledgement, so latency is the caller's.
_LINGER_MS: Final = 5


@dataclass(frozen=True)
class Delivery:
    """What the broker made of one request's events."""

    acknowledged: int
    failed: int
    error: str | None = None
    """Why events were not acknowledged: the first error, or the timeout."""

    @property
    def complete(self) -> bool:
        return self.failed == 0


class IngestProducer:
    """Writes validated events to ``<prefix>.inference`` / ``<prefix>.feedback`` and waits
    for the broker's acknowledgement; use inside the app's event loop, then :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer_id = uuid.uuid4().hex
        self.topics = {kind: settings.topic(kind) for kind in KINDS}
        self.sequences = Sequences(self.producer_id, settings.sdk.sequence_max_models)
        self._client: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        #: Held while numbering and enqueueing one request's events (see the module doc).
        self._ordering = asyncio.Lock()

    def _config(self) -> dict[str, Any]:
        kafka, compression = self.settings.kafka, self.settings.sdk.compression
        return kafka_config.client_config(
            kafka,
            producer=True,
            client_id=f"genmon-api-{self.producer_id[:8]}",
            enable_idempotence=kafka.acks == "all",
            compression_type=None if compression == "none" else compression,
            linger_ms=_LINGER_MS,
            max_batch_size=_MAX_BATCH_BYTES,
            max_request_size=2 * _MAX_BATCH_BYTES,
        )

    async def started(self, timeout_s: float) -> AIOKafkaProducer:
        """The client, started now if it is not (``TimeoutError``/``KafkaError`` otherwise)."""
        async with self._starting:
            if self._client is None:
                client = AIOKafkaProducer(**self._config())
                try:
                    await asyncio.wait_for(client.start(), timeout_s)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await client.stop()
                    raise
                self._client = client
            return self._client

    async def send(
        self, kind: str, events: Sequence[BaseModel], values: Sequence[bytes], timeout_s: float
    ) -> Delivery:
        """Write ``events`` (already encoded as ``values``) and wait up to ``timeout_s`` for
        the broker to acknowledge every one. Never raises for the broker: a
        :class:`Delivery` counts what was and was not acknowledged."""
        if not events:
            return Delivery(0, 0)
        deadline = time.monotonic() + timeout_s
        topic = self.topics[kind]
        futures: list[asyncio.Future[Any]] = []
        try:
            client = await self.started(timeout_s)
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                async with self._ordering:
                    for event, value in zip(events, values, strict=True):
                        model_id: str = event.model_id  # type: ignore[attr-defined]
                        producer, seq = self.sequences.take(kind, model_id)
                        futures.append(
                            await client.send(
                                topic,
                                value=value,
                                key=model_id.encode(),
                                headers=[(HEADER_PRODUCER, producer), (HEADER_SEQ, b"%d" % seq)],
                            )
                        )
        except TimeoutError:
            return self._settle(futures, len(events), "Kafka did not take the events in time")
        except Exception as exc:
            log.warning(
                "HTTP ingest could not hand %d %s events to Kafka: %r", len(events), kind, exc
            )
            return self._settle(futures, len(events), f"Kafka refused the events ({exc!r})")
        # asyncio.wait, not wait_for: a timeout must not cancel the delivery futures.
        await asyncio.wait(futures, timeout=max(deadline - time.monotonic(), 0.0))
        return self._settle(futures, len(events), None)

    @staticmethod
    def _settle(futures: list[asyncio.Future[Any]], total: int, error: str | None) -> Delivery:
        acknowledged = sum(
            1 for f in futures if f.done() and not f.cancelled() and f.exception() is None
        )
        if acknowledged < total and error is None:
            failures = [f.exception() for f in futures if f.done() and not f.cancelled()]
            first = next((exc for exc in failures if exc is not None), None)
            error = (
                f"Kafka failed to write them ({first!r})"
                if first is not None
                else "Kafka did not acknowledge them in time"
            )
        return Delivery(acknowledged, total - acknowledged, error)

    async def close(self, timeout_s: float) -> None:
        """Deliver what is in flight (up to ``timeout_s``), then stop the client."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.stop(), timeout_s)
        except Exception as exc:
            log.warning("the HTTP ingest producer did not stop cleanly: %r", exc)


def producer_of(app: Any) -> IngestProducer:
    """The app's ingest producer, made on first use (the startup hook makes it earlier)."""
    producer: IngestProducer | None = getattr(app.state, "ingest_producer", None)
    if producer is None:
        producer = IngestProducer(app.state.settings)
        app.state.ingest_producer = producer
    return producer
