"""End to end through the real findings topic and `genmon worker` subprocesses, restart included.

A person acknowledges and resolves the incident with the CLI in between, from a process
that knows the database and nothing else: the worker's dispatcher pages the receiver and
publishes both transitions to the incidents topic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from incident_support import finding, migrated_engine, sqlite_url
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka_support import consume
from sqlmodel import Session, func, select

from genmon.incidents.receiver import WebhookReceiver
from genmon.infra.kafka import KafkaBroker
from genmon.schemas import DeadLetter, IncidentEvent
from genmon.schemas.codec import encode
from genmon.schemas.incidents import Incident, Notification, NotificationEvent
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECRET = "kafka-test-secret"
FINDINGS = 1000
GENMON = str(Path(sys.executable).with_name("genmon"))


def _committed(bootstrap: str, group: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


class Worker:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [GENMON, "worker", "--loglevel", "warning"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_consumed(self, bootstrap: str, group: str, topic: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}")
            if _committed(bootstrap, group, topic) >= FINDINGS + 1:
                return
            time.sleep(1)
        raise AssertionError(f"worker did not consume {FINDINGS} findings in {timeout_s} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def test_identical_findings_and_a_replay_after_restart_page_once(
    kafka_settings: Settings,
    unique_name: str,
    free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    prefix = unique_name
    topic = f"{prefix}.findings"
    with WebhookReceiver(secret=SECRET) as receiver:
        destinations = tmp_path / "destinations.yaml"
        destinations.write_text(
            yaml.safe_dump(
                {"destinations": [{"name": "hook", "url": receiver.url, "secret": SECRET}]}
            )
        )
        env = {
            **os.environ,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "GENMON_KAFKA__TOPIC_PREFIX": prefix,
            "GENMON_DATABASE__URL": url,
            "GENMON_HOME": str(tmp_path / "home"),
            "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
            "GENMON_NOTIFY__POLL_INTERVAL_S": "0.2",
        }
        same = finding(0, model_id=unique_name).model_copy(update={"finding_id": "f-1"})
        payload = encode(same)

        topic_settings = kafka_settings.model_copy(
            update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": prefix})}
        )
        KafkaBroker(topic_settings).ensure_topics(bootstrap)
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for _ in range(FINDINGS):
            producer.send(topic, key=same.fingerprint.encode(), value=payload)
        producer.send(topic, key=b"garbage", value=b"{not json")
        producer.flush()
        producer.close()

        first_group = f"{unique_name}-a"
        first = Worker(
            {**env, "GENMON_WORKER__APP_ID": first_group,
             "GENMON_WORKER__WEB_PORT": str(free_port())},
            tmp_path / "worker.log",
        )  # fmt: skip
        try:
            first.wait_consumed(bootstrap, first_group, topic, timeout_s=180)
            assert receiver.wait_for(1, timeout_s=30)
            incident_id = receiver.requests[0].json["incident"]["id"]
            on_call = {**os.environ, "GENMON_DATABASE__URL": url}
            for command in ("ack", "resolve"):
                subprocess.run(
                    [GENMON, "incidents", command, incident_id, "--by", "alice"],
                    env=on_call,
                    check=True,
                    capture_output=True,
                )
            assert receiver.wait_for(3, timeout_s=30)
            announced = [
                IncidentEvent.model_validate_json(record.value)
                for record in consume(kafka_settings, f"{prefix}.incidents", expected=3)
            ]
        finally:
            first.stop()

        # A new consumer group replays the whole topic: every finding comes again.
        second_group = f"{unique_name}-b"
        second = Worker(
            {**env, "GENMON_WORKER__APP_ID": second_group,
             "GENMON_WORKER__WEB_PORT": str(free_port())},
            tmp_path / "worker.log",
        )  # fmt: skip
        try:
            second.wait_consumed(bootstrap, second_group, topic, timeout_s=180)
            time.sleep(2)  # give a (wrong) second page the chance to arrive
        finally:
            second.stop()

    with Session(engine) as session:
        incidents = session.exec(select(Incident)).all()
        triggers = session.exec(
            select(func.count())
            .select_from(Notification)
            .where(Notification.event == NotificationEvent.TRIGGER)
        ).one()
    assert len(incidents) == 1 and incidents[0].finding_count == 1
    assert [(e.incident_id, e.transition, e.actor) for e in announced] == [
        (incidents[0].id, "opened", "genmon"),
        (incidents[0].id, "acknowledged", "alice"),
        (incidents[0].id, "resolved", "alice"),
    ]
    # The replay by the second worker announced nothing more.
    replayed = consume(kafka_settings, f"{prefix}.incidents", expected=3, timeout_s=5)
    assert len(replayed) == 3
    # The unparsable message was dead-lettered with its reason (once per consumer group).
    consumer = KafkaConsumer(
        f"{prefix}.deadletter",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    dead = [DeadLetter.model_validate_json(record.value) for record in consumer]
    consumer.close()
    assert len(dead) == 2
    assert {(d.source_topic, d.reason) for d in dead} == {(topic, "bad_json")}
    assert triggers == 1
    assert receiver.rejected == 0 and receiver.duplicates == 0
    assert [r.json["event"] for r in receiver.requests] == ["trigger", "acknowledge", "resolve"]
