"""Findings -> incidents, idempotently, with every notification queued in the same transaction.

One problem is one *fingerprint* (:mod:`~genmon.incidents.grouping` says which incident a
finding belongs to). The database, not memory, guarantees:

- a finding is applied once: its ``dedup_key`` (fingerprint + window end) goes into
  ``finding_seen`` in the same transaction, so a replay after a restart changes nothing;
- a fingerprint has at most one open incident: the partial unique index
  ``uq_incident_open_fingerprint``; a race between workers ends in an IntegrityError and
  the loser retries against the winner's row;
- every change and what it owes the outside world commit together: the audit row, the
  pages and the incidents-topic event are written in the change's transaction
  (:mod:`~genmon.incidents.notifications`), with unique idempotency keys, so there is
  exactly one trigger per incident opening.

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

A later finding of an open incident with a higher severity escalates it: severity and
title become the newer finding's (:mod:`~genmon.incidents.assessment` judges them), and
the update says so. When a silence ends while an incident it kept from a destination is
still open, :meth:`IncidentManager.repeat_unsilenced_pages` (run by the dispatcher every
poll interval) pages that destination then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from genmon.db import session_scope
from genmon.incidents._txn import write_transaction
from genmon.incidents.assessment import (
    SEVERITY_RANK,
    chart_with,
    describe_score,
    finding_severity,
    finding_title,
    observe,
    runbook_for,
)
from genmon.incidents.exceptions import IncidentNotFoundError, InvalidTransitionError
from genmon.incidents.grouping import (
    open_incident,
    recently_resolved,
    related_open,
    superseded_incident,
)
from genmon.incidents.notifications import (
    queue_notifications,
    queue_unsilenced_pages,
    record_transition,
)
from genmon.incidents.routing import Router
from genmon.incidents.silences import pages_to_repeat
from genmon.schemas.events import Finding, IncidentStatus, utcnow
from genmon.schemas.incidents import FindingSeen, Incident, NotificationEvent, Transition
from genmon.schemas.redact import Redactor
from genmon.settings import IncidentSettings, NotifySettings, Settings, get_settings

log = logging.getLogger(__name__)

_RACE_RETRIES = 3


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

    def apply_in(self, session: Session, finding: Finding) -> Outcome:
        """Apply ``finding`` in the caller's transaction: a change of the outbox and the
        incident it raises (a destination unreachable) commit together or not at all."""
        return self._apply(session, finding)

    def _apply(self, session: Session, finding: Finding) -> Outcome:
        key = finding.dedup_key
        if session.get(FindingSeen, key) is not None:
            return Outcome("duplicate")
        if (
            not finding.detected
            and open_incident(session, finding.fingerprint) is None
            and superseded_incident(session, finding) is None
        ):
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
        incident = open_incident(session, finding.fingerprint)
        if not finding.detected:
            if incident is None:
                incident = superseded_incident(session, finding)
                if incident is None:
                    return Outcome("ignored")
            return self._quiet_window(session, incident, finding, now)
        if incident is not None:
            return self._update(session, incident, finding, now)
        cooldown_s = self.config.reopen_cooldown_s
        recent = recently_resolved(session, finding.fingerprint, now, cooldown_s)
        if recent is not None:
            return self._reopen(session, recent, finding, now)
        return self._open(session, finding, now)

    def _open(self, session: Session, finding: Finding, now: datetime) -> Outcome:
        runbook = runbook_for(finding, self.config)
        incident = Incident(
            fingerprint=finding.fingerprint,
            model_id=finding.model_id,
            model_version=finding.model_version,
            detector=finding.detector,
            kind=finding.kind,
            signal=finding.signal,
            segment=finding.segment,
            severity=finding_severity(finding, self.config),
            title=finding_title(finding),
            runbook_url=runbook.url if runbook else None,
            remediation=list(runbook.remediation) if runbook else [],
            first_seen_at=now,
            opened_at=now,
            updated_at=now,
        )
        observe(incident, finding, now, self.config)
        reason = describe_score(finding)
        related = related_open(session, incident, now, self.config.group_window_s)
        if related is not None:
            # A link, not a merge: this problem still pages on its own, under its own key.
            incident.parent_id = related.id
            reason += f"; related to open incident {related.id}: {related.title}"
        session.add(incident)
        session.flush()
        self._record(session, incident, Transition.OPENED, None, reason=reason)
        sent = self._notify(session, incident, NotificationEvent.TRIGGER, reason)
        return Outcome("opened", incident.id, sent)

    def _update(
        self, session: Session, incident: Incident, finding: Finding, now: datetime
    ) -> Outcome:
        before = incident.severity
        observe(incident, finding, now, self.config)
        severity = finding_severity(finding, self.config)
        if SEVERITY_RANK[severity] <= SEVERITY_RANK[before]:
            return Outcome("updated", incident.id)
        # The worse finding says what the problem is now: its title replaces the old one.
        incident.severity = severity
        incident.title = finding_title(finding)
        escalated = f"escalated {before.value} -> {severity.value}: {incident.title}"
        self._record(
            session,
            incident,
            Transition.ESCALATED,
            incident.status,
            reason=f"{escalated} ({describe_score(finding)})",
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
        severity = finding_severity(finding, self.config)
        incident.severity = max(incident.severity, severity, key=SEVERITY_RANK.__getitem__)
        incident.title = finding_title(finding)  # the new page says what is happening now
        observe(incident, finding, now, self.config)
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
        # Not detected is not clear when the evidence still grew (a CUSUM that rose this
        # window, below its threshold): the problem is there, only not proven again yet.
        incident.quiet_windows = (
            0 if finding.evidence.get("elevated") else incident.quiet_windows + 1
        )
        incident.last_seen_at = now
        incident.updated_at = now
        incident.chart = chart_with(incident, finding, self.config.chart_points)
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
            reason=f"auto-resolved after {incident.quiet_windows} clear windows"
            + (
                f" of {finding.model_version}, which replaced {incident.model_version} as champion"
                if finding.fingerprint != incident.fingerprint
                else ""
            ),
            now=now,
        )
        return Outcome("resolved", incident.id, sent)

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
        """The transition's audit row, and its incidents-topic event when they are published."""
        record_transition(
            session,
            incident,
            transition,
            from_status,
            actor=actor,
            reason=reason,
            at=self.clock(),
            publish=self.config.publish_events,
        )

    def _notify(
        self, session: Session, incident: Incident, event: NotificationEvent, reason: str
    ) -> int:
        """Queue ``event`` for its destinations; returns how many pages were queued."""
        return queue_notifications(
            session,
            incident,
            event,
            reason,
            router=self.router,
            redactor=self.redactor,
            now=self.clock(),
            links=self.settings.api,
        )

    # --- silences that end ---------------------------------------------------------------

    def repeat_unsilenced_pages(self) -> int:
        """Page again wherever a silence that has ended held back a still-open incident.

        One trigger per destination that never heard of the incident (rules in
        :func:`~genmon.incidents.silences.pages_to_repeat`), under the incident's
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
                    queued += queue_unsilenced_pages(
                        session, incident_id, now, self.redactor, self.settings.api
                    )
            except IntegrityError:
                log.info("incident %s: its unsilenced page was queued by another", incident_id)
        return queued

    # --- housekeeping --------------------------------------------------------------------

    def prune_seen(self) -> int:
        """Forget dedup keys older than ``finding_dedup_retention_s``; returns how many."""
        cutoff = self.clock() - timedelta(seconds=self.config.finding_dedup_retention_s)
        with write_transaction(self.engine) as session:
            result = session.exec(sa.delete(FindingSeen).where(FindingSeen.seen_at < cutoff))
            return int(result.rowcount or 0)
