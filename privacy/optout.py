"""Opt-out from training: subjects whose feedback must never train a model.

One ``subject_opt_out`` row per subject (:class:`~genmon.schemas.governance.SubjectOptOut`);
the dataset builder reads :func:`opted_out` and leaves their examples out. Opting out
changes no dataset built before (erase the subject for that) and keeps their rows for
monitoring; opting in again deletes the row.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.schemas.governance import SubjectOptOut
from genmon.schemas.tables import MAX_REASON_CHARS

log = logging.getLogger("genmon.privacy.optout")


def _check(subject_id: str) -> None:
    if not subject_id or not subject_id.strip():
        raise ConfigurationError("a subject id is required: pass --subject ID")


def opt_out(engine: Engine, subject_id: str, requested_by: str, note: str = "") -> bool:
    """Record that ``subject_id`` opted out; False when they had already (the first
    request's time and note are kept)."""
    _check(subject_id)
    with session_scope(engine) as session:
        if session.get(SubjectOptOut, subject_id) is not None:
            return False
        session.add(
            SubjectOptOut(
                subject_id=subject_id, requested_by=requested_by, note=note[:MAX_REASON_CHARS]
            )
        )
        return True


def opt_in(engine: Engine, subject_id: str, requested_by: str) -> bool:
    """Remove ``subject_id``'s opt-out; False when there was none. ``requested_by`` is
    for the caller's log (the row, and with it the opt-out, is gone)."""
    _check(subject_id)
    with session_scope(engine) as session:
        row = session.get(SubjectOptOut, subject_id)
        if row is None:
            return False
        session.delete(row)
    log.info("a data subject opted in again (asked by %s)", requested_by)
    return True


def opted_out(engine: Engine) -> list[str]:
    """Every subject id that opted out, sorted."""
    with Session(engine) as session:
        query = select(SubjectOptOut.subject_id).order_by(col(SubjectOptOut.subject_id))
        return list(session.exec(query))


def opt_out_status(engine: Engine, subject_id: str) -> dict[str, Any]:
    """``{opted_out, since, requested_by, note}`` of one subject."""
    with Session(engine) as session:
        row = session.get(SubjectOptOut, subject_id)
    if row is None:
        return {"opted_out": False, "since": None, "requested_by": None, "note": None}
    return {
        "opted_out": True,
        "since": row.created_at.isoformat(),
        "requested_by": row.requested_by,
        "note": row.note,
    }
