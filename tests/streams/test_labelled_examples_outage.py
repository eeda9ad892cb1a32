"""A PostgreSQL outage while labelled examples are written loses none of them.

Each test stops a PRIVATE cluster (own home and port, as in tests/test_infra_postgres.py)
while rows are being written, keeps it down until the writer has met the outage and
retried, starts it again, and checks that every joined pair is stored exactly once and
that ``genmon_join_examples_written_total`` equals the rows. Conditions, not sleeps,
decide every step; the outage lasts a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fault_report import full_length, record
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from genmon.db import make_engine, upgrade
from genmon.infra.kafka import KafkaBroker
from genmon.infra.postgres import PostgresCluster
from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import FeedbackSettings, Settings
from genmon.streams.labelled_examples import LabelledExampleSink
from genmon.streams.pipeline_metrics import PipelineMetrics

pytestmark = pytest.mark.postgres

GENMON = str(Path(sys.executable).parent / "genmon")


@pytest.fixture
def private_cluster(settings: Settings, free_port: Callable[[], int]) -> Iterator[PostgresCluster]:
    """A running cluster of this test's own, migrated; stopped and removed after."""
    # Not tmp_path: the `postgres` OS user cannot traverse pytest's private root folder.
    home = Path(tempfile.mkdtemp(prefix="genmon-pg-outage-"))
    home.chmod(0o755)
    cluster = PostgresCluster(
        Settings(home=home, postgres=settings.postgres.model_copy(update={"port": free_port()}))
    )
    try:
        cluster.up()
        upgrade(cluster.url)
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home, ignore_errors=True)


def stored(url: str) -> tuple[int, int]:
    """(rows, distinct (model, request) pairs) in ``labelled_example``."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            total, distinct = connection.execute(
                sa.text(
                    "select count(*), count(distinct (model_id, request_id)) from labelled_example"
                )
            ).one()
            return int(total), int(distinct)
    finally:
        engine.dispose()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def committed_to_end(bootstrap: str, group: str, topic: str) -> bool:
    """Whether ``group`` has committed every partition of ``topic`` up to its end."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        ends = consumer.end_offsets(
            [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        )
        committed = admin.list_group_offsets(group).get(group, {})
        return any(ends.values()) and all(
            end == 0 or (tp in committed and committed[tp].offset == end)
            for tp, end in ends.items()
        )
    finally:
        consumer.close()
        admin.close()


# -- the sink alone, retrying in place -------------------------------------------------------
def test_the_sink_waits_out_an_outage_and_stores_every_row_once(
    private_cluster: PostgresCluster,
) -> None:
    registry = CollectorRegistry()
    sink = LabelledExampleSink(
        private_cluster.url,
        PipelineMetrics(registry),
        FeedbackSettings(examples_retry_initial_s=0.05, examples_retry_max_s=0.5),
    )

    def metric(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    def rows(batch: int) -> list[dict[str, Any]]:
        return [
            {"request_id": f"b{batch}-{i}", "model_id": "m", "model_version": "v1"}
            for i in range(25)
        ]

    async def write_all() -> None:
        for batch in range(40):
            await sink.write(rows(batch), "t.feedback", batch % 4)

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        writer = asyncio.ensure_future(write_all())
        await asyncio.wait_for(
            until(lambda: metric("genmon_join_examples_written_total") >= 250), 30
        )
        await asyncio.to_thread(private_cluster.down)
        # The writer met the outage and retried with backoff, holding its rows.
        transient = {"kind": "transient"}
        await asyncio.wait_for(
            until(lambda: metric("genmon_join_example_errors_total", **transient) >= 5), 30
        )
        assert not writer.done() and metric("genmon_join_examples_pending") == 25
        await asyncio.to_thread(private_cluster.up)
        await asyncio.wait_for(writer, 60)

    asyncio.run(scenario())
    assert stored(private_cluster.url) == (1000, 1000)
    assert metric("genmon_join_examples_written_total") == 1000
    assert metric("genmon_join_examples_failed_total") == 0
    assert metric("genmon_join_examples_pending") == 0


# -- the worker, rows waiting in <prefix>.examples-retry ---------------------------------------
class Worker:
    """One `genmon worker` subprocess."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = int(env["GENMON_WORKER__WEB_PORT"])
        with log.open("ab") as handle:
            self.proc = subprocess.Popen(
                [GENMON, "worker"],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            return "[^Worker]: Ready" in self.log.read_text(errors="replace")

        wait_for(ready, timeout, "the worker")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as reply:
            metrics: dict[str, Any] = json.loads(reply.read())["metrics"]
            return metrics

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.mark.kafka
def test_a_worker_keeps_joining_through_an_outage_and_stores_every_example_once(
    private_cluster: PostgresCluster,
    kafka_settings: Settings,
    unique_name: str,
    tmp_path: Path,
    free_port: Callable[[], int],
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    settings = Settings(kafka={"bootstrap_servers": bootstrap, "topic_prefix": unique_name})
    KafkaBroker(settings).ensure_topics(bootstrap)
    env = {
        **os.environ,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
        "GENMON_WORKER__APP_ID": unique_name,
        "GENMON_WORKER__WEB_PORT": str(free_port()),
        "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_DATABASE__URL": private_cluster.url,
        "GENMON_EMBEDDING__ENABLED": "false",
        "GENMON_FEEDBACK__EXAMPLES_RETRY_INITIAL_S": "0.2",
        "GENMON_FEEDBACK__EXAMPLES_RETRY_MAX_S": "1",
        "GENMON_WORKER__SESSION_TIMEOUT_S": "6",
        "GENMON_WORKER__HEARTBEAT_INTERVAL_S": "1",
    }
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    worker = Worker(env, tmp_path / "worker.log")
    t0 = datetime.now(UTC) - timedelta(seconds=5)

    def send(event: InferenceEvent | FeedbackEvent) -> None:
        kind = "inference" if isinstance(event, InferenceEvent) else "feedback"
        producer.send(
            settings.topic(kind),
            key=event.model_id.encode(),
            value=event.model_dump_json().encode(),
        )

    def feedback(first: int, last: int) -> None:
        for i in range(first, last):
            send(FeedbackEvent(request_id=f"r{i}", model_id="m-outage", score=0.5, created_at=t0))
        producer.flush()

    def stat(name: str, labels: str | None = None) -> float:
        value = worker.stats().get(name, 0)
        return float(value.get(labels, 0) if isinstance(value, dict) else value)

    try:
        worker.wait_ready()
        for i in range(300):
            send(
                InferenceEvent(
                    request_id=f"r{i}",
                    model_id="m-outage",
                    latency_ms=10.0,
                    prompt=f"question {i}",
                    response=f"answer {i}",
                    started_at=t0 + timedelta(milliseconds=i),
                )
            )
        feedback(0, 100)
        wait_for(lambda: stored(private_cluster.url)[0] == 100, 60, "the first 100 examples")

        private_cluster.down()
        feedback(100, 300)
        # The join goes on, its rows go to the retry topic, and the retry agent keeps
        # trying the database with backoff.
        wait_for(lambda: stat("genmon_join_joined_total") == 300, 60, "all pairs joined")
        wait_for(
            lambda: (
                stat("genmon_join_examples_deferred_total") > 0
                and stat("genmon_join_example_errors_total", "kind=transient") >= 4
            ),
            60,
            "rows deferred and retried",
        )
        assert stat("genmon_join_examples_written_total") == 100
        down_at = time.monotonic()
        if full_length():  # make faults: the 2-minute outage users reported
            wait_for(lambda: time.monotonic() - down_at >= 120, 130, "a 2-minute outage")
        outage_s = time.monotonic() - down_at
        private_cluster.up()

        wait_for(lambda: stored(private_cluster.url)[0] >= 300, 60, "every example stored")
        wait_for(lambda: stat("genmon_join_examples_pending") == 0, 30, "nothing pending")
        rows, distinct = stored(private_cluster.url)
        record(
            "PostgreSQL down",
            outage_s=round(outage_s, 1),
            sent=300,
            stored=distinct,
            duplicates=rows - distinct,
            lost=300 - distinct,
        )
        assert (rows, distinct) == (300, 300)
        assert stat("genmon_join_examples_written_total") == 300
        assert stat("genmon_join_examples_failed_total") == 0
        # The retry records, stored, are acknowledged: their offsets get committed.
        retry_topic = settings.topic("examples-retry")
        wait_for(
            lambda: committed_to_end(bootstrap, unique_name, retry_topic),
            30,
            "the retry records committed",
        )
    finally:
        worker.stop()
        producer.close()
