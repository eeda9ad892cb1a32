"""Who may call what: bearer tokens checked against their scopes, and the audit of writes.

Routes declare what they need with ``Depends(require(Scope.READ))`` (or ``OPERATE``,
``ADMIN``, ``INGEST``). A token comes as ``Authorization: Bearer gm_...`` or, for the
dashboard's pages, in the ``genmon_token`` cookie. No token, or one that is unknown,
revoked or expired: 401. A token without the scope: 403. Both name what to do.

:func:`audit_writes` (a middleware installed by :func:`genmon.api.app.create_app`) stores
every write (any method but GET, HEAD, OPTIONS) outside ingest, and every refused write,
with the token's name, the action and the target a route put on ``request.state``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from genmon.api import audit
from genmon.api.tokens import Caller, verify_token
from genmon.schemas.access import Scope

#: The cookie the dashboard keeps a token in (set by its sign-in page).
TOKEN_COOKIE = "genmon_token"
#: Writes under these path prefixes are not audited: ingest is counted in /metrics
#: instead, where an audit row per batch would cost a database write per request.
UNAUDITED_PREFIXES = ("/v1/inferences", "/v1/feedback", "/v1/traces")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def presented_token(request: Request) -> str | None:
    """The token the request carries: the bearer header first, then the cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE) or None


async def caller_of(request: Request) -> Caller | None:
    """The request's caller (cached on ``request.state``), or None without a valid token."""
    if hasattr(request.state, "caller"):
        cached: Caller | None = request.state.caller
        return cached
    text = presented_token(request)
    caller = None
    if text:
        caller = await run_in_threadpool(verify_token, request.app.state.engine, text)
    request.state.caller = caller
    return caller


def require(scope: Scope) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency that lets through only a caller whose token allows ``scope``."""

    async def dependency(request: Request) -> Caller:
        caller = await caller_of(request)
        if caller is None:
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is required: create one with "
                f"`genmon tokens create NAME --scope {scope.value}`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not caller.can(scope):
            raise HTTPException(
                status_code=403,
                detail=f"token {caller.token_name!r} lacks the {scope.value!r} scope "
                f"(it has: {', '.join(sorted(s.value for s in caller.scopes)) or 'none'})",
            )
        return caller

    dependency.__name__ = f"require_{scope.value}"
    return dependency


def audited(request: Request, action: str, target: str | None = None, **detail: Any) -> None:
    """Name the action (``incident.ack``) and its target for the audit row of this write."""
    request.state.audit_action = action
    request.state.audit_target = target
    request.state.audit_detail = detail


async def audit_writes(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Middleware: store an audit row for every write answered (allowed or refused)."""
    response = await call_next(request)
    path = request.url.path
    if request.method in READ_METHODS or path.startswith(UNAUDITED_PREFIXES):
        return response
    caller: Caller | None = getattr(request.state, "caller", None)
    await run_in_threadpool(
        audit.record,
        request.app.state.engine,
        token_name=caller.token_name if caller else "-",
        method=request.method,
        path=path,
        status_code=response.status_code,
        action=getattr(request.state, "audit_action", ""),
        target=getattr(request.state, "audit_target", None),
        detail=getattr(request.state, "audit_detail", None),
    )
    return response
