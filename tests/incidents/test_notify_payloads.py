"""Destination payloads, validated against JSON Schemas written from the vendors' docs."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from incident_support import (
    ALERTMANAGER,
    PAGERDUTY,
    ROUTING_KEY,
    SLACK,
    FakeClock,
    finding,
    migrated_engine,
    settings_with,
    sqlite_url,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli import main
from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.incidents.destinations import AlertmanagerDestination, Message, PagerDutyDestination
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import Received, WebhookReceiver
from genmon.incidents.routing import Router
from genmon.incidents.signing import verify_signature
from genmon.schemas.events import utcnow
from genmon.schemas.incidents import (
    Incident,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)
from genmon.settings import (
    DestinationSettings,
    RouteSettings,
    RunbookSettings,
    Settings,
    get_settings,
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = migrated_engine(sqlite_url(tmp_path))
    yield engine
    engine.dispose()


def _destination_configs(receiver: WebhookReceiver) -> list[dict[str, str]]:
    base = f"http://{receiver.host}:{receiver.port}"
    return [
        {"name": "pd", "type": "pagerduty", "url": f"{base}/pd", "routing_key": ROUTING_KEY},
        {"name": "am", "type": "alertmanager", "url": f"{base}/am"},
        {"name": "slack", "type": "slack", "url": f"{base}/slack"},
        {"name": "hook", "type": "webhook", "url": f"{base}/hook"},
    ]


def _destinations(receiver: WebhookReceiver) -> list[DestinationSettings]:
    return [DestinationSettings.model_validate(c) for c in _destination_configs(receiver)]


#: Where these tests say the dashboard is (``api.public_url``).
DASHBOARD = "https://genmon.example/oncall"


@pytest.fixture(autouse=True)
def dashboard_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's settings put the dashboard at :data:`DASHBOARD` (what the payloads
    link to when the manager is not handed its own ``api`` settings)."""
    monkeypatch.setenv("GENMON_API__PUBLIC_URL", DASHBOARD)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _settings(receiver: WebhookReceiver, **incidents: Any) -> Settings:
    route = RouteSettings.model_validate(
        {
            "destinations": ["pd", "am", "slack", "hook"],
            "runbook": {"url": "https://runbooks.example/route", "remediation": ["page ML"]},
        }
    )
    settings = settings_with(
        *_destinations(receiver),
        incidents={
            "auto_resolve_quiet_windows": 2,
            "runbooks": {
                "anomaly": RunbookSettings(
                    url="https://runbooks.example/anomaly", remediation=["check the deploy log"]
                )
            },
            **incidents,
        },
        notify={"routes": [route]},
    )
    api = settings.api.model_copy(update={"public_url": DASHBOARD})
    return settings.model_copy(update={"api": api})


def _deliver(engine: Engine, settings: Settings, clock: FakeClock | None = None) -> None:
    dispatcher = Dispatcher(engine, settings, clock=clock or utcnow)
    report = asyncio.run(dispatcher.drain(timeout_s=10))
    assert report.dead == 0 and report.retried == 0


def _by_path(receiver: WebhookReceiver, path: str) -> list[Received]:
    return [r for r in receiver.requests if r.path == f"/{path}"]


def test_auto_resolve_sends_pagerduty_resolve_with_the_same_dedup_key(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = manager.process(finding(0, score=5.0)).incident_id
    manager.process(finding(1, detected=False))
    manager.process(finding(2, detected=False))
    _deliver(engine, settings, clock)

    events = [r.json for r in _by_path(receiver, "pd")]
    for event in events:
        jsonschema.validate(event, PAGERDUTY)
    assert [e["event_action"] for e in events] == ["trigger", "resolve"]
    assert {e["dedup_key"] for e in events} == {incident_id}
    trigger = events[0]
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["custom_details"]["idempotency_key"]
    assert {link["href"] for link in trigger["links"]} == {
        f"{DASHBOARD}/incidents/{incident_id}",
        "https://runbooks.example/anomaly",
        "https://runbooks.example/route",
    }
    keys = [r.idempotency_key for r in _by_path(receiver, "pd")]
    assert len(set(keys)) == 2 and None not in keys


def test_pagerduty_acknowledge_validates(engine: Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.acknowledge(incident_id, actor="alice")
    _deliver(engine, settings, clock)
    events = [r.json for r in _by_path(receiver, "pd")]
    for event in events:
        jsonschema.validate(event, PAGERDUTY)
    assert [e["event_action"] for e in events] == ["trigger", "acknowledge"]


def test_alertmanager_payloads_validate_firing_then_resolved(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0, segment="locale=de")).incident_id)
    clock.advance(300)
    manager.resolve(incident_id, actor="alice")
    _deliver(engine, settings, clock)
    firing, resolved = (r.json for r in _by_path(receiver, "am"))
    for payload in (firing, resolved):
        jsonschema.validate(payload, ALERTMANAGER)
    assert (firing["status"], resolved["status"]) == ("firing", "resolved")
    assert firing["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    assert resolved["alerts"][0]["endsAt"] > firing["alerts"][0]["startsAt"]
    assert firing["groupKey"] == resolved["groupKey"]
    assert firing["alerts"][0]["fingerprint"] == resolved["alerts"][0]["fingerprint"]
    labels = firing["alerts"][0]["labels"]
    assert labels["model"] == "chat" and labels["segment"] == "locale=de"
    annotations = firing["alerts"][0]["annotations"]
    assert annotations["runbook_url"] == "https://runbooks.example/anomaly"
    assert annotations["idempotency_key"] == _by_path(receiver, "am")[0].idempotency_key


def test_cli_acknowledge_and_resolve_reach_every_destination(
    engine: Engine, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `genmon incidents ack|resolve` runs with settings of its own, here without any
    # destination: acknowledgements and resolves go where the page went.
    monkeypatch.setenv("GENMON_INCIDENTS__PUBLISH_EVENTS", "false")  # tested in test_incident_topic
    get_settings.cache_clear()
    settings = _settings(receiver)
    try:
        assert get_settings().notify.destinations == []
        url = engine.url.render_as_string(hide_password=False)
        incident_id = str(IncidentManager(engine, settings).process(finding(0)).incident_id)
        for command in ("ack", "resolve"):
            result = CliRunner().invoke(
                main, ["incidents", command, incident_id, "--by", "alice", "--url", url]
            )
            assert result.exit_code == 0, result.output
    finally:
        get_settings.cache_clear()
    _deliver(engine, settings)

    pagerduty = [r.json for r in _by_path(receiver, "pd")]
    for event in pagerduty:
        jsonschema.validate(event, PAGERDUTY)
    assert [(e["event_action"], e["dedup_key"]) for e in pagerduty] == [
        ("trigger", incident_id),
        ("acknowledge", incident_id),
        ("resolve", incident_id),
    ]
    alertmanager = [r.json for r in _by_path(receiver, "am")]
    for payload in alertmanager:
        jsonschema.validate(payload, ALERTMANAGER)
    assert [p["status"] for p in alertmanager] == ["firing", "firing", "resolved"]
    assert [p["commonAnnotations"]["event"] for p in alertmanager] == [
        "trigger",
        "acknowledge",
        "resolve",
    ]
    slack = [r.json for r in _by_path(receiver, "slack")]
    for message in slack:
        jsonschema.validate(message, SLACK)
    assert [re.findall(r"\[(\w+)\]", m["text"])[0] for m in slack] == [
        "TRIGGER",
        "ACKNOWLEDGE",
        "RESOLVED",
    ]
    hook = [r.json for r in _by_path(receiver, "hook")]
    assert [(h["event"], h["incident"]["status"]) for h in hook] == [
        ("trigger", "open"),
        ("acknowledge", "acknowledged"),
        ("resolve", "resolved"),
    ]
    assert "alice" in hook[1]["reason"] and "alice" in hook[2]["reason"]
    assert {"https://runbooks.example/route"} <= {r["url"] for r in hook[2]["runbooks"]}


def test_every_payload_links_to_the_incident_page(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    """The issue: a link in every webhook payload leads to the incident's page."""
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0, score=5.0)).incident_id)
    manager.resolve(incident_id, actor="alice")
    _deliver(engine, settings, clock)
    page = f"{DASHBOARD}/incidents/{incident_id}"

    hook = [r.json for r in _by_path(receiver, "hook")]
    assert [(h["event"], h["url"], h["incident"]["url"]) for h in hook] == [
        ("trigger", page, page),
        ("resolve", page, page),
    ]
    slack = [r.json for r in _by_path(receiver, "slack")]
    for message in slack:
        jsonschema.validate(message, SLACK)
        assert message["blocks"][0]["text"]["text"].startswith(f"*<{page}|")
    pagerduty = [r.json for r in _by_path(receiver, "pd")]
    for event in pagerduty:
        jsonschema.validate(event, PAGERDUTY)
    trigger = pagerduty[0]
    assert trigger["links"][0] == {"href": page, "text": "Incident in genmon"}
    assert trigger["client_url"] == page
    alertmanager = [r.json for r in _by_path(receiver, "am")]
    for payload in alertmanager:
        jsonschema.validate(payload, ALERTMANAGER)
    assert [p["alerts"][0]["generatorURL"] for p in alertmanager] == [page, page]


def test_a_reopen_pages_again_under_the_same_dedup_key(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver, reopen_cooldown_s=600)
    manager = IncidentManager(engine, settings, clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    clock.advance(60)
    manager.resolve(incident_id, actor="alice")
    clock.advance(120)
    assert manager.process(finding(1)).action == "reopened"
    _deliver(engine, settings, clock)

    # PagerDuty never reopens a resolved incident: a trigger under the same dedup key
    # opens a new one, which is what a recurrence should do.
    pagerduty = [r.json for r in _by_path(receiver, "pd")]
    for event in pagerduty:
        jsonschema.validate(event, PAGERDUTY)
    assert [(e["event_action"], e["dedup_key"]) for e in pagerduty] == [
        ("trigger", incident_id),
        ("resolve", incident_id),
        ("trigger", incident_id),
    ]
    assert pagerduty[2]["payload"]["custom_details"]["incident"]["reopen_count"] == 1
    # Alertmanager receivers see the same alert fire again, from when it reopened.
    firing, resolved, refiring = (r.json for r in _by_path(receiver, "am"))
    assert [p["status"] for p in (firing, resolved, refiring)] == ["firing", "resolved", "firing"]
    assert firing["groupKey"] == resolved["groupKey"] == refiring["groupKey"]
    assert refiring["alerts"][0]["fingerprint"] == firing["alerts"][0]["fingerprint"]
    assert refiring["alerts"][0]["startsAt"] > resolved["alerts"][0]["endsAt"]
    assert refiring["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    hook = [r.json for r in _by_path(receiver, "hook")]
    assert [h["event"] for h in hook] == ["trigger", "resolve", "trigger"]
    assert hook[2]["reason"].startswith("reopened")
    assert len({r.idempotency_key for r in receiver.requests}) == len(receiver.requests)


def test_slack_and_webhook_carry_the_runbooks(engine: Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    _deliver(engine, settings, clock)
    (slack,) = (r.json for r in _by_path(receiver, "slack"))
    jsonschema.validate(slack, SLACK)
    text = json.dumps(slack)
    assert "https://runbooks.example/anomaly" in text and "check the deploy log" in text
    assert "page ML" in text
    (hook,) = _by_path(receiver, "hook")
    body = hook.json
    assert body["schema"] == "genmon.notification/v1"
    assert body["idempotency_key"] == hook.idempotency_key
    assert [r["url"] for r in body["runbooks"]] == [
        "https://runbooks.example/anomaly",
        "https://runbooks.example/route",
    ]
    assert body["incident"]["chart"][0]["score"] == 2.0


def test_silence_suppresses_pages_but_keeps_the_incident(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    with session_scope(engine) as session:
        session.add(
            Silence(
                matchers=['model=~"ch.*"', "kind!=drift"],
                starts_at=clock.now,
                ends_at=clock.now + timedelta(hours=1),
                created_by="alice",
                comment="maintenance",
            )
        )
    manager = IncidentManager(engine, settings, clock=clock)
    manager.process(finding(0))
    manager.process(finding(1, detected=False))
    manager.process(finding(2, detected=False))
    _deliver(engine, settings, clock)
    assert receiver.requests == []
    with Session(engine) as session:
        (incident,) = session.exec(select(Incident)).all()
    assert incident.finding_count == 1 and incident.resolved_at is not None


def test_routes_by_severity_and_model() -> None:
    destinations = [
        DestinationSettings.model_validate(d)
        for d in (
            {"name": "pd", "type": "pagerduty", "url": "http://x/pd", "routing_key": "k" * 32},
            {"name": "team", "url": "http://x/team"},
            {"name": "all", "url": "http://x/all"},
        )
    ]
    routes = [
        RouteSettings.model_validate(r)
        for r in (
            {"destinations": ["pd"], "matchers": ['severity=~"error|critical"'], "continue": True},
            {"destinations": ["team"], "matchers": ["model=search"]},
            {"destinations": ["all"]},
        )
    ]
    router = Router(settings_with(*destinations, notify={"routes": routes}).notify)

    def names(**labels: str) -> list[str]:
        return [target.destination for target in router.route(labels)]

    assert names(severity="critical", model="search") == ["pd", "team"]
    assert names(severity="warning", model="search") == ["team"]
    assert names(severity="warning", model="chat") == ["all"]


def test_destinations_and_routes_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "destinations.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: pd, type: pagerduty, url: 'https://events.pagerduty.com/v2/enqueue',"
        " routing_key: SECRETKEY}\n"
        "routes:\n"
        "  - {destinations: [pd], matchers: ['kind=drift'], continue: false}\n"
    )
    settings = settings_with(notify={"destinations_file": path})
    router = Router(settings.notify)
    assert list(router.destinations) == ["pd"]
    assert [t.destination for t in router.route({"kind": "drift"})] == ["pd"]
    assert router.route({"kind": "bias"}) == []
    assert "SECRETKEY" not in repr(router.destinations)


def _queue_digest(engine: Engine, destination: str, text: str, clock: FakeClock) -> None:
    with session_scope(engine) as session:
        session.add(
            Notification(
                incident_id=None,
                destination=destination,
                event=NotificationEvent.DIGEST,
                idempotency_key=f"digest:{destination}:2026-03-02T09:00:00+00:00",
                payload={
                    "created_at": "2026-03-02T09:00:00+00:00",
                    "digest": {"models": {"chat": {"incidents_opened": 2}}},
                    "text": text,
                    "labels": {"kind": "digest"},
                },
                created_at=clock.now,
                next_attempt_at=clock.now,
            )
        )


def test_the_daily_digest_goes_to_webhook_and_slack_signed_and_never_silenced(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    """A digest is about no incident: webhook and Slack render it, a silence matching every
    incident does not hold it back, and a pages-only destination makes its row dead."""
    base = f"http://{receiver.host}:{receiver.port}"
    destinations = [
        DestinationSettings.model_validate(c)
        for c in (
            {"name": "hook", "type": "webhook", "url": f"{base}/hook", "secret": "whsec-digest"},
            {"name": "slack", "type": "slack", "url": f"{base}/slack"},
            {"name": "pd", "type": "pagerduty", "url": f"{base}/pd", "routing_key": ROUTING_KEY},
        )
    ]
    settings = settings_with(*destinations)
    clock = FakeClock()
    with session_scope(engine) as session:
        session.add(
            Silence(
                matchers=['model=~".*"'],
                starts_at=clock.now - timedelta(hours=1),
                ends_at=clock.now + timedelta(hours=1),
                created_by="alice",
            )
        )
    text = "genmon digest 2026-03-01T09:00 to 2026-03-02T09:00 (UTC)\nchat: <2> opened"
    for name in ("hook", "slack", "pd"):
        _queue_digest(engine, name, text, clock)
    report = asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert (report.delivered, report.dead, report.suppressed) == (2, 1, 0)
    (hook,) = _by_path(receiver, "hook")
    assert hook.json == {
        "schema": "genmon.digest/v1",
        "idempotency_key": "digest:hook:2026-03-02T09:00:00+00:00",
        "event": "digest",
        "created_at": "2026-03-02T09:00:00+00:00",
        "digest": {"models": {"chat": {"incidents_opened": 2}}},
    }
    assert verify_signature("whsec-digest", hook.headers, hook.body, now=time.time())
    (slack,) = (r.json for r in _by_path(receiver, "slack"))
    jsonschema.validate(slack, SLACK)
    assert slack["text"].startswith("genmon digest") and "&lt;2&gt;" in json.dumps(slack)
    assert _by_path(receiver, "pd") == []
    with Session(engine) as session:
        pd = session.exec(select(Notification).where(Notification.destination == "pd")).one()
    assert pd.status is NotificationStatus.DEAD
    assert "takes pages, not the daily digest" in (pd.last_error or "")
    for vendor in (PagerDutyDestination(destinations[2]), AlertmanagerDestination(destinations[0])):
        with pytest.raises(ConfigurationError, match=r"scheduler\.digest_destination"):
            vendor.body(Message("k", "digest", {}, None))
