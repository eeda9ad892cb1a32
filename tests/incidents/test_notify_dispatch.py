"""The outbox dispatcher against a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from incident_support import (
    FakeClock,
    finding,
    settings_with,
    webhook,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from genmon.db import session_scope
from genmon.incidents.dispatcher import Dispatcher, DispatchReport
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.incidents.retry import parse_retry_after
from genmon.schemas.incidents import (
    DeliveryAttempt,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)
from genmon.settings import Settings

SECRET = "hmac-key-for-tests"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=SECRET) as running:
        yield running


def _settings(receiver: WebhookReceiver, **notify: object) -> Settings:
    return settings_with(
        webhook("hook", receiver.url, secret=SECRET, rate_per_s=1000, burst=1000),
        incidents={"group_window_s": 0},
        notify={"backoff_initial_s": 1.0, "backoff_max_s": 60.0, **notify},
    )


def _once(dispatcher: Dispatcher) -> DispatchReport:
    return asyncio.run(dispatcher.dispatch_once())


def _until_idle(dispatcher: Dispatcher, clock: FakeClock, rounds: int = 100) -> DispatchReport:
    """Dispatch round after round, jumping the clock over backoffs, until nothing is left."""
    total = DispatchReport()
    for _ in range(rounds):
        report = _once(dispatcher)
        total.add(report)
        if not report.claimed:
            if report.wait_s is None:
                return total
            clock.advance(max(report.wait_s, 0.001))
    raise AssertionError(f"outbox not drained after {rounds} rounds: {total}")


def _rows(engine: Engine) -> list[Notification]:
    with Session(engine) as session:
        return list(session.exec(select(Notification).order_by(Notification.id)).all())


def _incident_lifecycles(manager: IncidentManager, count: int) -> None:
    """``count`` incidents, each triggered, acknowledged and resolved."""
    for model in range(count):
        outcome = manager.process(finding(0, model_id=f"model-{model}"))
        manager.acknowledge(str(outcome.incident_id), actor="alice")
        manager.resolve(str(outcome.incident_id), actor="alice")


def test_receiver_down_then_up_gets_everything_once_and_in_order(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    _incident_lifecycles(manager, 5)
    dispatcher = Dispatcher(engine, settings, clock=clock)

    receiver.stop()
    report = _once(dispatcher)
    # Only each incident's head (its trigger) is tried: the rest wait behind it.
    assert (report.claimed, report.retried, report.delivered) == (5, 5, 0)
    for _ in range(2):
        clock.advance(120)
        report = _once(dispatcher)
        # Five failures in a row paused the destination: one probe goes out at a time.
        assert (report.claimed, report.retried, report.delivered) == (1, 1, 0)
    assert {row.status for row in _rows(engine)} == {NotificationStatus.PENDING}

    receiver.start()
    total = _until_idle(dispatcher, clock)
    assert total.delivered == 15 and total.dead == 0
    assert len(receiver.unique) == 15 and receiver.duplicates == 0 and receiver.rejected == 0
    per_incident: dict[str, list[str]] = defaultdict(list)
    for received in receiver.requests:
        body = received.json
        assert body["idempotency_key"] == received.idempotency_key
        per_incident[body["incident"]["id"]].append(body["event"])
    assert list(per_incident.values()) == [["trigger", "acknowledge", "resolve"]] * 5
    rows = _rows(engine)
    assert {row.status for row in rows} == {NotificationStatus.DELIVERED}
    with Session(engine) as session:
        attempts = session.exec(select(func.count()).select_from(DeliveryAttempt)).one()
    assert attempts == 15 + 5 + 2  # the delivery log keeps the failed attempts too


def test_dead_after_max_attempts_and_later_rows_still_go(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver, max_attempts=3)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    receiver.script.extend([(500, {})] * 3)
    total = _until_idle(dispatcher := Dispatcher(engine, settings, clock=clock), clock)
    assert total.dead == 1 and total.delivered == 0
    (trigger,) = _rows(engine)
    assert trigger.status is NotificationStatus.DEAD
    assert trigger.attempts == 3 and trigger.last_status_code == 500
    # A dead row does not block the incident's later notifications forever.
    manager.resolve(incident_id, actor="alice")
    assert _until_idle(dispatcher, clock).delivered == 1
    assert [r.json["event"] for r in receiver.requests] == ["resolve"]


def test_resolve_never_overtakes_a_failing_trigger(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.resolve(incident_id, actor="alice")
    receiver.script.append((503, {}))
    dispatcher = Dispatcher(engine, settings, clock=clock)
    report = _once(dispatcher)
    assert (report.claimed, report.retried) == (1, 1)
    assert _once(dispatcher).claimed == 0  # the resolve waits for the trigger's retry
    _until_idle(dispatcher, clock)
    assert [r.json["event"] for r in receiver.requests] == ["trigger", "resolve"]


def _silence(engine: Engine, clock: FakeClock, matcher: str) -> str:
    silence = Silence(
        matchers=[matcher],
        starts_at=clock.now,
        ends_at=clock.now + timedelta(hours=1),
        created_by="alice",
    )
    with session_scope(engine) as session:
        session.add(silence)
    return silence.id


def test_a_silence_added_after_queueing_holds_the_page_and_its_resolve_back(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    chat = str(manager.process(finding(0)).incident_id)
    search = str(manager.process(finding(0, model_id="search")).incident_id)
    silence_id = _silence(engine, clock, "model=chat")  # after both pages were queued
    manager.resolve(chat, actor="alice")
    total = _until_idle(Dispatcher(engine, settings, clock=clock), clock)
    assert (total.suppressed, total.delivered) == (2, 1)
    assert [(r.json["incident"]["id"], r.json["event"]) for r in receiver.requests] == [
        (search, "trigger")
    ]
    chat_rows = [row for row in _rows(engine) if row.incident_id == chat]
    assert [(row.event, row.status, row.silenced_by, row.attempts) for row in chat_rows] == [
        (NotificationEvent.TRIGGER, NotificationStatus.SUPPRESSED, silence_id, 0),
        (NotificationEvent.RESOLVE, NotificationStatus.SUPPRESSED, silence_id, 0),
    ]


def test_a_silence_does_not_strand_a_page_that_went_out(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    assert _once(dispatcher).delivered == 1
    _silence(engine, clock, "model=chat")
    manager.acknowledge(incident_id, actor="alice")
    manager.resolve(incident_id, actor="alice")
    total = _until_idle(dispatcher, clock)
    assert (total.delivered, total.suppressed) == (2, 0)
    assert [r.json["event"] for r in receiver.requests] == ["trigger", "acknowledge", "resolve"]


def test_retry_after_is_honoured(engine: Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    receiver.script.append((429, {"Retry-After": "120"}))
    dispatcher = Dispatcher(engine, settings, clock=clock)
    assert _once(dispatcher).retried == 1
    (row,) = _rows(engine)
    assert row.next_attempt_at >= clock.now + timedelta(seconds=120)
    clock.advance(100)
    assert _once(dispatcher).claimed == 0
    clock.advance(21)
    assert _once(dispatcher).delivered == 1


def test_permanent_client_error_is_dead_at_once(engine: Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    receiver.script.append((400, {}))
    report = _once(Dispatcher(engine, settings, clock=clock))
    assert report.dead == 1
    (row,) = _rows(engine)
    assert row.status is NotificationStatus.DEAD and row.attempts == 1
    assert row.last_error is not None and "400" in row.last_error


def test_rate_limit_per_destination(engine: Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    settings = settings_with(
        webhook("hook", receiver.url, secret=SECRET, rate_per_s=1, burst=2),
        incidents={"group_window_s": 0},
    )
    manager = IncidentManager(engine, settings, clock=clock)
    for model in range(5):
        manager.process(finding(0, model_id=f"m{model}"))
    dispatcher = Dispatcher(engine, settings, clock=clock)
    first = _once(dispatcher)
    assert (first.delivered, first.rate_limited) == (2, 3)
    assert first.wait_s is None  # something was claimed this round
    blocked = _once(dispatcher)
    assert blocked.claimed == 0 and blocked.wait_s is not None and 0 < blocked.wait_s <= 1
    clock.advance(1)
    assert _once(dispatcher).delivered == 1


def test_expired_lease_is_redelivered_with_the_same_key(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver, lease_s=30, timeout_s=5)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    crashed = Dispatcher(engine, settings, clock=clock)
    claimed, _ = crashed._claim(DispatchReport())  # claimed, then the process "dies"
    assert len(claimed) == 1
    survivor = Dispatcher(engine, settings, clock=clock)
    assert _once(survivor).claimed == 0  # leased to the dead dispatcher
    clock.advance(36)
    assert _once(survivor).delivered == 1
    (row,) = _rows(engine)
    assert row.attempts == 2
    assert list(receiver.unique) == [claimed[0].idempotency_key]


def test_secrets_stay_out_of_errors_and_logs(
    engine: Engine, free_port: object, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # type: ignore[operator]
    url = f"http://127.0.0.1:{port}/hook?token=URL-TOKEN-SECRET"
    settings = settings_with(webhook("hook", url, secret="HMAC-SECRET"))
    clock = FakeClock()
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    with caplog.at_level(logging.DEBUG):
        assert _once(Dispatcher(engine, settings, clock=clock)).retried == 1
    (row,) = _rows(engine)
    assert row.last_error
    for text in (row.last_error, caplog.text, repr(settings), str(settings.notify)):
        assert "URL-TOKEN-SECRET" not in text and "HMAC-SECRET" not in text
    assert "hook" in caplog.text  # the destination is named, its URL is not


def test_run_loop_delivers_promptly_when_woken(engine: Engine, receiver: WebhookReceiver) -> None:
    settings = _settings(receiver, poll_interval_s=30)
    manager = IncidentManager(engine, settings)
    dispatcher = Dispatcher(engine, settings)

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(manager.process, finding(0))
        dispatcher.wake()
        arrived = await asyncio.to_thread(receiver.wait_for, 1, 10.0)
        stop.set()
        await asyncio.wait_for(runner, 10)
        assert arrived

    asyncio.run(scenario())
    assert [row.status for row in _rows(engine)] == [NotificationStatus.DELIVERED]


def test_parse_retry_after_accepts_seconds_and_http_dates() -> None:
    from incident_support import T0

    assert parse_retry_after("30", T0) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", T0) == 60.0
    assert parse_retry_after("soon", T0) is None
    assert parse_retry_after(None, T0) is None


def test_row_for_a_removed_destination_is_dead_with_a_hint(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    IncidentManager(engine, _settings(receiver), clock=clock).process(finding(0))
    report = _once(Dispatcher(engine, settings_with(), clock=clock))
    assert report.dead == 1
    (row,) = _rows(engine)
    assert row.last_error is not None and "not configured any more" in row.last_error


def test_pagerduty_without_routing_key_is_a_configuration_error() -> None:
    from genmon.exceptions import ConfigurationError

    pagerduty = webhook("pd", "https://events.pagerduty.com/v2/enqueue", type="pagerduty")
    with pytest.raises(ConfigurationError, match="routing_key"):
        Dispatcher(sa.create_engine("sqlite://"), settings_with(pagerduty))
