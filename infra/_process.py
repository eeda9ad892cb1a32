"""Process and port helpers shared by the local Kafka and PostgreSQL services.

A service is "ours" only when the pid it recorded still belongs to a live process whose
command line (or working directory) proves it is that service: pids get reused, and
signalling a stranger would be far worse than starting a second copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

# Popen objects of services this process started: keeping them referenced lets the
# interpreter reap the child instead of leaving a zombie that looks alive to psutil.
_started: dict[int, subprocess.Popen[bytes]] = {}


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_owner(port: int) -> str:
    """A short description of the process listening on ``port``, for error messages."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return "another process"
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "another process"
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                return f"pid {conn.pid}"
            return f"pid {conn.pid} ({shorten(cmdline, 160)})"
    return "another process"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_pid(path: Path) -> int | None:
    """The pid stored in the first line of ``path``, or None when absent or garbled."""
    try:
        first_line = path.read_text().splitlines()[0]
        return int(first_line.strip())
    except (OSError, ValueError, IndexError):
        return None


def live_process(pid: int | None, proves_identity: Callable[[psutil.Process], bool]) -> bool:
    """Whether ``pid`` is a running (non-zombie) process for which ``proves_identity`` holds."""
    if pid is None or pid <= 0 or not process_exists(pid):
        return False
    try:
        return proves_identity(psutil.Process(pid))
    except psutil.Error:
        return False


def cmdline_contains(*needles: str) -> Callable[[psutil.Process], bool]:
    """An identity check: every needle occurs among the process's arguments."""

    def check(process: psutil.Process) -> bool:
        args = process.cmdline()
        return all(any(needle in arg for arg in args) for needle in needles)

    return check


def spawn_detached(argv: Sequence[str], output: Path, cwd: Path) -> int:
    """Start ``argv`` in its own session (it outlives the CLI), output appended to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as sink:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started[process.pid] = process
    return process.pid


def terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM ``pid``, wait up to ``timeout_s``, then SIGKILL; returns once it is gone."""
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        return
    if not wait_gone(pid, timeout_s):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
        wait_gone(pid, 10.0)


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited (and is reaped when it is our child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_exists(pid):
            return True
        time.sleep(0.1)
    return not process_exists(pid)


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited; zombies count as exited."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        return False
    _reap(pid)
    return False


def has_exited(pid: int) -> bool:
    """Whether ``pid`` has ended; authoritative (exit status) for processes we started."""
    process = _started.get(pid)
    if process is not None:
        return process.poll() is not None
    return not process_exists(pid)


def exit_description(pid: int) -> str:
    """How a process we started ended ("exit code 1", "signal 9"), or why that is unknown."""
    process = _started.get(pid)
    if process is None or process.poll() is None:
        return "state unknown" if process is None else "still running, but unrecognised"
    code = process.returncode
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _reap(pid: int) -> None:
    """Collect the exit status of a child we started, so it does not linger as a zombie."""
    process = _started.get(pid)
    if process is not None:
        process.wait()


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of ``path`` ("" when it does not exist)."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
