"""The demo's dashboard: ``genmon api`` on loopback over the demo's database and topics.

It runs as a subprocess like the workers (its own log, stopped with SIGTERM so uvicorn
shuts down cleanly), without a token: it listens on 127.0.0.1 only, so nobody but this
machine's users reach it. The workers get the same ``api`` settings, so the link in every
page they send leads to this dashboard.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from genmon.settings import ApiSettings

#: The demo's dashboard listens here only: no token asked, so never on a public address.
LOOPBACK = "127.0.0.1"
#: How long ``genmon api`` may take to answer /healthz once started.
START_TIMEOUT_S = 120.0


def dashboard_settings(base: ApiSettings) -> ApiSettings:
    """``base`` on loopback, open without a token (its port and public URL kept)."""
    return base.model_copy(update={"host": LOOPBACK, "require_token_for_dashboard": False})


def dashboard_env(api: ApiSettings) -> dict[str, str]:
    """The variables that give a child process these ``api`` settings."""
    env = {
        "GENMON_API__HOST": api.host,
        "GENMON_API__PORT": str(api.port),
        "GENMON_API__REQUIRE_TOKEN_FOR_DASHBOARD": str(api.require_token_for_dashboard).lower(),
    }
    if api.public_url:
        env["GENMON_API__PUBLIC_URL"] = api.public_url
    return env


class Dashboard:
    """``genmon api`` as a child process, with its log under the demo's folder."""

    def __init__(self, api: ApiSettings, env: dict[str, str], log_path: Path) -> None:
        self.api = api
        self.env = {**env, **dashboard_env(api)}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where people open it (``api.link_base()``)."""
        return self.api.link_base()

    @property
    def local_url(self) -> str:
        """Where this process reaches it (the public URL may be a proxy's)."""
        return f"http://{self.api.host}:{self.api.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "genmon.cli", "api"]
        command += ["--host", self.api.host, "--port", str(self.api.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once /healthz answers; fail in one line if it exits or never answers."""
        import httpx

        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise click.ClickException(
                    f"the dashboard (`genmon api`) exited with {self.process.returncode}: "
                    f"{self._last_log_line()} (log {self.log_path}); free port "
                    f"{self.api.port} or set GENMON_API__PORT"
                )
            try:
                if httpx.get(f"{self.local_url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise click.ClickException(
            f"the dashboard did not answer on {self.local_url} within {timeout_s:.0f} s; "
            f"see {self.log_path}"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes its requests and runs the shutdown hooks), then kill."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"
