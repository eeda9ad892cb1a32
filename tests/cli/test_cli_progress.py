"""Progress bars on long work for people at a terminal, never for scripts or ``--json``
(genmon.cli._progress), seen through a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from genmon.cli._progress import interactive, progress, spinner

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")


def _stream(path: Path, events: int = 400) -> Path:
    with path.open("w") as handle:
        for i in range(events):
            event = {
                "model_id": "progress-bot",
                "request_id": f"r{i}",
                "started_at": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00",
                "prompt": "how do I reset my password?",
                "response": "Open settings, then security.",
                "latency_ms": 120.0 + i % 7,
            }
            handle.write(json.dumps(event) + "\n")
    return path


def _run_with_a_terminal_on_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run ``genmon ARGS`` with stderr on a pseudo-terminal and stdout on a pipe."""
    controller, terminal = pty.openpty()
    drawn = bytearray()

    def drain() -> None:  # a full terminal buffer would block the command
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "genmon.cli", *args],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=env,
            timeout=300,
        )
    finally:
        os.close(terminal)
    reader.join(timeout=30)
    os.close(controller)
    return done.returncode, done.stdout.decode(), drawn.decode(errors="replace")


def test_replay_draws_a_bar_at_a_terminal_and_nothing_with_json(tmp_path: Path) -> None:
    stream = _stream(tmp_path / "stream.jsonl")
    args = ["replay", str(stream), "--no-embeddings", "--database", f"sqlite:///{tmp_path}/r.db"]
    code, out, drawn = _run_with_a_terminal_on_stderr(args)
    assert code == 0, drawn
    assert "replaying stream.jsonl" in drawn and "100%" in drawn, drawn
    assert "inferences" in out and "replaying" not in out  # the bar stays off stdout

    code, out, drawn = _run_with_a_terminal_on_stderr([*args[:2], "--json", *args[2:]])
    assert code == 0, drawn
    assert "replaying" not in drawn, drawn
    assert json.loads(out)["counts"]["inference_events"] == 400


def test_scripts_see_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal (pytest's capture, a pipe, a log): nothing drawn, the work still done."""
    assert not interactive() and not interactive(as_json=True)
    done: list[float] = []
    with spinner("working"), progress("counting", 3) as advance:
        for _ in range(3):
            advance(1)
            done.append(1)
    assert done == [1, 1, 1]
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
