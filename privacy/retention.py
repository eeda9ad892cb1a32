"""Retention: what genmon stored longer ago than ``settings.retention`` allows goes.

:func:`run_retention` deletes, per kind, what is *strictly older* than its cut-off
(``now`` minus ``retention.<kind>_days``; unset: kept forever) and nothing newer:

=====================  ===================================================================
kind                   what goes
=====================  ===================================================================
labelled_examples      ``labelled_example`` rows created before the cut-off
findings               ``finding_seen`` dedup rows seen before it
notifications          settled notifications (delivered, dead, suppressed, superseded) of
                       resolved incidents, and settled daily digests (about no incident),
                       with their delivery log; never those of an open incident (they say
                       where its resolve goes)
incidents              resolved incidents, resolved before the cut-off, with their
                       transitions and notifications; never an open one, nor one with a
                       notification still to deliver
datasets               the dataset folders of jobs that ended before the cut-off; the job
                       keeps ``metrics.dataset_expired: {at, uri}``
artifacts              checkpoints and adapters of jobs that ended before the cut-off,
                       except an adapter a version serves or may serve again (active, the
                       serving version, any alias, a watching rollout); the job keeps
                       ``metrics.artifacts_expired`` and the version
                       ``eval_metrics.artifact_expired``
signals                ``window_signal`` rows at window resolution: merged into the hourly
                       rows of their series, then deleted (``removed`` counts the window
                       rows; :mod:`~genmon.privacy.signal_rollups` says how hours merge)
signal_rollups         hourly ``window_signal`` rows (``retention.signal_rollups_days``)
api_audit              ``api_audit`` rows (the API's writes) recorded before the cut-off
windows                nothing here: window records live on Kafka topics, whose
                       ``kafka.retention_ms`` bounds them (a warning when it is longer than
                       ``retention.windows_days``)
=====================  ===================================================================

Notifications and incidents resolved less than ``incidents.reopen_cooldown_s`` ago are
kept whatever the cut-off: such an incident may still reopen, and its notifications say
where its next resolve goes. Rows go in transactions of ``retention.batch_size``, so memory
and lock time stay bounded however much is due. ``dry_run`` counts instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.incidents._txn import write_transaction
from genmon.privacy.signal_rollups import hourly_where, roll_up
from genmon.schemas.access import ApiAudit
from genmon.schemas.events import IncidentStatus, utcnow
from genmon.schemas.incidents import (
    DeliveryAttempt,
    FindingSeen,
    Incident,
    IncidentTransition,
    Notification,
    NotificationStatus,
)
from genmon.schemas.signals import WindowSignal
from genmon.schemas.tables import LabelledExample
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore

log = logging.getLogger("genmon.privacy.retention")

#: The kinds, in the order they run (notifications before their incidents).
KINDS = (
    "labelled_examples",
    "findings",
    "notifications",
    "incidents",
    "datasets",
    "artifacts",
    "signals",
    "signal_rollups",
    "api_audit",
    "windows",
)
#: Notifications that will not change any more.
SETTLED = (
    NotificationStatus.DELIVERED,
    NotificationStatus.DEAD,
    NotificationStatus.SUPPRESSED,
    NotificationStatus.SUPERSEDED,
)
_DAY_MS = 86_400_000


@dataclass
class KindResult:
    """What retention removed (or would remove) of one kind."""

    kind: str
    removed: int = 0
    cutoff: datetime | None = None
    """``None``: this kind is kept forever (its ``retention.*_days`` is unset)."""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "removed": self.removed,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "note": self.note,
        }


@dataclass
class RetentionReport:
    """One run of :func:`run_retention`."""

    now: datetime
    dry_run: bool
    kinds: dict[str, KindResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(result.removed for result in self.kinds.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "dry_run": self.dry_run,
            "removed": self.removed,
            "kinds": {kind: result.to_json() for kind, result in self.kinds.items()},
            "warnings": list(self.warnings),
        }


def cutoff(now: datetime, days: float | None) -> datetime | None:
    """``now`` minus ``days`` (``None``: keep forever)."""
    return None if days is None else now - timedelta(days=days)


def run_retention(
    engine: Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    store: ArtifactStore | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Delete what is older than ``settings.retention`` allows (see the module docstring);
    ``dry_run``: count it and delete nothing. ``store`` defaults to
    ``settings.retrain.artifacts_uri``."""
    from genmon.privacy.retention_files import expire_artifacts, expire_datasets
    from genmon.retrain.artifacts import ArtifactStore

    now = now or utcnow()
    keep = settings.retention
    report = RetentionReport(now=now, dry_run=dry_run)
    purge = _Purger(engine, keep.batch_size, dry_run)
    # An incident resolved within the cool-down may reopen: it and its pages stay.
    settled_before = now - timedelta(seconds=settings.incidents.reopen_cooldown_s)

    def run(kind: str, days: float | None, apply: Callable[[datetime], int]) -> None:
        limit = cutoff(now, days)
        result = report.kinds[kind] = KindResult(kind, cutoff=limit)
        if limit is None:
            result.note = "kept forever (retention unset)"
            return
        result.removed = apply(limit)
        log.info(
            "retention: %s %d %s older than %s",
            "would remove" if dry_run else "removed",
            result.removed,
            kind,
            limit.isoformat(),
        )

    run("labelled_examples", keep.labelled_examples_days, purge.labelled_examples)
    run("findings", keep.findings_days, purge.findings_seen)
    run("notifications", keep.notifications_days, lambda c: purge.notifications(c, settled_before))
    run("incidents", keep.incidents_days, lambda c: purge.incidents(min(c, settled_before)))
    if (keep.datasets_days, keep.artifacts_days) != (None, None):
        store = store or ArtifactStore(settings.retrain.artifacts_uri)
    run("datasets", keep.datasets_days, lambda c: expire_datasets(engine, store, c, now, dry_run))
    run(
        "artifacts", keep.artifacts_days, lambda c: expire_artifacts(engine, store, c, now, dry_run)
    )
    run("signals", keep.signals_days, purge.signals)
    if keep.signals_days is not None:
        report.kinds["signals"].note = "rolled up into hourly rows, then deleted"
    run("signal_rollups", keep.signal_rollups_days, purge.signal_rollups)
    run("api_audit", keep.api_audit_days, purge.api_audit)
    report.kinds["windows"] = _windows(settings, now, report.warnings)
    return report


def _windows(settings: Settings, now: datetime, warnings: list[str]) -> KindResult:
    """Window records are Kafka's to delete: say how long the topics keep them."""
    kafka_days = settings.kafka.retention_ms / _DAY_MS
    wanted = settings.retention.windows_days
    result = KindResult(
        "windows",
        cutoff=now - timedelta(milliseconds=settings.kafka.retention_ms),
        note=f"on Kafka: {settings.topic('windows')} and genmon's other topics keep records "
        f"{kafka_days:g} days (kafka.retention_ms)",
    )
    if wanted is not None and settings.kafka.retention_ms > wanted * _DAY_MS:
        warnings.append(
            f"kafka.retention_ms ({kafka_days:g} days) is longer than retention.windows_days "
            f"({wanted:g}): lower GENMON_KAFKA__RETENTION_MS and apply it to the existing "
            "topics (kafka-configs --alter --add-config retention.ms=...)"
        )
    return result


class _Purger:
    """Batched deletes: one transaction of at most ``batch`` rows at a time."""

    def __init__(self, engine: Engine, batch: int, dry_run: bool) -> None:
        self.engine, self.batch, self.dry_run = engine, batch, dry_run

    def purge(
        self,
        table: Any,
        key: Any,
        where: Any,
        before: Callable[[Session, list[Any]], None] | None = None,
    ) -> int:
        """Delete the rows of ``table`` matching ``where``, ``batch`` keys at a time;
        ``before`` deletes what depends on a batch first, in its transaction."""
        if self.dry_run:
            with Session(self.engine) as session:
                return int(
                    session.exec(select(sa.func.count()).select_from(table).where(where)).one()
                )
        removed = 0
        while True:
            with write_transaction(self.engine) as session:
                keys = list(session.exec(select(key).where(where).order_by(key).limit(self.batch)))
                if keys:
                    if before is not None:
                        before(session, keys)
                    session.exec(sa.delete(table).where(key.in_(keys)))
            removed += len(keys)
            if len(keys) < self.batch:
                return removed

    def labelled_examples(self, limit: datetime) -> int:
        where = col(LabelledExample.created_at) < limit
        return self.purge(LabelledExample, col(LabelledExample.id), where)

    def findings_seen(self, limit: datetime) -> int:
        where = col(FindingSeen.seen_at) < limit
        return self.purge(FindingSeen, col(FindingSeen.dedup_key), where)

    def signals(self, limit: datetime) -> int:
        """Window-resolution signal rows before ``limit``, merged into hourly rows first."""
        return roll_up(self.engine, limit, self.batch, self.dry_run)

    def signal_rollups(self, limit: datetime) -> int:
        return self.purge(WindowSignal, col(WindowSignal.id), hourly_where(limit))

    def api_audit(self, limit: datetime) -> int:
        return self.purge(ApiAudit, col(ApiAudit.id), col(ApiAudit.at) < limit)

    def notifications(self, limit: datetime, settled_before: datetime) -> int:
        """Settled notifications older than ``limit`` of incidents resolved before
        ``settled_before``, and settled digests (no incident) older than ``limit``."""
        at = sa.func.coalesce(
            col(Notification.delivered_at),
            col(Notification.requeued_at),
            col(Notification.created_at),
        )
        resolved = select(Incident.id).where(
            Incident.status == IncidentStatus.RESOLVED,
            col(Incident.resolved_at) < settled_before,
        )
        where = sa.and_(
            col(Notification.status).in_(SETTLED),
            at < limit,
            sa.or_(
                col(Notification.incident_id).in_(resolved),
                col(Notification.incident_id).is_(None),
            ),
        )
        return self.purge(Notification, col(Notification.id), where, _delete_attempts)

    def incidents(self, limit: datetime) -> int:
        """Resolved incidents resolved before ``limit`` with nothing left to deliver."""
        undelivered = select(Notification.id).where(
            Notification.incident_id == Incident.id,
            col(Notification.status).in_(
                (NotificationStatus.PENDING, NotificationStatus.DELIVERING)
            ),
        )
        where = sa.and_(
            Incident.status == IncidentStatus.RESOLVED,
            col(Incident.resolved_at) < limit,
            ~undelivered.exists(),
        )
        return self.purge(Incident, col(Incident.id), where, _delete_incident_children)


def _delete_attempts(session: Session, notification_ids: list[Any]) -> None:
    session.exec(
        sa.delete(DeliveryAttempt).where(col(DeliveryAttempt.notification_id).in_(notification_ids))
    )


def _delete_incident_children(session: Session, incident_ids: list[Any]) -> None:
    """Everything that points at these incidents, so no foreign key is left dangling
    (SQLite enforces them only with its pragma; explicit deletes need neither)."""
    notifications = select(Notification.id).where(col(Notification.incident_id).in_(incident_ids))
    session.exec(
        sa.delete(DeliveryAttempt).where(col(DeliveryAttempt.notification_id).in_(notifications))
    )
    session.exec(sa.delete(Notification).where(col(Notification.incident_id).in_(incident_ids)))
    session.exec(
        sa.delete(IncidentTransition).where(col(IncidentTransition.incident_id).in_(incident_ids))
    )
    session.exec(
        sa.update(Incident).where(col(Incident.parent_id).in_(incident_ids)).values(parent_id=None)
    )


__all__ = ["KINDS", "KindResult", "RetentionReport", "cutoff", "run_retention"]
