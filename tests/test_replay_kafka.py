"""The live worker on the real broker and `genmon replay` find the same on the same stream.

A seeded stream of real traffic (``bench.replay.traffic``: 45 minutes of a production
trace with an error burst and a slower version) goes to the inference and feedback
topics of a fresh `genmon worker`, and through `genmon replay`. Every finding the worker
publishes, detected and clear, must be one the replay computed: same fingerprint, window,
verdict, score and title. Embeddings are off in both: the live sampler is not seeded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka_support import consume

from bench.replay import traffic
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import Finding
from genmon.settings import Settings
from genmon.streams.replay import Replay

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
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


def test_the_live_worker_and_replay_publish_the_same_findings(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    # Event times in the past, so the stream can be sent as fast as the broker takes it.
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    model = f"{unique_name}-bot"
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

    env_settings = {"GENMON_EMBEDDING__ENABLED": "false"}
    replay_settings = Settings(embedding={"enabled": False})
    engine = Replay(replay_settings, keep_findings=True)
    engine.feed(lines)
    report = engine.finish()
    expected = {_key(f) for f in report.findings}
    assert any(f.detected and f.signal == "error_rate" for f in report.findings)
    assert any(f.detected and f.model_version == "v2" for f in report.findings)

    prefix = unique_name
    bootstrap = kafka_settings.kafka.bootstrap_servers
    topics = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": prefix})}
    )
    KafkaBroker(topics).ensure_topics(bootstrap)
    env = {
        **os.environ,
        **env_settings,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GENMON_KAFKA__TOPIC_PREFIX": prefix,
        "GENMON_WORKER__APP_ID": prefix,
        "GENMON_WORKER__WEB_PORT": str(free_port()),
        "GENMON_DATABASE__URL": f"sqlite:///{tmp_path / 'worker.sqlite'}",
        "GENMON_HOME": str(tmp_path / "home"),
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
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
        for line, event in zip(lines, events, strict=True):
            kind = "inference" if traffic.is_inference(event) else "feedback"
            producer.send(f"{prefix}.{kind}", key=model.encode(), value=line)
        producer.flush()
        producer.close()
        records = consume(topics, f"{prefix}.findings", expected=len(expected), timeout_s=240)
        time.sleep(5)  # anything more than the replay computed would show now
        records += consume(topics, f"{prefix}.findings", expected=10**9, timeout_s=3)[
            len(records) :
        ]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    live = {_key(Finding.model_validate_json(record.value)) for record in records}
    tail = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert live == expected, (sorted(live - expected)[:3], sorted(expected - live)[:3], tail)
