"""Token scopes over a table of representative endpoints: each scope allows what it should
and nothing more; no, unknown, revoked or expired tokens get 401; every write, allowed or
refused, is audited with the token's name (real PostgreSQL, the app served by uvicorn).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from api_support import MODEL, Served, seeded_app, uvicorn_thread
from sqlmodel import Session, col, select

from genmon.api.tokens import create_token, revoke_token
from genmon.schemas.access import ApiAudit, Scope
from genmon.schemas.events import utcnow
from genmon.settings import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

UNKNOWN = "0" * 32


def endpoints(served: Served) -> list[tuple[str, str, dict[str, Any] | None, Scope]]:
    """(method, path, JSON body, the scope it needs): reads, operator writes, admin writes,
    ingest. Every write here can be repeated (a note, a silence, a 404, a no-op promote)."""
    seeded = served.seeded
    return [
        ("GET", "/v1/incidents", None, Scope.READ),
        ("GET", f"/v1/incidents/{seeded.open_incident}", None, Scope.READ),
        ("GET", "/v1/silences", None, Scope.READ),
        ("GET", "/v1/findings", None, Scope.READ),
        ("GET", f"/v1/signals?model_id={MODEL}", None, Scope.READ),
        ("GET", f"/v1/models/{MODEL}/versions", None, Scope.READ),
        ("GET", "/v1/jobs", None, Scope.READ),
        ("POST", f"/v1/incidents/{seeded.open_incident}/notes", {"text": "hi"}, Scope.OPERATE),
        ("POST", "/v1/silences", {"matchers": ["model=none"], "duration_s": 60}, Scope.OPERATE),
        ("POST", f"/v1/jobs/{UNKNOWN}/cancel", None, Scope.OPERATE),
        ("POST", f"/v1/models/{MODEL}/promote", {"version": "v1"}, Scope.ADMIN),
        ("POST", "/v1/inferences", {}, Scope.INGEST),
    ]


@pytest.fixture(scope="module")
def served(
    postgres_url: str, kafka_settings: Settings, free_port: Any
) -> Iterator[tuple[Served, httpx.Client]]:
    from uuid import uuid4

    with (
        seeded_app(postgres_url, kafka_settings, f"t-api-tokens-{uuid4().hex[:12]}") as app,
        uvicorn_thread(app.app, free_port()) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        yield app, client


def call(client: httpx.Client, method: str, path: str, body: Any, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.request(method, path, json=body, headers=headers).status_code


@pytest.mark.parametrize("scope", list(Scope), ids=lambda s: s.value)
def test_each_scope_allows_what_it_should_and_nothing_more(
    served: tuple[Served, httpx.Client], scope: Scope
) -> None:
    app, client = served
    token = app.seeded.tokens[scope.value]
    wrong = []
    for method, path, body, needed in endpoints(app):
        status = call(client, method, path, body, token)
        allowed = scope.allows(needed)
        if (allowed and status in (401, 403)) or status >= 500 or (not allowed and status != 403):
            wrong.append(f"{method} {path} (needs {needed.value}) -> {status}")
    assert not wrong, f"token with scope {scope.value}: {wrong}"


@pytest.mark.parametrize("token", [None, "", "gm_nope", f"gm_{UNKNOWN}_secret", "Basic x"])
def test_no_or_unknown_token_is_401_everywhere(
    served: tuple[Served, httpx.Client], token: str | None
) -> None:
    app, client = served
    statuses = {
        f"{method} {path}": call(client, method, path, body, token)
        for method, path, body, _ in endpoints(app)
    }
    assert set(statuses.values()) == {401}, statuses


def test_a_revoked_or_expired_token_is_401(served: tuple[Served, httpx.Client]) -> None:
    app, client = served
    _, revoked = create_token(app.engine, "to-revoke", [Scope.ADMIN])
    _, expired = create_token(
        app.engine, "expired", [Scope.ADMIN], expires_at=utcnow() - timedelta(seconds=1)
    )
    assert call(client, "GET", "/v1/incidents", None, revoked) == 200
    revoke_token(app.engine, "to-revoke")
    assert call(client, "GET", "/v1/incidents", None, revoked) == 401
    assert call(client, "GET", "/v1/incidents", None, expired) == 401
    # The cookie the dashboard keeps is checked the same way.
    client.cookies.set("genmon_token", revoked)
    try:
        assert client.get("/v1/incidents").status_code == 401
    finally:
        client.cookies.clear()


def test_writes_and_refused_writes_are_audited_with_the_token_name(
    served: tuple[Served, httpx.Client],
) -> None:
    app, client = served
    incident = app.seeded.open_incident
    path = f"/v1/incidents/{incident}/notes"
    assert call(client, "POST", path, {"text": "audited"}, app.seeded.tokens["operate"]) == 200
    assert call(client, "POST", path, {"text": "refused"}, app.seeded.tokens["read"]) == 403
    assert call(client, "POST", path, {"text": "anonymous"}, None) == 401
    with Session(app.engine) as session:
        rows = session.exec(
            select(ApiAudit).where(ApiAudit.path == path).order_by(col(ApiAudit.id))
        ).all()
    seen = [(r.token_name, r.method, r.status_code) for r in rows[-3:]]
    assert seen == [("tok-operate", "POST", 200), ("tok-read", "POST", 403), ("-", "POST", 401)]
    allowed = rows[-3]
    assert (allowed.action, allowed.target) == ("incident.note", incident)
    detail = client.get(
        f"/v1/incidents/{incident}",
        headers={"Authorization": f"Bearer {app.seeded.tokens['read']}"},
    ).json()
    assert detail["timeline"][-1]["actor"] == "api:tok-operate"
    assert detail["link"].endswith(f"/incidents/{incident}")
