"""Which incident a finding belongs to, and which incidents are related to each other.

One problem is one *fingerprint*: sha256 over model id, detector, signal and segment
(:attr:`genmon.schemas.Finding.fingerprint`). A finding goes to its fingerprint's open
(or acknowledged) incident; failing that, to one resolved within ``reopen_cooldown_s``,
which the manager reopens; failing that, a new incident opens. The queries that look an
incident up for a change lock its row (``FOR UPDATE``), so the manager's read and write
are one step for other workers.

Every problem pages as itself: a new incident queues its own trigger (its own PagerDuty
dedup key, its own Alertmanager alert with its own labels, its own resolve later), and a
reopened one its own trigger again, whatever else of the same model is open. Making a
real problem an "update" of whatever opened first (often a false alarm) would reach
on-call under the wrong title and leave its resolve unsent. Related problems are only
*linked*: a new incident of a model that has an open top-level incident opened within
``group_window_s`` gets it as ``parent_id`` (read "related to"), and its trigger's reason
and payload (``incident.parent_id``, ``incident.related``) name it. Linking is one level
deep: an incident with a parent is never a parent itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlmodel import Session, select

from genmon.schemas.events import Finding, IncidentStatus, ModelAlias
from genmon.schemas.incidents import Incident
from genmon.schemas.retrain import ModelAliasRow


def open_incident(session: Session, fingerprint: str) -> Incident | None:
    """The fingerprint's open or acknowledged incident (at most one: a unique index), locked."""
    query = (
        select(Incident)
        .where(Incident.fingerprint == fingerprint)
        .where(Incident.status != IncidentStatus.RESOLVED)
        .with_for_update()
    )
    return session.exec(query).first()


def without_version(segment: str | None) -> str:
    """A finding's segment without its ``model_version=<v>`` part (``topic=cards``)."""
    parts = [p for p in (segment or "").split(",") if p and not p.startswith("model_version=")]
    return ",".join(parts)


def superseded_incident(session: Session, finding: Finding) -> Incident | None:
    """The open incident a clear ``finding`` of the model's champion speaks for, locked.

    When the registry's ``champion`` alias moved from the version an incident is about to
    the finding's version (a retrained version that replaced it), the old version no longer
    serves, so its own windows can never clear the incident: the same detector, signal and
    segment on the version that replaced it does. Models nobody registered have no champion,
    and an incident about the champion itself is judged on its own windows.
    """
    if finding.model_version is None:
        return None
    champion = session.get(ModelAliasRow, (finding.model_id, ModelAlias.CHAMPION.value))
    if champion is None or champion.version != finding.model_version:
        return None
    query = (
        select(Incident)
        .where(Incident.model_id == finding.model_id)
        .where(Incident.detector == finding.detector)
        .where(Incident.signal == finding.signal)
        .where(Incident.status != IncidentStatus.RESOLVED)
        .where(Incident.model_version != finding.model_version)
        .order_by(Incident.opened_at)
        .with_for_update()
    )
    segment = without_version(finding.segment)
    return next(
        (row for row in session.exec(query) if without_version(row.segment) == segment), None
    )


def recently_resolved(
    session: Session, fingerprint: str, now: datetime, cooldown_s: float
) -> Incident | None:
    """The fingerprint's latest incident resolved within ``cooldown_s``, locked: to reopen."""
    since = now - timedelta(seconds=cooldown_s)
    query = (
        select(Incident)
        .where(Incident.fingerprint == fingerprint)
        .where(Incident.status == IncidentStatus.RESOLVED)
        .where(Incident.resolved_at >= since)
        .order_by(Incident.resolved_at.desc())
        .with_for_update()
    )
    return session.exec(query).first()


def related_open(
    session: Session, incident: Incident, now: datetime, group_window_s: float
) -> Incident | None:
    """The model's first open top-level incident opened within ``group_window_s``."""
    if group_window_s <= 0:
        return None
    since = now - timedelta(seconds=group_window_s)
    query = (
        select(Incident)
        .where(Incident.model_id == incident.model_id)
        .where(Incident.status != IncidentStatus.RESOLVED)
        .where(Incident.parent_id.is_(None))
        .where(Incident.fingerprint != incident.fingerprint)
        .where(Incident.opened_at >= since)
        .order_by(Incident.opened_at)
    )
    return session.exec(query).first()


def related_ids(session: Session, incident: Incident) -> list[str]:
    """The incident it is related to (``parent_id``), or those related to it."""
    if incident.parent_id is not None:
        return [incident.parent_id]  # linking is one level deep: it has none of its own
    if incident.notify_seq <= 1:
        return []  # its first page, at opening: nothing has been linked to it yet
    query = (
        select(Incident.id).where(Incident.parent_id == incident.id).order_by(Incident.opened_at)
    )
    return list(session.exec(query).all())
