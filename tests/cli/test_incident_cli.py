"""`genmon incidents|silences|notify` on a real SQLite database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from incident_support import FakeClock, finding, migrated_engine, settings_with, sqlite_url, webhook
from sqlmodel import Session, select

from genmon.cli import main
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.schemas import IncidentStatus
from genmon.schemas.incidents import Incident, Notification, NotificationStatus, Silence


@pytest.fixture
def url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path)


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_incident_lifecycle_from_the_command_line(url: str) -> None:
    engine = migrated_engine(url)
    manager = IncidentManager(engine, settings_with())
    incident_id = str(manager.process(finding(0, evidence={"p99_ms": 2400})).incident_id)

    listed = _run("incidents", "list", "--url", url)
    assert incident_id in listed and "open" in listed
    as_json = json.loads(_run("incidents", "list", "--json", "--url", url))
    assert [i["id"] for i in as_json] == [incident_id]

    _run("incidents", "ack", incident_id, "--by", "alice", "--reason", "on it", "--url", url)
    _run("incidents", "notes", incident_id, "rolled back v42", "--by", "alice", "--url", url)
    assert "rolled back v42" in _run("incidents", "notes", incident_id, "--url", url)
    _run("incidents", "resolve", incident_id, "--by", "alice", "--url", url)

    shown = _run("incidents", "show", incident_id, "--url", url)
    assert "p99_ms" in shown and "rolled back v42" in shown
    for step in ("opened", "acknowledged", "noted", "resolved"):
        assert step in shown
    detail = json.loads(_run("incidents", "show", incident_id, "--json", "--url", url))
    assert detail["status"] == "resolved"
    assert [t["actor"] for t in detail["transitions"]] == ["genmon", "alice", "alice", "alice"]
    assert "no incidents" in _run("incidents", "list", "--url", url)
    assert incident_id in _run("incidents", "list", "--status", "resolved", "--url", url)
    with Session(engine) as session:
        stored = session.get(Incident, incident_id)
    assert stored is not None and stored.status is IncidentStatus.RESOLVED


def test_show_names_related_incidents_both_ways(url: str) -> None:
    engine = migrated_engine(url)
    manager = IncidentManager(engine, settings_with())
    first = str(manager.process(finding(0, signal="latency_ms")).incident_id)
    second = str(manager.process(finding(0, signal="error_rate")).incident_id)
    assert f"related to {first}" in _run("incidents", "show", second, "--url", url)
    assert f"related: {second}" in _run("incidents", "show", first, "--url", url)
    engine.dispose()


def test_errors_are_one_line_messages(url: str) -> None:
    migrated_engine(url)
    result = CliRunner().invoke(main, ["incidents", "ack", "nope", "--url", url])
    assert result.exit_code == 1
    assert "no incident 'nope'" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["silences", "add", "-m", "colour=red", "--url", url])
    assert bad.exit_code == 1 and "unknown label 'colour'" in bad.output


def test_silences_add_list_expire(url: str) -> None:
    engine = migrated_engine(url)
    added = _run(
        "silences", "add", "-m", "model=chat", "-m", 'severity=~"warning|error"',
        "--duration", "1h", "--comment", "deploy", "--url", url,
    )  # fmt: skip
    silence_id = added.split()[0]
    assert silence_id in _run("silences", "list", "--url", url)
    manager = IncidentManager(engine, settings_with(webhook("hook", "http://127.0.0.1:9/h")))
    assert manager.process(finding(0)).notifications == 0  # silenced
    _run("silences", "expire", silence_id, "--url", url)
    assert "no silences" in _run("silences", "list", "--url", url)
    assert silence_id in _run("silences", "list", "--all", "--url", url)
    assert manager.process(finding(0, model_id="chat", signal="other")).notifications == 1
    with Session(engine) as session:
        (silence,) = session.exec(select(Silence)).all()
    assert silence.matchers == ['model="chat"', 'severity=~"warning|error"']


def test_dead_notifications_are_listed_and_can_be_requeued(url: str, free_port: object) -> None:
    engine = migrated_engine(url)
    port = free_port()  # type: ignore[operator]
    settings = settings_with(
        webhook("hook", f"http://127.0.0.1:{port}/hook"), notify={"max_attempts": 1}
    )
    clock = FakeClock()
    IncidentManager(engine, settings, clock=clock).process(finding(0))
    report = asyncio.run(Dispatcher(engine, settings, clock=clock).dispatch_once())
    assert report.dead == 1
    dead = _run("notify", "list", "--status", "dead", "--url", url)
    assert "dead" in dead and "hook" in dead and "ConnectError" in dead
    assert "no notifications" in _run("notify", "list", "--status", "pending", "--url", url)
    assert "requeued 1" in _run("notify", "retry", "--all-dead", "--url", url)
    with Session(engine) as session:
        row = session.exec(select(Notification)).one()
    assert row.status is NotificationStatus.PENDING and row.attempts == 0
