"""The SDK against a broker that is down: never blocks, buffers to its limit, delivers later.

Uses a private broker (own home, own ports) that the test stops and starts; the shared
broker of the other tests is never touched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from broker_support import private_broker as private
from kafka_support import consume

from genmon import Monitor
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.codec import HEADER_PRODUCER, HEADER_SEQ
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BUFFER = 500
MODELS = ("chat", "search", "code")


@pytest.fixture
def private_broker(kafka_settings: Settings, free_port: Callable[[], int]) -> Iterator[KafkaBroker]:
    """A broker this test may stop; not started yet."""
    with private(kafka_settings, free_port) as broker:
        yield broker


def _log(monitor: Monitor, count: int, calls: dict[str, int]) -> tuple[list[bool], list]:
    """Log ``count`` events round-robin over MODELS; return acceptance and (model, seq).

    That no call waits for the broker is proved apart, without timings
    (tests/test_sdk.py, a producer whose connect and send never return)."""
    accepted, sent = [], []
    for i in range(count):
        model = MODELS[i % len(MODELS)]
        ok = monitor.log_inference(model_id=model, latency_ms=float(i), prompt=f"p{i}")
        accepted.append(ok)
        if ok:
            sent.append((model, calls[model]))
        calls[model] += 1
    return accepted, sent


def test_events_wait_for_a_broker_that_is_down_and_arrive_when_it_is_up(
    private_broker: KafkaBroker,
) -> None:
    settings = private_broker.settings
    calls: dict[str, int] = defaultdict(int)
    monitor = Monitor(settings=settings, buffer_max_events=BUFFER, linger_ms=5)
    try:
        # 1. No broker at all: the producer cannot even be constructed yet.
        accepted, expected = _log(monitor, BUFFER + 200, calls)
        assert accepted == [True] * BUFFER + [False] * 200
        stats = monitor.stats
        assert (stats.buffered, stats.dropped, stats.sent) == (BUFFER, 200, 0)

        private_broker.up()
        assert monitor.flush(timeout=120), monitor.stats
        assert (monitor.stats.sent, monitor.stats.buffered) == (BUFFER, 0)

        # 2. The broker goes away under a live producer.
        private_broker.down()
        accepted, more = _log(monitor, 300, calls)
        assert all(accepted)
        assert monitor.stats.buffered == 300
        private_broker.up()
        assert monitor.flush(timeout=120), monitor.stats
        expected += more
        stats = monitor.stats
        assert (stats.sent, stats.dropped, stats.failed) == (BUFFER + 300, 200, 0)
    finally:
        monitor.close(timeout=10)

    # Every accepted event arrived once, each model's in the order it was logged.
    records = consume(settings, settings.topic("inference"), expected=len(expected))
    assert len(records) == len(expected)
    by_model: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        headers = dict(record.headers)
        assert headers[HEADER_PRODUCER] == monitor.producer_id.encode()
        by_model[record.key.decode()].append(int(headers[HEADER_SEQ]))
    want: dict[str, list[int]] = defaultdict(list)
    for model, seq in expected:
        want[model].append(seq)
    assert by_model == want
