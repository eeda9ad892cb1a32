"""The default backend: the job runs in a child process of the worker, on this machine.

A child dies with its worker (:func:`genmon.retrain.runner.die_with_parent`), so a local
run is never adopted: the next worker starts a new attempt from the last checkpoint. How
the worker watches the child (heartbeat, exit codes) is in :mod:`genmon.retrain.runner`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from genmon.retrain.backends.base import settings_env, training_command
from genmon.retrain.queue import Lease
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: Environment variable naming the worker's pid to its child (see ``die_with_parent``).
PARENT_PID_ENV = "GENMON_RETRAIN_PARENT_PID"
#: Lines of the child's stderr kept for the error of a crashed job.
TAIL_LINES = 30
#: Seconds a stopping child gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 10.0


def child_env(settings: Settings, loglevel: str | None = None) -> dict[str, str]:
    """The child's environment: the worker's, with the settings the job needs spelled out
    (the worker may have been given settings that differ from its environment; the rest,
    such as ``notify`` for announcements, the job reads from the environment as is)."""
    env = dict(os.environ)
    env.update(settings_env(settings, loglevel))
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


@dataclass
class ChildRun:
    """One child process and what it said."""

    process: subprocess.Popen[str]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    relay: threading.Thread | None = None

    def kill(self, why: str) -> None:
        if self.process.poll() is None:
            log.warning("killing job process %d: %s", self.process.pid, why)
            self.process.kill()

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_GRACE_S` (the worker is stopping)."""
        log.info("stopping job process %d (worker shutting down)", self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill(f"still running {STOP_GRACE_S:g} s after SIGTERM")
            self.process.wait()


def _relay(stream: IO[str], tail: deque[str]) -> None:
    """Pass the child's stderr through to ours, keeping its last lines for the error."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        sys.stderr.write(line)
        sys.stderr.flush()


class LocalBackend:
    """Runs the training command as a child of this worker (``retrain.backend: local``)."""

    name = "local"

    def __init__(
        self, settings: Settings, python: str = sys.executable, loglevel: str | None = None
    ) -> None:
        self.settings = settings
        self.python = python
        self.loglevel = loglevel

    def command(self, lease: Lease) -> list[str]:
        return training_command(self.settings, lease, self.python)

    def spawn(self, lease: Lease) -> ChildRun:
        """Start the child. Call it from the thread that runs the claim loop:
        ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends."""
        process = subprocess.Popen(
            self.command(lease),
            env=child_env(self.settings, self.loglevel),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        log.info("retrain job %s epoch %d: job process %d", lease.job_id, lease.epoch, process.pid)
        child = ChildRun(process)
        assert process.stderr is not None
        child.relay = threading.Thread(
            target=_relay, args=(process.stderr, child.tail), name="job-stderr", daemon=True
        )
        child.relay.start()
        return child


__all__ = ["PARENT_PID_ENV", "ChildRun", "LocalBackend", "child_env"]
