"""Every problem pages as itself: a real problem that follows a false alarm of the same
model reaches PagerDuty and Alertmanager under its own key, title and labels, and so does
its resolve (manager -> outbox -> dispatcher -> a real receiver over HTTP; SQLite and,
with -m postgres, PostgreSQL)."""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
from incident_support import (
    ALERTMANAGER,
    PAGERDUTY,
    ROUTING_KEY,
    FakeClock,
    finding,
    settings_with,
)
from sqlalchemy.engine import Engine

from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.schemas import Finding, Severity
from genmon.settings import DestinationSettings, Settings

MODEL = "support-bot"
REAL_TITLE = "error rate 18%, baseline 0.4%, support-bot v3, locale=de"


def _settings(receiver: WebhookReceiver) -> Settings:
    base = f"http://{receiver.host}:{receiver.port}"
    destinations = [
        {"name": "pd", "type": "pagerduty", "url": f"{base}/pd", "routing_key": ROUTING_KEY},
        {"name": "am", "type": "alertmanager", "url": f"{base}/am"},
    ]
    return settings_with(
        *(DestinationSettings.model_validate(d) for d in destinations),
        incidents={"auto_resolve_quiet_windows": 2},  # group_window_s keeps its 10 min
    )


def _deliver(engine: Engine, settings: Settings, clock: FakeClock) -> None:
    report = asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert report.dead == 0 and report.retried == 0


def _received(receiver: WebhookReceiver, path: str, schema: dict[str, Any]) -> list[Any]:
    bodies = [r.json for r in receiver.requests if r.path == f"/{path}"]
    for body in bodies:
        jsonschema.validate(body, schema)
    return bodies


def _pagerduty(receiver: WebhookReceiver, incident_id: str) -> list[dict[str, Any]]:
    """PagerDuty events under ``incident_id``'s dedup key, in arrival order (the dispatcher
    keeps order per incident, not across incidents)."""
    events = _received(receiver, "pd", PAGERDUTY)
    return [event for event in events if event["dedup_key"] == incident_id]


def _alerts(receiver: WebhookReceiver, incident_id: str) -> list[dict[str, Any]]:
    """Alertmanager alerts of ``incident_id``, in arrival order."""
    payloads = _received(receiver, "am", ALERTMANAGER)
    alerts = [alert for payload in payloads for alert in payload["alerts"]]
    return [alert for alert in alerts if alert["annotations"]["incident_id"] == incident_id]


def _actions(events: list[dict[str, Any]]) -> list[str]:
    return [event["event_action"] for event in events]


def _states(alerts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(status, genmon event) of each alert: an "update" firing would not count."""
    return [(alert["status"], alert["annotations"]["event"]) for alert in alerts]


def _error_rate(window: int, *, detected: bool = True) -> Finding:
    """The real problem: another signal of the same model, with its own severity and title."""
    found = finding(
        window,
        model_id=MODEL,
        detector="error_rate",
        kind="quality",
        signal="error_rate",
        segment="locale=de",
        score=45.0 if detected else 0.1,
        detected=detected,
    )
    return found.model_copy(update={"severity": Severity.CRITICAL, "title": REAL_TITLE})


def test_a_real_problem_after_a_false_alarm_pages_and_resolves_as_itself(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    settings = _settings(receiver)
    manager = IncidentManager(engine, settings, clock=clock)
    false_alarm = manager.process(finding(0, model_id=MODEL, signal="latency_ms", score=1.1))
    clock.advance(120)  # well within incidents.group_window_s
    opened = manager.process(_error_rate(2))
    assert opened.action == "opened"
    a, b = str(false_alarm.incident_id), str(opened.incident_id)
    _deliver(engine, settings, clock)

    # PagerDuty: a trigger under B's own dedup key, B's title as its summary.
    assert len(receiver.requests) == 4  # a trigger each, to each destination
    (trigger,) = _pagerduty(receiver, b)
    assert trigger["event_action"] == "trigger"
    assert (trigger["payload"]["summary"], trigger["payload"]["severity"]) == (
        REAL_TITLE,
        "critical",
    )
    details = trigger["payload"]["custom_details"]
    assert details["incident"]["parent_id"] == a and details["incident"]["related"] == [a]
    assert f"related to open incident {a}" in details["reason"]
    # Alertmanager: B's own firing alert, with B's labels.
    (alert,) = _alerts(receiver, b)
    assert _states([alert]) == [("firing", "trigger")]
    assert alert["annotations"]["summary"] == REAL_TITLE
    assert {k: alert["labels"][k] for k in ("model", "signal", "segment", "severity")} == {
        "model": MODEL,
        "signal": "error_rate",
        "segment": "locale=de",
        "severity": "critical",
    }

    # B clears and auto-resolves; its resolve goes out under its own key, A stays open.
    for window in (3, 4):
        clock.advance(60)
        manager.process(_error_rate(window, detected=False))
    _deliver(engine, settings, clock)
    assert _actions(_pagerduty(receiver, b)) == ["trigger", "resolve"]
    assert _states(_alerts(receiver, b)) == [("firing", "trigger"), ("resolved", "resolve")]
    # A's pages are its own: one trigger each, no update about B, no resolve.
    assert _actions(_pagerduty(receiver, a)) == ["trigger"]
    assert _states(_alerts(receiver, a)) == [("firing", "trigger")]
    assert len(receiver.requests) == 6
    assert len({r.idempotency_key for r in receiver.requests}) == len(receiver.requests)
