"""What the resource routes share: the error answers they declare in the OpenAPI, and
the map from genmon's exceptions to HTTP statuses (404 unknown, 409 a state that forbids
the action, 422 bad input, 503 the database down), so no user input ends in a 500.

Not a route module (its name starts with ``_``): :func:`genmon.api.app.route_modules`
skips it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, HTTPException

from genmon.api.auth import require
from genmon.api.payloads import Problem
from genmon.api.queries import InvalidCursor
from genmon.api.tokens import Caller
from genmon.exceptions import ConfigurationError, DatabaseError
from genmon.incidents.exceptions import IncidentNotFoundError, InvalidTransitionError
from genmon.retrain.exceptions import (
    JobNotFound,
    JobStateError,
    ModelNotRegisteredError,
    RegistryError,
    RolloutNotFound,
    VersionNotFoundError,
)
from genmon.schemas.access import Scope
from genmon.schemas.events import MAX_ID_CHARS

_DESCRIPTIONS = {
    400: "a body that is not JSON",
    401: "no token, or one unknown, revoked or expired",
    403: "the token lacks the scope",
    404: "no such resource",
    409: "the resource's state does not allow this action",
    503: "the database (or the broker) does not answer",
}

#: The error answers of a route that reads a body (FastAPI answers 400 to one that
#: does not parse), with ``problems(*BODY, ...)``.
BODY = (400,)

#: Raised by genmon for an id that names nothing: 404.
NOT_FOUND: tuple[type[Exception], ...] = (
    IncidentNotFoundError,
    JobNotFound,
    ModelNotRegisteredError,
    VersionNotFoundError,
    RolloutNotFound,
)
#: Raised for an action the resource's state forbids: 409 (after NOT_FOUND: a
#: RolloutNotFound is also a RegistryError).
CONFLICT: tuple[type[Exception], ...] = (InvalidTransitionError, JobStateError, RegistryError)

ReadCaller = Annotated[Caller, Depends(require(Scope.READ))]
OperateCaller = Annotated[Caller, Depends(require(Scope.OPERATE))]
AdminCaller = Annotated[Caller, Depends(require(Scope.ADMIN))]


def problems(
    *codes: int, links: dict[str, tuple[str, str]] | None = None, status: int = 200
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: 401, 403, 503 and ``codes`` answered as :class:`Problem`.

    ``links`` (operation id -> (path parameter, runtime expression such as
    ``$response.body#/items/0/id``)) are the OpenAPI links of the ``status`` answer: what
    a client, or Schemathesis' stateful tests, can call next with the ids it just got.
    """
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": Problem, "description": _DESCRIPTIONS[code]}
        for code in sorted({401, 403, 503, *codes})
    }
    if links:
        responses[status] = {
            "links": {
                operation: {"operationId": operation, "parameters": {param: expression}}
                for operation, (param, expression) in links.items()
            }
        }
    return responses


def actor(caller: Caller) -> str:
    """Who did it, as timelines and audit trails record an API caller (cut to fit the
    actor columns: a token's name may already use their whole width)."""
    return f"api:{caller.token_name}"[:MAX_ID_CHARS]


def unprocessable(field: str, message: str, where: str = "query") -> HTTPException:
    """A 422 shaped like FastAPI's own (a list of field errors), naming ``field``."""
    return HTTPException(
        status_code=422,
        detail=[{"loc": [where, field], "msg": message, "type": "value_error"}],
    )


@contextmanager
def answers(field: str = "body") -> Iterator[None]:
    """Turn genmon's errors raised inside the block into their HTTP answers."""
    try:
        yield
    except NOT_FOUND as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except CONFLICT as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except InvalidCursor as exc:
        raise unprocessable("cursor", str(exc)) from exc
    except ConfigurationError as exc:
        raise unprocessable(field, str(exc), "body") from exc
    except DatabaseError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc


def utc(field: str, when: datetime | None) -> datetime | None:
    """``when`` in UTC (naive means UTC); 422 for one that UTC cannot hold (year 9999 at
    a negative offset)."""
    if when is None:
        return None
    try:
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise unprocessable(field, f"{when.isoformat()} is out of range in UTC") from exc
