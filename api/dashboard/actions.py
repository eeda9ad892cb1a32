"""The incident page's buttons: acknowledge and resolve, posted by htmx.

Each calls :class:`~genmon.incidents.manager.IncidentManager` (the same transition, audit
trail and notifications as the CLI and ``/v1/incidents/{id}/ack``) as
``dashboard:<token name>`` and answers the incident's state fragment, which htmx swaps in
place. They need an ``operate`` token; the cookie is ``SameSite=Strict``, so another site
cannot post them with the user's cookie. The API's audit middleware stores each one under
the action named here. The answer also carries the timeline, swapped out of band, so the
new transition shows at once; ``/incidents/{id}/live`` sends the same to open pages when
someone else moves the incident.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from genmon.api import queries
from genmon.api.auth import audited
from genmon.api.dashboard.web import render, viewer
from genmon.db import session_scope
from genmon.incidents.exceptions import IncidentNotFoundError, InvalidTransitionError
from genmon.incidents.manager import IncidentManager
from genmon.schemas.access import Scope
from genmon.schemas.incidents import Incident, IncidentTransition

router = APIRouter(include_in_schema=False)

#: Longest reason kept from the form.
MAX_REASON_CHARS = 500


@router.post("/incidents/{incident_id}/ack")
async def acknowledge(request: Request, incident_id: str) -> Response:
    return await _act(request, incident_id, "incident.ack")


@router.post("/incidents/{incident_id}/resolve")
async def resolve(request: Request, incident_id: str) -> Response:
    return await _act(request, incident_id, "incident.resolve")


async def _act(request: Request, incident_id: str, action: str) -> Response:
    audited(request, action, incident_id)
    caller = await viewer(request, Scope.OPERATE)
    if isinstance(caller, Response):
        if caller.status_code != 403 or not request.headers.get("hx-request"):
            return caller
        who = request.state.caller.token_name
        refused = f"token {who!r} lacks the operate scope: sign in with one that has it"
        return render(request, "_incident_action.html", {"incident": None, "error": refused}, 403)
    reason = (await _form_field(request, "reason"))[:MAX_REASON_CHARS]
    manager = IncidentManager(request.app.state.engine, request.app.state.settings)
    step = manager.acknowledge if action == "incident.ack" else manager.resolve
    error: str | None = None
    status_code = 200
    try:
        incident: Incident | None = await run_in_threadpool(
            step, incident_id, f"dashboard:{caller.token_name}", reason
        )
    except IncidentNotFoundError as exc:
        incident, error, status_code = None, str(exc), 404
    except InvalidTransitionError as exc:
        incident, error, status_code = None, str(exc), 409
    if incident is None:
        # The page's htmx config swaps 403, 404 and 409: the message shows where the buttons were.
        return render(
            request,
            "_incident_action.html",
            {"incident": None, "error": error, "caller": caller},
            status_code=status_code,
        )
    timeline = await run_in_threadpool(_timeline, request, incident_id)
    return render(
        request,
        "_incident_action.html",
        {"incident": incident, "timeline": timeline, "caller": caller},
    )


@router.get("/incidents/{incident_id}/live")
async def live_state(request: Request, incident_id: str) -> Response:
    """The incident page's status badge and timeline as out-of-band fragments, fetched
    when the event stream says an incident changed: a teammate's acknowledge shows on
    every open page. The form is left alone, so a reason being typed is kept."""
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    incident, timeline = await run_in_threadpool(_current, request, incident_id)
    if incident is None:
        return Response(status_code=204)
    context = {"incident": incident, "timeline": timeline, "caller": caller}
    return render(request, "_incident_live.html", context)


def _current(
    request: Request, incident_id: str
) -> tuple[Incident | None, list[IncidentTransition]]:
    with session_scope(request.app.state.engine) as session:
        incident = session.get(Incident, incident_id)
        if incident is None:
            return None, []
        return incident, queries.incident_timeline(session, incident_id)


def _timeline(request: Request, incident_id: str) -> list[IncidentTransition]:
    with session_scope(request.app.state.engine) as session:
        return queries.incident_timeline(session, incident_id)


async def _form_field(request: Request, name: str) -> str:
    """One field of a urlencoded form (no multipart parser needed for a reason box)."""
    from urllib.parse import parse_qs

    body = (await request.body()).decode("utf-8", errors="replace")
    values = parse_qs(body).get(name) or [""]
    return values[0].strip()
