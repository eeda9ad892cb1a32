"""The model registry: registered base weights, versions with lineage, movable aliases.

A model becomes retrainable when registered: its base weights (a local folder or a model
id in the local Hugging Face cache, resolved offline), their fingerprint and the version
serving now. Every later version is exactly one LoRA adapter on that base, with its
lineage (parent version, job, dataset hash, incidents, gate metrics, artifact URI).

Aliases (``champion``, ``challenger``, ``previous``) are MLflow-style movable pointers.
Each move is **one transaction** that also keeps ``model_version.status`` in step:

- champion -> V: the old champion becomes ``previous`` and ``retired``; V becomes
  ``active`` (the one-active unique index of ``model_version`` makes a second active row
  impossible) and the model's ``serving_version``; a challenger that was V is unset;
- rollback: champion goes back to ``previous``; the version rolled back is
  ``rolled_back`` (and so is the job that produced it);
- challenger -> V or unset: statuses do not change (a challenger serves at most a share of
  traffic, under a rollout: :mod:`genmon.retrain.rollout`).

A watching rollout ends with any move that breaks its comparison, in the same transaction:
promoting its challenger by hand confirms it; another champion, or another challenger,
cancels it (and a new champion also unsets the challenger, so serving stops splitting).

Every move returns the :class:`~genmon.schemas.events.ModelEvent` s it made, one per alias
changed, for :class:`genmon.retrain.announce.ModelAnnouncer` to publish *after* the commit.
Moves of one model are serialized: each transaction first writes the model's
``registered_model`` row (a row lock on PostgreSQL, the write lock on SQLite), so two
concurrent promotions run one after the other and never leave two champions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from genmon.db import session_scope
from genmon.retrain.exceptions import (
    AliasConflictError,
    ModelNotRegisteredError,
    RegistryError,
    VersionNotFoundError,
)
from genmon.schemas.events import ModelAlias, ModelEvent, RetrainStatus, RolloutStatus, utcnow
from genmon.schemas.retrain import ModelAliasRow, RegisteredModel, RetrainJobAudit, Rollout
from genmon.schemas.tables import MAX_REASON_CHARS, ModelVersion, ModelVersionStatus, RetrainJob

__all__ = [
    "AliasConflictError",
    "ModelNotRegisteredError",
    "RegistryError",
    "VersionNotFoundError",
    "adapter_uri",
    "aliases",
    "create_version",
    "current_events",
    "get_model",
    "get_version",
    "list_models",
    "move_alias",
    "next_version_name",
    "promote",
    "register_model",
    "rollback",
    "versions",
]

_VERSION_NAME = re.compile(r"^v(\d+)$")


# --- reading --------------------------------------------------------------------------


def list_models(engine: Engine) -> list[RegisteredModel]:
    """Every registered model, by id."""
    with session_scope(engine) as session:
        return list(session.exec(select(RegisteredModel).order_by(RegisteredModel.model_id)))


def get_model(engine: Engine, model_id: str) -> RegisteredModel:
    """The registered model ``model_id``; :class:`ModelNotRegisteredError` if none."""
    with session_scope(engine) as session:
        return _model(session, model_id)


def aliases(engine: Engine, model_id: str) -> dict[str, str]:
    """Alias -> version of ``model_id`` (aliases that are unset are absent)."""
    with session_scope(engine) as session:
        return _aliases(session, model_id)


def versions(engine: Engine, model_id: str) -> list[ModelVersion]:
    """Every version of ``model_id``, oldest first."""
    with session_scope(engine) as session:
        query = (
            select(ModelVersion)
            .where(ModelVersion.model_id == model_id)
            .order_by(col(ModelVersion.created_at), col(ModelVersion.id))
        )
        return list(session.exec(query))


def get_version(engine: Engine, model_id: str, version: str) -> ModelVersion:
    """One version; :class:`VersionNotFoundError` if the model has no such version."""
    with session_scope(engine) as session:
        return _version(session, model_id, version)


def adapter_uri(row: ModelVersion) -> str | None:
    """The version's adapter, or ``None`` for a version that is its base weights alone."""
    if not row.artifact_uri or row.artifact_uri == row.base_uri:
        return None
    return row.artifact_uri


def next_version_name(engine: Engine, model_id: str) -> str:
    """``v<N+1>``, N the highest ``v<number>`` version of the model so far (``v1`` if none)."""
    with session_scope(engine) as session:
        return _next_name(session, model_id)


def current_events(engine: Engine, model_id: str, actor: str = "genmon") -> list[ModelEvent]:
    """An ``announced`` event for each alias set now: what a re-announcement publishes
    when an earlier announcement was lost (followers take it as the current state). The
    challenger of a watching rollout carries its share of traffic again."""
    with session_scope(engine) as session:
        _model(session, model_id)
        watching = _watching(session, model_id)
        events = []
        for alias, version in _aliases(session, model_id).items():
            share = None
            if watching is not None and (alias, version) == ("challenger", watching.challenger):
                share = watching.share
            events.append(
                _event(session, model_id, alias, version, None, "announced", actor, "", share)
            )
        return events


# --- registering and recording versions ----------------------------------------------


def register_model(
    engine: Engine,
    model_id: str,
    base_uri: str,
    serving_version: str,
    actor: str = "genmon",
    *,
    force: bool = False,
    announce: Callable[[list[ModelEvent]], object] | None = None,
) -> RegisteredModel:
    """Make ``model_id`` retrainable: its base weights, their fingerprint, its serving version.

    The base is resolved offline (:func:`genmon.retrain.lm.resolve_base`) and fingerprinted
    (sha256 of the weight files). The serving version gets a ``model_version`` row that is
    the base alone (``artifact_uri`` = the base, no adapter), ``active``, and ``champion``
    points at it. Registering again with the same weights is idempotent (a different
    serving version moves champion to it); different weights are refused unless ``force``,
    since every version tuned so far is an adapter for the old ones.
    ``announce`` gets the alias events after the commit.
    """
    from genmon.retrain import lm  # torch: loaded only by the commands that need it

    lm.resolve_base(base_uri)
    fingerprint = lm.fingerprint_weights(base_uri)
    with _transaction(engine) as session:
        if _touch(session, model_id):
            model = _model(session, model_id)
            _check_same_base(model, base_uri, fingerprint, force)
            model.base_uri, model.base_fingerprint = base_uri, fingerprint
            session.add(model)
        else:
            model = RegisteredModel(
                model_id=model_id,
                base_uri=base_uri,
                base_fingerprint=fingerprint,
                serving_version=serving_version,
                registered_by=actor,
            )
            session.add(model)
        session.flush()
        row = session.exec(_version_query(model_id, serving_version)).first()
        if row is None:
            session.add(
                ModelVersion(
                    model_id=model_id,
                    version=serving_version,
                    artifact_uri=base_uri,
                    base_uri=base_uri,
                    base_fingerprint=fingerprint,
                )
            )
            session.flush()
        elif row.base_fingerprint not in (None, fingerprint):
            raise RegistryError(
                f"{model_id} {serving_version} already names the weights with fingerprint "
                f"{row.base_fingerprint[:12]}; give the new weights a new serving version "
                f"(--serving-version {_next_name(session, model_id)})"
            )
        reason = f"registered on {base_uri}"
        events = _move_champion(session, model_id, serving_version, actor, reason, "registered")
    if announce is not None and events:
        announce(events)
    return model


def _check_same_base(model: RegisteredModel, base_uri: str, fingerprint: str, force: bool) -> None:
    if model.base_fingerprint == fingerprint or force:
        return
    raise RegistryError(
        f"model {model.model_id!r} is registered on {model.base_uri} (fingerprint "
        f"{model.base_fingerprint[:12]}); the weights at {base_uri} differ (fingerprint "
        f"{fingerprint[:12]}), and every version tuned so far is an adapter for the old ones. "
        "Pass --force (force=True) to re-register it on the new weights."
    )


def create_version(
    engine: Engine,
    model_id: str,
    version: str | None,
    artifact_uri: str,
    parent_version: str | None,
    job_id: str | None = None,
    dataset_hash: str | None = None,
    incident_ids: Sequence[str] = (),
    metrics: dict[str, Any] | None = None,
    *,
    base_uri: str | None = None,
    base_fingerprint: str | None = None,
) -> ModelVersion:
    """Record a candidate version (one adapter on the model's base) with its lineage.

    ``version`` ``None`` takes :func:`next_version_name` in the same transaction. The base
    defaults to the registered one. Idempotent per job: a job that records its version
    again (a retry after a crash) gets the row it made the first time.
    """
    with _transaction(engine) as session:
        model = _lock_model(session, model_id)
        if job_id is not None:
            done = session.exec(
                select(ModelVersion).where(
                    ModelVersion.model_id == model_id, ModelVersion.job_id == job_id
                )
            ).first()
            if done is not None:
                return done
        name = version or _next_name(session, model_id)
        if session.exec(_version_query(model_id, name)).first() is not None:
            raise RegistryError(
                f"model {model_id!r} already has a version {name!r}; choose another name "
                f"(next free: {_next_name(session, model_id)})"
            )
        if parent_version is not None:
            _version(session, model_id, parent_version)
        row = ModelVersion(
            model_id=model_id,
            version=name,
            artifact_uri=artifact_uri,
            parent_version=parent_version,
            job_id=job_id,
            eval_metrics=dict(metrics or {}),
            base_uri=base_uri or model.base_uri,
            base_fingerprint=base_fingerprint or model.base_fingerprint,
            dataset_hash=dataset_hash,
            incident_ids=list(incident_ids),
        )
        session.add(row)
        session.flush()
        return row


# --- moving aliases ---------------------------------------------------------------------


def move_alias(
    engine: Engine,
    model_id: str,
    alias: str | ModelAlias,
    version: str | None,
    actor: str = "genmon",
    reason: str = "",
) -> list[ModelEvent]:
    """Point ``alias`` of ``model_id`` at ``version`` (``None``: unset it), atomically.

    Returns the events of every alias that changed, the one asked for first (a champion
    move also moves ``previous`` and may unset ``challenger``); empty when nothing changed.
    """
    name = ModelAlias(alias)
    with _transaction(engine) as session:
        _lock_model(session, model_id)
        if name is ModelAlias.CHAMPION:
            if version is None:
                raise RegistryError(
                    f"champion of {model_id!r} cannot be unset: something must serve; "
                    "`genmon models rollback` goes back to the previous version"
                )
            return _move_champion(session, model_id, version, actor, reason, "promoted")
        if version is not None:
            _version(session, model_id, version)
            if (
                name is ModelAlias.CHALLENGER
                and _aliases(session, model_id).get(ModelAlias.CHAMPION.value) == version
            ):
                raise RegistryError(
                    f"{model_id} {version} is the champion already; a challenger is a "
                    "candidate that does not serve yet"
                )
        action = "unset" if version is None else name.value
        event = _set_alias(session, model_id, name, version, actor, reason, action)
        watching = _watching(session, model_id) if event is not None else None
        if name is ModelAlias.CHALLENGER and watching is not None:
            said = f"challenger moved to {version or 'nothing'} by hand by {actor}"
            _decide(session, watching, RolloutStatus.CANCELLED, actor, reason or said)
        return [event] if event is not None else []


def promote(
    engine: Engine,
    model_id: str,
    version: str | None = None,
    actor: str = "genmon",
    reason: str = "",
) -> list[ModelEvent]:
    """Make ``version`` (default: the challenger) the champion; see :func:`move_alias`."""
    if version is None:
        version = aliases(engine, model_id).get(ModelAlias.CHALLENGER.value)
        if version is None:
            raise RegistryError(
                f"{model_id!r} has no challenger to promote; name the version "
                f"(`genmon models promote {model_id} VERSION`)"
            )
    return move_alias(engine, model_id, ModelAlias.CHAMPION, version, actor, reason)


def rollback(
    engine: Engine, model_id: str, actor: str = "genmon", reason: str = ""
) -> list[ModelEvent]:
    """Champion back to ``previous``; the version rolled back is marked ``rolled_back``.

    ``previous`` is unset afterwards (the registry keeps one step of history), so a second
    rollback refuses instead of bouncing back to the bad version.
    """
    with _transaction(engine) as session:
        _lock_model(session, model_id)
        current = _aliases(session, model_id)
        target = current.get(ModelAlias.PREVIOUS.value)
        bad = current.get(ModelAlias.CHAMPION.value)
        if target is None or bad is None:
            raise RegistryError(
                f"{model_id!r} has no previous version to roll back to; promote a version "
                f"by name instead (`genmon models promote {model_id} VERSION`)"
            )
        events = _move_champion(
            session, model_id, target, actor, reason, "rolled_back", keep_previous=False
        )
        _mark_rolled_back(session, model_id, bad, actor, reason)
        unset = _set_alias(
            session, model_id, ModelAlias.PREVIOUS, None, actor, reason, "rolled_back"
        )
        return [*events, *([unset] if unset is not None else [])]


# --- inside one transaction -----------------------------------------------------------


@contextmanager
def _transaction(engine: Engine) -> Iterator[Session]:
    """:func:`genmon.db.session_scope`, turning a lost race on a unique index into
    :class:`AliasConflictError` (safe to run again)."""
    try:
        with session_scope(engine) as session:
            yield session
    except IntegrityError as error:
        raise AliasConflictError(
            "another change to the same model's versions or aliases won a race "
            f"({' '.join(str(error.orig).split())[:200]}); run the command again"
        ) from error


def _touch(session: Session, model_id: str) -> bool:
    """Write the model's row first, so later moves of the same model wait for this
    transaction (row lock on PostgreSQL, write lock on SQLite); ``False``: no such model."""
    touched = session.execute(
        sa.update(RegisteredModel)
        .where(col(RegisteredModel.model_id) == model_id)
        .values(updated_at=utcnow())
    )
    return bool(getattr(touched, "rowcount", 0))


def _lock_model(session: Session, model_id: str) -> RegisteredModel:
    """The model, locked for this transaction (call it before reading anything else)."""
    if not _touch(session, model_id):
        raise _not_registered(model_id)
    return _model(session, model_id)


def _move_champion(
    session: Session,
    model_id: str,
    version: str,
    actor: str,
    reason: str,
    action: str,
    *,
    keep_previous: bool = True,
) -> list[ModelEvent]:
    target = _version(session, model_id, version)
    current = _aliases(session, model_id)
    old = current.get(ModelAlias.CHAMPION.value)
    if old == version:
        return []
    now = utcnow()
    for active in session.exec(
        select(ModelVersion).where(
            ModelVersion.model_id == model_id, ModelVersion.status == ModelVersionStatus.ACTIVE
        )
    ):
        if active.version != version:
            # The rollback path overwrites this with ROLLED_BACK in the same transaction.
            active.status = ModelVersionStatus.RETIRED
            session.add(active)
    session.flush()  # retire first: the one-active index sees one active row at a time
    target.status, target.promoted_at = ModelVersionStatus.ACTIVE, now
    session.add(target)
    model = _model(session, model_id)
    model.serving_version, model.updated_at = version, now
    session.add(model)
    session.flush()
    events = [_set_alias(session, model_id, ModelAlias.CHAMPION, version, actor, reason, action)]
    if old is not None and keep_previous:
        events.append(
            _set_alias(session, model_id, ModelAlias.PREVIOUS, old, actor, reason, action)
        )
    if current.get(ModelAlias.CHALLENGER.value) == version:
        events.append(
            _set_alias(session, model_id, ModelAlias.CHALLENGER, None, actor, reason, action)
        )
    events += _settle_watching(session, model_id, version, actor, reason, action)
    return [event for event in events if event is not None]


def _settle_watching(
    session: Session, model_id: str, champion: str, actor: str, reason: str, action: str
) -> list[ModelEvent | None]:
    """A champion moved outside the watch ends a watching rollout: its challenger promoted
    by hand confirms it (a person decided); any other champion cancels it, since the
    comparison no longer holds, and unsets the challenger so serving stops splitting."""
    watching = _watching(session, model_id)
    if watching is None:
        return []
    said = f"{champion} made champion ({action}) by {actor}" + (f": {reason}" if reason else "")
    if watching.challenger == champion:
        _decide(session, watching, RolloutStatus.CONFIRMED, actor, said)
        return []
    _decide(session, watching, RolloutStatus.CANCELLED, actor, said)
    if _aliases(session, model_id).get(ModelAlias.CHALLENGER.value) != watching.challenger:
        return []
    return [_set_alias(session, model_id, ModelAlias.CHALLENGER, None, actor, said, "cancelled")]


def _watching(session: Session, model_id: str) -> Rollout | None:
    """The model's watching rollout (the partial unique index allows one)."""
    query = select(Rollout).where(
        Rollout.model_id == model_id, Rollout.status == RolloutStatus.WATCHING
    )
    return session.exec(query).first()


def _decide(
    session: Session,
    rollout: Rollout,
    status: RolloutStatus,
    actor: str,
    reason: str,
    result: dict[str, Any] | None = None,
) -> None:
    """Record the decision on ``rollout`` (the alias moves are the caller's, in the same
    transaction)."""
    rollout.status, rollout.decided_at, rollout.decided_by = status, utcnow(), actor
    rollout.reason = reason[:MAX_REASON_CHARS]
    if result is not None:
        rollout.result = dict(result)
    session.add(rollout)
    session.flush()


def _set_alias(
    session: Session,
    model_id: str,
    alias: ModelAlias,
    version: str | None,
    actor: str,
    reason: str,
    action: str,
    traffic_share: float | None = None,
) -> ModelEvent | None:
    """Point one alias (``None``: delete it); its event, or ``None`` when nothing changed.
    ``traffic_share``: the challenger's share of traffic, for serving to split on."""
    row = session.get(ModelAliasRow, (model_id, alias.value))
    before = row.version if row is not None else None
    if before == version:
        return None
    if version is None:
        session.delete(row)
    elif row is None:
        session.add(
            ModelAliasRow(model_id=model_id, alias=alias.value, version=version, updated_by=actor)
        )
    else:
        row.version, row.updated_at, row.updated_by = version, utcnow(), actor
        session.add(row)
    session.flush()
    return _event(
        session, model_id, alias.value, version, before, action, actor, reason, traffic_share
    )


def _event(
    session: Session,
    model_id: str,
    alias: str,
    version: str | None,
    previous: str | None,
    action: str,
    actor: str,
    reason: str,
    traffic_share: float | None = None,
) -> ModelEvent:
    row = session.exec(_version_query(model_id, version)).first() if version else None
    return ModelEvent(
        model_id=model_id,
        alias=ModelAlias(alias),
        version=version,
        previous_version=previous,
        artifact_uri=adapter_uri(row) if row is not None else None,
        base_uri=row.base_uri if row is not None else None,
        action=action,
        reason=reason[:1024],
        traffic_share=traffic_share,
        actor=actor,
    )


def _mark_rolled_back(
    session: Session, model_id: str, version: str, actor: str, reason: str
) -> None:
    """The rolled-back version, and the job that produced it, say so."""
    row = _version(session, model_id, version)
    row.status = ModelVersionStatus.ROLLED_BACK
    session.add(row)
    if row.job_id is None:
        return
    job = session.get(RetrainJob, row.job_id)
    if job is None or job.status is not RetrainStatus.PROMOTED:
        return
    job.status, job.updated_at = RetrainStatus.ROLLED_BACK, utcnow()
    session.add(job)
    session.add(
        RetrainJobAudit(
            job_id=job.job_id,
            from_status=RetrainStatus.PROMOTED.value,
            to_status=RetrainStatus.ROLLED_BACK.value,
            actor=actor,
            lease_epoch=job.lease_epoch,
            reason=reason or f"{model_id} {version} rolled back",
        )
    )


def _model(session: Session, model_id: str) -> RegisteredModel:
    model = session.get(RegisteredModel, model_id)
    if model is None:
        raise _not_registered(model_id)
    return model


def _not_registered(model_id: str) -> ModelNotRegisteredError:
    return ModelNotRegisteredError(
        f"model {model_id!r} is not registered; register it with "
        f"`genmon models register {model_id} --base PATH --serving-version v1`"
    )


def _version_query(model_id: str, version: str | None) -> Any:
    return select(ModelVersion).where(
        ModelVersion.model_id == model_id, ModelVersion.version == version
    )


def _version(session: Session, model_id: str, version: str) -> ModelVersion:
    row = session.exec(_version_query(model_id, version)).first()
    if row is None:
        raise VersionNotFoundError(
            f"model {model_id!r} has no version {version!r}; `genmon models show {model_id}` "
            "lists its versions"
        )
    return row


def _aliases(session: Session, model_id: str) -> dict[str, str]:
    rows = session.exec(select(ModelAliasRow).where(ModelAliasRow.model_id == model_id))
    return {row.alias: row.version for row in rows}


def _next_name(session: Session, model_id: str) -> str:
    names = session.exec(select(ModelVersion.version).where(ModelVersion.model_id == model_id))
    numbers = [int(found.group(1)) for name in names if (found := _VERSION_NAME.match(name))]
    return f"v{max(numbers, default=0) + 1}"
