"""``/v1/signals``: what closed windows measured and scored, per model, version and
segment, from the database (window rows, hourly rollups for older periods): no Kafka.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from genmon.api.payloads import SignalPoint, SignalSeries
from genmon.api.queries import MAX_SIGNAL_ROWS, signal_rows
from genmon.api.routes._common import ReadCaller, answers, problems, unprocessable, utc
from genmon.db import session_scope
from genmon.schemas.events import FindingSegment, Identifier
from genmon.schemas.signals import ALL

router = APIRouter(prefix="/v1/signals", tags=["signals"])


@router.get(
    "",
    response_model=SignalSeries,
    responses=problems(),
    summary="Window signals",
    operation_id="getSignals",
)
def get_signals(
    request: Request,
    _caller: ReadCaller,
    model_id: Identifier,
    version: Identifier = ALL,
    segment: Annotated[FindingSegment, Query(min_length=1)] = ALL,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SIGNAL_ROWS)] = 5000,
) -> SignalSeries:
    """One series, oldest first: ``version`` and ``segment`` ``*`` (the default) are the
    whole model; a segment reads ``key=value`` as the windows name it. Over ``limit``
    rows, the newest are kept."""
    since, until = utc("since", since), utc("until", until)
    if since is not None and until is not None and since >= until:
        raise unprocessable("until", "until must be after since")
    with answers(), session_scope(request.app.state.engine) as session:
        rows = signal_rows(
            session,
            model_id,
            version=version,
            segment=segment,
            since=since,
            until=until,
            limit=limit,
        )
    return SignalSeries(
        model_id=model_id,
        version=version,
        segment=segment,
        points=[SignalPoint.model_validate(row) for row in rows],
    )
