"""The rows the manager writes into the outbox, in the transaction of the incident change.

:class:`~genmon.incidents.manager.IncidentManager` decides that an incident changed;
this module writes what that change owes the outside world, in the caller's session, so
the change and its notifications commit together or not at all. The dispatcher
(:mod:`~genmon.incidents.dispatcher`) delivers them later.

- **audit and topic**: every transition gets an ``incident_transition`` row, whoever
  made it (a finding, the CLI, an auto-resolve); with ``incidents.publish_events`` it also
  queues an :class:`~genmon.schemas.IncidentEvent` row for
  :data:`~genmon.schemas.incidents.INCIDENTS_TOPIC_DESTINATION`, which the dispatcher
  publishes with the same retries as a page. No process but the dispatcher needs a Kafka
  producer, and a broker outage delays events, never loses them.
- **pages**: a trigger or update goes where the routes send it; an acknowledge or resolve
  goes where the incident was paged (whatever the routes of this process say, so
  ``genmon incidents ack`` needs no destinations configured). Each row carries a unique
  idempotency key (incident, notification sequence, event, destination): exactly one
  trigger per incident opening.
- **silences** hold pages back, never incidents or topic events; see
  :mod:`~genmon.incidents.silences` for how acknowledgements and resolves follow the
  fate of the page they belong to. When a silence ends while an incident it kept from a
  destination is still open or acknowledged, :func:`queue_unsilenced_pages` pages that
  destination then: a trigger, and for an acknowledged incident the acknowledge after
  it, so the receiver learns about the problem and that someone has it (PagerDuty would
  otherwise escalate it as unhandled).

genmon's own ids (incident, fingerprint, parent and related incidents, finding) are kept
as they are when a payload is redacted (:mod:`~genmon.schemas.redact`): they look like
API keys to the redactor, and on-call needs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from genmon.incidents.grouping import related_ids
from genmon.incidents.routing import Router, incident_labels
from genmon.incidents.silences import (
    ActiveSilences,
    HeldBackPage,
    follow_up_silenced_by,
    pages_to_repeat,
)
from genmon.schemas.events import IncidentEvent, IncidentStatus
from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    INCIDENTS_TOPIC_DESTINATION,
    Incident,
    IncidentTransition,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
    Transition,
)
from genmon.schemas.redact import Redactor
from genmon.settings import ApiSettings, get_settings

log = logging.getLogger(__name__)

NOTIFICATION_CHART_POINTS = 10
_SILENCES = "genmon_silences"


def record_transition(
    session: Session,
    incident: Incident,
    transition: Transition,
    from_status: IncidentStatus | None,
    *,
    actor: str,
    reason: str,
    at: datetime,
    publish: bool,
) -> None:
    """The audit row of a transition and, when ``publish``, its incidents-topic row."""
    insert = sa.insert(IncidentTransition).values(
        incident_id=incident.id,
        transition=transition,
        from_status=from_status,
        to_status=incident.status,
        actor=actor,
        reason=reason,
        at=at,
    )
    if transition is Transition.NOTED or not publish:
        session.exec(insert)
        return
    transition_id = session.exec(insert.returning(IncidentTransition.id)).scalar_one()
    event = IncidentEvent(
        event_id=f"{incident.id}.{transition_id}",
        incident_id=incident.id,
        fingerprint=incident.fingerprint,
        model_id=incident.model_id,
        status=incident.status,
        severity=incident.severity,
        title=incident.title,
        transition=transition.value,
        actor=actor,
        at=at,
    )
    # The topic's row of the outbox: committed with the transition or not at all.
    session.exec(
        sa.insert(Notification).values(
            incident_id=incident.id,
            destination=INCIDENTS_TOPIC_DESTINATION,
            event=NotificationEvent.TRANSITION,
            idempotency_key=f"{incident.id}.{transition_id}.{transition.value}.topic",
            status=NotificationStatus.PENDING,
            attempts=0,
            payload=event.model_dump(mode="json"),
            created_at=at,
            next_attempt_at=at,
        )
    )


def queue_notifications(
    session: Session,
    incident: Incident,
    event: NotificationEvent,
    reason: str,
    *,
    router: Router,
    redactor: Redactor,
    now: datetime,
    links: ApiSettings | None = None,
) -> int:
    """Queue ``event`` for its destinations, in the caller's transaction.

    A trigger or update goes where ``router`` sends it; an acknowledge or resolve goes
    where the incident was paged. Returns how many rows were queued for delivery (not
    suppressed by a silence). ``links`` says where the dashboard is (default: this
    process's ``api`` settings): every payload links to the incident's page.
    """
    labels = incident_labels(incident)
    announcement = event in ANNOUNCEMENTS
    if not announcement:
        targets = _paged_destinations(session, incident)
    elif event is NotificationEvent.UPDATE and not _is_paged(session, incident):
        # Never announced (no route took its trigger): nothing to update.
        return 0
    else:
        targets = [
            (
                target.destination,
                {"url": target.runbook.url, "remediation": list(target.runbook.remediation)}
                if target.runbook
                else None,
            )
            for target in router.route(labels)
        ]
    if not targets:
        return 0
    silence = _silence_for(session, labels, now) if announcement else None
    incident.notify_seq += 1
    payload = notification_payload(
        session, incident, event, reason, labels, now, redactor, links=links
    )
    rows = []
    for destination, route_runbook in targets:
        if announcement:
            silenced_by = silence.id if silence else None
        else:
            silenced_by = follow_up_silenced_by(session, incident.id, destination)
        key = f"{incident.id}.{incident.notify_seq}.{event.value}.{destination}"
        rows.append(
            {
                "incident_id": incident.id,
                "destination": destination,
                "event": event,
                "idempotency_key": key,
                "status": (
                    NotificationStatus.SUPPRESSED if silenced_by else NotificationStatus.PENDING
                ),
                "attempts": 0,
                "silenced_by": silenced_by,
                "payload": {**payload, "route_runbook": route_runbook},
                "created_at": now,
                "next_attempt_at": now,
            }
        )
    session.exec(sa.insert(Notification), params=rows)
    return sum(1 for row in rows if row["silenced_by"] is None)


def _paged_destinations(
    session: Session, incident: Incident
) -> list[tuple[str, dict[str, Any] | None]]:
    """Destinations paged since their last resolve, each with its route's runbook."""
    query = (
        select(Notification.destination, Notification.event, Notification.payload)
        .where(Notification.incident_id == incident.id)
        .where(
            Notification.event.in_(
                (NotificationEvent.TRIGGER, NotificationEvent.UPDATE, NotificationEvent.RESOLVE)
            )
        )
        .order_by(Notification.id)
    )
    paged: dict[str, dict[str, Any] | None] = {}
    for destination, event, payload in session.exec(query):
        if event is NotificationEvent.RESOLVE:
            paged.pop(destination, None)
        else:
            paged[destination] = payload.get("route_runbook")
    return list(paged.items())


def _is_paged(session: Session, incident: Incident) -> bool:
    """Whether the incident's latest trigger or resolve queued is a trigger."""
    query = (
        select(Notification.event)
        .where(Notification.incident_id == incident.id)
        .where(Notification.event.in_((NotificationEvent.TRIGGER, NotificationEvent.RESOLVE)))
        .order_by(Notification.id.desc())
        .limit(1)
    )
    return session.exec(query).first() is NotificationEvent.TRIGGER


def _silence_for(session: Session, labels: dict[str, str], now: datetime) -> Silence | None:
    """The active silence matching ``labels``, if any.

    Loaded once per transaction: a batch of findings shares one view of silences.
    """
    active = session.info.get(_SILENCES)
    if active is None:
        active = session.info[_SILENCES] = ActiveSilences.load(session, now)
    return active.matching(labels)


def notification_payload(
    session: Session,
    incident: Incident,
    event: NotificationEvent,
    reason: str,
    labels: dict[str, str],
    now: datetime,
    redactor: Redactor,
    *,
    links: ApiSettings | None = None,
) -> dict[str, Any]:
    """What every destination renders from: the incident, redacted but for genmon's ids,
    with ``incident.url``, its page on the dashboard (``links``, default this process's
    ``api`` settings), stored with the row so a retry links where the page did."""
    related = related_ids(session, incident)
    # genmon's own ids stay readable in reasons, titles and evidence; secrets do not.
    keep = {incident.id, incident.fingerprint, *related}
    finding_id = incident.evidence.get("finding_id")
    if isinstance(finding_id, str):
        keep.add(finding_id)

    def scrub(value: Any) -> Any:
        return redactor.scrub(value, keep)

    return {
        "event": event.value,
        "sequence": incident.notify_seq,
        "reason": scrub(reason),
        "created_at": now.isoformat(),
        "labels": labels,
        "incident": {
            "id": incident.id,
            "url": (links or get_settings().api).incident_url(incident.id),
            "fingerprint": incident.fingerprint,
            "title": scrub(incident.title),
            "status": incident.status.value,
            "severity": incident.severity.value,
            "model_id": incident.model_id,
            "model_version": incident.model_version,
            "detector": incident.detector,
            "kind": incident.kind.value,
            "signal": incident.signal,
            "segment": scrub(incident.segment) if incident.segment else None,
            "opened_at": incident.opened_at.isoformat(),
            "first_seen_at": incident.first_seen_at.isoformat(),
            "last_seen_at": incident.last_seen_at.isoformat(),
            "acknowledged_at": _iso(incident.acknowledged_at),
            "resolved_at": _iso(incident.resolved_at),
            "finding_count": incident.finding_count,
            "peak_score": incident.peak_score,
            "last_score": incident.last_score,
            "threshold": incident.threshold,
            "effect_size": incident.effect_size,
            "p_value": incident.p_value,
            "reopen_count": incident.reopen_count,
            "flapping": incident.flapping,
            "parent_id": incident.parent_id,
            "related": related,
            "evidence": scrub(incident.evidence),
            "chart": incident.chart[-NOTIFICATION_CHART_POINTS:],
        },
        "runbook": {"url": incident.runbook_url, "remediation": list(incident.remediation)},
    }


def queue_unsilenced_pages(
    session: Session,
    incident_id: str,
    now: datetime,
    redactor: Redactor,
    links: ApiSettings | None = None,
) -> int:
    """Queue the pages that ended silences held back from a still-open incident.

    Locks the incident first (the write lock on SQLite, its row on PostgreSQL) and looks
    again: it may have been resolved, or paged, since the caller's read. Idempotency keys
    are made of the silences' ids, so a second try fails on the unique index instead of
    paging twice. Returns how many triggers were queued.
    """
    touched = session.exec(
        sa.update(Incident)
        .where(Incident.id == incident_id)
        .where(Incident.status != IncidentStatus.RESOLVED)
        .values(notify_seq=Incident.notify_seq)
    )
    if not touched.rowcount:
        return 0
    pages = pages_to_repeat(session, now, incident_id)
    if not pages:
        return 0
    incident = pages[0].incident
    reason = f"a silence held this page back and has ended; still {incident.status.value}"
    rows = _repeated(
        session, incident, pages, NotificationEvent.TRIGGER, reason, now, redactor, links
    )
    if incident.status is IncidentStatus.ACKNOWLEDGED:
        actor = session.exec(
            select(IncidentTransition.actor)
            .where(IncidentTransition.incident_id == incident.id)
            .where(IncidentTransition.transition == Transition.ACKNOWLEDGED)
            .order_by(IncidentTransition.id.desc())
        ).first()
        acknowledged = f"acknowledged by {actor or 'someone'}"
        rows += _repeated(
            session,
            incident,
            pages,
            NotificationEvent.ACKNOWLEDGE,
            acknowledged,
            now,
            redactor,
            links,
        )
    session.exec(sa.insert(Notification), params=rows)
    for page in pages:
        log.info(
            "incident %s: silence %s ended while it is %s; paging %s again",
            incident.id,
            page.silence_id,
            incident.status.value,
            page.destination,
        )
    return len(pages)


def _repeated(
    session: Session,
    incident: Incident,
    pages: Sequence[HeldBackPage],
    event: NotificationEvent,
    reason: str,
    now: datetime,
    redactor: Redactor,
    links: ApiSettings | None,
) -> list[dict[str, Any]]:
    """Rows of ``event`` for the destinations of ``pages``, keyed by their silences."""
    incident.notify_seq += 1
    labels = incident_labels(incident)
    payload = notification_payload(
        session, incident, event, reason, labels, now, redactor, links=links
    )
    return [
        {
            "incident_id": incident.id,
            "destination": page.destination,
            "event": event,
            "idempotency_key": (
                f"{incident.id}.unsilenced.{page.silence_id}.{event.value}.{page.destination}"
            ),
            "status": NotificationStatus.PENDING,
            "attempts": 0,
            "silenced_by": None,
            "payload": {**payload, "route_runbook": page.route_runbook},
            "created_at": now,
            "next_attempt_at": now,
        }
        for page in pages
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
