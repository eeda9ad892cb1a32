"""``GET /metrics``: Prometheus text of the API process (no token: scrapers call it).

What it serves, and how it bounds its reads and its labels: :mod:`genmon.api.metrics`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from genmon.api.metrics import metrics_of

router = APIRouter(tags=["probes"])


@router.get(
    "/metrics",
    summary="Prometheus metrics: ingest, consumer lag, dead letters, detector scores, "
    "incidents, webhook failures, jobs",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    app = request.app
    body = await metrics_of(app).render(app.state.engine, app.state.settings)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
