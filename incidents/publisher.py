"""Publishing the outbox's incident events to ``<prefix>.incidents``, for the dispatcher.

One aiokafka producer per dispatcher run (``kafka.acks``, idempotent with ``all``; TLS and
SASL from ``settings.kafka``), started on the first event and again after a failed start,
so a dispatcher whose broker is down keeps delivering pages and retries the events with the
outbox's backoff. Events are keyed by incident id: one incident's transitions stay in order
on one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer

from genmon import kafka_config
from genmon.settings import Settings

log = logging.getLogger(__name__)


class IncidentTopicPublisher:
    """Sends already-encoded incident events; use inside one event loop, then :meth:`close`."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.topic = settings.topic("incidents")
        self.bootstrap_servers = settings.kafka.bootstrap_servers
        self.kafka = settings.kafka
        self.timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    **kafka_config.client_config(
                        self.kafka,
                        producer=True,
                        client_id="genmon-dispatcher",
                        enable_idempotence=self.kafka.acks == "all",
                        request_timeout_ms=int(self.timeout_s * 1000),
                    )
                )
                try:
                    await asyncio.wait_for(producer.start(), self.timeout_s)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(self, key: bytes, value: bytes) -> None:
        """Return once the broker has the event; raise (KafkaError, TimeoutError) otherwise."""
        producer = await self._started()
        await asyncio.wait_for(
            producer.send_and_wait(self.topic, key=key, value=value), self.timeout_s
        )

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), self.timeout_s)
        except Exception as exc:
            log.warning("the incidents topic producer did not stop cleanly: %r", exc)
