"""``/v1/silences``: list, add and expire silences (as ``genmon silences`` does).

A silence mutes the pages of the incidents whose labels match every matcher; incidents
are still opened and kept.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlmodel import col, select

from genmon.api.auth import audited
from genmon.api.payloads import SilenceCreate, SilencePublic
from genmon.api.routes._common import BODY, OperateCaller, ReadCaller, actor, answers, problems
from genmon.db import session_scope
from genmon.incidents.exceptions import IncidentNotFoundError
from genmon.incidents.routing import parse_matchers
from genmon.schemas.events import Identifier, utcnow
from genmon.schemas.incidents import Silence

router = APIRouter(prefix="/v1/silences", tags=["silences"])

SilenceId = Annotated[Identifier, Path()]


def public(silence: Silence) -> SilencePublic:
    now = utcnow()
    active = silence.starts_at <= now < silence.ends_at
    return SilencePublic.model_validate({**silence.model_dump(), "active": active})


@router.get(
    "",
    response_model=list[SilencePublic],
    responses=problems(links={"expireSilence": ("silence_id", "$response.body#/0/id")}),
    summary="List silences",
    operation_id="listSilences",
)
def list_silences(
    request: Request, _caller: ReadCaller, include_expired: bool = False
) -> list[SilencePublic]:
    """Silences in force (or every one, with ``include_expired``), ending soonest first."""
    query = select(Silence).order_by(col(Silence.ends_at), col(Silence.id))
    if not include_expired:
        query = query.where(Silence.ends_at > utcnow())
    with answers(), session_scope(request.app.state.engine) as session:
        return [public(s) for s in session.exec(query.limit(1000))]


@router.post(
    "",
    response_model=SilencePublic,
    status_code=201,
    responses=problems(
        *BODY, links={"expireSilence": ("silence_id", "$response.body#/id")}, status=201
    ),
    summary="Add a silence starting now",
    operation_id="createSilence",
)
def create_silence(request: Request, body: SilenceCreate, caller: OperateCaller) -> SilencePublic:
    from datetime import timedelta

    audited(request, "silence.create", None, matchers=body.matchers)
    with answers("matchers"):
        parsed = parse_matchers(body.matchers)
    now = utcnow()
    silence = Silence(
        matchers=[str(m) for m in parsed],
        starts_at=now,
        ends_at=now + timedelta(seconds=body.duration_s),
        created_by=actor(caller),
        comment=body.comment,
    )
    with answers(), session_scope(request.app.state.engine) as session:
        session.add(silence)
    request.state.audit_target = silence.id
    return public(silence)


@router.post(
    "/{silence_id}/expire",
    response_model=SilencePublic,
    responses=problems(404),
    summary="End a silence now",
    operation_id="expireSilence",
)
def expire_silence(
    request: Request, silence_id: SilenceId, _caller: OperateCaller
) -> SilencePublic:
    audited(request, "silence.expire", silence_id)
    with answers(), session_scope(request.app.state.engine) as session:
        silence = session.get(Silence, silence_id)
        if silence is None:
            raise IncidentNotFoundError(
                f"no silence {silence_id!r}; GET /v1/silences?include_expired=true lists them"
            )
        silence.ends_at = min(silence.ends_at, utcnow())
        session.add(silence)
    return public(silence)
