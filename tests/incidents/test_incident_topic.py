"""Incident transitions reach ``<prefix>.incidents`` through the outbox, whoever made them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from click.testing import CliRunner
from incident_support import (
    FakeClock,
    finding,
    settings_with,
    webhook,
)
from kafka_support import consume
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli import main
from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.incidents.dispatcher import Dispatcher, DispatchReport
from genmon.incidents.manager import IncidentManager
from genmon.incidents.routing import Router
from genmon.infra.kafka import KafkaBroker
from genmon.schemas import IncidentEvent, IncidentStatus
from genmon.schemas.events import utcnow
from genmon.schemas.incidents import (
    INCIDENTS_TOPIC_DESTINATION,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)
from genmon.settings import Settings


def _topic_rows(engine: Engine) -> list[Notification]:
    with Session(engine) as session:
        query = (
            select(Notification)
            .where(Notification.destination == INCIDENTS_TOPIC_DESTINATION)
            .order_by(Notification.id)
        )
        return list(session.exec(query).all())


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _until_idle(dispatcher: Dispatcher, clock: FakeClock) -> DispatchReport:
    total = DispatchReport()
    for _ in range(50):
        report = asyncio.run(dispatcher.dispatch_once())
        total.add(report)
        if not report.claimed:
            if report.wait_s is None:
                return total
            clock.advance(max(report.wait_s, 0.001))
    raise AssertionError(f"outbox not drained: {total}")


def _with_kafka(settings: Settings, bootstrap: str, prefix: str) -> Settings:
    kafka = settings.kafka.model_copy(
        update={"bootstrap_servers": bootstrap, "topic_prefix": prefix}
    )
    return settings.model_copy(update={"kafka": kafka})


def test_every_transition_is_queued_for_the_topic_and_no_silence_holds_it(
    engine: Engine,
) -> None:
    clock = FakeClock()
    settings = settings_with(
        webhook("hook", "http://127.0.0.1:9/hook"),
        incidents={"publish_events": True, "auto_resolve_quiet_windows": 1},
    )
    with session_scope(engine) as session:
        session.add(
            Silence(
                matchers=["model=chat"],
                starts_at=clock.now,
                ends_at=clock.now.replace(hour=5),
                created_by="alice",
            )
        )
    manager = IncidentManager(engine, settings, clock=clock)
    opened = manager.process(finding(0, score=1.5))
    incident_id = str(opened.incident_id)
    assert opened.notifications == 0  # the page is silenced, the event is not
    manager.process(finding(0, score=1.5))  # a replay adds nothing
    manager.process(finding(1, score=5.0))  # escalated
    manager.acknowledge(incident_id, actor="alice")
    manager.add_note(incident_id, actor="alice", text="a note is not a transition")
    manager.resolve(incident_id, actor="alice")
    clock.advance(60)
    assert manager.process(finding(2)).action == "reopened"
    assert manager.process(finding(3, detected=False)).action == "resolved"

    rows = _topic_rows(engine)
    events = [IncidentEvent.model_validate(row.payload) for row in rows]
    assert [(e.transition, e.status, e.actor) for e in events] == [
        ("opened", IncidentStatus.OPEN, "genmon"),
        ("escalated", IncidentStatus.OPEN, "genmon"),
        ("acknowledged", IncidentStatus.ACKNOWLEDGED, "alice"),
        ("resolved", IncidentStatus.RESOLVED, "alice"),
        ("reopened", IncidentStatus.OPEN, "genmon"),
        ("resolved", IncidentStatus.RESOLVED, "genmon"),
    ]
    assert {e.incident_id for e in events} == {incident_id}
    assert {(row.event, row.status, row.silenced_by) for row in rows} == {
        (NotificationEvent.TRANSITION, NotificationStatus.PENDING, None)
    }
    assert len({row.idempotency_key for row in rows}) == len(rows)
    assert len({e.event_id for e in events}) == len(events)  # consumers drop repeats by it


def test_without_publish_events_nothing_is_queued_for_the_topic(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(incidents={"publish_events": False}))
    manager.resolve(str(manager.process(finding(0)).incident_id), actor="alice")
    assert _topic_rows(engine) == []


def test_the_topic_destination_name_is_reserved() -> None:
    settings = settings_with(webhook(INCIDENTS_TOPIC_DESTINATION, "http://127.0.0.1:9/hook"))
    with pytest.raises(ConfigurationError, match="reserved for the incidents topic"):
        Router(settings.notify)


@pytest.mark.kafka
def test_cli_and_automatic_transitions_reach_the_topic_in_order_across_an_outage(
    database_url: str,
    engine: Engine,
    kafka_settings: Settings,
    unique_name: str,
    free_port: Callable[[], int],
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    settings = _with_kafka(
        settings_with(incidents={"publish_events": True, "auto_resolve_quiet_windows": 1}),
        bootstrap,
        unique_name,
    )
    KafkaBroker(settings).ensure_topics(bootstrap)
    clock = FakeClock(utcnow())
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    # A person, from another process: the CLI needs the database, not the broker.
    _cli("incidents", "ack", incident_id, "--by", "alice", "--url", database_url)
    _cli("incidents", "resolve", incident_id, "--by", "bob", "--url", database_url)
    clock.advance(60)
    assert manager.process(finding(1)).action == "reopened"
    assert manager.process(finding(2, detected=False)).action == "resolved"

    # The broker is away: the events wait in the outbox, in order, and are retried.
    away = _with_kafka(settings, f"127.0.0.1:{free_port()}", unique_name)
    report = asyncio.run(Dispatcher(engine, away, clock=clock).dispatch_once())
    assert (report.claimed, report.retried, report.delivered) == (1, 1, 0)
    first, *rest = _topic_rows(engine)
    assert first.status is NotificationStatus.PENDING and first.attempts == 1
    assert first.last_error is not None and "KafkaConnectionError" in first.last_error
    assert {row.attempts for row in rest} == {0}

    total = _until_idle(Dispatcher(engine, settings, clock=clock), clock)
    assert total.delivered == 5 and total.dead == 0
    records = consume(settings, settings.topic("incidents"), expected=5, timeout_s=30)
    events = [IncidentEvent.model_validate_json(record.value) for record in records]
    assert [(e.transition, e.actor) for e in events] == [
        ("opened", "genmon"),
        ("acknowledged", "alice"),
        ("resolved", "bob"),
        ("reopened", "genmon"),
        ("resolved", "genmon"),
    ]
    assert {record.key for record in records} == {incident_id.encode()}
    rows = _topic_rows(engine)
    assert {row.status for row in rows} == {NotificationStatus.DELIVERED}
    # A redelivery of a row carries the same event id: it is fixed when the row is queued.
    assert [e.event_id for e in events] == [row.payload["event_id"] for row in rows]
