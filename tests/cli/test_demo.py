"""`genmon demo` (the README's main job) runs end to end on the real broker and database.

One run covers both stories: the monitoring one (a bad rollout opens incidents and pages a
signed receiver) and the feedback loop (issue "Close the feedback loop (1 of 2)"'s
acceptance): a refusal incident on bank-bot, exactly one retraining job although the finding
and the request are each delivered twice, a candidate the behaviour check shows refusing
less, the champion alias moved, the models topic and a signed webhook announcing it, the
follower serving it and the incident resolved on its traffic. With ``--keep`` (issue "genmon
for people"), the dashboard it prints answers, the incidents' pages too, until Ctrl-C stops
it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from incident_support import postgres_schema_url

from genmon.settings import Settings

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"
#: What `genmon demo --keep` says once the story is told and the dashboard stays up.
KEPT_UP = "Ctrl-C stops them"

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
    api_port = free_port()
    env = {
        **os.environ,
        "GENMON_WORKER__WEB_PORT": str(free_port()),
        "GENMON_API__PORT": str(api_port),
    }
    demo = subprocess.Popen(
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
            "--keep",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _Output(demo)
    try:
        out = output.wait_for(KEPT_UP, timeout_s=900)
        # Kept up after the story: the printed dashboard and an incident's page answer.
        dashboard = f"http://127.0.0.1:{api_port}"
        assert f"dashboard: {dashboard} " in out, out
        assert httpx.get(f"{dashboard}/", timeout=30).status_code == 200, out
        page = re.search(rf"{re.escape(dashboard)}/incidents/\S+", out)
        assert page is not None, out
        assert httpx.get(page.group(0), timeout=30).status_code == 200
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(timeout=120) == 0, output.text
    finally:
        _stop(demo)
    output.reader.join(timeout=30)
    out = output.text
    # Ctrl-C stopped the dashboard with the rest.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{dashboard}/healthz", timeout=5)
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


def _stop(demo: subprocess.Popen[str]) -> None:
    """Ctrl-C a demo still running (it stops its workers and dashboard), kill it if stuck."""
    if demo.poll() is not None:
        return
    demo.send_signal(signal.SIGINT)
    try:
        demo.wait(timeout=120)
    except subprocess.TimeoutExpired:
        demo.kill()
        demo.wait(timeout=30)


class _Output:
    """A process's output, line by line as it comes (a thread reads the pipe)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, name="demo-output", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The output so far once it holds ``text``; fails if the process ends first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.text:
                return self.text
            if self.process.poll() is not None:
                self.reader.join(timeout=30)  # what it printed last
                if text in self.text:
                    return self.text
                pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.text}")
            time.sleep(1.0)
        pytest.fail(f"no {text!r} within {timeout_s:.0f} s:\n{self.text}")


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
