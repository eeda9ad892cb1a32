"""Pages that arrive, in order: long receiver outages, the retry horizon, in-flight
ordering, the outbox transaction and requeues (SQLite, and PostgreSQL with -m postgres).

Time is a :class:`FakeClock` that jumps over backoffs and probe pauses: hours of outage
take a few dozen dispatch rounds against a real HTTP receiver whose port is closed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fault_report import pick, record
from incident_support import PAGERDUTY, ROUTING_KEY, FakeClock, finding, settings_with, webhook
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, func, select

from genmon.cli import main
from genmon.exceptions import DatabaseError
from genmon.incidents import expiry, health, outbox
from genmon.incidents.dispatcher import Dispatcher, DispatchReport
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.incidents.requeue import requeue_dead
from genmon.schemas import IncidentStatus, Severity
from genmon.schemas.incidents import (
    FindingSeen,
    Incident,
    IncidentTransition,
    Notification,
    NotificationEvent,
    NotificationStatus,
)
from genmon.settings import DestinationSettings, Settings

HOUR = 3600.0


@pytest.fixture
def backup() -> Iterator[WebhookReceiver]:
    """A second receiver, for the destination that stays up."""
    with WebhookReceiver() as running:
        yield running


def _settings(*destinations: DestinationSettings, **notify: Any) -> Settings:
    return settings_with(
        *destinations,
        incidents={"group_window_s": 0},
        notify={"backoff_initial_s": 1.0, "backoff_max_s": 300.0, **notify},
    )


def _hook(receiver: WebhookReceiver, name: str = "hook") -> DestinationSettings:
    return webhook(name, receiver.url, rate_per_s=1000, burst=1000)


def _once(dispatcher: Dispatcher) -> DispatchReport:
    return asyncio.run(dispatcher.dispatch_once())


def _run_until(
    dispatcher: Dispatcher, clock: FakeClock, until: datetime, most_per_round: int | None = None
) -> DispatchReport:
    """Dispatch round after round until a round at ``until`` found nothing to claim,
    jumping the clock over waits; each round claims at most ``most_per_round`` rows."""
    total = DispatchReport()
    while True:
        report = _once(dispatcher)
        total.add(report)
        if most_per_round is not None:
            assert report.claimed <= most_per_round, report
        if report.claimed or report.suppressed:
            continue
        left = (until - clock.now).total_seconds()
        if left <= 0:
            return total
        clock.advance(left if report.wait_s is None else min(max(report.wait_s, 0.001), left))


def _until_idle(dispatcher: Dispatcher, clock: FakeClock, rounds: int = 200) -> DispatchReport:
    total = DispatchReport()
    for _ in range(rounds):
        report = _once(dispatcher)
        total.add(report)
        if not report.claimed and not report.suppressed:
            if report.wait_s is None:
                return total
            clock.advance(max(report.wait_s, 0.001))
    raise AssertionError(f"outbox not drained after {rounds} rounds: {total}")


def _rows(engine: Engine, **where: Any) -> list[Notification]:
    query = select(Notification).order_by(Notification.id)
    for column, value in where.items():
        query = query.where(getattr(Notification, column) == value)
    with Session(engine) as session:
        return list(session.exec(query).all())


def _events_by_incident(receiver: WebhookReceiver) -> dict[str, list[str]]:
    """What the receiver got, per incident, in arrival order."""
    seen: dict[str, list[str]] = defaultdict(list)
    for received in receiver.requests:
        body = received.json
        seen[body["incident"]["id"]].append(body["event"])
    return dict(seen)


def _queued_by_incident(engine: Engine, destination: str) -> dict[str, list[str]]:
    queued: dict[str, list[str]] = defaultdict(list)
    for row in _rows(engine, destination=destination):
        queued[row.incident_id].append(row.event.value)
    return dict(queued)


# --- a long outage -------------------------------------------------------------------------


def test_a_two_hour_outage_pauses_the_destination_and_then_everything_arrives_in_order(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    """The fault test of issue #13: 8 tries in 90 s used to kill 4 of 6 first pages."""
    clock = FakeClock()
    settings = _settings(_hook(receiver))
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    receiver.stop()
    opened = [str(manager.process(finding(0, model_id=f"m{n}")).incident_id) for n in range(6)]
    for incident_id in opened[:3]:
        manager.acknowledge(incident_id, actor="alice")
    for incident_id in opened[::2]:
        clock.advance(60)
        manager.resolve(incident_id, actor="alice")

    first = _once(dispatcher)
    assert (first.claimed, first.retried) == (6, 6)  # each incident's head, once
    # Paused after the first failures: one probe at a time, on the backoff schedule.
    during = _run_until(dispatcher, clock, clock.now + timedelta(hours=2), most_per_round=1)
    assert during.dead == 0 and during.delivered == 0
    assert during.claimed == during.retried > 0
    with Session(engine) as session:
        (hook,) = health.statuses(session, ["hook"])
    assert hook.state == "paused" and hook.next_probe_at is not None and hook.pending == 12

    receiver.start()
    after = _until_idle(dispatcher, clock)
    assert after.dead == 0 and after.delivered == 12
    assert receiver.duplicates == 0 and len(receiver.unique) == 12
    assert _events_by_incident(receiver) == _queued_by_incident(engine, "hook")
    rows = _rows(engine)
    assert {row.status for row in rows} == {NotificationStatus.DELIVERED}
    # Waiting behind a paused destination used none of a row's tries.
    followups = [row for row in rows if row.event is not NotificationEvent.TRIGGER]
    assert {row.attempts for row in followups} == {1}
    with Session(engine) as session:
        (hook,) = health.statuses(session, ["hook"])
    assert (hook.state, hook.consecutive_failures, hook.next_probe_at) == ("ok", 0, None)


def _paused(engine: Engine, destination: str) -> bool:
    with Session(engine) as session:
        found = health.statuses(session, [destination])
    return any(status.state == "paused" for status in found)


async def _until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Wait until ``condition()`` holds (checked in a thread), or the timeout passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(condition):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_a_receiver_outage_on_the_real_clock_loses_and_reorders_nothing(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    """The fault as reported (8 tries, backoff from 1 s; `make faults`: 120 s down), with
    the dispatcher's own loop and clock."""
    outage_s = pick(3.0, 120.0)
    backoff_max_s = pick(1.0, 30.0)
    settings = _settings(
        _hook(receiver), max_attempts=8, backoff_max_s=backoff_max_s, poll_interval_s=0.2
    )
    manager = IncidentManager(engine, settings)
    dispatcher = Dispatcher(engine, settings)
    receiver.stop()
    opened = [str(manager.process(finding(0, model_id=f"m{n}")).incident_id) for n in range(6)]
    for incident_id in opened[::2]:
        manager.resolve(incident_id, actor="alice")
    expected = _queued_by_incident(engine, "hook")
    pages = sum(len(events) for events in expected.values())

    async def scenario() -> bool:
        stop = asyncio.Event()
        runner = asyncio.create_task(dispatcher.run(stop))
        try:
            assert await _until(lambda: _paused(engine, "hook"), 30)
            await asyncio.sleep(outage_s)  # the fault itself, not a proof
            receiver.start()
            return await asyncio.to_thread(receiver.wait_for, pages, 2 * backoff_max_s + 30)
        finally:
            stop.set()
            await asyncio.wait_for(runner, 30)

    arrived = asyncio.run(scenario())
    got = _events_by_incident(receiver)
    out_of_order = sum(got.get(key) != events for key, events in expected.items())
    record(
        f"receiver outage ({engine.dialect.name})",
        outage_s=outage_s,
        pages_delivered=len(receiver.unique),
        duplicates=receiver.duplicates,
        out_of_order=out_of_order,
        lost=pages - len(receiver.unique),
    )
    assert arrived and got == expected and receiver.duplicates == 0
    assert {row.status for row in _rows(engine)} == {NotificationStatus.DELIVERED}


# --- the horizon ---------------------------------------------------------------------------


def test_past_the_horizon_pages_are_dead_and_an_incident_pages_another_destination(
    engine: Engine, receiver: WebhookReceiver, backup: WebhookReceiver
) -> None:
    clock = FakeClock()
    # Probes at most every 30 min: six hours in few rounds (the schedule is tested above).
    settings = _settings(_hook(receiver), _hook(backup, "backup"), backoff_max_s=1800.0)
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    receiver.stop()
    incident_id = str(manager.process(finding(0)).incident_id)
    assert _once(dispatcher).retried == 1  # hook fails from the start; backup got its page
    clock.advance(HOUR)
    manager.acknowledge(incident_id, actor="alice")  # dies with its trigger, 1 h younger

    before = _run_until(dispatcher, clock, clock.now + timedelta(hours=4.9))
    assert before.dead == 0
    assert [r.json["event"] for r in backup.requests] == ["trigger", "acknowledge"]
    assert {row.status for row in _rows(engine, destination="hook")} == {NotificationStatus.PENDING}

    past = _run_until(dispatcher, clock, clock.now + timedelta(hours=0.2))
    assert past.expired == 2 and past.dead == 2
    hook_rows = _rows(engine, destination="hook")
    assert [(r.event, r.status) for r in hook_rows] == [
        (NotificationEvent.TRIGGER, NotificationStatus.DEAD),
        (NotificationEvent.ACKNOWLEDGE, NotificationStatus.DEAD),
    ]
    assert all(r.last_error and "undelivered after 6 h" in r.last_error for r in hook_rows)
    with Session(engine) as session:
        alarm = session.exec(select(Incident).where(Incident.model_id == "genmon")).one()
    assert alarm.status is IncidentStatus.OPEN and alarm.segment == "hook"
    assert alarm.title.startswith("destination hook unreachable for 6")
    assert alarm.title.endswith("2 pages undelivered")
    # Paged to the destination that works, never queued for the one that does not.
    assert {r.destination for r in _rows(engine, incident_id=alarm.id)} == {"backup"}
    page = backup.requests[-1].json
    assert (page["event"], page["incident"]["id"]) == ("trigger", alarm.id)

    # Back, and requeued: the pages go out in order, and the alarm resolves itself.
    receiver.start()
    assert requeue_dead(engine, clock.now).requeued == 2
    _until_idle(dispatcher, clock)
    assert _events_by_incident(receiver) == {incident_id: ["trigger", "acknowledge"]}
    with Session(engine) as session:
        resolved = session.get(Incident, alarm.id)
    assert resolved is not None and resolved.status is IncidentStatus.RESOLVED
    assert [r.json["event"] for r in backup.requests][-1] == "resolve"


def test_only_destination_down_still_records_its_incident(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(_hook(receiver), retry_horizon_s=HOUR, backoff_max_s=1800.0)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    receiver.stop()
    dispatcher = Dispatcher(engine, settings, clock=clock)
    assert _run_until(dispatcher, clock, clock.now + timedelta(hours=1.1)).expired == 1
    with Session(engine) as session:
        alarm = session.exec(select(Incident).where(Incident.model_id == "genmon")).one()
    assert "hook unreachable" in alarm.title
    assert _rows(engine, incident_id=alarm.id) == []  # nowhere to page it but the dead one


# --- in-flight ordering --------------------------------------------------------------------


def _trigger_and_resolve(engine: Engine, settings: Settings, clock: FakeClock) -> str:
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.resolve(incident_id, actor="alice")
    return incident_id


def test_a_later_row_is_not_claimable_while_an_earlier_one_is_in_flight(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(_hook(receiver))
    _trigger_and_resolve(engine, settings, clock)
    first = Dispatcher(engine, settings, clock=clock)
    second = Dispatcher(engine, settings, clock=clock)
    claimed, _ = first._claim(DispatchReport())  # claimed and on the wire, not settled
    assert [item.event for item in claimed] == ["trigger"]

    assert _once(second).claimed == 0
    lease = clock.now + timedelta(seconds=60)
    assert outbox.claim_due(engine, clock.now, lease, 10, {}).claimed == []
    trigger, resolve = _rows(engine)
    assert (trigger.status, resolve.status) == (
        NotificationStatus.DELIVERING,
        NotificationStatus.PENDING,
    )

    async def deliver() -> None:
        async with first._channels() as channels:
            result = await first._deliver(channels, claimed[0])
        first._record([(claimed[0], result)])

    asyncio.run(deliver())
    assert _once(second).delivered == 1
    assert [r.json["event"] for r in receiver.requests] == ["trigger", "resolve"]


def test_a_stale_read_cannot_claim_a_row_behind_a_requeued_one(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    """The claim's UPDATE checks the order itself, not only the read before it."""
    clock = FakeClock()
    settings = _settings(_hook(receiver))
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    receiver.script.append((410, {}))  # refused for good: dead at once
    assert _once(Dispatcher(engine, settings, clock=clock)).dead == 1
    manager.resolve(incident_id, actor="alice")

    stale = outbox.read_due(engine, clock.now, 10)  # a dispatcher reads: the resolve is due
    assert [row.event for row in stale.rows] == [NotificationEvent.RESOLVE]
    assert requeue_dead(engine, clock.now).requeued == 1  # on-call requeues the trigger
    other = Dispatcher(engine, settings, clock=clock)
    claimed, _ = other._claim(DispatchReport())
    assert [item.event for item in claimed] == ["trigger"]  # in flight elsewhere
    lease = clock.now + timedelta(seconds=60)
    assert outbox.take_due(engine, stale, clock.now, lease, {}).claimed == []


# --- the outbox transaction ----------------------------------------------------------------


@pytest.fixture
def failing_outbox(engine: Engine) -> Iterator[list[str]]:
    """Makes every INSERT into ``notification`` fail, as a full disk or a lost
    connection would; yields the statements it refused."""
    refused: list[str] = []

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO NOTIFICATION"):
            refused.append(statement)
            raise OperationalError(statement, None, Exception("injected: disk full"))

    sa.event.listen(engine, "before_cursor_execute", refuse)
    yield refused
    sa.event.remove(engine, "before_cursor_execute", refuse)


def _count(engine: Engine, table: type[Any]) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


def test_an_incident_is_not_committed_without_its_notifications(
    engine: Engine, failing_outbox: list[str]
) -> None:
    settings = _settings(webhook("hook", "http://127.0.0.1:9/hook"))
    manager = IncidentManager(engine, settings)
    with pytest.raises(DatabaseError):
        manager.process(finding(0))
    with pytest.raises(DatabaseError):
        manager.process_many([finding(0, model_id="a"), finding(0, model_id="b")])
    assert failing_outbox  # the notifications' insert was reached, and failed
    for table in (Incident, IncidentTransition, FindingSeen, Notification):
        assert _count(engine, table) == 0, table


def test_a_resolve_is_not_committed_without_its_notifications(engine: Engine) -> None:
    settings = _settings(webhook("hook", "http://127.0.0.1:9/hook"))
    manager = IncidentManager(engine, settings)
    incident_id = str(manager.process(finding(0)).incident_id)

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO NOTIFICATION"):
            raise OperationalError(statement, None, Exception("injected"))

    sa.event.listen(engine, "before_cursor_execute", refuse)
    try:
        with pytest.raises(DatabaseError):
            manager.resolve(incident_id, actor="alice")
    finally:
        sa.event.remove(engine, "before_cursor_execute", refuse)
    with Session(engine) as session:
        incident = session.get(Incident, incident_id)
        assert incident is not None and incident.status is IncidentStatus.OPEN
    assert [row.event for row in _rows(engine)] == [NotificationEvent.TRIGGER]


# --- requeueing ----------------------------------------------------------------------------


def _cli_retry(engine: Engine) -> str:
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["notify", "retry", "--all-dead", "--url", url])
    assert result.exit_code == 0, result.output
    return result.output


def test_retry_all_dead_never_sends_an_opened_after_its_resolved(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(_hook(receiver))
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    receiver.script.append((422, {}))
    assert _once(dispatcher).dead == 1
    manager.resolve(incident_id, actor="alice")
    assert _once(dispatcher).delivered == 1

    output = _cli_retry(engine)
    assert "requeued 0" in output and "1 superseded" in output
    assert _until_idle(dispatcher, clock).claimed == 0
    assert [r.json["event"] for r in receiver.requests] == ["resolve"]
    trigger, _ = _rows(engine)
    assert trigger.status is NotificationStatus.SUPERSEDED


def test_retry_all_dead_requeues_whole_chains_in_their_order(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(_hook(receiver), retry_horizon_s=HOUR, backoff_max_s=1800.0)
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    receiver.stop()
    opened = [str(manager.process(finding(0, model_id=f"m{n}")).incident_id) for n in range(3)]
    for incident_id in opened:
        manager.acknowledge(incident_id, actor="alice")
    for incident_id in reversed(opened):
        manager.resolve(incident_id, actor="alice")
    assert _run_until(dispatcher, clock, clock.now + timedelta(hours=1.1)).expired == 9
    assert {row.status for row in _rows(engine, destination="hook")} == {NotificationStatus.DEAD}

    receiver.start()
    assert "requeued 9" in _cli_retry(engine)
    _until_idle(dispatcher, clock)
    assert _events_by_incident(receiver) == {
        incident_id: ["trigger", "acknowledge", "resolve"] for incident_id in opened
    }
    assert receiver.duplicates == 0


# --- per vendor ----------------------------------------------------------------------------


def test_after_an_outage_pagerduty_and_alertmanager_get_trigger_then_resolve(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    base = f"http://{receiver.host}:{receiver.port}"
    destinations = [
        DestinationSettings.model_validate(config)
        for config in (
            {"name": "pd", "type": "pagerduty", "url": f"{base}/pd", "routing_key": ROUTING_KEY},
            {"name": "am", "type": "alertmanager", "url": f"{base}/am"},
            {"name": "slack", "type": "slack", "url": f"{base}/slack"},
            {"name": "hook", "type": "webhook", "url": f"{base}/hook"},
        )
    ]
    clock = FakeClock()
    settings = _settings(*destinations)
    manager = IncidentManager(engine, settings, clock=clock)
    dispatcher = Dispatcher(engine, settings, clock=clock)
    receiver.stop()
    warning = finding(0).model_copy(update={"severity": Severity.WARNING})
    incident_id = str(manager.process(warning).incident_id)
    _run_until(dispatcher, clock, clock.now + timedelta(minutes=5))
    critical = finding(1).model_copy(update={"severity": Severity.CRITICAL})
    assert manager.process(critical).notifications == 4  # the update
    manager.acknowledge(incident_id, actor="alice")
    manager.resolve(incident_id, actor="alice")
    _run_until(dispatcher, clock, clock.now + timedelta(minutes=5))

    receiver.start()
    assert _until_idle(dispatcher, clock).dead == 0

    def events(path: str) -> list[str]:
        return [r.json.get("event") or "" for r in receiver.requests if r.path == f"/{path}"]

    pagerduty = [r.json for r in receiver.requests if r.path == "/pd"]
    for event in pagerduty:
        jsonschema.validate(event, PAGERDUTY)
    assert [e["event_action"] for e in pagerduty] == ["trigger", "resolve"]
    alertmanager = [r.json for r in receiver.requests if r.path == "/am"]
    assert [p["commonAnnotations"]["event"] for p in alertmanager] == ["trigger", "resolve"]
    assert [p["status"] for p in alertmanager] == ["firing", "resolved"]
    assert events("hook") == ["trigger", "update", "acknowledge", "resolve"]
    assert len(events("slack")) == 4  # a message log: every transition, in order
    superseded = _rows(engine, status=NotificationStatus.SUPERSEDED)
    assert sorted((r.destination, r.event.value) for r in superseded) == [
        ("am", "acknowledge"),
        ("am", "update"),
        ("pd", "acknowledge"),
        ("pd", "update"),
    ]


# --- units ---------------------------------------------------------------------------------


def test_the_unreachable_incident_has_one_fingerprint_per_destination() -> None:
    assert expiry.unreachable_fingerprint("a") == expiry.unreachable_fingerprint("a")
    assert expiry.unreachable_fingerprint("a") != expiry.unreachable_fingerprint("b")
