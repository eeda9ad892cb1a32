"""``/v1/incidents``: list (filters, cursor pages), detail with evidence and timeline,
and people's actions (acknowledge, resolve, note) through the incident manager, so an
action from the API pages, publishes and records exactly as one from the CLI does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from genmon.api.auth import audited
from genmon.api.payloads import (
    Incident,
    IncidentDetail,
    IncidentPage,
    NoteBody,
    ReasonBody,
    SeverityCounts,
    TransitionPublic,
)
from genmon.api.queries import (
    evidence_for_people,
    incident_page,
    incident_timeline,
    open_incident_counts,
)
from genmon.api.routes._common import (
    BODY,
    OperateCaller,
    ReadCaller,
    actor,
    answers,
    problems,
)
from genmon.db import session_scope
from genmon.incidents.exceptions import IncidentNotFoundError
from genmon.incidents.manager import IncidentManager
from genmon.schemas.events import Code, FindingSegment, Identifier, IncidentStatus, Severity
from genmon.schemas.incidents import Incident as IncidentRow
from genmon.settings import Settings

router = APIRouter(prefix="/v1/incidents", tags=["incidents"])


def _links(expression: str) -> dict[str, tuple[str, str]]:
    """Links from an answer holding an incident id to the operations on that incident."""
    operations = ("getIncident", "acknowledgeIncident", "resolveIncident", "noteIncident")
    return {operation: ("incident_id", expression) for operation in operations}


IncidentId = Annotated[Identifier, Path()]


def shown(incident: IncidentRow, settings: Settings) -> Incident:
    """An incident with its dashboard link and its evidence as people may see it."""
    fields = incident.model_dump()
    fields["evidence"] = evidence_for_people(incident, settings.notify)
    return Incident(**fields, link=settings.api.incident_url(incident.id))


def detail(request: Request, incident_id: str) -> IncidentDetail:
    settings: Settings = request.app.state.settings
    with answers(), session_scope(request.app.state.engine) as session:
        incident = session.get(IncidentRow, incident_id)
        if incident is None:
            raise IncidentNotFoundError(
                f"no incident {incident_id!r}; GET /v1/incidents lists their ids"
            )
        timeline = incident_timeline(session, incident_id)
    public = shown(incident, settings)
    return IncidentDetail(
        **public.model_dump(), timeline=[TransitionPublic.model_validate(t) for t in timeline]
    )


@router.get(
    "",
    response_model=IncidentPage,
    responses=problems(links=_links("$response.body#/items/0/id")),
    summary="List incidents",
    operation_id="listIncidents",
)
def list_incidents(
    request: Request,
    _caller: ReadCaller,
    status: Annotated[list[IncidentStatus] | None, Query()] = None,
    model_id: Identifier | None = None,
    severity: Severity | None = None,
    segment: FindingSegment | None = None,
    cursor: Code | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> IncidentPage:
    """Newest opened first; ``status`` may repeat (``?status=open&status=acknowledged``).
    Pass ``next_cursor`` back as ``cursor`` for the next page."""
    settings: Settings = request.app.state.settings
    with answers(), session_scope(request.app.state.engine) as session:
        rows, next_cursor = incident_page(
            session,
            status=[s.value for s in status] if status else None,
            model_id=model_id,
            severity=severity.value if severity else None,
            segment=segment,
            cursor=cursor,
            limit=limit,
        )
    return IncidentPage(items=[shown(r, settings) for r in rows], next_cursor=next_cursor)


@router.get(
    "/counts",
    response_model=SeverityCounts,
    responses=problems(),
    summary="Unresolved incidents by severity",
    operation_id="countIncidents",
)
def incident_counts(request: Request, _caller: ReadCaller) -> SeverityCounts:
    with answers(), session_scope(request.app.state.engine) as session:
        counts = open_incident_counts(session)
    return SeverityCounts(counts={Severity(k): v for k, v in counts.items()})


@router.get(
    "/{incident_id}",
    response_model=IncidentDetail,
    responses=problems(404, links=_links("$response.body#/id")),
    summary="One incident: evidence, notes and timeline",
    operation_id="getIncident",
)
def get_incident(request: Request, incident_id: IncidentId, _caller: ReadCaller) -> IncidentDetail:
    return detail(request, incident_id)


@router.post(
    "/{incident_id}/ack",
    response_model=IncidentDetail,
    responses=problems(*BODY, 404, 409),
    summary="Acknowledge an open incident",
    operation_id="acknowledgeIncident",
)
def acknowledge(
    request: Request,
    incident_id: IncidentId,
    caller: OperateCaller,
    body: ReasonBody | None = None,
) -> IncidentDetail:
    audited(request, "incident.ack", incident_id)
    manager = _manager(request)  # a broken routing file is the server's 500, not a 4xx
    with answers():
        manager.acknowledge(incident_id, actor(caller), body.reason if body else "")
    return detail(request, incident_id)


@router.post(
    "/{incident_id}/resolve",
    response_model=IncidentDetail,
    responses=problems(*BODY, 404, 409),
    summary="Resolve an incident",
    operation_id="resolveIncident",
)
def resolve(
    request: Request,
    incident_id: IncidentId,
    caller: OperateCaller,
    body: ReasonBody | None = None,
) -> IncidentDetail:
    audited(request, "incident.resolve", incident_id)
    manager = _manager(request)
    with answers():
        manager.resolve(incident_id, actor(caller), body.reason if body else "")
    return detail(request, incident_id)


@router.post(
    "/{incident_id}/notes",
    response_model=IncidentDetail,
    responses=problems(*BODY, 404),
    summary="Add a note to an incident",
    operation_id="noteIncident",
)
def add_note(
    request: Request, incident_id: IncidentId, body: NoteBody, caller: OperateCaller
) -> IncidentDetail:
    audited(request, "incident.note", incident_id)
    manager = _manager(request)
    with answers():
        manager.add_note(incident_id, actor(caller), body.text)
    return detail(request, incident_id)


def _manager(request: Request) -> IncidentManager:
    return IncidentManager(request.app.state.engine, request.app.state.settings)
