"""Read queries shared by the JSON API and the dashboard: one place decides what a page of
incidents, a timeline or a signal series is, so both show the same thing.

Every function takes an open ``Session`` (``genmon.db.session_scope``) and only reads.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from genmon.api.exceptions import ApiError
from genmon.schemas.events import IncidentStatus, Severity
from genmon.schemas.incidents import Incident, IncidentTransition
from genmon.schemas.redact import Redactor
from genmon.schemas.signals import ALL, ROLLUP_RESOLUTION_S, WindowSignal
from genmon.settings import NotifySettings

#: The most incidents one page may hold, whatever the caller asks.
MAX_PAGE = 500
#: The most signal rows one series may hold.
MAX_SIGNAL_ROWS = 20_000


class InvalidCursor(ApiError, ValueError):
    """A pagination cursor that this API did not hand out (the API answers 422)."""


def encode_cursor(incident: Incident) -> str:
    """The opaque cursor after ``incident``: its opening time and id, base64url."""
    raw = f"{aware(incident.opened_at).isoformat()}|{incident.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(opened_at, id)`` of a cursor; raises :class:`InvalidCursor` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, sep, incident_id = raw.partition("|")
        if not sep or not incident_id:
            raise ValueError("no separator")
        opened_at = datetime.fromisoformat(when)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidCursor(
            f"cursor {cursor[:40]!r} is not one this API handed out: pass the `next_cursor` "
            "of the previous page, or none for the first"
        ) from exc
    return aware(opened_at), incident_id


def incident_page(
    session: Session,
    *,
    status: list[str] | None = None,
    model_id: str | None = None,
    severity: str | None = None,
    segment: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Incident], str | None]:
    """One page of incidents, newest opened first, and the cursor of the next page (None
    at the end). Keyset pagination on ``(opened_at, id)``: a page stays right while new
    incidents open above it."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(Incident)
    if status:
        query = query.where(col(Incident.status).in_([IncidentStatus(s) for s in status]))
    if model_id is not None:
        query = query.where(Incident.model_id == model_id)
    if severity is not None:
        query = query.where(Incident.severity == Severity(severity))
    if segment is not None:
        query = query.where(Incident.segment == segment)
    if cursor:
        opened_at, incident_id = decode_cursor(cursor)
        query = query.where(
            sa.or_(
                col(Incident.opened_at) < opened_at,
                sa.and_(Incident.opened_at == opened_at, col(Incident.id) < incident_id),
            )
        )
    query = query.order_by(col(Incident.opened_at).desc(), col(Incident.id).desc())
    rows = list(session.exec(query.limit(limit + 1)))
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None


def incident_timeline(session: Session, incident_id: str) -> list[IncidentTransition]:
    """The incident's transitions, oldest first (its audit trail)."""
    query = (
        select(IncidentTransition)
        .where(IncidentTransition.incident_id == incident_id)
        .order_by(col(IncidentTransition.at), col(IncidentTransition.id))
    )
    return list(session.exec(query))


def signal_rows(
    session: Session,
    model_id: str,
    *,
    version: str = ALL,
    segment: str = ALL,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 5000,
) -> list[WindowSignal]:
    """A (model, version, segment) series between ``since`` and ``until``, oldest first.

    Window-resolution rows where they exist; hourly rollups (kept longer) for the part of
    the range older than the first window row, so a long range charts without a gap and
    without counting an hour twice. Over ``limit`` rows, the newest ``limit`` are kept
    (a chart's recent end matters most).
    """
    limit = max(1, min(limit, MAX_SIGNAL_ROWS))
    base = select(WindowSignal).where(
        WindowSignal.model_id == model_id,
        WindowSignal.model_version == version,
        WindowSignal.segment == segment,
    )
    if since is not None:
        base = base.where(col(WindowSignal.window_end) > aware(since))
    if until is not None:
        base = base.where(col(WindowSignal.window_start) < aware(until))
    fine = list(
        session.exec(
            base.where(WindowSignal.resolution_s != ROLLUP_RESOLUTION_S)
            .order_by(col(WindowSignal.window_start).desc())
            .limit(limit)
        )
    )
    fine.reverse()
    rollups: list[WindowSignal] = []
    room = limit - len(fine)
    if room > 0:
        coarse = base.where(WindowSignal.resolution_s == ROLLUP_RESOLUTION_S)
        if fine:
            coarse = coarse.where(col(WindowSignal.window_end) <= fine[0].window_start)
        rollups = list(
            session.exec(coarse.order_by(col(WindowSignal.window_start).desc()).limit(room))
        )
        rollups.reverse()
    return rollups + fine


def signal_series(session: Session, model_id: str) -> list[tuple[str, str]]:
    """The (version, segment) series stored for a model, the whole-model one first."""
    query = (
        select(WindowSignal.model_version, WindowSignal.segment)
        .where(WindowSignal.model_id == model_id)
        .distinct()
    )
    pairs = [(str(v), str(s)) for v, s in session.exec(query)]
    return sorted(pairs, key=lambda p: (p != (ALL, ALL), p[0] != ALL, p[1] != ALL, p))


def signal_models(session: Session) -> list[str]:
    """Every model with stored window signals, by name."""
    query = select(WindowSignal.model_id).distinct().order_by(col(WindowSignal.model_id))
    return [str(m) for m in session.exec(query)]


def open_incident_counts(session: Session) -> dict[str, int]:
    """Unresolved incidents by severity; every severity present, zero or not."""
    counts = {severity.value: 0 for severity in Severity}
    query = (
        select(Incident.severity, sa.func.count())
        .where(Incident.status != IncidentStatus.RESOLVED)
        .group_by(Incident.severity)
    )
    for severity, count in session.exec(query):
        counts[Severity(severity).value] = int(count)
    return counts


def open_incidents_by_model(session: Session) -> dict[str, int]:
    """Unresolved incidents per model (models overview)."""
    query = (
        select(Incident.model_id, sa.func.count())
        .where(Incident.status != IncidentStatus.RESOLVED)
        .group_by(Incident.model_id)
    )
    return {str(model): int(count) for model, count in session.exec(query)}


def evidence_for_people(incident: Incident, notify: NotifySettings) -> dict[str, Any]:
    """The incident's evidence as people may see it: redacted and cut as
    ``notify.redact`` / ``notify.max_text_chars`` say, as in its pages, but for genmon's
    own ids (incident, fingerprint, parent, finding), which look like keys to the
    redactor and which on-call needs."""
    redactor = Redactor(enabled=notify.redact, max_text_chars=notify.max_text_chars)
    keep = {incident.id, incident.fingerprint}
    if incident.parent_id:
        keep.add(incident.parent_id)
    finding_id = incident.evidence.get("finding_id")
    if isinstance(finding_id, str):
        keep.add(finding_id)
    scrubbed: dict[str, Any] = redactor.scrub(incident.evidence, keep)
    return scrubbed


def aware(when: datetime) -> datetime:
    """``when`` with a time zone (naive means UTC, as genmon stores it)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
