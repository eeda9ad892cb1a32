"""``/v1/findings``: the detector findings genmon applied to incidents.

genmon keeps, per finding it acted on (a detection, or a clear window of a signal with an
open incident), its dedup key (``fingerprint:window_end``) and when it was applied, for
``retention.findings_days``; the finding's numbers live on in its incident (score, peak,
chart, evidence) and in the window signals. This lists those rows, newest first, each
with the incident of its fingerprint that was open when it was applied.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlmodel import Session, col, select

from genmon.api.payloads import FindingPage, FindingPublic
from genmon.api.routes._common import ReadCaller, answers, problems, utc
from genmon.db import session_scope
from genmon.schemas.events import Identifier
from genmon.schemas.incidents import FindingSeen, Incident
from genmon.settings import Settings

router = APIRouter(prefix="/v1/findings", tags=["findings"])


@router.get(
    "",
    response_model=FindingPage,
    responses=problems(
        links={"getIncident": ("incident_id", "$response.body#/items/0/incident_id")}
    ),
    summary="List findings",
    operation_id="listFindings",
)
def list_findings(
    request: Request,
    _caller: ReadCaller,
    model_id: Identifier | None = None,
    incident_id: Identifier | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FindingPage:
    """Newest applied first; ``model_id`` or ``incident_id`` narrow it to the findings of
    that model's (or that incident's) fingerprints."""
    settings: Settings = request.app.state.settings
    query = select(FindingSeen).order_by(
        col(FindingSeen.seen_at).desc(), col(FindingSeen.dedup_key)
    )
    since = utc("since", since)
    if since is not None:
        query = query.where(col(FindingSeen.seen_at) >= since)
    scope = select(Incident.fingerprint)
    if model_id is not None:
        scope = scope.where(Incident.model_id == model_id)
    if incident_id is not None:
        scope = scope.where(Incident.id == incident_id)
    if model_id is not None or incident_id is not None:
        query = query.where(col(FindingSeen.fingerprint).in_(scope))
    with answers(), session_scope(request.app.state.engine) as session:
        rows = list(session.exec(query.limit(limit)))
        incidents = _incidents_of(session, {row.fingerprint for row in rows})
    items = []
    for row in rows:
        incident = _applied_to(incidents.get(row.fingerprint, []), row.seen_at)
        items.append(
            FindingPublic(
                dedup_key=row.dedup_key,
                fingerprint=row.fingerprint,
                seen_at=row.seen_at,
                window_end=_window_end(row.dedup_key),
                incident_id=incident.id if incident else None,
                model_id=incident.model_id if incident else None,
                detector=incident.detector if incident else None,
                signal=incident.signal if incident else None,
                segment=incident.segment if incident else None,
                link=settings.api.incident_url(incident.id) if incident else None,
            )
        )
    return FindingPage(items=items)


def _incidents_of(session: Session, fingerprints: set[str]) -> dict[str, list[Incident]]:
    """The incidents of these fingerprints, oldest first per fingerprint."""
    found: dict[str, list[Incident]] = {}
    if not fingerprints:
        return found
    query = (
        select(Incident)
        .where(col(Incident.fingerprint).in_(fingerprints))
        .order_by(col(Incident.first_seen_at))
    )
    for incident in session.exec(query):
        found.setdefault(incident.fingerprint, []).append(incident)
    return found


def _applied_to(candidates: list[Incident], seen_at: datetime) -> Incident | None:
    """The latest incident of the fingerprint that existed when the finding was applied."""
    before = [i for i in candidates if i.first_seen_at <= seen_at]
    return before[-1] if before else (candidates[0] if candidates else None)


def _window_end(dedup_key: str) -> datetime | None:
    """The window end a dedup key names (``fingerprint:window_end``), if it names one."""
    _, _, window = dedup_key.partition(":")
    try:
        return datetime.fromisoformat(window)
    except ValueError:
        return None
