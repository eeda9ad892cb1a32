"""Rollouts: a challenger on a share of traffic, watched against the champion, then decided.

genmon does not route traffic; the rollout is a contract with the serving system. Starting
one points the ``challenger`` alias at the version and announces it on ``<prefix>.models``
with ``traffic_share``: serving sends that share of requests to it (genmon's follower can
split them) and logs the version of every request. The rollout watcher
(:mod:`genmon.retrain.watch`) compares the two versions on the traffic they serve at the
same time and, through the functions here, decides:

- :func:`confirm_rollout`: the watch ended clean; ``champion`` -> the challenger, the old
  champion -> ``previous``, the challenger alias unset;
- :func:`rollback_rollout`: the challenger regressed (or a person stopped it); the
  challenger alias is unset, the version is ``rolled_back`` and so is the job that made it.
  A rolled-back version never starts a rollout again: only a person promotes it
  (``genmon models promote``);
- :func:`end_rollout`: ``cancelled`` or ``inconclusive``; the challenger alias is unset.

Each is **one transaction** with the alias moves, serialized per model like every registry
move (the model's row is written first), and returns the
:class:`~genmon.schemas.events.ModelEvent` s to announce after the commit. At most one
rollout of a model is ``watching`` (a partial unique index): a second start is refused
unless it replaces the first (a newer retrained version does).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.db import session_scope
from genmon.retrain.exceptions import RolloutError, RolloutNotFound
from genmon.retrain.registry import (
    _aliases,
    _decide,
    _event,
    _lock_model,
    _mark_rolled_back,
    _move_champion,
    _set_alias,
    _transaction,
    _version,
    _watching,
)
from genmon.schemas.events import ModelAlias, ModelEvent, RolloutStatus
from genmon.schemas.retrain import Rollout
from genmon.schemas.tables import ModelVersionStatus

#: The detector name of the watch's findings: their incidents never ask for a retrain.
ROLLOUT_DETECTOR = "rollout_watch"
#: Statuses :func:`end_rollout` records (confirm and roll back have their own functions).
ENDINGS = frozenset({RolloutStatus.CANCELLED, RolloutStatus.INCONCLUSIVE})

__all__ = [
    "ENDINGS",
    "ROLLOUT_DETECTOR",
    "active_rollouts",
    "confirm_rollout",
    "end_rollout",
    "get_rollout",
    "latest_rollout",
    "list_rollouts",
    "rollback_rollout",
    "save_watch",
    "share_text",
    "start_rollout",
]


def share_text(share: float) -> str:
    """``0.1`` -> ``"10%"``, ``0.025`` -> ``"2.5%"``."""
    return f"{share * 100:.3g}%"


# --- reading --------------------------------------------------------------------------


def active_rollouts(engine: Engine, model_id: str | None = None) -> list[Rollout]:
    """The rollouts being watched (of ``model_id``, or of every model), oldest first."""
    with session_scope(engine) as session:
        query = select(Rollout).where(Rollout.status == RolloutStatus.WATCHING)
        if model_id is not None:
            query = query.where(Rollout.model_id == model_id)
        return list(session.exec(query.order_by(col(Rollout.started_at))))


def list_rollouts(engine: Engine, model_id: str | None = None, limit: int = 20) -> list[Rollout]:
    """The latest rollouts, decided or not, newest first (the history)."""
    with session_scope(engine) as session:
        query = select(Rollout)
        if model_id is not None:
            query = query.where(Rollout.model_id == model_id)
        query = query.order_by(col(Rollout.started_at).desc()).limit(limit)
        return list(session.exec(query))


def get_rollout(engine: Engine, rollout_id: str) -> Rollout:
    """One rollout; :class:`RolloutNotFound` if there is none with this id."""
    with session_scope(engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise RolloutNotFound(rollout_id)
        return rollout


def latest_rollout(engine: Engine, model_id: str) -> Rollout | None:
    """The model's most recent rollout, whatever its status; ``None`` if it never had one."""
    found = list_rollouts(engine, model_id, limit=1)
    return found[0] if found else None


# --- starting -------------------------------------------------------------------------


def start_rollout(
    engine: Engine,
    model_id: str,
    version: str,
    share: float,
    actor: str = "genmon",
    reason: str = "",
    job_id: str | None = None,
    *,
    replace: bool = False,
) -> tuple[Rollout, list[ModelEvent]]:
    """Put ``version`` on ``share`` of traffic as the challenger and start its watch.

    Refused (:class:`RolloutError`, saying what to run) for the champion itself, a
    rolled-back version, a model without a champion, or while another rollout is watching
    (``replace=True`` cancels that one: a newer challenger takes its place). Idempotent per
    job: a job that starts its rollout again (a retry after a crash) gets the first one and
    no events.
    """
    if not 0.0 < share < 1.0:
        raise RolloutError(
            f"a challenger's share of traffic must be between 0 and 1 (exclusive), not "
            f"{share:g}; e.g. --share 0.1 for 10%"
        )
    with _transaction(engine) as session:
        _lock_model(session, model_id)
        done = _of_job(session, model_id, version, job_id)
        if done is not None:
            return done, []
        champion = _check_start(session, model_id, version)
        _replace_watching(session, model_id, version, actor, replace)
        rollout = Rollout(
            model_id=model_id,
            champion=champion,
            challenger=version,
            share=share,
            job_id=job_id,
            started_by=actor,
            reason=reason[:1024],
        )
        session.add(rollout)
        session.flush()
        said = f"challenger on {share_text(share)} of traffic (rollout {rollout.rollout_id})"
        said += f": {reason}" if reason else ""
        return rollout, [_announce_challenger(session, rollout, actor, said)]


def _of_job(session: Session, model_id: str, version: str, job_id: str | None) -> Rollout | None:
    if job_id is None:
        return None
    query = select(Rollout).where(
        Rollout.model_id == model_id, Rollout.job_id == job_id, Rollout.challenger == version
    )
    return session.exec(query).first()


def _check_start(session: Session, model_id: str, version: str) -> str:
    """The champion the challenger will be compared against; refuses what cannot start."""
    row = _version(session, model_id, version)
    champion = _aliases(session, model_id).get(ModelAlias.CHAMPION.value)
    if champion is None:
        raise RolloutError(
            f"{model_id!r} has no champion to compare a challenger with; "
            f"`genmon models promote {model_id} {version}` makes it serve directly"
        )
    if champion == version:
        raise RolloutError(
            f"{model_id} {version} is the champion already: it serves all traffic. Roll out "
            f"another version (`genmon models show {model_id}` lists them)"
        )
    if row.status is ModelVersionStatus.ROLLED_BACK:
        raise RolloutError(
            f"{model_id} {version} was rolled back and is never rolled out again "
            f"automatically; if a person decides it should serve, `genmon models promote "
            f"{model_id} {version}`"
        )
    return champion


def _replace_watching(
    session: Session, model_id: str, version: str, actor: str, replace: bool
) -> None:
    """Cancel the watching rollout for ``replace``; refuse to start beside it otherwise.
    (Its challenger alias moves on to the new version with the announcement.)"""
    watching = _watching(session, model_id)
    if watching is None:
        return
    if not replace:
        raise RolloutError(
            f"rollout {watching.rollout_id} of {model_id} {watching.challenger} is watching "
            f"(since {watching.started_at:%Y-%m-%d %H:%M} UTC); wait for its decision, stop it "
            f"with `genmon models rollback {model_id}`, or replace it (`genmon models rollout "
            f"{model_id} {version} --replace`)"
        )
    said = f"replaced by a rollout of {version}"
    _decide(session, watching, RolloutStatus.CANCELLED, actor, said)


def _announce_challenger(session: Session, rollout: Rollout, actor: str, reason: str) -> ModelEvent:
    """Point the challenger alias at the rollout's version, with its share of traffic.

    The alias may point there already (set by hand): the event is made anyway, since
    serving learns the share only from it."""
    model_id, version = rollout.model_id, rollout.challenger
    event = _set_alias(
        session,
        model_id,
        ModelAlias.CHALLENGER,
        version,
        actor,
        reason,
        "challenger",
        traffic_share=rollout.share,
    )
    if event is None:
        event = _event(
            session,
            model_id,
            ModelAlias.CHALLENGER.value,
            version,
            version,
            "challenger",
            actor,
            reason,
            rollout.share,
        )
    return event


# --- the watch --------------------------------------------------------------------------


def save_watch(
    engine: Engine,
    rollout_id: str,
    state: dict[str, Any],
    result: dict[str, Any],
    watch_from_ms: int | None,
    planned_watch_s: float | None,
) -> None:
    """Store the watch's state and latest result, so a restarted watcher goes on where this
    one stopped. A rollout decided meanwhile (by a person, say) keeps its final state."""
    with session_scope(engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise RolloutNotFound(rollout_id)
        if rollout.status is not RolloutStatus.WATCHING:
            return
        rollout.state, rollout.result = dict(state), dict(result)
        rollout.watch_from_ms, rollout.planned_watch_s = watch_from_ms, planned_watch_s
        session.add(rollout)


# --- deciding ---------------------------------------------------------------------------


def confirm_rollout(
    engine: Engine,
    rollout_id: str,
    result: dict[str, Any],
    actor: str = "genmon",
    reason: str = "",
) -> list[ModelEvent]:
    """The watch ended clean: the challenger becomes the champion, the old champion
    ``previous``; the confirmation is recorded with ``result`` as its evidence."""
    with _transaction(engine) as session:
        rollout = _load(session, rollout_id)
        if rollout.status is not RolloutStatus.WATCHING:
            raise RolloutError(
                f"rollout {rollout_id} of {rollout.model_id} {rollout.challenger} is "
                f"{rollout.status.value}, not watching: there is nothing to confirm"
            )
        said = reason or f"the watch of {rollout.challenger} ended clean"
        _decide(session, rollout, RolloutStatus.CONFIRMED, actor, said, result)
        return _move_champion(
            session, rollout.model_id, rollout.challenger, actor, said, "confirmed"
        )


def rollback_rollout(
    engine: Engine,
    rollout_id: str,
    result: dict[str, Any],
    reason: str,
    actor: str = "genmon",
    finding_id: str | None = None,
) -> list[ModelEvent]:
    """Stop the challenger: its alias unset (announced ``rolled_back`` with ``reason``),
    the version and its job ``rolled_back``, the rollout ``rolled_back`` with ``result``
    and the finding of the regression. A rollout rolled back already gives no events (a
    redelivered decision); one decided otherwise is refused, saying what to run."""
    with _transaction(engine) as session:
        rollout = _load(session, rollout_id)
        if rollout.status is RolloutStatus.ROLLED_BACK:
            return []
        if rollout.status is not RolloutStatus.WATCHING:
            raise RolloutError(
                f"rollout {rollout_id} of {rollout.model_id} {rollout.challenger} is "
                f"{rollout.status.value}, not watching; `genmon models rollback "
                f"{rollout.model_id}` moves the champion back to the previous version"
            )
        _decide(session, rollout, RolloutStatus.ROLLED_BACK, actor, reason, result)
        if finding_id is not None:
            rollout.incident_finding_id = finding_id
            session.add(rollout)
        events = _unset_challenger(session, rollout, actor, reason, "rolled_back")
        _mark_rolled_back(session, rollout.model_id, rollout.challenger, actor, reason)
        return events


def end_rollout(
    engine: Engine,
    rollout_id: str,
    status: RolloutStatus,
    result: dict[str, Any],
    reason: str,
    actor: str = "genmon",
) -> list[ModelEvent]:
    """End a watching rollout as ``cancelled`` or ``inconclusive``: the challenger alias is
    unset and the version stays a candidate (nothing showed it worse)."""
    if status not in ENDINGS:
        raise RolloutError(
            f"end_rollout records cancelled or inconclusive, not {status.value}; use "
            "confirm_rollout or rollback_rollout"
        )
    with _transaction(engine) as session:
        rollout = _load(session, rollout_id)
        if rollout.status is not RolloutStatus.WATCHING:
            raise RolloutError(
                f"rollout {rollout_id} of {rollout.model_id} is {rollout.status.value} "
                "already, not watching"
            )
        _decide(session, rollout, status, actor, reason, result)
        return _unset_challenger(session, rollout, actor, reason, status.value)


def _load(session: Session, rollout_id: str) -> Rollout:
    """The rollout, its model locked first (so the status read is the one decided on)."""
    found = session.get(Rollout, rollout_id)
    if found is None:
        raise RolloutNotFound(rollout_id)
    _lock_model(session, found.model_id)
    session.refresh(found)
    return found


def _unset_challenger(
    session: Session, rollout: Rollout, actor: str, reason: str, action: str
) -> list[ModelEvent]:
    current = _aliases(session, rollout.model_id).get(ModelAlias.CHALLENGER.value)
    if current != rollout.challenger:
        return []
    event = _set_alias(
        session, rollout.model_id, ModelAlias.CHALLENGER, None, actor, reason, action
    )
    return [event] if event is not None else []
