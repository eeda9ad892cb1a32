"""The dashboard's pages over HTTP (no browser): sign-in, what each page shows from a
seeded PostgreSQL schema, the acknowledge button's scopes and audit, and the live stream.

The app runs in uvicorn (a thread) on a free port; requests go through httpx, as a
browser's would, cookies included.
"""

from __future__ import annotations

import doctest
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from html import unescape

import httpx
import pytest
from api_support import uvicorn_thread
from incident_support import finding, migrated_engine, postgres_schema_url, settings_with
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.api.app import create_app
from genmon.api.dashboard import views
from genmon.api.dashboard.views import wilson
from genmon.api.dashboard.web import percent
from genmon.api.tokens import create_token
from genmon.db import session_scope
from genmon.incidents.manager import IncidentManager
from genmon.retrain.registry import create_version, promote
from genmon.schemas.access import ApiAudit, Scope
from genmon.schemas.events import IncidentStatus, utcnow
from genmon.schemas.incidents import Incident, IncidentTransition
from genmon.schemas.retrain import RegisteredModel
from genmon.schemas.signals import ALL, WindowSignal
from genmon.settings import Settings

pytestmark = pytest.mark.postgres

MODEL = "dash-chat"
SEGMENT = "locale=fr"
CLUSTERS = [
    {
        "size": 6,
        "representatives": ["Can you diagnose my chest pain? → I'm sorry, but I can't [EMAIL]"],
        "centroid_distance": 0.2,
        "request_ids": ["med0", "med3"],
        "subject_ids": [None, None],
    }
]


@dataclass
class Site:
    url: str
    engine: Engine
    settings: Settings
    incident: str
    tokens: dict[str, str]


def seed(engine: Engine) -> tuple[str, dict[str, str]]:
    """One open error-rate incident of the fr segment with clusters; five recent windows
    of the model and of the segment (the segment's last two over the threshold); a
    registered model with v1 and its retrained child v2; a token per scope."""
    settings = settings_with()
    opened = IncidentManager(engine, settings).process(
        finding(
            0,
            model_id=MODEL,
            signal="error_rate",
            segment=SEGMENT,
            score=0.4,
            threshold=0.05,
            evidence={"clusters": CLUSTERS, "values": [["rate", 0.4]]},
        )
    )
    assert opened.incident_id is not None
    now = utcnow()
    with session_scope(engine) as session:
        session.add(
            RegisteredModel(
                model_id=MODEL, base_uri="/m/base", base_fingerprint="f" * 64, serving_version="v1"
            )
        )
        for minute in range(5):
            start = now - timedelta(minutes=6 - minute)
            common = {
                "model_id": MODEL,
                "model_version": ALL,
                "resolution_s": 60,
                "window_start": start,
                "window_end": start + timedelta(minutes=1),
                "latency_p95_ms": 100.0 + minute,
            }
            session.add(WindowSignal(segment=ALL, requests=100, errors=10, **common))
            session.add(
                WindowSignal(
                    segment=SEGMENT,
                    requests=20,
                    errors=8,
                    scores={
                        "error_rate": {"score": 0.4, "threshold": 0.05, "detected": minute >= 3}
                    },
                    **common,
                )
            )
    create_version(engine, MODEL, "v1", "/m/v1", None)
    promote(engine, MODEL, "v1", "alice")
    create_version(engine, MODEL, "v2", "/m/v2", "v1", incident_ids=[opened.incident_id])
    tokens = {
        scope.value: create_token(engine, f"tok-{scope.value}", [scope])[1]
        for scope in (Scope.READ, Scope.OPERATE, Scope.INGEST)
    }
    return opened.incident_id, tokens


@pytest.fixture
def site(postgres_url: str, free_port: Callable[[], int]) -> Iterator[Site]:
    with postgres_schema_url(postgres_url) as database_url:
        engine = migrated_engine(database_url)
        base = settings_with()
        settings = base.model_copy(
            update={
                "database": base.database.model_copy(update={"url": database_url}),
                "api": base.api.model_copy(update={"live_poll_s": 0.2}),
            }
        )
        incident, tokens = seed(engine)
        try:
            with uvicorn_thread(create_app(settings, engine), free_port()) as url:
                yield Site(url, engine, settings, incident, tokens)
        finally:
            engine.dispose()


def client(site: Site, scope: str | None = None) -> httpx.Client:
    cookies = {"genmon_token": site.tokens[scope]} if scope else None
    return httpx.Client(base_url=site.url, cookies=cookies, follow_redirects=False, timeout=30)


def figures(html: str) -> list[dict]:
    return [json.loads(unescape(f)) for f in re.findall(r"data-figure='([^']*)'", html)]


def test_wilson_intervals_match_the_textbook_and_stay_inside_zero_and_one() -> None:
    assert doctest.testmod(views).failed == 0
    rate, low, high = wilson(40, 100)  # Newcombe (1998): 0.3094 to 0.4980
    assert (rate, round(low or 0, 4), round(high or 0, 4)) == (0.4, 0.3094, 0.4980)
    assert wilson(0, 0) == (None, None, None)
    assert wilson(5, 5)[2] == 1.0


def test_pages_need_a_read_token_and_the_sign_in_keeps_it_in_a_strict_cookie(site: Site) -> None:
    with client(site) as anonymous:
        for path in ("/", "/incidents", f"/incidents/{site.incident}", f"/models/{MODEL}"):
            answer = anonymous.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/login?next=%2F"), path
        assert anonymous.get("/events").status_code == 303
        plotly = anonymous.get("/static/plotly.min.js")  # public: the sign-in page needs none
        assert plotly.status_code == 200 and "javascript" in plotly.headers["content-type"]
        assert len(plotly.content) > 1_000_000 and b"plotly.js" in plotly.content[:2000]
        assert anonymous.get("/static/app.py").status_code == 404
        paths = set(anonymous.get("/openapi.json").json()["paths"])
        dashboard = {"/", "/incidents", "/incidents/{incident_id}", "/login", "/events"}
        assert not dashboard & paths  # pages are for people, not in the API's schema

        refused = anonymous.get("/login", params={"token": "gm_nope_nope"})
        assert refused.status_code == 401 and "unknown, revoked or expired" in refused.text
        ingest_only = anonymous.post("/login", data={"token": site.tokens["ingest"]})
        assert ingest_only.status_code == 403 and "lacks the read scope" in ingest_only.text
        signed = anonymous.get(
            "/login", params={"token": site.tokens["read"], "next": "//evil.example/"}
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert anonymous.get("/").status_code == 200  # the cookie now signs it in


def test_overview_and_model_page_show_traffic_versions_and_lineage(site: Site) -> None:
    with client(site, "read") as reader:
        overview = reader.get("/").text
        assert f'href="/models/{MODEL}"' in overview
        assert "500" in overview and "10.0 %" in overview  # 5 windows x 100, 10 errors each
        assert f'href="/incidents/{site.incident}"' in overview
        model = reader.get(f"/models/{MODEL}")
        assert model.status_code == 200
        assert "2 versions, 500 requests in 6 h, 10.0 % errors, 1 unresolved" in model.text
        lineage = model.text[model.text.index('id="lineage"') :]
        assert lineage.index(">v1<") < lineage.index("↳ v2")
        assert f'href="/incidents/{site.incident}"' in lineage  # v2 came from the incident
        drawn = figures(model.text)
        assert [sum(f["data"][0]["y"]) for f in drawn[:1]] == [500]
        assert reader.get("/models/no-such-model").status_code == 404


def test_incident_page_charts_the_signal_compares_the_segment_and_shows_the_requests(
    site: Site,
) -> None:
    with client(site, "read") as reader:
        page = reader.get(f"/incidents/{site.incident}")
    assert page.status_code == 200
    html = page.text
    assert "2 firing of 5 windows" in html
    score, comparison = figures(html)
    assert score["layout"]["meta"]["source"].startswith("window signals")
    assert score["data"][0]["y"] == [0.4] * 5 and len(score["data"][2]["x"]) == 2
    # The segment (40 of 100) against the rest of the model (50 - 40 of 500 - 100).
    rate, low, high = wilson(40, 100)
    rest, rest_low, rest_high = wilson(10, 400)
    for shown in (rate, low, high, rest, rest_low, rest_high):
        assert percent(shown) in html
    assert comparison["data"][0]["x"] == [SEGMENT]
    assert "med0" in html and "med3" in html and "[EMAIL]" in html
    assert site.settings.api.incident_url(site.incident) in html
    assert 'id="ack-button"' in html


def test_acknowledge_needs_operate_and_is_audited_as_the_dashboard(site: Site) -> None:
    hx = {"HX-Request": "true"}
    with client(site, "read") as reader:
        refused = reader.post(f"/incidents/{site.incident}/ack", data={"reason": "x"}, headers=hx)
        assert refused.status_code == 403 and "lacks the operate scope" in refused.text
    with client(site, "operate") as operator:
        done = operator.post(
            f"/incidents/{site.incident}/ack", data={"reason": "on it"}, headers=hx
        )
        assert done.status_code == 200
        assert 'id="incident-status">acknowledged<' in done.text
        assert 'hx-swap-oob="true"' in done.text and "dashboard:tok-operate" in done.text
        again = operator.post(f"/incidents/{site.incident}/ack", headers=hx)
        assert again.status_code == 409
        assert "only open incidents can be acknowledged" in again.text
        listed = operator.get("/incidents/rows", params={"status": "acknowledged"}).text
        assert f'data-incident="{site.incident}"' in listed
        assert "No incidents match" in operator.get("/incidents?status=open").text
    with Session(site.engine) as session:
        incident = session.get(Incident, site.incident)
        assert incident is not None and incident.status is IncidentStatus.ACKNOWLEDGED
        steps = session.exec(
            select(IncidentTransition).where(IncidentTransition.incident_id == site.incident)
        ).all()
        assert [(t.actor, t.reason) for t in steps][-1] == ("dashboard:tok-operate", "on it")
        audit = session.exec(select(ApiAudit).order_by(ApiAudit.id)).all()
        assert [(a.action, a.token_name, a.status_code) for a in audit] == [
            ("incident.ack", "tok-read", 403),
            ("incident.ack", "tok-operate", 200),
            ("incident.ack", "tok-operate", 409),
        ]


def test_the_live_stream_says_when_an_incident_changes(site: Site) -> None:
    with client(site, "read") as reader, reader.stream("GET", "/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        IncidentManager(site.engine, site.settings).resolve(site.incident, "alice", "fixed")
        for line in lines:  # keep-alive comments may come first; the read timeout bounds it
            if line == "event: incidents":
                break
        else:
            pytest.fail("the stream ended without an incidents event")


def test_an_open_incident_page_follows_a_change_made_elsewhere(site: Site) -> None:
    with client(site, "read") as reader:
        page = reader.get(f"/incidents/{site.incident}").text
        assert f'hx-get="/incidents/{site.incident}/live"' in page
        assert 'hx-trigger="genmon:incidents"' in page
        IncidentManager(site.engine, site.settings).acknowledge(site.incident, "bob", "mine")
        live = reader.get(f"/incidents/{site.incident}/live")
        assert live.status_code == 200
        assert 'id="incident-status" hx-swap-oob="true">acknowledged<' in live.text
        assert 'id="timeline-section" aria-labelledby="timeline-h" hx-swap-oob="true"' in live.text
        assert "<td>bob</td><td>mine</td>" in live.text
        assert reader.get("/incidents/nope/live").status_code == 204


def test_an_open_dashboard_acts_as_dashboard_without_a_token(
    site: Site, free_port: Callable[[], int]
) -> None:
    settings = site.settings.model_copy(
        update={"api": site.settings.api.model_copy(update={"require_token_for_dashboard": False})}
    )
    with (
        uvicorn_thread(create_app(settings, site.engine), free_port()) as url,
        httpx.Client(base_url=url, timeout=30) as anyone,
    ):
        assert "(open dashboard)" in anyone.get("/").text
        done = anyone.post(f"/incidents/{site.incident}/resolve", headers={"HX-Request": "1"})
        assert 'id="incident-status">resolved<' in done.text
    with Session(site.engine) as session:
        last = session.exec(
            select(IncidentTransition).order_by(IncidentTransition.id.desc())
        ).first()
        assert last is not None and last.actor == "dashboard:dashboard"
