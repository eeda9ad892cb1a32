"""Signing in to the dashboard: a token pasted once, kept in an HttpOnly cookie.

``/login`` takes a token from its form (or ``?token=...`` once, for a link printed by
``genmon tokens create``), checks it, stores it in the ``genmon_token`` cookie
(``HttpOnly``: page scripts cannot read it; ``SameSite=Strict``: other sites cannot send
it; ``Secure`` when served over HTTPS) and goes back to the page asked for. ``/logout``
drops the cookie.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from genmon.api.auth import TOKEN_COOKIE
from genmon.api.dashboard.web import render, settings_of
from genmon.api.tokens import verify_token
from genmon.schemas.access import Scope

router = APIRouter(include_in_schema=False)

#: How long the browser keeps the cookie (the token's own expiry still applies).
COOKIE_MAX_AGE_S = 7 * 24 * 3600


def _safe_next(value: str | None) -> str:
    """A local path to go back to; anything else (another site) goes to the overview."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/"


@router.get("/login")
async def login_form(
    request: Request, token: str | None = None, next: str | None = None
) -> Response:
    if token:
        return await _sign_in(request, token, _safe_next(next))
    return _form(request, _safe_next(next))


@router.post("/login")
async def login_submit(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    return await _sign_in(request, token, _safe_next((form.get("next") or [""])[0]))


@router.get("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, path="/")
    return response


async def _sign_in(request: Request, token: str, next_path: str) -> Response:
    caller = (
        await run_in_threadpool(verify_token, request.app.state.engine, token) if token else None
    )
    if caller is None:
        return _form(request, next_path, "That token is unknown, revoked or expired.", 401)
    if not caller.can(Scope.READ):
        return _form(
            request,
            next_path,
            f"Token {caller.token_name!r} lacks the read scope the dashboard needs.",
            403,
        )
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https"
        or settings_of(request).api.link_base().startswith("https://"),
    )
    return response


def _form(
    request: Request, next_path: str, error: str | None = None, status: int = 200
) -> Response:
    return render(
        request,
        "login.html",
        {"title": "Sign in to genmon", "next": next_path, "error": error, "caller": None},
        status_code=status,
    )
