"""Hostile input: every consumed message is counted once, valid or invalid, and every
invalid one is a dead letter; text PostgreSQL cannot store never reaches it.

In memory through both ingest paths, then through a real `genmon worker` on the real
broker, then into the real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fault_report import record
from incident_support import postgres_schema_url
from kafka import KafkaProducer
from kafka_support import consume

from genmon.db import upgrade
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import MAX_EVENT_BYTES, DeadLetter, FeedbackEvent
from genmon.settings import Settings
from genmon.streams.app import create_app
from genmon.streams.ingest import Ingestor

VALID, SANITIZED = "valid", "sanitized"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _inference(i: int, **fields: Any) -> dict[str, Any]:
    started = datetime.now(UTC) - timedelta(seconds=5)
    base = {
        "request_id": f"r{i}",
        "model_id": f"m{i % 3}",
        "latency_ms": float(i % 400),
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "prompt": f"q{i}",
        "response": f"a{i}",
    }
    return {**base, **fields}


def _raw(document: dict[str, Any], *, escape: str = "") -> bytes:
    """JSON of ``document``, each ``@`` in its strings written as the raw escape given."""
    return json.dumps(document).replace("@", escape).encode()


def inference_mix(i: int) -> list[tuple[str, bytes | None]]:
    """One of each hostile kind (and valid ones), with what the worker must make of it."""
    deep = b'"metadata": {"k": %s}}'
    return [
        (VALID, _raw(_inference(i))),  # read natively
        (VALID, _raw({k: v for k, v in _inference(i).items() if k != "request_id"})),
        # Valid, but a time the native decoder does not read even in canonical form.
        (VALID, _raw(_inference(i, started_at="1900-01-01T00:00:00Z"))),
        (VALID, _raw(_inference(i))[:-1] + b", " + deep % _nested(150).encode()),
        (SANITIZED, _raw(_inference(i, prompt="a@b"), escape="\\u0000")),
        (SANITIZED, _raw(_inference(i, response="cut @"), escape="\\ud83d")),
        (SANITIZED, _raw(_inference(i, metadata={"k@": ["@"]}), escape="\\u0000")),
        ("invalid_value", _raw(_inference(i, model_id="m@"), escape="\\u0000")),
        ("invalid_value", _raw(_inference(i, request_id="@"), escape="\\udc00")),
        ("invalid_value", _raw(_inference(i, segment={"locale": "d@"}), escape="\\u0000")),
        ("bad_json", b'{"model_id": "m1", "latency_ms": '),
        ("bad_json", _raw(_inference(i))[:-1] + b", " + deep % _nested(250).encode()),
        ("wrong_type", _raw(_inference(i, latency_ms="slow"))),
        ("oversized", _raw(_inference(i, prompt="x" * 40_000))),
        ("oversized", _raw(_inference(i, metadata={"b": "y" * MAX_EVENT_BYTES}))),
        ("not_utf8", b"\xff\xfe" + b"x" * 50),
        ("empty_payload", b""),
        ("empty_payload", None),
        ("not_an_object", b"[1]"),
        ("missing_field", b'{"model_id": "m1"}'),
        ("unknown_field", _raw(_inference(i, temperature=0.2))),
    ]


def feedback_mix(i: int) -> list[tuple[str, bytes | None]]:
    base = {"request_id": f"r{i}", "model_id": f"m{i % 3}", "score": 0.5}
    return [
        (VALID, _raw(base)),
        (SANITIZED, _raw({**base, "comment": "@"}, escape="\\u0000")),
        ("invalid_value", _raw({**base, "model_id": "m@"}, escape="\\u0000")),
        ("bad_json", b'{"request_id": '),
    ]


def expected_counts(outcomes: list[str]) -> dict[str, Any]:
    bad = Counter(o for o in outcomes if o not in (VALID, SANITIZED))
    return {
        "valid": len(outcomes) - bad.total(),
        "invalid": bad.total(),
        "sanitized": outcomes.count(SANITIZED),
        "invalid_by_reason": dict(bad),
    }


def _counts(stats: dict[str, Any]) -> dict[str, Any]:
    return {name: stats[name] for name in ("valid", "invalid", "sanitized", "invalid_by_reason")}


# --- in memory: both ingest paths ---------------------------------------------------------


@dataclass
class Message:
    value: bytes | None
    offset: int
    topic: str
    key: bytes | None = b"k"
    partition: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@pytest.mark.parametrize("native_ingest", [True, False])
def test_each_message_is_counted_once_and_each_invalid_one_is_a_dead_letter(
    native_ingest: bool,
) -> None:
    app = create_app(
        Settings.model_validate({"worker": {"native_ingest": native_ingest}}), installers=()
    )
    ingestor = Ingestor(app)
    assert (ingestor.decoder is not None) == native_ingest
    outcomes: list[str] = []
    dead: list[DeadLetter] = []
    valid = 0
    for i in range(6):  # batches, each holding every kind
        inferences = inference_mix(i)
        batch, letters = ingestor.validate_inferences(
            [Message(raw, n, "in") for n, (_, raw) in enumerate(inferences)]
        )
        feedback = feedback_mix(i)
        result = ingestor.validate(
            FeedbackEvent, [Message(raw, n, "fb") for n, (_, raw) in enumerate(feedback)]
        )
        valid += len(batch.events) + len(result.valid)
        dead += [letter for _, letter in letters + result.dead]
        outcomes += [outcome for outcome, _ in inferences + feedback]
        for event in batch.events:
            assert "\x00" not in event.prompt + event.response + json.dumps(event.metadata)
    stats = app.genmon.metrics.snapshot()["ingest"]
    assert _counts(stats) == expected_counts(outcomes)
    assert (stats["valid"], stats["invalid"]) == (valid, len(dead))
    assert Counter(letter.reason for letter in dead) == stats["invalid_by_reason"]


# --- a real worker on the real broker -----------------------------------------------------


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as response:
            stats: dict[str, Any] = json.loads(response.read())["ingest"]
            return stats

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict:
        """Poll /stats until ``predicate`` holds; fail with the worker's log otherwise."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            log = self.log_path.read_text(errors="replace")[-4000:]
            assert self.process.poll() is None, f"worker exited:\n{log}"
            try:
                last = self.stats()
            except OSError:
                pass  # the web server is not up yet
            else:
                if predicate(last):
                    return last
            time.sleep(0.5)
        pytest.fail(f"timed out; last stats {last}\n{self.log_path.read_text()[-4000:]}")


@pytest.fixture
def test_settings(kafka_settings: Settings, unique_name: str) -> Settings:
    kafka = kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})
    settings = kafka_settings.model_copy(update={"kafka": kafka})
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    return settings


@pytest.fixture
def start_worker(
    test_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Starts `genmon worker` on this test's topics, with extra environment; stops it after."""
    started: list[Worker] = []

    def start(**env: str) -> Worker:
        port = free_port()
        environ = {
            **os.environ,
            "GENMON_HOME": str(tmp_path / "home"),
            "GENMON_DATABASE__URL": f"sqlite:///{tmp_path / 'genmon.sqlite'}",
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": test_settings.kafka.bootstrap_servers,
            "GENMON_KAFKA__TOPIC_PREFIX": test_settings.kafka.topic_prefix,
            "GENMON_KAFKA__PARTITIONS": str(test_settings.kafka.partitions),
            "GENMON_WORKER__APP_ID": unique_name,
            "GENMON_EMBEDDING__ENABLED": "false",
            **env,
        }
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "genmon.cli", "worker", "--loglevel", "warning",
                 "--web-port", str(port)],
                env=environ, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        worker = Worker(process, f"http://127.0.0.1:{port}", log_path)
        started.append(worker)
        worker.wait_for(lambda stats: True, 180.0)
        return worker

    yield start
    for worker in started:
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


def _send(
    settings: Settings, messages: list[tuple[str, str, bytes | None, bytes | None]]
) -> dict[tuple[str, int, int], str]:
    """Send ``(kind, outcome, key, value)``; the outcome of each by (topic, partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20)
    futures = [
        (outcome, producer.send(settings.topic(kind), value, key=key))
        for kind, outcome, key, value in messages
    ]
    producer.flush()
    sent = {}
    for outcome, future in futures:
        metadata = future.get(timeout=30)
        sent[(metadata.topic, metadata.partition, metadata.offset)] = outcome
    producer.close()
    return sent


def _letters(settings: Settings, expected: int) -> dict[tuple[str, int, int], DeadLetter]:
    records = consume(settings, settings.topic("deadletter"), expected=expected)
    letters = [DeadLetter.model_validate_json(record.value) for record in records]
    return {(letter.source_topic, letter.partition, letter.offset): letter for letter in letters}


@pytest.mark.kafka
@pytest.mark.slow
def test_a_worker_counts_a_hostile_stream_exactly(
    start_worker: Callable[..., Worker], test_settings: Settings
) -> None:
    """Small batches, so that many hold an event the native decoder hands back to Python
    whole (a year before 1970, deep metadata): the counters read what was sent."""
    worker = start_worker(GENMON_WORKER__BATCH_SIZE="50")
    messages = []
    for i in range(100):
        for kind, mix in (("inference", inference_mix(i)), ("feedback", feedback_mix(i))):
            messages += [(kind, outcome, b"m%d" % (i % 3), raw) for outcome, raw in mix]
    # Then a valid sentinel per key and topic, so last in each partition: once they are
    # counted, every message before them has been, and a double count would show now
    # (no sleep as proof).
    for kind, mix in (("inference", inference_mix), ("feedback", feedback_mix)):
        for k in range(3):
            raw = next(raw for outcome, raw in mix(k) if outcome == VALID)
            messages.append((kind, VALID, b"m%d" % k, raw))
    sent = _send(test_settings, messages)
    expected = expected_counts(list(sent.values()))
    total = len(sent)
    assert total == 2_506

    stats = worker.wait_for(
        lambda s: (
            s["valid"] + s["invalid"] >= total and s["deadletter_sent"] >= expected["invalid"]
        ),
        180.0,
    )
    record(
        "hostile mix",
        sent=total,
        validated=stats["valid"],
        dead_lettered=stats["deadletter_sent"],
        lost=total - stats["valid"] - stats["invalid"],
    )
    assert _counts(stats) == expected
    assert (stats["deadletter_sent"], stats["deadletter_failed"]) == (expected["invalid"], 0)
    letters = _letters(test_settings, expected["invalid"])
    bad = {
        position: reason for position, reason in sent.items() if reason not in (VALID, SANITIZED)
    }
    assert {position: letter.reason for position, letter in letters.items()} == bad


# --- into the real PostgreSQL -------------------------------------------------------------


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A migrated schema of its own on the shared PostgreSQL."""
    with postgres_schema_url(postgres_url) as url:
        upgrade(url)
        yield url


@pytest.mark.kafka
@pytest.mark.postgres
def test_nul_text_reaches_postgresql_as_u_fffd_and_a_nul_model_id_is_dead_lettered(
    start_worker: Callable[..., Worker], test_settings: Settings, postgres_database: str
) -> None:
    worker = start_worker(GENMON_DATABASE__URL=postgres_database)
    inference = _raw(
        _inference(1, model_id="chat", prompt="pro@mpt", response="an@swer"), escape="\\u0000"
    )
    nul_model = _raw(_inference(2, model_id="chat@"), escape="\\u0000")
    sent = _send(test_settings, [("inference", VALID, b"chat", inference)])
    feedback = {"request_id": "r1", "model_id": "chat", "correction": "fix@ed", "label": "bad"}
    sent |= _send(
        test_settings,
        [
            ("feedback", VALID, b"chat", _raw(feedback, escape="\\u0000")),
            ("inference", "invalid_value", b"chat", nul_model),
        ],
    )

    engine = sa.create_engine(postgres_database)
    query = sa.text("select prompt, response, correction, label from labelled_example")
    deadline, rows = time.monotonic() + 120, []
    try:
        while not rows and time.monotonic() < deadline:
            with engine.connect() as connection:
                rows = [tuple(row) for row in connection.execute(query)]
            time.sleep(0.5)
    finally:
        engine.dispose()
    assert rows == [("pro\ufffdmpt", "an\ufffdswer", "fix\ufffded", "bad")], worker.stats()

    stats = worker.wait_for(lambda s: s["deadletter_sent"] >= 1, 60.0)
    assert (stats["valid"], stats["invalid"], stats["sanitized"]) == (2, 1, 2)
    letters = _letters(test_settings, 1)
    [(position, letter)] = letters.items()
    assert sent[position] == letter.reason == "invalid_value"
    assert letter.error.startswith("model_id: ") and "NUL (U+0000)" in letter.error
