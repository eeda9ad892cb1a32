"""Which silence, if any, keeps a notification from its destination, and when it lets go.

The manager asks when it queues a notification and the dispatcher asks again just before
delivering it, so a silence added in between still holds the page back. Both use the
same two rules:

- an *announcement* (trigger, update) is suppressed while an active silence matches the
  incident's labels;
- a *follow-up* (acknowledge, resolve) goes wherever the incident was announced: it is
  suppressed, with the same silence id, when every announcement to that destination since
  the incident's last resolve there was suppressed, and delivered otherwise, even under a
  silence. A receiver therefore never gets the resolve of a page it never saw, and never
  keeps open a page it did see (a PagerDuty incident acknowledged or resolved while its
  model is silenced still gets the acknowledge or the resolve).

A problem can outlive its silence. :func:`pages_to_repeat` finds the destinations that
were never told about a still-open (open or acknowledged) incident: every announcement
to them since the incident's last resolve there was suppressed, the silence that held
back the latest one has ended (at ``ends_at``, or early by ``genmon silences expire``),
and no other active silence matches the incident now. The dispatcher checks this every
poll interval and the manager queues one trigger per such destination
(:meth:`~genmon.incidents.manager.IncidentManager.repeat_unsilenced_pages`), as
Alertmanager notifies again about an alert still firing when its silence ends. It is the
end of that silence that releases the page: one still running keeps holding it even if
it no longer matches the incident.

Rows for the incidents topic are a record of what happened, not pages: no silence holds
them back. Nor does one hold back the scheduler's daily digest: silences match an
incident's labels, and the digest is about no incident (its ``incident_id`` is null), so
a silence of one model does not mute the summary of them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from genmon.incidents.routing import Matcher, incident_labels, matches, parse_matchers
from genmon.schemas.events import IncidentStatus
from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    Incident,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)


@dataclass(frozen=True)
class ActiveSilences:
    """The silences in force at ``at``, with their matchers parsed once."""

    at: datetime
    silences: Sequence[tuple[Silence, list[Matcher]]]

    @classmethod
    def load(cls, session: Session, now: datetime) -> ActiveSilences:
        rows = session.exec(
            select(Silence).where(Silence.starts_at <= now).where(Silence.ends_at > now)
        ).all()
        return cls(now, [(silence, parse_matchers(silence.matchers)) for silence in rows])

    def matching(self, labels: dict[str, str]) -> Silence | None:
        for silence, matchers in self.silences:
            if matches(matchers, labels):
                return silence
        return None


@dataclass(frozen=True)
class HeldBackPage:
    """A still-open incident that ``destination`` never heard of, its silence now over."""

    incident: Incident
    destination: str
    silence_id: str
    """The silence that held back the latest announcement to ``destination``."""
    route_runbook: dict[str, Any] | None
    """The runbook of the route that sent that announcement there."""


def _latest_held_back(
    session: Session, incident_id: str, destination: str, before_id: int | None = None
) -> tuple[int, str] | None:
    """(row id, silence id) of the latest announcement to ``destination`` since the last
    resolve there (before ``before_id`` when given), if every one of them was suppressed."""
    query = (
        select(Notification.id, Notification.event, Notification.status, Notification.silenced_by)
        .where(Notification.incident_id == incident_id)
        .where(Notification.destination == destination)
        .order_by(Notification.id.desc())
    )
    if before_id is not None:
        query = query.where(Notification.id < before_id)
    latest: tuple[int, str] | None = None
    for row_id, event, status, silence_id in session.exec(query):
        if event is NotificationEvent.RESOLVE:
            break
        if event in ANNOUNCEMENTS:
            if status is not NotificationStatus.SUPPRESSED:
                return None
            if latest is None and row_id is not None and silence_id is not None:
                latest = (row_id, silence_id)
    return latest


def follow_up_silenced_by(
    session: Session, incident_id: str, destination: str, before_id: int | None = None
) -> str | None:
    """The silence that kept this follow-up's announcement from ``destination``, if any.

    Looks at the incident's rows for ``destination`` (those before ``before_id`` when
    given) back to its last resolve there: ``None`` when one announcement among them was
    not suppressed, or when there is none to follow.
    """
    held = _latest_held_back(session, incident_id, destination, before_id)
    return held[1] if held is not None else None


def pages_to_repeat(
    session: Session, now: datetime, incident_id: str | None = None
) -> list[HeldBackPage]:
    """Destinations to page again at ``now`` (of ``incident_id`` only, when given).

    Only open incidents with an announcement held back by a silence that has ended are
    looked at, so the usual answer (nothing) costs one query over the open incidents' rows.
    """
    still_open = select(Incident.id).where(Incident.status != IncidentStatus.RESOLVED)
    # Rows with a silence id are the suppressed ones. Asking for the silence rather than
    # for the status keeps the status index out of the plan: through it the query would
    # read every row ever suppressed instead of starting from the open incidents.
    query = (
        select(Notification.incident_id, Notification.destination)
        .join(Silence, Silence.id == Notification.silenced_by)
        .where(Notification.incident_id.in_(still_open))
        .where(Notification.event.in_(ANNOUNCEMENTS))
        .where(Silence.ends_at <= now)
        .distinct()
    )
    if incident_id is not None:
        query = query.where(Notification.incident_id == incident_id)
    candidates = session.exec(query).all()
    if not candidates:
        return []
    active = ActiveSilences.load(session, now)
    found = []
    for candidate_id, destination in sorted(candidates):
        held = _latest_held_back(session, candidate_id, destination)
        if held is None:
            continue  # the destination was told since (or the page was resolved there)
        row_id, silence_id = held
        silence = session.get(Silence, silence_id)
        if silence is not None and silence.ends_at > now:
            continue
        incident = session.get(Incident, candidate_id)
        if incident is None or active.matching(incident_labels(incident)) is not None:
            continue
        payload = session.exec(select(Notification.payload).where(Notification.id == row_id)).one()
        found.append(HeldBackPage(incident, destination, silence_id, payload.get("route_runbook")))
    return found
