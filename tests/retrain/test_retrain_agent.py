"""The retrain agent on the real broker: incidents and requests delivered twice make one
job each, every offset is committed, an unregistered model's incident is "not
retrainable"."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import retrain_support_triggers as support
from click.testing import CliRunner
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from sqlalchemy.engine import Engine

from genmon.cli.retrain import retrain
from genmon.infra.kafka import KafkaBroker
from genmon.retrain.agent import RetrainAgent
from genmon.retrain.triggers import incident_key, manual_request, not_registered
from genmon.schemas.codec import encode
from genmon.schemas.events import IncidentEvent, IncidentStatus, Severity
from genmon.schemas.retrain import DecisionOutcome
from genmon.settings import Settings, get_settings

pytestmark = [pytest.mark.kafka]


def _agent_settings(kafka_settings: Settings, name: str) -> Settings:
    return kafka_settings.model_copy(
        update={
            "kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": name}),
            "worker": kafka_settings.worker.model_copy(update={"app_id": name}),
        }
    )


def _offsets(settings: Settings, group: str, topics: tuple[str, ...]) -> tuple[dict, dict]:
    """(committed, end) offsets of ``topics`` by partition."""
    bootstrap = settings.kafka.bootstrap_servers
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        found = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    committed = {tp: meta.offset for tp, meta in found.items() if tp.topic in topics}
    reader = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in reader.partitions_for_topic(topic)
        ]
        ends = {tp: offset for tp, offset in reader.end_offsets(partitions).items() if offset}
    finally:
        reader.close()
    return committed, ends


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def _event(incident_id: str, model_id: str, transition: str) -> IncidentEvent:
    return IncidentEvent(
        event_id=f"{incident_id}.{transition}",
        incident_id=incident_id,
        fingerprint="f" * 32,
        model_id=model_id,
        status=IncidentStatus.OPEN,
        severity=Severity.WARNING,
        title="refusals up",
        transition=transition,
    )


def test_an_incident_and_a_request_each_delivered_twice_make_one_job_each(
    kafka_settings: Settings, unique_name: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _agent_settings(kafka_settings, unique_name)
    bootstrap = settings.kafka.bootstrap_servers
    KafkaBroker(settings).ensure_topics(bootstrap)
    incidents, requests = settings.topic("incidents"), settings.topic("retrain")

    support.register(engine, "bot")
    refusals = support.incident(engine, "bot")
    ghost = support.incident(engine, "ghost")
    asked = manual_request("bot", "v1", "refuses card questions", "alice")

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for _ in range(2):
        producer.send(
            incidents, key=refusals.encode(), value=encode(_event(refusals, "bot", "opened"))
        )
        producer.send(requests, key=b"bot", value=encode(asked))
    producer.send(incidents, key=ghost.encode(), value=encode(_event(ghost, "ghost", "opened")))
    producer.send(
        incidents, key=refusals.encode(), value=encode(_event(refusals, "bot", "resolved"))
    )
    producer.send(requests, key=b"bot", value=b"{not json")
    producer.flush()
    producer.close()
    # `genmon retrain request` publishes to the same topic.
    monkeypatch.setenv("GENMON_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("GENMON_KAFKA__TOPIC_PREFIX", unique_name)
    get_settings.cache_clear()
    url = engine.url.render_as_string(hide_password=False)
    try:
        asked_by_cli = CliRunner().invoke(
            retrain, ["request", "bot", "--reason", "from the CLI", "--url", url]
        )
    finally:
        get_settings.cache_clear()
    assert asked_by_cli.exit_code == 0, asked_by_cli.output
    cli_job_id = asked_by_cli.output.strip()

    agent = RetrainAgent(settings, engine, support.policy())
    group, topics = f"{unique_name}-retrain", (incidents, requests)

    def settled() -> bool:
        if len(support.jobs(engine)) < 3 or not support.decisions(engine, "ghost"):
            return False
        committed, ends = _offsets(settings, group, topics)
        return committed == ends

    agent.start()
    try:
        _wait(settled, 60, "both jobs, the ghost's decision and every offset committed")
    finally:
        agent.stop()

    jobs = {job.job_id: job for job in support.jobs(engine, "bot")}
    assert sorted((job.trigger, job.trigger_key) for job in jobs.values()) == sorted(
        [
            ("incident", incident_key(refusals, 0)),
            ("manual", asked.trigger_key),
            ("manual", jobs[cli_job_id].trigger_key),
        ]
    )
    assert jobs[asked.job_id].requested_by == "alice"
    assert jobs[cli_job_id].reason == "from the CLI"
    [refused] = support.decisions(engine, "ghost")
    assert (refused.outcome, refused.reason) == (DecisionOutcome.REFUSED, not_registered("ghost"))
    assert agent.counts["skipped"] == 1  # the message that is no request
    assert agent.counts["published"] >= 1  # the incident's request went through the topic
    committed, ends = _offsets(settings, group, topics)
    assert committed == ends and sum(ends.values()) >= 9

    # A new consumer group replays both topics from the start: nothing new is queued.
    replay = _agent_settings(kafka_settings, unique_name).model_copy(
        update={"worker": settings.worker.model_copy(update={"app_id": f"{unique_name}-b"})}
    )
    second = RetrainAgent(replay, engine, support.policy())
    second.start()
    try:
        _wait(
            lambda: _offsets(replay, f"{unique_name}-b-retrain", topics)[0] == ends,
            60,
            "the replay to be committed",
        )
    finally:
        second.stop()
    assert len(support.jobs(engine)) == 3
    assert second.counts["stored"] >= 4
