"""`genmon notify status|retry` on a real SQLite database, against a receiver that is down."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner
from incident_support import FakeClock, finding, migrated_engine, settings_with, sqlite_url, webhook

from genmon.cli import main
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_shows_a_paused_destination_with_its_next_probe(
    tmp_path: Path, free_port: object
) -> None:
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    port = free_port()  # type: ignore[operator]
    settings = settings_with(webhook("hook", f"http://127.0.0.1:{port}/hook"))
    clock = FakeClock()
    manager = IncidentManager(engine, settings, clock=clock)
    for model in ("a", "b", "c", "d"):
        manager.process(finding(0, model_id=model))
    report = asyncio.run(Dispatcher(engine, settings, clock=clock).dispatch_once())
    assert report.retried == 4  # nobody listens on that port: four failures in a row

    table = _run("notify", "status", "--url", url)
    assert "hook" in table and "paused" in table and "ConnectError" in table
    (hook,) = json.loads(_run("notify", "status", "--json", "--url", url))
    assert hook["destination"] == "hook" and hook["state"] == "paused"
    assert hook["consecutive_failures"] == 4 and hook["pending"] == 4 and hook["dead"] == 0
    assert hook["next_probe_at"] is not None and hook["failing_since"] is not None


def test_status_without_destinations_or_rows(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    migrated_engine(url)
    assert "no destinations" in _run("notify", "status", "--url", url)
    assert json.loads(_run("notify", "status", "--json", "--url", url)) == []
