"""The live worker on the real broker and `genmon replay` find the same on the same stream.

A seeded stream of real traffic (``bench.replay.traffic``: 45 minutes of a production
trace with an error burst and a slower version) goes to the inference and feedback
topics of a fresh `genmon worker`, and through `genmon replay`. Every finding the worker
publishes, detected and clear, must be one the replay computed: same fingerprint, window,
verdict, score and title. Embeddings are off in both: the live sampler is not seeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka_support import consume

from bench.replay import traffic
from genmon.infra.kafka import KafkaBroker
from genmon.replay.engine import Replay
from genmon.schemas.events import Finding
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"
GENMON = str(Path(sys.executable).with_name("genmon"))


def _key(finding: Finding) -> tuple:
    return (
        finding.fingerprint,
        finding.window_end,
        finding.detected,
        round(finding.score, 6),
        finding.title,
        finding.severity,
    )


@contextlib.contextmanager
def live_worker(
    kafka_settings: Settings, prefix: str, port: int, tmp_path: Path, **env_settings: str
) -> Iterator[tuple[Settings, Path]]:
    """A `genmon worker` subprocess on topics ``<prefix>.*``, its database and log."""
    bootstrap = kafka_settings.kafka.bootstrap_servers
    topics = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": prefix})}
    )
    KafkaBroker(topics).ensure_topics(bootstrap)
    database = tmp_path / "worker.sqlite"
    env = {
        **os.environ,
        # The test's producer sends an hour of event time in seconds; under the suite's
        # load it can stall for more than the default 5 s, and a caught-up worker then
        # rightly advances an idle model's watermark with the wall clock (an hour ahead),
        # closing the rest of its windows early. 20 s keeps a stall from being "idle".
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "20",
        **env_settings,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GENMON_KAFKA__TOPIC_PREFIX": prefix,
        "GENMON_WORKER__APP_ID": prefix,
        "GENMON_WORKER__WEB_PORT": str(port),
        "GENMON_DATABASE__URL": f"sqlite:///{database}",
        "GENMON_HOME": str(tmp_path / "home"),
        # The worker's own cache: a warm cache spares the test the int8 export.
        "GENMON_EMBEDDING__CACHE_DIR": str(Settings().embedding.cache_dir.resolve()),
    }
    log = (tmp_path / "worker.log").open("ab")
    worker = subprocess.Popen(
        [GENMON, "worker", "--loglevel", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        time.sleep(15)  # the worker joins its group before the stream starts
        yield topics, database
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def send(topics: Settings, lines: list[bytes], events: list[dict]) -> None:
    """The stream's lines to the inference and feedback topics, keyed by model id."""
    producer = KafkaProducer(
        bootstrap_servers=topics.kafka.bootstrap_servers, acks="all", linger_ms=20
    )
    for line, event in zip(lines, events, strict=True):
        kind = "inference" if traffic.is_inference(event) else "feedback"
        producer.send(topics.topic(kind), key=event["model_id"].encode(), value=line)
    producer.flush()
    producer.close()


def test_the_live_worker_and_replay_publish_the_same_findings(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    # Event times in the past, so the stream can be sent as fast as the broker takes it.
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    # A fixed model id: the stream's requests are drawn from it, and with a random one 3 in
    # 60 streams put the 4-minute burst in a lull of the trace that no closed window flags.
    # The topics, group and database are the test's own, so the id needs no uniqueness.
    model = "replay-kafka-bot"
    healthy = traffic.stationary(DATA_DIR, "azure_code", 0.75, seed=5, model_id=model, start=start)
    burst, _ = traffic.inject(
        healthy,
        traffic.Change("error_burst", timedelta(minutes=25), timedelta(minutes=4)),
        DATA_DIR,
        seed=5,
        start=start,
    )
    events, _ = traffic.inject(
        burst, traffic.Change("bad_deploy", timedelta(minutes=35)), DATA_DIR, seed=6, start=start
    )
    lines = [json.dumps(event).encode() for event in events]

    # Early looks judge a window as it stands when the clock says so: the worker's every
    # wall second of a stream sent as fast as the broker takes it, the replay's every
    # second of event time. They see different partial windows (and say so in their
    # titles), so both leave them out here; tests/streams/test_early_detection*.py have
    # them, in the worker on the broker too.
    off = {"enabled": False}
    engine = Replay(Settings(embedding=off, detectors={"early_interval_s": 0}), keep_findings=True)
    engine.feed(lines)
    report = engine.finish()
    expected = {_key(f) for f in report.findings}
    assert any(f.detected and f.signal == "error_rate" for f in report.findings)
    assert any(f.detected and f.model_version == "v2" for f in report.findings)

    env = {"GENMON_EMBEDDING__ENABLED": "false", "GENMON_DETECTORS__EARLY_INTERVAL_S": "0"}
    with live_worker(kafka_settings, unique_name, free_port(), tmp_path, **env) as (topics, _):
        send(topics, lines, events)
        findings = topics.topic("findings")
        records = consume(topics, findings, expected=len(expected), timeout_s=240)
        time.sleep(5)  # anything more than the replay computed would show now
        records += consume(topics, findings, expected=10**9, timeout_s=3)[len(records) :]
    live = {_key(Finding.model_validate_json(record.value)) for record in records}
    tail = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert live == expected, (sorted(live - expected)[:3], sorted(expected - live)[:3], tail)


def test_an_hour_of_healthy_real_traffic_through_the_worker_pages_nothing(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    """The acceptance's "shorter run through the real broker and worker": an hour of the
    Azure conversation and Mooncake traces, default settings but the embedding stage.

    The hour is sent in seconds, and the CPU encoder embeds ~11 of these 1-2 KB texts a
    second on this machine: it would fall behind and sample less (its backpressure), and
    the test would wait minutes for it. Embedding drift on healthy traffic is judged in
    ``tests/replay/test_replay.py`` (six hours per model), and the differential test above shows
    the worker and the replay judge alike."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1, minutes=5)
    streams = [
        traffic.stationary(
            DATA_DIR, trace, 1, seed=9, model_id=f"{unique_name}-{trace}", start=start
        )
        for trace in ("azure_conv", "mooncake")
    ]
    events = traffic.merge(*streams)
    lines = [json.dumps(event).encode() for event in events]
    port = free_port()
    env = {"GENMON_EMBEDDING__ENABLED": "false"}
    with live_worker(kafka_settings, unique_name, port, tmp_path, **env) as (topics, database):
        send(topics, lines, events)
        # Done when both models' hour of tumbling windows is closed (and judged).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            stats = _stats(port)
            closed = stats.get("genmon_pipeline_windows_closed_total", {}).get("kind=tumbling", 0)
            if closed >= 2 * 60:
                break
            time.sleep(2)
        else:
            raise AssertionError(f"the worker did not get through the hour: {stats}")
        time.sleep(5)
        records = consume(topics, topics.topic("findings"), expected=10**9, timeout_s=5)
    detected = [Finding.model_validate_json(r.value) for r in records]
    assert [f.title for f in detected if f.detected] == []
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM incident").fetchone() == (0,)


def _stats(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
            metrics: dict = json.loads(response.read())["metrics"]
            return metrics
    except OSError:
        return {}
