"""`genmon worker` as a real subprocess on the real broker: ingest, counters, dead letters.

Each test gets its own topic prefix, app id (consumer group) and web port, so tests
sharing the broker never see each other's data.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka_support import consume

from genmon import Monitor
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import MAX_EVENT_BYTES, DeadLetter
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

STARTUP_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 180.0


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as response:
            stats: dict[str, Any] = json.loads(response.read())["ingest"]
            return stats

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict:
        """Poll /stats until ``predicate`` holds; fail with the worker's log otherwise."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"worker exited:\n{self.log_tail()}"
            try:
                last = self.stats()
            except OSError:
                pass  # the web server is not up yet
            else:
                if predicate(last):
                    return last
            time.sleep(0.5)
        pytest.fail(f"timed out; last stats {last}\n{self.log_tail()}")


@pytest.fixture
def test_settings(kafka_settings: Settings, unique_name: str) -> Settings:
    """The shared broker with this test's own topics."""
    kafka = kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})
    settings = kafka_settings.model_copy(update={"kafka": kafka})
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    return settings


@pytest.fixture
def worker(
    test_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> Iterator[Worker]:
    port = free_port()
    env = {
        **os.environ,
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": test_settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": test_settings.kafka.topic_prefix,
        "GENMON_KAFKA__PARTITIONS": str(test_settings.kafka.partitions),
        "GENMON_WORKER__APP_ID": unique_name,
        "GENMON_EMBEDDING__ENABLED": "false",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "genmon.cli", "worker", "--loglevel", "warning",
             "--web-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    handle = Worker(process, f"http://127.0.0.1:{port}", log_path)
    try:
        handle.wait_for(lambda stats: True, STARTUP_TIMEOUT_S)
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_every_event_from_the_sdk_is_counted_once_in_order(
    worker: Worker, test_settings: Settings
) -> None:
    models = [f"model-{i}" for i in range(7)]
    with Monitor(settings=test_settings) as monitor:
        for i in range(10_000):
            model = models[(i * 3 + i // 7) % len(models)]  # interleaved, uneven runs
            assert monitor.log_inference(
                model_id=model, latency_ms=float(i % 500), prompt=f"q{i}", response=f"a{i}"
            )
        assert monitor.flush(timeout=120)
        # Then one sentinel per model, so per partition: a duplicate of any event before
        # it in its partition would be handled before the sentinel, so none can come
        # after the count is read (no sleep as proof).
        for model in models:
            assert monitor.log_inference(model_id=model, latency_ms=1.0, prompt="sentinel")
        assert monitor.flush(timeout=120)
        assert monitor.stats.sent == 10_000 + len(models)

    total = 10_000 + len(models)
    stats = worker.wait_for(lambda s: s["valid"] >= total, DRAIN_TIMEOUT_S)
    assert stats["valid"] == total
    assert stats["valid_by_topic"] == {test_settings.topic("inference"): total}
    assert (stats["invalid"], stats["gaps"], stats["out_of_order"], stats["duplicates"]) == (
        0, 0, 0, 0,
    )  # fmt: skip
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    counted = f'genmon_ingest_valid_total{{topic="{test_settings.topic("inference")}"}} {total}.0'
    assert counted in text


def _bad_messages(rng: random.Random) -> list[tuple[str, bytes | None]]:
    """One malformed message of each kind, with the reason the worker must give."""
    valid = {"model_id": "chat", "latency_ms": 10.0}
    return [
        ("bad_json", b'{"model_id": "chat", "latency_ms": '),
        ("wrong_type", json.dumps({**valid, "latency_ms": "slow"}).encode()),
        ("wrong_type", json.dumps({**valid, "prompt_tokens": [1, 2]}).encode()),
        ("oversized", json.dumps({**valid, "prompt": "x" * 40_000}).encode()),
        ("oversized", json.dumps({**valid, "metadata": {"b": "y" * MAX_EVENT_BYTES}}).encode()),
        ("unknown_schema_version", json.dumps({**valid, "schema_version": 3}).encode()),
        ("not_utf8", b"\xff" + rng.randbytes(200)),
        ("empty_payload", b""),
        ("empty_payload", None),  # a tombstone
        ("not_an_object", b"[]"),
        ("missing_field", b'{"model_id": "chat"}'),
        ("invalid_value", json.dumps({**valid, "latency_ms": -3}).encode()),
        ("unknown_field", json.dumps({**valid, "temperature": 1}).encode()),
    ]


def test_malformed_messages_go_to_the_dead_letter_topic_with_reasons(
    worker: Worker, test_settings: Settings
) -> None:
    rng = random.Random(7)
    kinds = _bad_messages(rng)
    producer = KafkaProducer(bootstrap_servers=test_settings.kafka.bootstrap_servers, linger_ms=20)
    topic = test_settings.topic("inference")
    futures: list[tuple[tuple[str, bytes | None, int] | None, Any]] = []
    for i in range(2_000):
        if i % 2:
            value = json.dumps({"model_id": f"m{i % 5}", "latency_ms": i}).encode()
            futures.append((None, producer.send(topic, value, key=b"m%d" % (i % 5))))
        else:
            reason, bad_value = kinds[(i // 2) % len(kinds)]
            key = None if i % 3 == 0 and bad_value is not None else b"bad-%d" % i
            size = len(bad_value or b"")
            futures.append(((reason, key, size), producer.send(topic, bad_value, key=key)))
    producer.flush()
    expected: dict[tuple[int, int], tuple[str, bytes | None, int]] = {}
    for bad, future in futures:
        metadata = future.get(timeout=30)
        if bad is not None:
            expected[(metadata.partition, metadata.offset)] = bad
    producer.close()
    assert len(expected) == 1_000

    stats = worker.wait_for(
        lambda s: s["valid"] + s["invalid"] >= 2_000 and s["deadletter_sent"] >= 1_000,
        DRAIN_TIMEOUT_S,
    )
    assert (stats["valid"], stats["invalid"], stats["deadletter_failed"]) == (1_000, 1_000, 0)
    assert stats["invalid_by_reason"] == dict(Counter(reason for reason, _, _ in expected.values()))

    letters = consume(test_settings, test_settings.topic("deadletter"), expected=1_000)
    assert len(letters) == 1_000
    found = {}
    for record in letters:
        letter = DeadLetter.model_validate_json(record.value)
        assert letter.source_topic == topic
        assert dict(record.headers)["genmon-reason"] == letter.reason.encode()
        found[(letter.partition, letter.offset)] = (letter.reason, record.key, letter.payload_size)
        limit = test_settings.worker.dlq_max_payload_bytes
        assert letter.payload_truncated == (letter.payload_size > limit)
    assert found == expected
    assert worker.process.poll() is None


def test_malformed_feedback_goes_to_the_dead_letter_topic_too(
    worker: Worker, test_settings: Settings
) -> None:
    """The feedback topic has its own ingest agent: its bad messages are dead-lettered
    with their reason as the inference topic's are, and the worker keeps going."""
    kinds: list[tuple[str, bytes]] = [
        ("bad_json", b'{"request_id": "r1", '),
        ("not_an_object", b"[1]"),
        ("empty_payload", b""),
        ("missing_field", json.dumps({"model_id": "chat"}).encode()),
    ]
    topic = test_settings.topic("feedback")
    producer = KafkaProducer(bootstrap_servers=test_settings.kafka.bootstrap_servers)
    expected = {}
    for i in range(12):
        reason, value = kinds[i % len(kinds)]
        metadata = producer.send(topic, value, key=b"fb-%d" % i).get(timeout=30)
        expected[(metadata.partition, metadata.offset)] = reason
    producer.close()

    stats = worker.wait_for(lambda s: s["deadletter_sent"] >= 12, DRAIN_TIMEOUT_S)
    assert stats["invalid"] == 12 and stats["deadletter_failed"] == 0
    letters = consume(test_settings, test_settings.topic("deadletter"), expected=12)
    found = {}
    for record in letters:
        letter = DeadLetter.model_validate_json(record.value)
        assert letter.source_topic == topic
        found[(letter.partition, letter.offset)] = letter.reason
    assert found == expected
    assert worker.process.poll() is None
