"""`genmon demo` (the README's main job) runs end to end on the real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from genmon.settings import Settings

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_opens_incidents_and_pages_a_signed_receiver(
    kafka_settings: Settings, free_port: Callable[[], int]
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
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
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
