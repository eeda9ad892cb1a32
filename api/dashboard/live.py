"""``/events``: server-sent events that tell open pages an incident changed.

The stream polls the database every ``api.live_poll_s`` for a marker of the incident
table (latest ``updated_at`` and the row count: an incident opening, changing or being
pruned moves it) and sends ``event: incidents`` when it moves; the page's script then
has htmx fetch the list fragment again, with the page's filters. Polling the database
rather than Kafka keeps the API free of consumers and shows exactly what the database
holds. Between changes a comment line every :data:`KEEPALIVE_S` keeps proxies from
closing an idle stream. The stream ends when the client goes away, and after
:data:`MAX_STREAM_S` in any case (the browser reconnects by itself, after ``retry``),
so a server that is shutting down never waits on an open page.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from genmon.api.dashboard import views
from genmon.api.dashboard.web import settings_of, viewer
from genmon.db import session_scope
from genmon.exceptions import DatabaseError

router = APIRouter(include_in_schema=False)

KEEPALIVE_S = 15.0
MAX_STREAM_S = 300.0
#: What the browser waits before reconnecting, in milliseconds.
RETRY_MS = 2000


def _marker(request: Request) -> str | None:
    try:
        with session_scope(request.app.state.engine) as session:
            return views.live_marker(session)
    except DatabaseError:
        return None  # a database away for a moment: say nothing, try again next poll


async def stream(request: Request) -> AsyncIterator[str]:
    """The event stream: ``incidents`` whenever the marker moves, comments in between."""
    poll_s = settings_of(request).api.live_poll_s
    started = last_sent = time.monotonic()
    # The marker is read before the first line goes out: a change made once the client
    # has seen the stream open is always one the stream reports.
    marker = await run_in_threadpool(_marker, request)
    yield f"retry: {RETRY_MS}\n: connected\n\n"
    while time.monotonic() - started < MAX_STREAM_S:
        await asyncio.sleep(poll_s)
        if await request.is_disconnected():
            return
        current = await run_in_threadpool(_marker, request)
        if current is not None and current != marker:
            marker = current
            last_sent = time.monotonic()
            yield f"event: incidents\ndata: {current}\n\n"
        elif time.monotonic() - last_sent >= KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


@router.get("/events")
async def events(request: Request) -> Response:
    caller = await viewer(request)
    if isinstance(caller, Response):
        return caller
    return StreamingResponse(
        stream(request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
