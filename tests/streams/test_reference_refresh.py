"""Drift-reference refresh by the clock: a ``reference-refresh`` tick the scheduler
recorded makes the detection runner replace its references at the next closed window."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from incident_support import migrated_engine, sqlite_url
from sqlmodel import Session
from test_runner import Traffic, window

from genmon.detectors import EmbeddingShiftDrift
from genmon.schemas.governance import REFERENCE_REFRESH_SCHEDULE, ScheduleFire
from genmon.settings import Settings
from genmon.streams.detection.reference_refresh import LatestFire, RefreshRequests
from genmon.streams.detection.runner import DetectorRunner

WARMUP = 4
ERRORS = "error_rate\x1f*"


def _ref_windows(state: dict[str, Any]) -> int:
    return int(state["baselines"][ERRORS]["ref"][0])


def _apply(runner: DetectorRunner, state: Any, minutes: range, error_rate: float) -> Any:
    for minute in minutes:
        state, _ = runner.on_window(state, window(minute, {"v1": Traffic(error_rate=error_rate)}))
        state = json.loads(json.dumps(state))  # what the Faust table keeps
    return state


def test_a_recorded_reference_refresh_makes_the_next_window_refresh(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    settings = Settings(
        database={"url": url},
        scheduler={"reference_refresh_cron": "0 4 * * *"},
        detectors={"baseline_warmup_windows": WARMUP},
    )
    runner = DetectorRunner(settings)
    assert runner.refresh is not None and runner.refresh.read_now() is None  # nothing asked
    # Warm-up at 5 % errors, then a candidate as large grows the young reference to 8
    # windows; four more healthy windows at 0.5 % are a candidate too small to refresh it
    # by size (it waits for 8).
    state = _apply(runner, None, range(1, 2 * WARMUP + 1), 0.05)
    state = _apply(runner, state, range(2 * WARMUP + 1, 3 * WARMUP + 1), 0.005)
    assert "refreshed_at" not in state  # a state as stored before the field: it loads
    assert _ref_windows(state) == 2 * WARMUP
    before = state["baselines"][ERRORS]["reference"][1]

    fired = datetime(2026, 1, 5, 4, tzinfo=UTC)
    try:
        with Session(engine) as session:
            session.add(
                ScheduleFire(
                    schedule=REFERENCE_REFRESH_SCHEDULE,
                    fire_time=fired,
                    holder="scheduler",
                    result={"status": "requested"},
                )
            )
            session.commit()
    finally:
        engine.dispose()
    assert runner.refresh.read_now() == round(fired.timestamp() * 1000)

    state = _apply(runner, state, range(3 * WARMUP + 1, 3 * WARMUP + 2), 0.005)
    assert state["refreshed_at"] == round(fired.timestamp() * 1000)
    # The four-window candidate at 0.5 % replaced the 8-window reference at ~2.8 %.
    assert _ref_windows(state) == WARMUP
    after = state["baselines"][ERRORS]["reference"][1]
    assert after < 0.01 < before
    # Applied once: the next windows learn as usual until the next tick.
    state = _apply(runner, state, range(3 * WARMUP + 2, 3 * WARMUP + 4), 0.005)
    assert _ref_windows(state) == WARMUP and state["baselines"][ERRORS]["cand"][0] == 3


def test_no_refresh_cron_or_no_database_reads_nothing(tmp_path: Path) -> None:
    assert DetectorRunner(Settings()).refresh is None  # no reference_refresh_cron
    missing = f"sqlite:///{tmp_path / 'absent.sqlite'}"
    assert RefreshRequests(LatestFire(missing)).read_now() is None
    assert not (tmp_path / "absent.sqlite").exists()  # looking did not create it


def test_an_embedding_reference_refreshes_once_its_candidate_has_enough_rows() -> None:
    rng = np.random.default_rng(3)
    det = EmbeddingShiftDrift(
        alpha=1e-6,
        components=2,
        basis_rows=40,
        reference_windows=3,
        min_reference_rows=60,
        min_window_rows=5,
        refresh_windows=1000,
    )
    for _ in range(5):  # two windows for the basis, three for the reference
        det.update(rng.normal(size=(20, 4)))
    assert det.refresh_now() is None  # no candidate yet
    for _ in range(2):
        det.update(rng.normal(size=(20, 4)))
    assert det.refresh_now() is None  # two windows, 40 rows: too few
    det.update(rng.normal(size=(20, 4)))
    assert det.refresh_now() is True
    assert det.state_dict()["state"]["refreshes"] == 1
