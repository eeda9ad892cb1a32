"""`genmon demo` (the README's main job) runs end to end on the real broker and database.

One run covers both stories: the monitoring one (a bad rollout opens incidents and pages a
signed receiver) and the feedback loop (issue "Close the feedback loop (1 of 2)"'s
acceptance): a refusal incident on bank-bot, exactly one retraining job although the finding
and the request are each delivered twice, a candidate the behaviour check shows refusing
less, the champion alias moved, the models topic and a signed webhook announcing it, the
follower serving it and the incident resolved on its traffic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from incident_support import postgres_schema_url

from genmon.settings import Settings

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def demo_db(postgres_url: str) -> Iterator[str]:
    with postgres_schema_url(postgres_url) as url:
        yield url


def test_demo_pages_on_call_and_closes_the_feedback_loop(
    kafka_settings: Settings, demo_db: str, free_port: Callable[[], int]
) -> None:
    if not (DATA_DIR / "xstest").is_dir():
        pytest.fail(f"the demo needs the shared data sets at {DATA_DIR}")
    env = {**os.environ, "GENMON_WORKER__WEB_PORT": str(free_port())}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "genmon.cli",
            "demo",
            "--data-dir",
            str(DATA_DIR),
            "--healthy-s",
            "55",
            "--regression-s",
            "30",
            "--database-url",
            demo_db,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The regression: Llama-2 refuses XSTest's safe prompts far more often than GPT-4, on
    # the new version, judged against the model's baseline from its first window...
    assert re.search(r"Refusal rate \d+% \(\d+ of \d+\), baseline [\d.]+%, support-bot v2", out), (
        out
    )
    # ... and everyone's time to first token moved to Bedrock's.
    assert re.search(r"TTFT p95 [\d.]+ m?s, baseline [\d.]+ m?s, support-bot", out), out
    assert "trigger" in out, out
    assert "(0 rejected)" in out, out
    assert '"invalid": 5' in out, out
    _assert_the_loop_closed(demo_db, out)


def _assert_the_loop_closed(url: str, out: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as db:
            incidents = db.execute(
                sa.text("SELECT id, signal, status FROM incident WHERE model_id = 'bank-bot'")
            ).all()
            jobs = db.execute(
                sa.text(
                    "SELECT job_id, status, incident_id, candidate_version, verdict"
                    " FROM retrain_job WHERE model_id = 'bank-bot'"
                )
            ).all()
            champion = db.execute(
                sa.text(
                    "SELECT version FROM model_alias WHERE model_id = 'bank-bot'"
                    " AND alias = 'champion'"
                )
            ).scalar_one()
            audit = db.execute(sa.text("SELECT count(*) FROM retrain_job_audit")).scalar_one()
    finally:
        engine.dispose()
    # One incident, resolved on the new version's traffic.
    assert [(signal, status) for _, signal, status in incidents] == [("refusal_rate", "resolved")]
    # Exactly one job although the finding and the request were delivered twice.
    assert "delivered again: findings message" in out and "retrain message" in out, out
    assert len(jobs) == 1, jobs
    _, status, incident_id, version, verdict = jobs[0]
    assert (status, incident_id) == ("promoted", incidents[0][0])
    # The candidate refuses less on the incident's segment, judged by genmon's own detector.
    behaviour = verdict["metrics"]["refusal_rate"]
    assert behaviour["candidate"] < behaviour["serving"], verdict
    assert behaviour["ci"][1] < 0, verdict
    # The alias moved, on-call's webhook got the signed announcement, the follower serves it.
    assert champion == version
    assert re.search(r"model announcements to on-call: [1-9]", out), out
    assert f"the follower serves {version} now" in out, out
    assert audit >= 3  # queued, running, evaluating, promoted
    # Resolved by the new version's clear windows, not by the old one's.
    assert re.search(rf"incident resolved: .* of {version}, which replaced v1 as champion", out)
