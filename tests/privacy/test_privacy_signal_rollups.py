"""Retention of window signals: window rows rolled up into hours, hours and the API audit
dropped, each exactly at its cut-off (one second older goes, the cut-off itself stays)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.privacy.retention import run_retention
from genmon.schemas.access import ApiAudit
from genmon.schemas.signals import ROLLUP_RESOLUTION_S, WindowSignal
from genmon.settings import Settings

NOW = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
SECOND = timedelta(seconds=1)
SIGNALS_CUT = NOW - timedelta(days=7)  # 12:30: its hour is 12:00
ROLLUPS_CUT = NOW - timedelta(days=30)
AUDIT_CUT = NOW - timedelta(days=10)
HOUR = SIGNALS_CUT.replace(minute=0)


def _settings() -> Settings:
    return Settings.model_validate(
        {
            "retention": {
                "signals_days": 7,
                "signal_rollups_days": 30,
                "api_audit_days": 10,
                "batch_size": 2,  # several transactions, and an hour split across them
            }
        }
    )


def _window(start: datetime, segment: str = "*", **values: Any) -> WindowSignal:
    return WindowSignal(
        model_id="chat",
        model_version="v1",
        segment=segment,
        resolution_s=60,
        window_start=start,
        window_end=start + timedelta(seconds=60),
        **values,
    )


def _rows(engine: Engine) -> dict[tuple[int, datetime, str], WindowSignal]:
    with Session(engine) as session:
        return {
            (r.resolution_s, r.window_start.astimezone(UTC), r.segment): r
            for r in session.exec(select(WindowSignal))
        }


def _score(score: float, detected: bool, value: float) -> dict[str, Any]:
    return {
        "score": score,
        "threshold": 5.0,
        "detected": detected,
        "value": value,
        "baseline": 0.01,
        "detector": "rate_cusum",
    }


def test_window_rows_roll_up_into_hours_at_the_cutoff(engine: Engine) -> None:
    settings = _settings()
    with Session(engine) as session:
        # Two windows of the 12:00 hour older than the cut-off, then the cut-off and after.
        session.add(
            _window(
                SIGNALS_CUT - 61 * SECOND,
                requests=100,
                errors=10,
                error_rate=0.1,
                latency_p50_ms=100.0,
                latency_p95_ms=200.0,
                latency_p99_ms=300.0,
                feedback=10,
                negative_feedback=2,
                negative_rate=0.2,
                refusal_rate=0.1,  # of 90 answered: 9
                empty_rate=0.0,
                scores={"error_rate": _score(7.0, True, 0.1)},
            )
        )
        session.add(
            _window(
                SIGNALS_CUT - SECOND,
                requests=300,
                errors=0,
                error_rate=0.0,
                latency_p50_ms=200.0,
                latency_p95_ms=400.0,
                latency_p99_ms=None,
                feedback=30,
                negative_feedback=3,
                negative_rate=0.1,
                refusal_rate=0.03,  # of 300 answered: 9
                empty_rate=0.01,  # 3
                scores={"error_rate": _score(2.0, False, 0.0), "latency": _score(1.0, False, 1)},
            )
        )
        session.add(_window(SIGNALS_CUT - timedelta(hours=1), segment="lang=en", requests=5))
        session.add(_window(SIGNALS_CUT, requests=7))
        session.add(_window(SIGNALS_CUT + SECOND, requests=8))
        session.commit()

    dry = run_retention(engine, settings, now=NOW, dry_run=True)
    assert dry.kinds["signals"].removed == 3
    assert len(_rows(engine)) == 5  # a dry run changes nothing
    report = run_retention(engine, settings, now=NOW)
    assert report.kinds["signals"].removed == 3

    rows = _rows(engine)
    assert set(rows) == {
        (60, SIGNALS_CUT, "*"),
        (60, SIGNALS_CUT + SECOND, "*"),
        (ROLLUP_RESOLUTION_S, HOUR, "*"),
        (ROLLUP_RESOLUTION_S, HOUR - timedelta(hours=1), "lang=en"),
    }
    hour = rows[(ROLLUP_RESOLUTION_S, HOUR, "*")]
    assert hour.window_end.astimezone(UTC) == HOUR + timedelta(hours=1)
    assert (hour.requests, hour.errors, hour.feedback, hour.negative_feedback) == (400, 10, 40, 5)
    assert hour.error_rate == pytest.approx(10 / 400)
    assert hour.negative_rate == pytest.approx(5 / 40)
    assert hour.refusal_rate == pytest.approx(18 / 390)
    assert hour.empty_rate == pytest.approx(3 / 390)
    # Request-weighted mean of the windows' quantiles; a missing one is left out.
    assert hour.latency_p50_ms == pytest.approx((100 * 100 + 300 * 200) / 400)
    assert hour.latency_p99_ms == pytest.approx(300.0)
    assert hour.scores["error_rate"] == {
        **_score(7.0, True, 0.1),
        "windows": 2,
        "detected_windows": 1,
    }
    assert hour.scores["latency"]["windows"] == 1
    assert rows[(ROLLUP_RESOLUTION_S, HOUR - timedelta(hours=1), "lang=en")].requests == 5

    # Run again: nothing left to roll up, nothing changes.
    again = run_retention(engine, settings, now=NOW)
    assert again.kinds["signals"].removed == 0
    assert _rows(engine)[(ROLLUP_RESOLUTION_S, HOUR, "*")].requests == 400

    # A later run cuts off more of the same hour: merged into its rollup, not overwritten.
    later = NOW + 10 * SECOND
    run_retention(engine, settings, now=later)
    rows = _rows(engine)
    assert (60, SIGNALS_CUT, "*") not in rows and (60, SIGNALS_CUT + SECOND, "*") not in rows
    merged = rows[(ROLLUP_RESOLUTION_S, HOUR, "*")]
    assert merged.requests == 415
    assert merged.scores["error_rate"]["windows"] == 2  # the new windows judged nothing
    assert merged.latency_p50_ms == pytest.approx((100 * 100 + 300 * 200) / 400)  # none new


def test_hourly_rows_and_the_api_audit_go_at_their_cutoffs(engine: Engine) -> None:
    with Session(engine) as session:
        for start in (ROLLUPS_CUT - SECOND, ROLLUPS_CUT, ROLLUPS_CUT + SECOND):
            session.add(
                WindowSignal(
                    model_id="chat",
                    resolution_s=ROLLUP_RESOLUTION_S,
                    window_start=start,
                    window_end=start + timedelta(hours=1),
                    requests=1,
                )
            )
        for at in (AUDIT_CUT - SECOND, AUDIT_CUT, AUDIT_CUT + SECOND):
            session.add(
                ApiAudit(at=at, token_name="t", method="POST", path="/v1/x", status_code=200)
            )
        session.commit()

    report = run_retention(engine, _settings(), now=NOW)
    assert report.kinds["signal_rollups"].removed == 1
    assert report.kinds["api_audit"].removed == 1
    assert set(report.to_json()["kinds"]) >= {"signals", "signal_rollups", "api_audit"}
    with Session(engine) as session:
        starts = {r.window_start.astimezone(UTC) for r in session.exec(select(WindowSignal))}
        audits = {r.at.astimezone(UTC) for r in session.exec(select(ApiAudit))}
    assert starts == {ROLLUPS_CUT, ROLLUPS_CUT + SECOND}
    assert audits == {AUDIT_CUT, AUDIT_CUT + SECOND}
