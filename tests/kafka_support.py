"""Reading back what tests produced to the real broker."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer

from genmon.settings import Settings


def consume(settings: Settings, *topics: str, expected: int, timeout_s: float = 60.0) -> list[Any]:
    """Records of ``topics`` from the start, until ``expected`` arrived or the time ran out."""
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
    finally:
        consumer.close()
    return records
