"""Window signals over time: window rows rolled up into hourly rows, then dropped.

``window_signal`` (:class:`~genmon.schemas.signals.WindowSignal`) gets one row per model,
version, segment and closed tumbling window. Retention (:func:`genmon.privacy.retention.
run_retention`) bounds it in two steps:

- rows at window resolution (``resolution_s`` below :data:`ROLLUP_RESOLUTION_S`) whose
  ``window_start`` is older than ``retention.signals_days`` are merged into the hourly row
  of their series (``resolution_s`` = 3600, ``window_start`` on the hour, UTC) and deleted,
  in one transaction per batch: an interrupted run changes nothing, and a second run finds
  nothing left to merge (so it is idempotent). An hour already rolled up (its windows cut
  off in two runs) is merged into, not overwritten;
- hourly rows older than ``retention.signal_rollups_days`` are deleted.

How an hour is summarised (:func:`merge`):

- counts (requests, errors, feedback, negative feedback) are summed, and rates
  recomputed from them: ``error_rate`` over requests, ``negative_rate`` over feedback,
  ``refusal_rate``/``empty_rate`` over answered requests (``requests - errors``, as the
  windows count them; each window's count is its rate times its answered requests, so
  these are exact up to float rounding);
- latency quantiles are the **request-weighted mean of the windows' quantiles**: an
  approximation (the quantile of a merged distribution is not the mean of quantiles; the
  sketches are not stored), close for steady traffic and smoothing short spikes, which the
  window rows kept for ``signals_days`` show exactly;
- scores, per signal: the window with the highest score gives ``score``, ``threshold``,
  ``value``, ``baseline`` and ``detector``; ``detected`` is whether any window detected,
  ``windows`` how many windows were judged and ``detected_windows`` how many fired.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.incidents._txn import write_transaction
from genmon.schemas.signals import ROLLUP_RESOLUTION_S, WindowSignal

#: Series keys of one hourly row.
Key = tuple[str, str, str, datetime]


def hour_of(at: datetime) -> datetime:
    """The start of ``at``'s hour (the rollup's ``window_start``)."""
    return at.replace(minute=0, second=0, microsecond=0)


def _answered(row: Any) -> int:
    return max(int(row.requests) - int(row.errors), 0)


def _count(rate: float | None, of: int) -> float:
    return (rate or 0.0) * of


def _weighted(rows: Iterable[Any], field: str) -> float | None:
    """Request-weighted mean of a quantile over the rows that have it (see module)."""
    total = weight = 0.0
    for row in rows:
        value = getattr(row, field)
        if value is not None and row.requests > 0:
            total += value * row.requests
            weight += row.requests
    return total / weight if weight else None


def _scores(rows: Iterable[Any]) -> dict[str, Any]:
    """Per signal: the top-scoring judgement, whether any detected, how many there were.

    A row that is itself a rollup counts its own ``windows``/``detected_windows``."""
    out: dict[str, Any] = {}
    for row in rows:
        for signal, judged in (row.scores or {}).items():
            if not isinstance(judged, dict):
                continue
            windows = int(judged.get("windows", 1))
            fired = int(judged.get("detected_windows", 1 if judged.get("detected") else 0))
            best = out.get(signal)
            if best is None:
                out[signal] = {**judged, "windows": windows, "detected_windows": fired}
                continue
            merged_windows = best["windows"] + windows
            merged_fired = best["detected_windows"] + fired
            if (judged.get("score") or 0.0) > (best.get("score") or 0.0):
                best = {**judged}
            out[signal] = {
                **best,
                "detected": merged_fired > 0,
                "windows": merged_windows,
                "detected_windows": merged_fired,
            }
    return out


def merge(key: Key, rows: list[Any]) -> dict[str, Any]:
    """The hourly row of ``rows`` (window rows of one series and hour, plus the hour's
    existing rollup if any), as column values; see the module for how."""
    model_id, version, segment, start = key
    requests = sum(int(r.requests) for r in rows)
    errors = sum(int(r.errors) for r in rows)
    feedback = sum(int(r.feedback) for r in rows)
    negative = sum(int(r.negative_feedback) for r in rows)
    answered = max(requests - errors, 0)
    refusals = sum(_count(r.refusal_rate, _answered(r)) for r in rows)
    empties = sum(_count(r.empty_rate, _answered(r)) for r in rows)
    return {
        "model_id": model_id,
        "model_version": version,
        "segment": segment,
        "resolution_s": ROLLUP_RESOLUTION_S,
        "window_start": start,
        "window_end": start + timedelta(seconds=ROLLUP_RESOLUTION_S),
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "latency_p50_ms": _weighted(rows, "latency_p50_ms"),
        "latency_p95_ms": _weighted(rows, "latency_p95_ms"),
        "latency_p99_ms": _weighted(rows, "latency_p99_ms"),
        "feedback": feedback,
        "negative_feedback": negative,
        "negative_rate": negative / feedback if feedback else None,
        "refusal_rate": refusals / answered if answered else None,
        "empty_rate": empties / answered if answered else None,
        "scores": _scores(rows),
    }


def _window_rows(limit: datetime) -> Any:
    return sa.and_(
        col(WindowSignal.resolution_s) < ROLLUP_RESOLUTION_S,
        col(WindowSignal.window_start) < limit,
    )


def roll_up(engine: Engine, limit: datetime, batch: int, dry_run: bool = False) -> int:
    """Merge window rows older than ``limit`` into hourly rows and delete them, ``batch``
    rows per transaction; returns the window rows removed (or, ``dry_run``, due)."""
    where = _window_rows(limit)
    if dry_run:
        with Session(engine) as session:
            count = select(sa.func.count()).select_from(WindowSignal).where(where)
            return int(session.exec(count).one())
    removed = 0
    while True:
        with write_transaction(engine) as session:
            rows = list(
                session.exec(
                    select(WindowSignal)
                    .where(where)
                    .order_by(col(WindowSignal.window_start), col(WindowSignal.id))
                    .limit(batch)
                )
            )
            _merge_into_hours(session, rows)
            if rows:
                ids = [row.id for row in rows]
                session.exec(sa.delete(WindowSignal).where(col(WindowSignal.id).in_(ids)))
        removed += len(rows)
        if len(rows) < batch:
            return removed


def _merge_into_hours(session: Session, rows: list[WindowSignal]) -> None:
    """Merge ``rows`` into their hours' rollups (read, merged, written back) in ``session``."""
    groups: dict[Key, list[Any]] = {}
    for row in rows:
        key = (row.model_id, row.model_version, row.segment, hour_of(row.window_start))
        groups.setdefault(key, []).append(row)
    for key, members in groups.items():
        model_id, version, segment, start = key
        existing = session.exec(
            select(WindowSignal).where(
                WindowSignal.model_id == model_id,
                WindowSignal.model_version == version,
                WindowSignal.segment == segment,
                WindowSignal.resolution_s == ROLLUP_RESOLUTION_S,
                WindowSignal.window_start == start,
            )
        ).first()
        values = merge(key, [*members, *([existing] if existing is not None else [])])
        if existing is None:
            session.add(WindowSignal(**values))
        else:
            for name, value in values.items():
                setattr(existing, name, value)
            session.add(existing)
    session.flush()


def hourly_where(limit: datetime) -> Any:
    """Hourly rows older than ``limit`` (retention's ``signal_rollups`` kind)."""
    return sa.and_(
        col(WindowSignal.resolution_s) >= ROLLUP_RESOLUTION_S,
        col(WindowSignal.window_start) < limit,
    )


__all__ = ["hour_of", "hourly_where", "merge", "roll_up"]
