"""A page held back by a silence goes out once the silence ends, if the problem is still open.

Real SQLite and PostgreSQL, a real HTTP receiver on loopback; the fake clock moves time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner
from incident_support import (
    FakeClock,
    finding,
    migrated_engine,
    settings_with,
    webhook,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli import main
from genmon.db import session_scope
from genmon.incidents.dispatcher import Dispatcher, DispatchReport
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.schemas.incidents import (
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)
from genmon.settings import Settings

SECRET = "hmac-key-for-tests"
HOUR_S = 3600


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=SECRET) as running:
        yield running


def _settings(receiver: WebhookReceiver, *names: str, **notify: object) -> Settings:
    hooks = [
        webhook(name, receiver.url, secret=SECRET, rate_per_s=1000, burst=1000)
        for name in names or ("hook",)
    ]
    return settings_with(*hooks, incidents={"group_window_s": 0}, notify=notify)


def _silence(engine: Engine, clock: FakeClock, matcher: str = "model=chat", hours: int = 1) -> str:
    silence = Silence(
        matchers=[matcher],
        starts_at=clock.now,
        ends_at=clock.now + timedelta(hours=hours),
        created_by="alice",
    )
    with session_scope(engine) as session:
        session.add(silence)
    return silence.id


def _until_idle(dispatcher: Dispatcher) -> DispatchReport:
    return asyncio.run(dispatcher.drain(timeout_s=10))


def _rows(engine: Engine) -> list[tuple[NotificationEvent, str, NotificationStatus, str | None]]:
    with Session(engine) as session:
        query = select(
            Notification.event,
            Notification.destination,
            Notification.status,
            Notification.silenced_by,
        ).order_by(Notification.id)
        return [tuple(row) for row in session.exec(query).all()]


def _events(receiver: WebhookReceiver) -> list[str]:
    return [request.json["event"] for request in receiver.requests]


@pytest.mark.parametrize("silenced_when", ["queued", "due"])
def test_a_held_back_page_goes_out_once_per_destination_when_its_silence_ends(
    engine: Engine, receiver: WebhookReceiver, silenced_when: str
) -> None:
    clock = FakeClock()
    settings = _settings(receiver, "hook", "chat")
    manager = IncidentManager(engine, settings, clock=clock)
    if silenced_when == "queued":
        silence_id = _silence(engine, clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    if silenced_when == "due":
        silence_id = _silence(engine, clock)  # the dispatcher holds the pages back
    first, second = (Dispatcher(engine, settings, clock=clock) for _ in range(2))
    assert _until_idle(first).delivered == 0

    clock.advance(HOUR_S - 1)  # still silenced
    assert _until_idle(first).unsilenced == 0
    assert receiver.requests == []

    clock.advance(1)  # the silence's end
    reports = [_until_idle(dispatcher) for dispatcher in (first, second, first, second)]
    assert [report.unsilenced for report in reports] == [2, 0, 0, 0]
    assert sum(report.delivered for report in reports) == 2
    assert receiver.duplicates == 0 and receiver.rejected == 0
    assert sorted(receiver.unique) == [
        f"{incident_id}.unsilenced.{silence_id}.trigger.{name}" for name in ("chat", "hook")
    ]
    assert {request.json["incident"]["id"] for request in receiver.requests} == {incident_id}
    assert _events(receiver) == ["trigger", "trigger"]

    # The page went out, so its resolve goes out too.
    manager.resolve(incident_id, actor="alice")
    _until_idle(first)
    assert _events(receiver) == ["trigger", "trigger", "resolve", "resolve"]
    assert [(event, status) for event, _, status, _ in _rows(engine)] == [
        (NotificationEvent.TRIGGER, NotificationStatus.SUPPRESSED),
        (NotificationEvent.TRIGGER, NotificationStatus.SUPPRESSED),
        (NotificationEvent.TRIGGER, NotificationStatus.DELIVERED),
        (NotificationEvent.TRIGGER, NotificationStatus.DELIVERED),
        (NotificationEvent.RESOLVE, NotificationStatus.DELIVERED),
        (NotificationEvent.RESOLVE, NotificationStatus.DELIVERED),
    ]


def test_expiring_a_silence_on_the_command_line_releases_the_page(
    database_url: str, engine: Engine, receiver: WebhookReceiver
) -> None:
    settings = _settings(receiver)
    added = CliRunner().invoke(
        main, ["silences", "add", "-m", "model=chat", "--duration", "2h", "--url", database_url]
    )
    assert added.exit_code == 0, added.output
    silence_id = added.output.split()[0]
    manager = IncidentManager(engine, settings)
    incident_id = str(manager.process(finding(0)).incident_id)
    dispatcher = Dispatcher(engine, settings)
    assert _until_idle(dispatcher).delivered == 0

    expired = CliRunner().invoke(main, ["silences", "expire", silence_id, "--url", database_url])
    assert expired.exit_code == 0, expired.output
    report = _until_idle(dispatcher)
    assert (report.unsilenced, report.delivered) == (1, 1)
    assert list(receiver.unique) == [f"{incident_id}.unsilenced.{silence_id}.trigger.hook"]


def test_the_running_dispatcher_pages_after_an_expiry_without_being_woken(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    settings = _settings(receiver, poll_interval_s=0.05)
    clock = FakeClock()
    silence_id = _silence(engine, clock)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    dispatcher = Dispatcher(engine, settings, clock=clock)

    async def scenario() -> bool:
        stop = asyncio.Event()
        runner = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(0.2)  # several polls under the silence
        held_back = receiver.requests == []
        with session_scope(engine) as session:
            silence = session.get(Silence, silence_id)
            assert silence is not None
            silence.ends_at = clock.now  # what `genmon silences expire` does
        arrived = await asyncio.to_thread(receiver.wait_for, 1, 10.0)
        await asyncio.sleep(0.2)  # more polls: nothing more may come
        stop.set()
        await asyncio.wait_for(runner, 10)
        return held_back and arrived

    assert asyncio.run(scenario())
    assert _events(receiver) == ["trigger"]


def test_dispatchers_checking_at_the_same_time_queue_one_page(
    database_url: str, engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    _silence(engine, clock)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    clock.advance(HOUR_S)
    # Separate engines, as separate processes would have.
    engines = [migrated_engine(database_url) for _ in range(4)]
    dispatchers = [Dispatcher(each, settings, clock=clock) for each in engines]
    start = threading.Barrier(len(dispatchers))
    queued: list[int] = []

    def check(dispatcher: Dispatcher) -> None:
        start.wait()
        for _ in range(3):
            queued.append(dispatcher.incidents.repeat_unsilenced_pages())

    threads = [threading.Thread(target=check, args=(each,)) for each in dispatchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for each in engines:
        each.dispose()
    assert sum(queued) == 1
    assert [(event, status) for event, _, status, _ in _rows(engine)] == [
        (NotificationEvent.TRIGGER, NotificationStatus.SUPPRESSED),
        (NotificationEvent.TRIGGER, NotificationStatus.PENDING),
    ]
    assert _until_idle(Dispatcher(engine, settings, clock=clock)).delivered == 1
    assert _events(receiver) == ["trigger"]


def test_a_resolved_incident_gets_nothing_when_its_silence_ends(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    silence_id = _silence(engine, clock)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.resolve(incident_id, actor="alice")
    clock.advance(2 * HOUR_S)
    report = _until_idle(Dispatcher(engine, settings, clock=clock))
    assert (report.unsilenced, report.delivered) == (0, 0)
    assert receiver.requests == []
    assert _rows(engine) == [
        (NotificationEvent.TRIGGER, "hook", NotificationStatus.SUPPRESSED, silence_id),
        (NotificationEvent.RESOLVE, "hook", NotificationStatus.SUPPRESSED, silence_id),
    ]


def test_another_silence_still_holds_the_page_until_it_ends(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    _silence(engine, clock, "model=chat", hours=1)
    _silence(engine, clock, "signal=latency_ms", hours=3)
    incident_id = str(
        IncidentManager(engine, settings, clock=clock).process(finding(0)).incident_id
    )
    ((_, _, _, held_by),) = _rows(engine)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    clock.advance(HOUR_S)  # the first silence has ended, the longer one matches still
    assert _until_idle(dispatcher).unsilenced == 0
    clock.advance(HOUR_S)
    assert _until_idle(dispatcher).unsilenced == 0
    assert receiver.requests == []
    clock.advance(HOUR_S)
    assert _until_idle(dispatcher).delivered == 1
    assert _until_idle(dispatcher).unsilenced == 0
    (received,) = receiver.requests
    assert received.json["event"] == "trigger"
    assert received.idempotency_key == f"{incident_id}.unsilenced.{held_by}.trigger.hook"


def test_an_acknowledged_incident_gets_its_trigger_then_its_acknowledge(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    _silence(engine, clock)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.acknowledge(incident_id, actor="alice", reason="on it")
    dispatcher = Dispatcher(engine, settings, clock=clock)
    assert _until_idle(dispatcher).delivered == 0
    clock.advance(HOUR_S)
    report = _until_idle(dispatcher)
    assert (report.unsilenced, report.delivered) == (1, 2)
    trigger, acknowledge = (request.json for request in receiver.requests)
    assert (trigger["event"], acknowledge["event"]) == ("trigger", "acknowledge")
    assert trigger["incident"]["status"] == "acknowledged"
    assert "alice" in acknowledge["reason"]
    assert acknowledge["sequence"] > trigger["sequence"]
    # Nothing more on later checks; the resolve follows the page that went out.
    manager.resolve(incident_id, actor="alice")
    _until_idle(dispatcher)
    assert _events(receiver) == ["trigger", "acknowledge", "resolve"]


def test_a_page_that_went_out_is_not_repeated_when_a_later_silence_ends(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    manager.process(finding(0))
    assert _until_idle(dispatcher).delivered == 1
    silence_id = _silence(engine, clock)
    clock.advance(60)
    escalated = manager.process(finding(1, score=5.0))  # critical: an update, silenced
    assert (escalated.action, escalated.notifications) == ("updated", 0)
    clock.advance(HOUR_S)
    report = _until_idle(dispatcher)
    assert (report.unsilenced, report.delivered) == (0, 0)
    assert _events(receiver) == ["trigger"]
    assert _rows(engine)[-1] == (
        NotificationEvent.UPDATE,
        "hook",
        NotificationStatus.SUPPRESSED,
        silence_id,
    )


def test_it_is_the_end_of_the_silence_that_releases_the_page(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    _silence(engine, clock, "status=open")
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.acknowledge(incident_id, actor="alice")  # the silence no longer matches it
    dispatcher = Dispatcher(engine, settings, clock=clock)
    clock.advance(HOUR_S / 2)
    assert _until_idle(dispatcher).delivered == 0
    clock.advance(HOUR_S / 2)
    assert _until_idle(dispatcher).delivered == 2
    assert _events(receiver) == ["trigger", "acknowledge"]
