"""What every dashboard page shares: the templates, who is looking, and small formatters.

Pages are server-rendered: a page is a template over plain values that the route built
in a thread (the database is synchronous). A page needs a ``read`` token (kept in the
``genmon_token`` cookie by :mod:`.login`); without one the browser is sent to ``/login``.
With ``api.require_token_for_dashboard`` false the dashboard is open and acts as the
caller ``dashboard`` with ``read`` and ``operate`` (for a trusted network, e.g. the demo
on loopback).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from genmon.api.auth import caller_of
from genmon.api.queries import aware
from genmon.api.tokens import Caller
from genmon.schemas.access import Scope
from genmon.settings import Settings

HERE = Path(__file__).parent
#: The caller an open dashboard (``api.require_token_for_dashboard`` false) acts as.
OPEN_DASHBOARD = Caller("dashboard", frozenset({Scope.READ, Scope.OPERATE}))


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """``when`` as a short age: ``42 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``."""
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = (now - aware(when)).total_seconds()
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def stamp(when: datetime | None) -> str:
    """``when`` in UTC to the second, as people read it (``2026-12-07 21:40:05 UTC``)."""
    return "-" if when is None else aware(when).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: float | int | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; ``-`` for none or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def percent(value: float | None, digits: int = 1) -> str:
    """A rate in percent (``12.5 %``)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.{digits}f} %"


def plural(count: int, word: str) -> str:
    """``1 incident``, ``2 incidents`` (regular plurals only: the dashboard's words are)."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(ago=ago, stamp=stamp, number=number, percent=percent, plural=plural)


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def viewer(request: Request, scope: Scope = Scope.READ) -> Caller | Response:
    """Who looks at the page, or the response to send instead: a redirect to ``/login``
    without a valid token, 403 with one that lacks ``scope``."""
    if not settings_of(request).api.require_token_for_dashboard:
        request.state.caller = OPEN_DASHBOARD  # the audit of its writes names it
        return OPEN_DASHBOARD
    caller = await caller_of(request)
    if caller is None:
        if "text/event-stream" in request.headers.get("accept", ""):
            return Response(status_code=401)  # EventSource cannot follow a page; it retries
        if request.headers.get("hx-request"):
            # htmx follows redirects inside the fragment; send the whole page instead.
            return Response(status_code=401, headers={"HX-Redirect": login_url(request)})
        return RedirectResponse(login_url(request), status_code=303)
    if not caller.can(scope):
        return render(
            request,
            "denied.html",
            {"caller": caller, "scope": scope.value, "title": "Not allowed"},
            status_code=403,
        )
    return caller


def login_url(request: Request) -> str:
    """``/login`` with the page to come back to."""
    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(back, safe='')}"


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    """``template`` over ``context`` with what every page uses (settings, the caller)."""
    settings = settings_of(request)
    base = {
        "request": request,
        "link_base": settings.api.link_base(),
        "open_dashboard": not settings.api.require_token_for_dashboard,
        "live_poll_ms": int(settings.api.live_poll_s * 1000),
    }
    return templates.TemplateResponse(
        request, template, {**base, **context}, status_code=status_code
    )
