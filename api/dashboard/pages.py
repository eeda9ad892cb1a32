"""The dashboard's pages: models overview, incidents (live), an incident, a model.

Each page checks who looks, reads the database in a thread and renders a template. The
incident list is also served as a fragment (``/incidents/rows``) that htmx fetches again
whenever the live stream (:mod:`.live`) says an incident changed, keeping the filters of
the page. None of these routes is in the OpenAPI document: they answer HTML, for people.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from genmon.api import queries
from genmon.api.dashboard import charts, views
from genmon.api.dashboard.web import plural, render, viewer
from genmon.api.tokens import Caller
from genmon.db import session_scope
from genmon.schemas.events import IncidentStatus, Severity
from genmon.schemas.incidents import Incident

router = APIRouter(include_in_schema=False)

STATUSES = [s.value for s in IncidentStatus]
SEVERITIES = [s.value for s in Severity]
#: Incidents one page of the list shows.
PAGE_SIZE = 50


def _now() -> datetime:
    return datetime.now(UTC)


@router.get("/")
async def models_overview(request: Request) -> Response:
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    return await _in_thread(request, "overview.html", _overview_context, caller=caller)


def _overview_context(request: Request) -> dict[str, object]:
    with session_scope(request.app.state.engine) as session:
        models = views.overview(session, _now())
        counts = queries.open_incident_counts(session)
        recent, _ = queries.incident_page(session, status=views.UNRESOLVED, limit=10)
    unresolved = sum(counts.values())
    return {
        "title": f"{plural(len(models), 'model')}, {plural(unresolved, 'unresolved incident')}",
        "models": models,
        "counts": counts,
        "recent": recent,
        "overview_minutes": views.OVERVIEW_S // 60,
    }


@router.get("/incidents")
async def incident_list(
    request: Request,
    status: Annotated[list[str] | None, Query()] = None,
    model: str | None = None,
    severity: str | None = None,
    cursor: str | None = None,
) -> Response:
    return await _list(request, "incidents.html", status, model, severity, cursor)


@router.get("/incidents/rows")
async def incident_rows(
    request: Request,
    status: Annotated[list[str] | None, Query()] = None,
    model: str | None = None,
    severity: str | None = None,
    cursor: str | None = None,
) -> Response:
    """The list's rows alone: what htmx swaps in when the live stream says so."""
    return await _list(request, "_incident_rows.html", status, model, severity, cursor)


async def _list(
    request: Request,
    template: str,
    status: list[str] | None,
    model: str | None,
    severity: str | None,
    cursor: str | None,
) -> Response:
    """The incident list, as a page or as its rows alone."""
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    filters = _filters(status, model, severity)
    return await _in_thread(
        request, template, _list_context, caller=caller, filters=filters, cursor=cursor
    )


@dataclass(frozen=True)
class Filters:
    """The list's filters, as the page's form and links carry them."""

    status: list[str]
    model: str | None
    severity: str | None

    def query(self) -> list[tuple[str, str]]:
        """The filters as query parameters (for the fragment's and the next page's links)."""
        pairs = [("status", s) for s in self.status]
        named = (("model", self.model), ("severity", self.severity))
        return pairs + [(k, v) for k, v in named if v]


def _filters(status: list[str] | None, model: str | None, severity: str | None) -> Filters:
    """The list's filters, unknown values dropped (a bad link shows everything, not a 500)."""
    return Filters(
        status=[s for s in status or [] if s in STATUSES],
        model=(model or "").strip() or None,
        severity=severity if severity in SEVERITIES else None,
    )


def _list_context(request: Request, filters: Filters, cursor: str | None) -> dict[str, object]:
    with session_scope(request.app.state.engine) as session:

        def page(cursor: str | None) -> tuple[list[Incident], str | None]:
            return queries.incident_page(
                session,
                status=filters.status or None,
                model_id=filters.model,
                severity=filters.severity,
                cursor=cursor,
                limit=PAGE_SIZE,
            )

        try:
            incidents, next_cursor = page(cursor)
        except queries.InvalidCursor:
            incidents, next_cursor = page(None)  # a stale or edited link: the first page
    query = filters.query()
    unresolved = sum(1 for i in incidents if i.status is not IncidentStatus.RESOLVED)
    shown = ", ".join(f"{k} {v}" for k, v in query) or "all"
    return {
        "title": f"Incidents ({shown})",
        "summary": f"{plural(len(incidents), 'incident')} shown, {unresolved} unresolved, "
        "newest first",
        "incidents": incidents,
        "next_cursor": next_cursor,
        "filters": filters,
        "query": query,
        "statuses": STATUSES,
        "severities": SEVERITIES,
    }


@router.get("/incidents/{incident_id}")
async def incident_detail(request: Request, incident_id: str) -> Response:
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    return await _in_thread(
        request, "incident.html", _incident_context, caller=caller, incident_id=incident_id
    )


def _incident_context(request: Request, incident_id: str) -> dict[str, object] | None:
    now = _now()
    with session_scope(request.app.state.engine) as session:
        incident = session.get(Incident, incident_id)
        if incident is None:
            return None
        points, source = views.score_points(session, incident, now)
        comparisons = views.segment_comparison(session, incident, now)
        timeline = queries.incident_timeline(session, incident_id)
    rate = views.rate_name(incident.signal)
    firing = sum(1 for p in points if p.detected)
    where = f"{incident.model_id}" + (
        f" {incident.model_version}" if incident.model_version else ""
    )
    if incident.segment:
        where += f", segment {incident.segment}"
    title = (
        f"{incident.severity.value}: {incident.signal} of {where} "
        f"{incident.last_score:.3g} vs threshold {incident.threshold:.3g}"
    )
    return {
        "title": title,
        "incident": incident,
        "incident_url": request.app.state.settings.api.incident_url(incident.id),
        "score_chart": charts.score_figure(points, incident.signal, source),
        "score_source": source,
        "points": len(points),
        "firing": firing,
        "comparisons": comparisons,
        "comparison_chart": charts.comparison_figure(comparisons, rate) if comparisons else None,
        "rate_name": rate,
        "evidence_segments": views.evidence_segments(incident),
        "clusters": views.clusters(incident),
        "values": views.evidence_values(incident),
        "notes_list": views.evidence_notes(incident),
        "timeline": timeline,
        "span": views.incident_span(incident, now),
    }


@router.get("/models/{model_id:path}")
async def model_detail(request: Request, model_id: str) -> Response:
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    return await _in_thread(request, "model.html", _model_context, caller=caller, model_id=model_id)


def _model_context(request: Request, model_id: str) -> dict[str, object] | None:
    with session_scope(request.app.state.engine) as session:
        page = views.model_page(session, model_id, _now())
    if not page.known:
        return None
    rows = page.rows
    requests = sum(r.requests for r in rows)
    errors = sum(r.errors for r in rows)
    rate = f", {100 * errors / requests:.1f} % errors" if requests else ""
    return {
        "title": f"{model_id}: {plural(len(page.versions), 'version')}, "
        f"{plural(requests, 'request')} in {views.MODEL_CHART_S // 3600} h{rate}, "
        f"{plural(len(page.incidents), 'unresolved incident')}",
        "page": page,
        "charts": [
            charts.traffic_figure(rows, model_id),
            charts.error_rate_figure(rows, model_id),
            charts.latency_figure(rows, model_id),
        ]
        if rows
        else [],
    }


async def _in_thread(
    request: Request,
    template: str,
    build: Callable[..., dict[str, object] | None],
    caller: Caller,
    **kwargs: object,
) -> Response:
    """Build the page's context in a thread (sync database work), then render it; a
    context of None is a 404 page."""
    context = await run_in_threadpool(build, request, **kwargs)
    if context is None:
        return render(
            request,
            "not_found.html",
            {"title": "Not found", "path": request.url.path, "caller": caller},
            status_code=404,
        )
    return render(request, template, {**context, "caller": caller})
