"""The API's resources over a seeded PostgreSQL schema: incident pages and filters,
evidence redacted as configured, actions and their 404/409/422, silences, window signals
with rollups for older periods, models and jobs; and the probes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from api_support import MODEL, Served, seeded_app, uvicorn_thread
from incident_support import finding
from sqlmodel import Session

from genmon.api.app import create_app
from genmon.api.queries import signal_rows
from genmon.db import make_engine, session_scope
from genmon.incidents.manager import IncidentManager
from genmon.schemas.events import utcnow
from genmon.schemas.signals import ALL, ROLLUP_RESOLUTION_S, WindowSignal
from genmon.settings import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture(scope="module")
def served(
    postgres_url: str, kafka_settings: Settings, free_port: Any
) -> Iterator[tuple[Served, httpx.Client]]:
    from uuid import uuid4

    with (
        seeded_app(postgres_url, kafka_settings, f"t-api-res-{uuid4().hex[:12]}") as app,
        uvicorn_thread(app.app, free_port()) as base_url,
        httpx.Client(
            base_url=base_url,
            timeout=30,
            headers={"Authorization": f"Bearer {app.seeded.tokens['admin']}"},
        ) as client,
    ):
        yield app, client


def test_incident_pages_cover_every_incident_once_newest_first(
    served: tuple[Served, httpx.Client],
) -> None:
    app, client = served
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2, "model_id": MODEL}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/incidents", params=params).raise_for_status().json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(app.seeded.incidents))
    bad = client.get("/v1/incidents", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_incident_filters(served: tuple[Served, httpx.Client]) -> None:
    app, client = served

    def ids(**params: Any) -> set[str]:
        page = client.get("/v1/incidents", params={"model_id": MODEL, **params})
        return {item["id"] for item in page.raise_for_status().json()["items"]}

    unresolved = ids(status=["open", "acknowledged"])
    assert unresolved == set(app.seeded.incidents) - {app.seeded.resolved_incident}
    assert ids(status="resolved") == {app.seeded.resolved_incident}
    assert ids(segment="locale=de") == {app.seeded.incidents[1]}
    assert client.get("/v1/incidents", params={"model_id": "nobody"}).json()["items"] == []
    assert client.get("/v1/incidents", params={"severity": "loud"}).status_code == 422


def test_incident_detail_redacts_evidence_and_links_to_its_page(
    served: tuple[Served, httpx.Client],
) -> None:
    app, client = served
    found = finding(
        90,
        model_id="api-redact",
        evidence={"exemplar": "write to bob@example.com", "request_ids": ["r-1"]},
    )
    outcome = IncidentManager(app.engine, app.settings).process(found)
    assert outcome.incident_id is not None
    detail = client.get(f"/v1/incidents/{outcome.incident_id}").raise_for_status().json()
    details = detail["evidence"]["details"]
    assert details["exemplar"] == "write to [REDACTED:email]"
    assert details["request_ids"] == ["r-1"]
    assert detail["evidence"]["finding_id"] == found.finding_id  # genmon's ids stay readable
    assert detail["link"] == app.settings.api.incident_url(outcome.incident_id)
    assert [step["transition"] for step in detail["timeline"]] == ["opened"]


def test_acknowledge_resolve_and_their_refusals(served: tuple[Served, httpx.Client]) -> None:
    app, client = served
    outcome = IncidentManager(app.engine, app.settings).process(finding(91, model_id="api-actions"))
    incident = outcome.incident_id
    acked = client.post(f"/v1/incidents/{incident}/ack", json={"reason": "mine"})
    assert acked.status_code == 200 and acked.json()["status"] == "acknowledged"
    again = client.post(f"/v1/incidents/{incident}/ack")
    assert again.status_code == 409 and "only open incidents" in again.json()["detail"]
    resolved = client.post(f"/v1/incidents/{incident}/resolve").json()
    assert resolved["status"] == "resolved"
    steps = [(s["transition"], s["actor"]) for s in resolved["timeline"]]
    assert steps[1:] == [("acknowledged", "api:tok-admin"), ("resolved", "api:tok-admin")]
    assert client.post(f"/v1/incidents/{incident}/resolve").status_code == 409
    assert client.post("/v1/incidents/nope/ack").status_code == 404
    assert client.post(f"/v1/incidents/{incident}/notes", json={"text": ""}).status_code == 422


def test_silences_create_list_expire(served: tuple[Served, httpx.Client]) -> None:
    _, client = served
    made = client.post("/v1/silences", json={"matchers": ["signal=latency_ms"], "duration_s": 600})
    assert made.status_code == 201
    silence = made.json()
    assert silence["active"] and silence["created_by"] == "api:tok-admin"
    assert silence["id"] in {s["id"] for s in client.get("/v1/silences").json()}
    bad = client.post("/v1/silences", json={"matchers": ["nolabel=~("]})
    assert bad.status_code == 422 and "matchers" in bad.json()["detail"][0]["loc"]
    expired = client.post(f"/v1/silences/{silence['id']}/expire").json()
    assert not expired["active"]
    assert silence["id"] not in {s["id"] for s in client.get("/v1/silences").json()}
    listed = client.get("/v1/silences", params={"include_expired": True}).json()
    assert silence["id"] in {s["id"] for s in listed}
    assert client.post("/v1/silences/nope/expire").status_code == 404


def test_signals_use_rollups_only_before_the_window_rows(
    served: tuple[Served, httpx.Client],
) -> None:
    app, client = served
    model = "api-rollups"
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    with session_scope(app.engine) as session:
        for hours_ago in (5, 4, 3, 1):  # hour 1 overlaps the window rows: not shown
            start = now - timedelta(hours=hours_ago)
            session.add(_row(model, ROLLUP_RESOLUTION_S, start, requests=6000))
        for minutes_ago in (90, 89, 88):
            session.add(_row(model, 60, now - timedelta(minutes=minutes_ago), requests=100))
    series = client.get("/v1/signals", params={"model_id": model}).raise_for_status().json()
    resolutions = [p["resolution_s"] for p in series["points"]]
    assert resolutions == [3600, 3600, 3600, 60, 60, 60]
    starts = [p["window_start"] for p in series["points"]]
    assert starts == sorted(starts)
    recent = client.get(
        "/v1/signals",
        params={"model_id": model, "since": (now - timedelta(minutes=89)).isoformat()},
    ).json()
    assert len(recent["points"]) == 2
    with Session(app.engine) as session:
        assert len(signal_rows(session, model, limit=2)) == 2
    backwards = client.get(
        "/v1/signals", params={"model_id": model, "since": now.isoformat(), "until": "2000-01-01"}
    )
    assert backwards.status_code == 422


def _row(model: str, resolution_s: int, start: Any, requests: int) -> WindowSignal:
    return WindowSignal(
        model_id=model,
        model_version=ALL,
        segment=ALL,
        resolution_s=resolution_s,
        window_start=start,
        window_end=start + timedelta(seconds=resolution_s),
        requests=requests,
    )


def test_models_and_jobs(served: tuple[Served, httpx.Client]) -> None:
    app, client = served
    model = client.get(f"/v1/models/{MODEL}").raise_for_status().json()
    assert model["aliases"] == {"champion": "v1", "challenger": "v2"}
    assert [(v["version"], v["parent_version"]) for v in model["lineage"]] == [
        ("v1", None),
        ("v2", "v1"),
    ]
    assert client.get("/v1/models/nobody").status_code == 404
    jobs = client.get("/v1/jobs", params={"status": "pending_approval"}).json()
    assert app.seeded.pending_job in {job["job_id"] for job in jobs}
    approved = client.post(f"/v1/jobs/{app.seeded.pending_job}/approve").json()
    assert approved["status"] == "queued" and approved["approved_by"] == "api:tok-admin"
    assert client.post(f"/v1/jobs/{app.seeded.pending_job}/approve").status_code == 409
    cancelled = client.post(f"/v1/jobs/{app.seeded.queued_job}/cancel").json()
    assert (cancelled["status"], cancelled["was"]) == ("cancelled", "queued")
    assert client.post(f"/v1/jobs/{app.seeded.queued_job}/cancel").status_code == 409
    assert client.get("/v1/jobs/nope").status_code == 404


def test_readyz_names_what_is_down(
    served: tuple[Served, httpx.Client], free_port: Any, tmp_path: Any
) -> None:
    app, client = served
    assert client.get("/readyz").json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok"},
    }
    dead_broker = f"127.0.0.1:{free_port()}"
    settings = app.settings.model_copy(
        update={
            "kafka": app.settings.kafka.model_copy(update={"bootstrap_servers": dead_broker}),
            "database": app.settings.database.model_copy(
                update={"url": f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"}
            ),
        }
    )
    engine = make_engine(settings.database.url)
    with uvicorn_thread(create_app(settings, engine), free_port()) as url:
        answer = httpx.get(f"{url}/readyz", timeout=30)
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    engine.dispose()
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert "database unreachable" in checks["database"]
    assert checks["broker"].startswith(f"broker unreachable at {dead_broker}")
