"""``/v1/models``: registered models, their versions (lineage and metrics) and aliases;
promotion and rollback (admin) through the registry, announced as the CLI announces them
(``<prefix>.models`` and the webhook destinations).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy.engine import Engine

from genmon.api.auth import audited
from genmon.api.payloads import AliasMoves, Model, ModelDetail, PromoteBody, ReasonBody
from genmon.api.queries import open_incidents_by_model
from genmon.api.routes._common import BODY, AdminCaller, ReadCaller, actor, answers, problems
from genmon.db import session_scope
from genmon.retrain.registry import aliases, get_model, list_models, promote, rollback, versions
from genmon.retrain.rollout import active_rollouts, rollback_rollout
from genmon.schemas.events import Identifier, ModelEvent
from genmon.schemas.retrain import RegisteredModel
from genmon.schemas.tables import ModelVersionPublic
from genmon.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelId = Annotated[Identifier, Path()]
#: Tries per announcement send: an API call should answer within seconds even when the
#: broker is down (the move stands; `genmon models announce` publishes it later).
ANNOUNCE_ATTEMPTS = 2


def _links(expression: str) -> dict[str, tuple[str, str]]:
    """Links from an answer holding a model id to the operations on that model."""
    operations = ("getModel", "listModelVersions", "promoteModel", "rollbackModel")
    return {operation: ("model_id", expression) for operation in operations}


def _summary(engine: Engine, model: RegisteredModel, open_incidents: int) -> Model:
    return Model(
        **model.model_dump(),
        aliases=aliases(engine, model.model_id),
        versions=len(versions(engine, model.model_id)),
        open_incidents=open_incidents,
    )


def _open_counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return open_incidents_by_model(session)


@router.get(
    "",
    response_model=list[Model],
    responses=problems(links=_links("$response.body#/0/model_id")),
    summary="List models",
    operation_id="listModels",
)
def list_all(request: Request, _caller: ReadCaller) -> list[Model]:
    """Registered models by id, with aliases, version count and unresolved incidents."""
    engine: Engine = request.app.state.engine
    with answers():
        counts = _open_counts(engine)
        return [_summary(engine, m, counts.get(m.model_id, 0)) for m in list_models(engine)]


@router.get(
    "/{model_id}",
    response_model=ModelDetail,
    responses=problems(404, links=_links("$response.body#/model_id")),
    summary="One model: aliases, watching rollout, lineage",
    operation_id="getModel",
)
def get_one(request: Request, model_id: ModelId, _caller: ReadCaller) -> ModelDetail:
    engine: Engine = request.app.state.engine
    with answers():
        model = get_model(engine, model_id)
        summary = _summary(engine, model, _open_counts(engine).get(model_id, 0))
        watching = active_rollouts(engine, model_id)
        lineage = [ModelVersionPublic.model_validate(v) for v in versions(engine, model_id)]
    return ModelDetail(
        **summary.model_dump(),
        rollout=watching[0].model_dump(mode="json") if watching else None,
        lineage=lineage,
    )


@router.get(
    "/{model_id}/versions",
    response_model=list[ModelVersionPublic],
    responses=problems(404),
    summary="A model's versions, oldest first",
    operation_id="listModelVersions",
)
def list_versions(
    request: Request, model_id: ModelId, _caller: ReadCaller
) -> list[ModelVersionPublic]:
    engine: Engine = request.app.state.engine
    with answers():
        get_model(engine, model_id)
        return [ModelVersionPublic.model_validate(v) for v in versions(engine, model_id)]


@router.post(
    "/{model_id}/promote",
    response_model=AliasMoves,
    responses=problems(*BODY, 404, 409),
    summary="Make a version (default: the challenger) the champion",
    operation_id="promoteModel",
)
def promote_version(
    request: Request, model_id: ModelId, caller: AdminCaller, body: PromoteBody | None = None
) -> AliasMoves:
    body = body or PromoteBody()
    audited(request, "model.promote", model_id, version=body.version)
    with answers():
        get_model(request.app.state.engine, model_id)
        events = promote(
            request.app.state.engine, model_id, body.version, actor(caller), body.reason
        )
    return _announced(request.app.state.settings, events)


@router.post(
    "/{model_id}/rollback",
    response_model=AliasMoves,
    responses=problems(*BODY, 404, 409),
    summary="Roll back the watched challenger, or the champion to the previous version",
    operation_id="rollbackModel",
)
def rollback_version(
    request: Request, model_id: ModelId, caller: AdminCaller, body: ReasonBody | None = None
) -> AliasMoves:
    """As ``genmon models rollback``: while a rollout is watching, its challenger is
    rolled back (the champion keeps serving); otherwise the champion goes back to the
    previous version."""
    reason = body.reason if body else ""
    audited(request, "model.rollback", model_id)
    engine: Engine = request.app.state.engine
    who = actor(caller)
    with answers():
        get_model(engine, model_id)
        watching = active_rollouts(engine, model_id)
        if watching:
            rollout = watching[0]
            said = reason or f"rolled back by {who}"
            events = rollback_rollout(engine, rollout.rollout_id, rollout.result, said, who)
        else:
            events = rollback(engine, model_id, who, reason)
    return _announced(request.app.state.settings, events)


def _announced(settings: Settings, events: list[ModelEvent]) -> AliasMoves:
    """Publish the moves (topic and webhooks); the answer says whether that worked."""
    if not events:
        return AliasMoves(events=[], announced=True, announce_failures=[])
    from genmon.retrain.announce import ModelAnnouncer

    with ModelAnnouncer(settings, attempts=ANNOUNCE_ATTEMPTS) as announcer:
        report = announcer.announce(events)
    return AliasMoves(events=events, announced=report.ok, announce_failures=report.failures)
