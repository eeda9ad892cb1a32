"""Findings -> incidents, idempotently, with every notification queued in the same transaction.

One problem is one *fingerprint*: sha256 over model id, detector, signal and segment
(:attr:`genmon.schemas.Finding.fingerprint`). The database, not memory, guarantees:

- a finding is applied once: its ``dedup_key`` (fingerprint + window end) goes into
  ``finding_seen`` in the same transaction, so a replay after a restart changes nothing;
- a fingerprint has at most one open incident: the partial unique index
  ``uq_incident_open_fingerprint``; a race between workers ends in an IntegrityError and
  the loser retries against the winner's row;
- exactly one trigger per incident opening: notification rows are written with the
  incident change and carry unique idempotency keys;
- every transition reaches the incidents topic, whoever made it (a finding, the CLI, an
  auto-resolve): with ``incidents.publish_events`` each transition also queues an
  :class:`~genmon.schemas.IncidentEvent` row for
  :data:`~genmon.schemas.incidents.INCIDENTS_TOPIC_DESTINATION` in the same transaction,
  and the dispatcher publishes it with the same retries as a page. No process but the
  dispatcher needs a Kafka producer, and a broker outage delays events, never loses them.

Life of an incident: ``open`` -> ``acknowledged`` -> ``resolved`` (by a person, or
automatically after ``auto_resolve_quiet_windows`` clear windows in a row: the pipeline
publishes ``detected=False`` findings for clear windows). Each step notifies the
destinations that were paged: acknowledge (PagerDuty ``acknowledge``, a Slack/webhook
message), resolve (PagerDuty ``resolve``, Alertmanager ``resolved``).

A fingerprint seen again within ``reopen_cooldown_s`` of its resolution reopens the same
incident (same id, history and counters) instead of opening a new one, and pages again:
every destination was told it is resolved, so it gets a new trigger with the same dedup
key. PagerDuty opens a new incident under that key (it never reopens a resolved one) and
Alertmanager receivers see the same alert firing again with a new ``startsAt``; a page
that stayed quiet would leave the receivers saying "resolved" about a live problem. After
``flap_max_reopens`` such reopenings the incident is *flapping* and only auto-resolves
once it has also been quiet for a whole cool-down, so a flapping signal pages at most a
bounded number of times.

Silences hold pages back, never incidents or topic events; see
:mod:`~genmon.streams.incidents.silences` for how acknowledgements and resolves follow
the fate of the page they belong to. When a silence ends while an incident it kept from
a destination is still open or acknowledged, :meth:`IncidentManager.repeat_unsilenced_pages`
(run by the dispatcher every poll interval) pages that destination then: a trigger, and
for an acknowledged incident the acknowledge after it, so the receiver learns about the
problem and that someone has it (PagerDuty would otherwise escalate it as unhandled).

Every problem pages as itself: a new incident queues its own trigger (its own PagerDuty
dedup key, its own Alertmanager alert with its own labels, its own resolve later), and a
reopened one its own trigger again, whatever else of the same model is open. Making a
real problem an "update" of whatever opened first (often a false alarm) would reach
on-call under the wrong title and leave its resolve unsent. Related problems are only
*linked*: a new incident of a model that has an open top-level incident opened within
``group_window_s`` gets it as ``parent_id`` (read "related to"), and its trigger's reason
and payload (``incident.parent_id``, ``incident.related``) name it.

A finding may carry its own ``severity`` and ``title`` (the detector runner judges them
from effect size and confidence, and says what happened with numbers); without them the
manager uses :func:`severity_for` and :func:`title_for`. A later finding of an open
incident with a higher severity escalates it: severity and title become the newer
finding's, and the update says so.

genmon's own ids (incident, fingerprint, parent and related incidents, finding) are kept
as they are when a payload is redacted (:mod:`~genmon.streams.redact`): they look like
API keys to the redactor, and on-call needs them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from genmon.db import session_scope
from genmon.schemas.events import Finding, IncidentEvent, IncidentStatus, Severity, utcnow
from genmon.schemas.incidents import (
    ANNOUNCEMENTS,
    INCIDENTS_TOPIC_DESTINATION,
    FindingSeen,
    Incident,
    IncidentTransition,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
    Transition,
)
from genmon.settings import (
    IncidentSettings,
    NotifySettings,
    RunbookSettings,
    Settings,
    get_settings,
)
from genmon.streams.incidents._txn import write_transaction
from genmon.streams.incidents.exceptions import IncidentNotFoundError, InvalidTransitionError
from genmon.streams.incidents.routing import Router, incident_labels
from genmon.streams.incidents.silences import (
    ActiveSilences,
    HeldBackPage,
    follow_up_silenced_by,
    pages_to_repeat,
)
from genmon.streams.redact import Redactor

log = logging.getLogger(__name__)

SEVERITY_ORDER = (Severity.INFO, Severity.WARNING, Severity.ERROR, Severity.CRITICAL)
_RANK = {severity: rank for rank, severity in enumerate(SEVERITY_ORDER)}
NOTIFICATION_CHART_POINTS = 10
_RACE_RETRIES = 3
_SILENCES = "genmon_silences"


def severity_for(finding: Finding, settings: IncidentSettings) -> Severity:
    """The worse of the severities from score/threshold and from |effect size| bands.

    A detected finding is at least a warning, whatever its bands say.
    """

    def band(value: float, bands: dict[str, float]) -> Severity:
        best = Severity.INFO
        for name, least in bands.items():
            severity = Severity(name)
            if value >= least and _RANK[severity] > _RANK[best]:
                best = severity
        return best

    ratio = finding.score / finding.threshold if finding.threshold > 0 else 0.0
    severity = band(ratio, settings.severity_score_ratio_bands)
    if finding.effect_size is not None:
        by_effect = band(abs(finding.effect_size), settings.severity_effect_size_bands)
        severity = max(severity, by_effect, key=_RANK.__getitem__)
    if finding.detected and severity is Severity.INFO:
        return Severity.WARNING
    return severity


def title_for(finding: Finding) -> str:
    """A title for a finding that brings none: model, detector, signal and segment."""
    segment = f" [{finding.segment}]" if finding.segment else ""
    title = f"{finding.kind.value} on {finding.model_id}: {finding.detector} flagged "
    return f"{title}{finding.signal}{segment}"[:512]


@dataclass(frozen=True)
class Outcome:
    """What applying one finding did."""

    action: str  # duplicate, ignored, opened, updated, quiet, resolved, reopened
    incident_id: str | None = None
    notifications: int = 0
    """Pages queued for delivery (suppressed ones and topic events not counted)."""


class IncidentManager:
    """Applies findings and people's actions to incidents, one transaction each."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings | None = None,
        *,
        router: Router | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.settings = settings or get_settings()
        self.config: IncidentSettings = self.settings.incidents
        notify: NotifySettings = self.settings.notify
        self.router = router or Router(notify)
        self.redactor = Redactor(enabled=notify.redact, max_text_chars=notify.max_text_chars)
        self.clock = clock

    # --- findings ------------------------------------------------------------------------

    def process(self, finding: Finding) -> Outcome:
        """Apply ``finding``; applying it again (a replay) changes nothing."""
        for attempt in range(_RACE_RETRIES):
            try:
                with write_transaction(self.engine) as session:
                    return self._apply(session, finding)
            except IntegrityError:
                # Another worker opened this fingerprint's incident (or applied this very
                # finding) between our read and our write; the retry sees its row.
                if attempt == _RACE_RETRIES - 1:
                    raise
                log.debug("retrying finding %s after a concurrent write", finding.dedup_key)
        raise AssertionError("unreachable")

    def process_many(self, findings: Sequence[Finding]) -> list[Outcome]:
        """Apply a batch in one transaction (one commit, one fsync); same result as one by one.

        A conflict with another worker rolls the batch back and applies it one by one.
        """
        if len(findings) <= 1:
            return [self.process(finding) for finding in findings]
        try:
            with write_transaction(self.engine) as session:
                return [self._apply(session, finding) for finding in findings]
        except IntegrityError:
            log.debug("batch of %d conflicted with another worker; one by one", len(findings))
            return [self.process(finding) for finding in findings]

    def _apply(self, session: Session, finding: Finding) -> Outcome:
        key = finding.dedup_key
        if session.get(FindingSeen, key) is not None:
            return Outcome("duplicate")
        if not finding.detected and self._open_incident(session, finding.fingerprint) is None:
            return Outcome("ignored")  # the common case: a clear window of a healthy signal
        now = self.clock()
        # Write first: a concurrent duplicate fails here, and on SQLite the write lock is
        # taken before the incident is read, so two workers cannot lose each other's update.
        # Core inserts for the append-only rows: ORM objects would cost more than the SQL.
        session.exec(
            sa.insert(FindingSeen).values(
                dedup_key=key, fingerprint=finding.fingerprint, seen_at=now
            )
        )
        incident = self._open_incident(session, finding.fingerprint)
        if not finding.detected:
            if incident is None:
                return Outcome("ignored")
            return self._quiet_window(session, incident, finding, now)
        if incident is not None:
            return self._update(session, incident, finding, now)
        recent = self._recently_resolved(session, finding.fingerprint, now)
        if recent is not None:
            return self._reopen(session, recent, finding, now)
        return self._open(session, finding, now)

    def _open_incident(self, session: Session, fingerprint: str) -> Incident | None:
        query = (
            select(Incident)
            .where(Incident.fingerprint == fingerprint)
            .where(Incident.status != IncidentStatus.RESOLVED)
            .with_for_update()
        )
        return session.exec(query).first()

    def _recently_resolved(
        self, session: Session, fingerprint: str, now: datetime
    ) -> Incident | None:
        since = now - timedelta(seconds=self.config.reopen_cooldown_s)
        query = (
            select(Incident)
            .where(Incident.fingerprint == fingerprint)
            .where(Incident.status == IncidentStatus.RESOLVED)
            .where(Incident.resolved_at >= since)
            .order_by(Incident.resolved_at.desc())
            .with_for_update()
        )
        return session.exec(query).first()

    def _open(self, session: Session, finding: Finding, now: datetime) -> Outcome:
        runbook = self._runbook(finding)
        incident = Incident(
            fingerprint=finding.fingerprint,
            model_id=finding.model_id,
            model_version=finding.model_version,
            detector=finding.detector,
            kind=finding.kind,
            signal=finding.signal,
            segment=finding.segment,
            severity=self._severity(finding),
            title=self._title(finding),
            runbook_url=runbook.url if runbook else None,
            remediation=list(runbook.remediation) if runbook else [],
            first_seen_at=now,
            opened_at=now,
            updated_at=now,
        )
        self._observe(incident, finding, now)
        reason = self._why(finding)
        related = self._related_open(session, incident, now)
        if related is not None:
            # A link, not a merge: this problem still pages on its own, under its own key.
            incident.parent_id = related.id
            reason += f"; related to open incident {related.id}: {related.title}"
        session.add(incident)
        session.flush()
        self._record(session, incident, Transition.OPENED, None, reason=reason)
        sent = self._notify(session, incident, NotificationEvent.TRIGGER, reason)
        return Outcome("opened", incident.id, sent)

    def _related_open(self, session: Session, incident: Incident, now: datetime) -> Incident | None:
        """The model's first open top-level incident opened within ``group_window_s``."""
        if self.config.group_window_s <= 0:
            return None
        since = now - timedelta(seconds=self.config.group_window_s)
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

    def _update(
        self, session: Session, incident: Incident, finding: Finding, now: datetime
    ) -> Outcome:
        before = incident.severity
        self._observe(incident, finding, now)
        severity = self._severity(finding)
        if _RANK[severity] <= _RANK[before]:
            return Outcome("updated", incident.id)
        # The worse finding says what the problem is now: its title replaces the old one.
        incident.severity = severity
        incident.title = self._title(finding)
        escalated = f"escalated {before.value} -> {severity.value}: {incident.title}"
        self._record(
            session,
            incident,
            Transition.ESCALATED,
            incident.status,
            reason=f"{escalated} ({self._why(finding)})",
        )
        sent = self._notify(session, incident, NotificationEvent.UPDATE, escalated)
        return Outcome("updated", incident.id, sent)

    def _reopen(
        self, session: Session, incident: Incident, finding: Finding, now: datetime
    ) -> Outcome:
        incident.status = IncidentStatus.OPEN
        incident.resolved_at = None
        incident.acknowledged_at = None
        incident.opened_at = now
        incident.reopen_count += 1
        limit = self.config.flap_max_reopens
        if limit and incident.reopen_count >= limit:
            incident.flapping = True
        incident.severity = max(incident.severity, self._severity(finding), key=_RANK.__getitem__)
        incident.title = self._title(finding)  # the new page says what is happening now
        self._observe(incident, finding, now)
        # Flush the status change first: the partial unique index rejects it here if
        # another worker already opened a fresh incident for this fingerprint.
        session.flush()
        reason = f"seen again within the {self.config.reopen_cooldown_s:g} s cool-down"
        if incident.flapping:
            reason += f"; flapping ({incident.reopen_count} reopenings)"
        self._record(session, incident, Transition.REOPENED, IncidentStatus.RESOLVED, reason=reason)
        # Its own trigger, whatever it is related to: every destination was told it resolved.
        sent = self._notify(session, incident, NotificationEvent.TRIGGER, f"reopened: {reason}")
        return Outcome("reopened", incident.id, sent)

    def _quiet_window(
        self, session: Session, incident: Incident, finding: Finding, now: datetime
    ) -> Outcome:
        incident.quiet_windows += 1
        incident.last_seen_at = now
        incident.updated_at = now
        incident.chart = self._chart_with(incident, finding)
        if incident.quiet_windows < self.config.auto_resolve_quiet_windows:
            return Outcome("quiet", incident.id)
        if incident.flapping:
            quiet_for = (now - incident.last_detected_at).total_seconds()
            if quiet_for < self.config.reopen_cooldown_s:
                return Outcome("quiet", incident.id)
        sent = self._resolve(
            session,
            incident,
            actor="genmon",
            reason=f"auto-resolved after {incident.quiet_windows} clear windows",
            now=now,
        )
        return Outcome("resolved", incident.id, sent)

    def _observe(self, incident: Incident, finding: Finding, now: datetime) -> None:
        incident.finding_count += 1
        incident.last_seen_at = now
        incident.last_detected_at = now
        incident.updated_at = now
        incident.quiet_windows = 0
        incident.last_score = finding.score
        incident.peak_score = (
            max(incident.peak_score, finding.score) if incident.finding_count > 1 else finding.score
        )
        incident.threshold = finding.threshold
        incident.effect_size = finding.effect_size
        incident.p_value = finding.p_value
        incident.model_version = finding.model_version or incident.model_version
        incident.evidence = self._evidence(finding)
        incident.chart = self._chart_with(incident, finding)

    def _evidence(self, finding: Finding) -> dict[str, Any]:
        snapshot: dict[str, Any] = {
            "finding_id": finding.finding_id,
            "detector": finding.detector,
            "window_start": finding.window_start.isoformat() if finding.window_start else None,
            "window_end": finding.window_end.isoformat() if finding.window_end else None,
            "score": finding.score,
            "threshold": finding.threshold,
            "p_value": finding.p_value,
            "effect_size": finding.effect_size,
            "n_seen": finding.n_seen,
            "details": finding.evidence,
        }
        encoded = json.dumps(snapshot, default=str)
        if len(encoded) > self.config.evidence_max_bytes:
            half = self.config.evidence_max_bytes // 2
            details: dict[str, Any] = {
                "truncated": True,
                "original_bytes": len(encoded),
                "excerpt": encoded[:half],
            }
            # Clusters of the affected examples are what on-call reads first: kept whole
            # when they fit in the other half.
            analysis = {
                key: finding.evidence[key]
                for key in ("clusters", "error_analysis")
                if finding.evidence.get(key)
            }
            if analysis and len(json.dumps(analysis, default=str)) < half - 512:
                details.update(analysis)
            snapshot["details"] = details
        return json.loads(json.dumps(snapshot, default=str))

    def _chart_with(self, incident: Incident, finding: Finding) -> list[dict[str, Any]]:
        at = finding.window_end or finding.emitted_at
        point = {"at": at.isoformat(), "score": finding.score, "detected": finding.detected}
        return [*incident.chart, point][-self.config.chart_points :]

    def _severity(self, finding: Finding) -> Severity:
        """The finding's own severity, else the one its score and effect size band to."""
        return finding.severity or severity_for(finding, self.config)

    @staticmethod
    def _title(finding: Finding) -> str:
        """The finding's own title (it says what happened, with numbers), else a generic one."""
        return finding.title or title_for(finding)

    def _runbook(self, finding: Finding) -> RunbookSettings | None:
        runbooks = self.config.runbooks
        return runbooks.get(finding.detector) or runbooks.get(finding.kind.value)

    @staticmethod
    def _why(finding: Finding) -> str:
        return (
            f"{finding.detector} score {finding.score:.4g} vs threshold {finding.threshold:.4g}"
            + (
                f", effect size {finding.effect_size:.3g}"
                if finding.effect_size is not None
                else ""
            )
            + (f", p={finding.p_value:.3g}" if finding.p_value is not None else "")
        )

    # --- people's actions ----------------------------------------------------------------

    def acknowledge(self, incident_id: str, actor: str, reason: str = "") -> Incident:
        with write_transaction(self.engine) as session:
            incident = self._get(session, incident_id)
            if incident.status is not IncidentStatus.OPEN:
                raise InvalidTransitionError(
                    f"incident {incident_id} is {incident.status.value}; only open incidents "
                    "can be acknowledged"
                )
            now = self.clock()
            incident.status = IncidentStatus.ACKNOWLEDGED
            incident.acknowledged_at = now
            incident.updated_at = now
            self._record(
                session, incident, Transition.ACKNOWLEDGED, IncidentStatus.OPEN, actor, reason
            )
            self._notify(
                session, incident, NotificationEvent.ACKNOWLEDGE, f"acknowledged by {actor}"
            )
            return incident

    def resolve(self, incident_id: str, actor: str, reason: str = "") -> Incident:
        with write_transaction(self.engine) as session:
            incident = self._get(session, incident_id)
            if incident.status is IncidentStatus.RESOLVED:
                raise InvalidTransitionError(f"incident {incident_id} is already resolved")
            self._resolve(
                session,
                incident,
                actor=actor,
                reason=reason or f"resolved by {actor}",
                now=self.clock(),
            )
            return incident

    def add_note(self, incident_id: str, actor: str, text: str) -> Incident:
        with write_transaction(self.engine) as session:
            incident = self._get(session, incident_id)
            now = self.clock()
            stamp = f"[{now.isoformat(timespec='seconds')} {actor}] {text.strip()}"
            incident.notes = f"{incident.notes}\n{stamp}" if incident.notes else stamp
            incident.updated_at = now
            self._record(session, incident, Transition.NOTED, incident.status, actor, text[:200])
            return incident

    def _get(self, session: Session, incident_id: str) -> Incident:
        # Touch the row first: that takes the write lock on SQLite (a row lock on
        # PostgreSQL) before reading, so a concurrent finding cannot be overwritten.
        touched = session.exec(
            sa.update(Incident).where(Incident.id == incident_id).values(updated_at=self.clock())
        )
        incident = session.get(Incident, incident_id, populate_existing=True)
        if not touched.rowcount or incident is None:
            raise IncidentNotFoundError(
                f"no incident {incident_id!r}; `genmon incidents list` shows their ids"
            )
        return incident

    def _resolve(
        self, session: Session, incident: Incident, *, actor: str, reason: str, now: datetime
    ) -> int:
        before = incident.status
        incident.status = IncidentStatus.RESOLVED
        incident.resolved_at = now
        incident.updated_at = now
        self._record(session, incident, Transition.RESOLVED, before, actor, reason)
        # Related incidents are untouched: each paged on its own and resolves on its own.
        return self._notify(session, incident, NotificationEvent.RESOLVE, reason)

    def _record(
        self,
        session: Session,
        incident: Incident,
        transition: Transition,
        from_status: IncidentStatus | None,
        actor: str = "genmon",
        reason: str = "",
    ) -> None:
        at = self.clock()
        insert = sa.insert(IncidentTransition).values(
            incident_id=incident.id,
            transition=transition,
            from_status=from_status,
            to_status=incident.status,
            actor=actor,
            reason=reason,
            at=at,
        )
        if transition is Transition.NOTED or not self.config.publish_events:
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

    # --- the outbox ----------------------------------------------------------------------

    def _notify(
        self, session: Session, incident: Incident, event: NotificationEvent, reason: str
    ) -> int:
        """Queue ``event`` for its destinations, in the caller's transaction.

        A trigger or update goes where the routes send it; an acknowledge or resolve goes
        where the incident was paged (whatever the routes of this process say, so
        ``genmon incidents ack`` needs no destinations configured). Returns how many rows
        were queued for delivery (not suppressed by a silence).
        """
        labels = incident_labels(incident)
        announcement = event in ANNOUNCEMENTS
        if not announcement:
            targets = self._paged_destinations(session, incident)
        elif event is NotificationEvent.UPDATE and not self._is_paged(session, incident):
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
                for target in self.router.route(labels)
            ]
        if not targets:
            return 0
        now = self.clock()
        silence = self._silence_for(session, labels, now) if announcement else None
        incident.notify_seq += 1
        payload = self._payload(session, incident, event, reason, labels, now)
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

    @staticmethod
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

    @staticmethod
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

    @staticmethod
    def _silence_for(session: Session, labels: dict[str, str], now: datetime) -> Silence | None:
        # Loaded once per transaction: a batch of findings shares one view of silences.
        active = session.info.get(_SILENCES)
        if active is None:
            active = session.info[_SILENCES] = ActiveSilences.load(session, now)
        return active.matching(labels)

    def _payload(
        self,
        session: Session,
        incident: Incident,
        event: NotificationEvent,
        reason: str,
        labels: dict[str, str],
        now: datetime,
    ) -> dict[str, Any]:
        related = self._related_ids(session, incident)
        # genmon's own ids stay readable in reasons, titles and evidence; secrets do not.
        keep = {incident.id, incident.fingerprint, *related}
        finding_id = incident.evidence.get("finding_id")
        if isinstance(finding_id, str):
            keep.add(finding_id)

        def scrub(value: Any) -> Any:
            return self.redactor.scrub(value, keep)

        return {
            "event": event.value,
            "sequence": incident.notify_seq,
            "reason": scrub(reason),
            "created_at": now.isoformat(),
            "labels": labels,
            "incident": {
                "id": incident.id,
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

    @staticmethod
    def _related_ids(session: Session, incident: Incident) -> list[str]:
        """The incident it is related to (``parent_id``), or those related to it."""
        if incident.parent_id is not None:
            return [incident.parent_id]  # linking is one level deep: it has none of its own
        if incident.notify_seq <= 1:
            return []  # its first page, at opening: nothing has been linked to it yet
        query = (
            select(Incident.id)
            .where(Incident.parent_id == incident.id)
            .order_by(Incident.opened_at)
        )
        return list(session.exec(query).all())

    # --- silences that end ---------------------------------------------------------------

    def repeat_unsilenced_pages(self) -> int:
        """Page again wherever a silence that has ended held back a still-open incident.

        One trigger per destination that never heard of the incident (rules in
        :func:`~genmon.streams.incidents.silences.pages_to_repeat`), under the incident's
        dedup key and an idempotency key made of the silence's id: checking again, a
        restart or a second dispatcher finds the page queued (the incident row is locked
        while it is checked and queued, and the database refuses a second row with that
        key). An acknowledged incident's trigger is followed by its acknowledge, the one
        the silence held back too: the receiver learns about the problem and that someone
        has it, and PagerDuty does not escalate what genmon says is being handled.
        Returns how many triggers were queued.
        """
        now = self.clock()
        with session_scope(self.engine) as session:
            incident_ids = sorted({page.incident.id for page in pages_to_repeat(session, now)})
        queued = 0
        for incident_id in incident_ids:
            try:
                with write_transaction(self.engine) as session:
                    queued += self._repeat_pages(session, incident_id, now)
            except IntegrityError:
                log.info("incident %s: its unsilenced page was queued by another", incident_id)
        return queued

    def _repeat_pages(self, session: Session, incident_id: str, now: datetime) -> int:
        # Lock the incident first (the write lock on SQLite, its row on PostgreSQL) and
        # look again: it may have been resolved, or paged, since the read above.
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
        rows = self._repeated(session, incident, pages, NotificationEvent.TRIGGER, reason, now)
        if incident.status is IncidentStatus.ACKNOWLEDGED:
            actor = session.exec(
                select(IncidentTransition.actor)
                .where(IncidentTransition.incident_id == incident.id)
                .where(IncidentTransition.transition == Transition.ACKNOWLEDGED)
                .order_by(IncidentTransition.id.desc())
            ).first()
            acknowledged = f"acknowledged by {actor or 'someone'}"
            rows += self._repeated(
                session, incident, pages, NotificationEvent.ACKNOWLEDGE, acknowledged, now
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
        self,
        session: Session,
        incident: Incident,
        pages: Sequence[HeldBackPage],
        event: NotificationEvent,
        reason: str,
        now: datetime,
    ) -> list[dict[str, Any]]:
        """Rows of ``event`` for the destinations of ``pages``, keyed by their silences."""
        incident.notify_seq += 1
        payload = self._payload(session, incident, event, reason, incident_labels(incident), now)
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

    # --- housekeeping --------------------------------------------------------------------

    def prune_seen(self) -> int:
        """Forget dedup keys older than ``finding_dedup_retention_s``; returns how many."""
        cutoff = self.clock() - timedelta(seconds=self.config.finding_dedup_retention_s)
        with write_transaction(self.engine) as session:
            result = session.exec(sa.delete(FindingSeen).where(FindingSeen.seen_at < cutoff))
            return int(result.rowcount or 0)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
