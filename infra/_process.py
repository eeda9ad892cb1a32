"""Process and port helpers shared by the local Kafka and PostgreSQL services.

A service is "ours" only when the pid it recorded still belongs to a live process whose
command line (or working directory) proves it is that service: pids get reused, and
signalling a stranger would be far worse than starting a second copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from genmon.exceptions import InfraError
from genmon.secrets import mask_text

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


def check_port_free(
    host: str,
    port: int,
    service: str,
    *,
    setting: str | None = None,
    error: type[InfraError] = InfraError,
) -> None:
    """Raise ``error`` (one line: the port, its holder, what to do) when ``service`` could
    not listen on ``host:port``.

    Checked before a service starts: otherwise the service itself fails to bind and
    ``genmon infra up`` can only show its log (a Java stack trace for Kafka). ``setting``
    names the variable that moves the service elsewhere (``GENMON_KAFKA__PORT``).
    """
    if not port_in_use(host, port):
        return
    remedy = f"choose a free port with {setting}" if setting else "choose another port"
    raise error(
        f"cannot start {service}: {host}:{port} is already in use by {port_holder(port)}; "
        f"stop that process, or {remedy}"
    )


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` now.

    Binds and listens the way servers do (SO_REUSEADDR, so connections of a stopped server
    lingering in TIME_WAIT do not count), which also catches a socket bound but not
    listening, or listening on another address of the same port: both refuse connections
    yet make the service's own bind fail.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            # Not ours to judge (an address this machine lacks, a privileged port): the
            # service reports those itself.
    return port_answers(host, port)


def port_holder(port: int) -> str:
    """Who holds local TCP ``port``, for one-line messages: ``"java (pid 4242: java ...
    kafka.Kafka server.properties)"``, or as much as can be told without the pid."""
    found, pid = _port_pid(port)
    if not found:
        # Linux lists no socket that is bound but neither listening nor connected (ss and
        # lsof do not show it either), so there is no pid to give.
        return "a socket bound without listening (Linux does not tell whose)"
    if pid is None:
        return f"another user's process (`sudo ss -ltnp 'sport = :{port}'` names it)"
    try:
        process = psutil.Process(pid)
        name = process.name()
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return f"pid {pid}"
    # Command lines can carry credentials (a database URL, --password=...).
    command = mask_text(_shorten_middle(cmdline, 120)) if cmdline else ""
    return f"{name} (pid {pid}: {command})" if command else f"{name} (pid {pid})"


def port_owner(port: int) -> str:
    """Former name of :func:`port_holder`."""
    return port_holder(port)


def _port_pid(port: int) -> tuple[bool, int | None]:
    """Whether a socket is on local ``port``, and the pid owning it (a listener first).

    psutil reads /proc/net/tcp* and matches socket inodes with /proc/<pid>/fd; processes of
    other users stay anonymous (None) unless genmon runs as root.
    """
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return True, None
    on_port = [c for c in connections if c.laddr and c.laddr.port == port]
    on_port.sort(key=lambda c: (c.pid is None, c.status != psutil.CONN_LISTEN, bool(c.raddr)))
    return bool(on_port), (on_port[0].pid if on_port else None)


def _shorten_middle(text: str, limit: int) -> str:
    """``text`` cut in the middle: a command's program and its last arguments (Kafka's main
    class and config file) say more than the JVM flags between them."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " ... " + text[-(limit - head - 5) :]


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
