"""`genmon worker --role incidents`: the incident path in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from incident_support import finding, migrated_engine, sqlite_url
from kafka import KafkaProducer
from sqlmodel import Session, select

from genmon.exceptions import ConfigurationError
from genmon.incidents.receiver import WebhookReceiver
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.codec import encode
from genmon.schemas.incidents import Incident
from genmon.settings import Settings
from genmon.streams.app import create_app
from genmon.streams.incident_agent import incidents_role_settings, run_incidents_worker

GENMON = str(Path(sys.executable).with_name("genmon"))
SECRET = "role-test-secret"


def test_main_worker_leaves_incidents_to_the_role_when_told() -> None:
    with_incidents = create_app(Settings())
    without = create_app(Settings(incidents={"run_in_worker": False}))
    assert "incidents" in with_incidents.genmon.extras
    assert "incidents" not in without.genmon.extras
    assert incidents_role_settings(Settings()).worker.app_id == "genmon-incidents"


def test_role_refuses_to_double_the_incident_path() -> None:
    with pytest.raises(ConfigurationError, match="GENMON_INCIDENTS__RUN_IN_WORKER=false"):
        run_incidents_worker(Settings())


@pytest.mark.kafka
@pytest.mark.slow
def test_incident_role_worker_pages_on_a_finding(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
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
            "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
            "GENMON_DATABASE__URL": url,
            "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
            "GENMON_INCIDENTS__RUN_IN_WORKER": "false",
            "GENMON_WORKER__WEB_PORT": str(free_port()),
        }
        prefixed = kafka_settings.model_copy(
            update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
        )
        KafkaBroker(prefixed).ensure_topics(bootstrap)
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [GENMON, "worker", "--role", "incidents", "--loglevel", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            sent = finding(0, model_id=unique_name)
            producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
            producer.send(
                prefixed.topic("findings"), key=sent.fingerprint.encode(), value=encode(sent)
            )
            producer.flush()
            producer.close()
            deadline = time.monotonic() + 120
            while not receiver.unique and time.monotonic() < deadline:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                time.sleep(0.5)
            pages = [r.json for r in receiver.unique.values()]
            assert [p["event"] for p in pages] == ["trigger"], pages
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            log.close()
        with Session(engine) as session:
            incidents = session.exec(select(Incident)).all()
        assert [i.fingerprint for i in incidents] == [sent.fingerprint]
