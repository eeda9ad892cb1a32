"""Which silence, if any, keeps a notification from its destination.

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

Rows for the incidents topic are a record of what happened, not pages: no silence holds
them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, select

from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
)
from genmon.streams.incidents.routing import Matcher, matches, parse_matchers


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


def follow_up_silenced_by(
    session: Session, incident_id: str, destination: str, before_id: int | None = None
) -> str | None:
    """The silence that kept this follow-up's announcement from ``destination``, if any.

    Looks at the incident's rows for ``destination`` (those before ``before_id`` when
    given) back to its last resolve there: ``None`` when one announcement among them was
    not suppressed, or when there is none to follow.
    """
    query = (
        select(Notification.event, Notification.status, Notification.silenced_by)
        .where(Notification.incident_id == incident_id)
        .where(Notification.destination == destination)
        .order_by(Notification.id.desc())
    )
    if before_id is not None:
        query = query.where(Notification.id < before_id)
    silenced_by: str | None = None
    for event, status, silence_id in session.exec(query):
        if event is NotificationEvent.RESOLVE:
            break
        if event in ANNOUNCEMENTS:
            if status is not NotificationStatus.SUPPRESSED:
                return None
            silenced_by = silenced_by or silence_id
    return silenced_by
