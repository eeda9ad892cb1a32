"""The dashboard in headless Chromium while a real `genmon worker` runs on the real broker.

An on-call engineer signs in with a token, watches the incident list, and sees an
incident appear without reloading when traffic breaches an SLO (``error_rate <= 5 %``, so
it fires on the first closed window, with no baseline to learn); opens it, sees its
chart drawn by Plotly, acknowledges it and sees the state change. The worker writes to a
migrated PostgreSQL schema of the test's own, the API (uvicorn, in a thread) reads it.
Screenshots of each step go to ``.build/test-artifacts/browser/``.

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright for Python (never
``playwright install``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from api_support import uvicorn_thread
from incident_support import migrated_engine, postgres_schema_url, settings_with
from kafka import KafkaProducer
from playwright.sync_api import Page, expect, sync_playwright
from sqlmodel import Session, select
from worker_support import WorkerProcess

from genmon.api.app import create_app
from genmon.api.tokens import create_token
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.access import ApiAudit, Scope
from genmon.schemas.events import IncidentStatus, InferenceEvent, InferenceStatus
from genmon.schemas.incidents import Incident, IncidentTransition, Transition
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / ".build" / "test-artifacts" / "browser"
#: How long the page may take to show what the worker did (worker start excluded).
SEEN_MS = 60_000


def worker_env(kafka: Settings, prefix: str, database_url: str, port: int, home: Path) -> dict:
    """A worker of its own (topics, group, home, database), with 2 s windows that close
    fast and one SLO on this test's model only."""
    return {
        **os.environ,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": kafka.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": prefix,
        "GENMON_WORKER__APP_ID": prefix,
        "GENMON_WORKER__WEB_PORT": str(port),
        "GENMON_HOME": str(home),
        "GENMON_DATABASE__URL": database_url,
        "GENMON_EMBEDDING__ENABLED": "false",
        "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
        "GENMON_WINDOWS__TUMBLING_S": "2",
        "GENMON_WINDOWS__HOPPING_SIZE_S": "4",
        "GENMON_WINDOWS__HOPPING_STEP_S": "2",
        "GENMON_WINDOWS__ALLOWED_LATENESS_S": "1",
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
        "GENMON_WINDOWS__CLOSE_INTERVAL_S": "0.5",
        "GENMON_DETECTORS__MIN_WINDOW_REQUESTS": "1",
        "GENMON_DETECTORS__SLOS": f'{{"{prefix}-chat": ["error_rate <= 5%"]}}',
        "GENMON_INCIDENTS__PUBLISH_EVENTS": "false",
    }


def failing_traffic(model_id: str) -> list[InferenceEvent]:
    """20 calls in one 2 s window a little in the past, half of them errors."""
    now = int(time.time() - 30)
    t0 = datetime.fromtimestamp(now - now % 2, UTC)
    return [
        InferenceEvent(
            request_id=f"r{i}",
            model_id=model_id,
            model_version="v1",
            latency_ms=10.0,
            started_at=t0 + timedelta(milliseconds=50 * i),
            status=InferenceStatus.ERROR if i % 2 else InferenceStatus.OK,
            error_code="E503" if i % 2 else None,
            response="" if i % 2 else "fine",
        )
        for i in range(20)
    ]


def shot(page: Page, step: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{step}.png"), full_page=True)


@pytest.fixture
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


def test_an_incident_appears_live_is_charted_and_acknowledged_in_the_browser(
    kafka_settings: Settings,
    postgres_url: str,
    unique_name: str,
    free_port: Callable[[], int],
    tmp_path: Path,
    artifacts: Path,
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "headless Chromium is missing: run infra/bootstrap.sh (as root it installs "
            "Debian's `chromium` package), then rerun this test"
        )
    model_id = f"{unique_name}-chat"
    prefixed = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
    )
    KafkaBroker(prefixed).ensure_topics(prefixed.kafka.bootstrap_servers)
    with postgres_schema_url(postgres_url) as database_url:
        engine = migrated_engine(database_url)
        base = settings_with()
        settings = base.model_copy(
            update={
                "database": base.database.model_copy(update={"url": database_url}),
                "kafka": prefixed.kafka,
                "api": base.api.model_copy(update={"live_poll_s": 0.3}),
            }
        )
        _, token = create_token(engine, "oncall", [Scope.OPERATE])
        worker = WorkerProcess(
            worker_env(kafka_settings, unique_name, database_url, free_port(), tmp_path / "home"),
            tmp_path / "worker.log",
        ).start()
        producer = KafkaProducer(bootstrap_servers=prefixed.kafka.bootstrap_servers, acks="all")
        try:
            with (
                uvicorn_thread(create_app(settings, engine), free_port()) as url,
                sync_playwright() as playwright,
            ):
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    # Unauthenticated: sent to the sign-in page, then back to the list.
                    page.goto(f"{url}/incidents")
                    expect(page).to_have_url(f"{url}/login?next=%2Fincidents")
                    page.get_by_label("Token").fill(token)
                    shot(page, "01-login")
                    page.get_by_role("button", name="Sign in").click()
                    expect(page).to_have_url(f"{url}/incidents")
                    expect(page.locator("#no-incidents")).to_be_visible()
                    # Subscribed before the traffic: what follows arrives over the stream.
                    expect(page.locator("#live-state")).to_have_attribute("data-state", "live")
                    shot(page, "02-empty-list-live")

                    worker.wait_ready()
                    for event in failing_traffic(model_id):
                        producer.send(
                            prefixed.topic("inference"),
                            key=model_id.encode(),
                            value=event.model_dump_json().encode(),
                        )
                    producer.flush()

                    row = page.locator("#incident-rows tr[data-incident]").filter(has_text=model_id)
                    expect(row.first).to_be_visible(timeout=SEEN_MS)
                    expect(row.first).to_contain_text("error_rate")
                    shot(page, "03-incident-appeared-live")

                    row.first.locator("th a").click()
                    expect(page).to_have_url(re.compile(r"/incidents/[0-9a-f]{32}$"))
                    chart = page.locator("#score-chart")
                    expect(chart.locator(".main-svg").first).to_be_visible()
                    expect(chart.locator(".scatterlayer .trace").first).to_be_attached()
                    expect(page.locator("#incident-status")).to_have_text("open")
                    shot(page, "04-incident-page-chart")

                    page.get_by_label("Reason (optional)").fill("looking into it")
                    page.get_by_role("button", name="Acknowledge").click()
                    expect(page.locator("#incident-status")).to_have_text("acknowledged")
                    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
                    expect(page.locator("#timeline")).to_contain_text("dashboard:oncall")
                    shot(page, "05-acknowledged")
                    incident_id = row_id(page, url)
                finally:
                    browser.close()
        finally:
            producer.close()
            worker.stop()
        with Session(engine) as session:
            incident = session.get(Incident, incident_id)
            assert incident is not None and incident.model_id == model_id
            assert incident.status is IncidentStatus.ACKNOWLEDGED
            acks = session.exec(
                select(IncidentTransition).where(
                    IncidentTransition.incident_id == incident_id,
                    IncidentTransition.transition == Transition.ACKNOWLEDGED,
                )
            ).all()
            assert [(t.actor, t.reason) for t in acks] == [("dashboard:oncall", "looking into it")]
            audit = session.exec(select(ApiAudit).where(ApiAudit.action == "incident.ack")).all()
            assert [(a.token_name, a.target, a.status_code) for a in audit] == [
                ("oncall", incident_id, 200)
            ]
        engine.dispose()
    assert sorted(p.name for p in artifacts.iterdir()) == [
        "01-login.png",
        "02-empty-list-live.png",
        "03-incident-appeared-live.png",
        "04-incident-page-chart.png",
        "05-acknowledged.png",
    ]


def row_id(page: Page, url: str) -> str:
    """The incident id of the page open in the browser."""
    return page.url.removeprefix(f"{url}/incidents/")
