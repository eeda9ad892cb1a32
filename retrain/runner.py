"""``genmon worker --role retrain``: the process that claims retrain jobs and runs them.

Any number of these run, on any machines that share the database. Each one

1. starts the retrain agent (:class:`genmon.retrain.agent.RetrainAgent`): it turns
   incidents and retrain requests into job rows and commits its Kafka offsets at once, so
   training never runs inside a Kafka poll loop (a job longer than
   ``max.poll.interval.ms`` would be redelivered forever);
2. loops: claim a job (:class:`genmon.retrain.queue.JobQueue`, guarded by the policy's
   ``max_running`` and ``daily_device_hours``) -> run it where ``retrain.backend`` says
   (:mod:`genmon.retrain.backends`): in a child process here
   (``python -m genmon.retrain.job JOB EPOCH OWNER``, under ``retrain.launcher``), or as a
   Ray Job or Kubernetes Job that this worker then only supervises -> renew the lease
   from a heartbeat thread every ``retrain.heartbeat_s`` while it runs.

What follows is the local backend. A remote run outlives its worker on purpose: the next
worker adopts it (:mod:`genmon.retrain.backends.supervise`).

Why a child process: training holds the GIL, the GPU and gigabytes of memory. In a child
it cannot starve the heartbeat, a crash or an out-of-memory kill takes the child and not
the worker, and the worker can stop it at once, which is what a lost lease asks: the
heartbeat finds the lease gone (expired, taken over, cancelled) -> SIGKILL, no grace. A
child that outlives its worker would train for nobody, so it dies with it
(:func:`die_with_parent`: ``PR_SET_PDEATHSIG`` plus a watch on its
parent, within a second or two).

Exit codes of the child: 0 the job ended (promoted or rejected), :data:`EXIT_LEASE_LOST`
it found its lease gone and stopped, :data:`EXIT_RECORDED` it failed and recorded the
failure itself; anything else (a crash, a signal) the worker records with
:meth:`JobQueue.fail` and the end of the child's log.

SIGTERM/SIGINT stop claiming, stop the running child (SIGTERM, then SIGKILL after a
grace period) and release its job (:meth:`JobQueue.release`): another worker resumes it
from its last checkpoint at once instead of waiting for the lease to lapse.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy.engine import Engine

from genmon import db
from genmon.exceptions import DatabaseError
from genmon.retrain.backends.local import PARENT_PID_ENV, ChildRun, LocalBackend, child_env
from genmon.retrain.queue import ACTIVE, JobQueue, Lease, get_job
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: The child found its lease gone and stopped without writing (EX_TEMPFAIL).
EXIT_LEASE_LOST = 75
#: The child failed and recorded it (``JobQueue.fail``) itself (EX_SOFTWARE).
EXIT_RECORDED = 70
#: prctl option: the signal a process gets when the thread that forked it ends.
PR_SET_PDEATHSIG = 1
#: Seconds between two looks at the parent (the fallback where prctl is missing).
PARENT_POLL_S = 1.0


def default_owner() -> str:
    """``host:pid:random``: unique per worker process, readable in audit rows."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def launch_rank() -> int | None:
    """This process's rank under ``torchrun``/``accelerate launch`` (``RANK``, else
    ``LOCAL_RANK``); ``None`` when no launcher started it."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def die_with_parent(parent_pid: int | None, *, launched: bool = False) -> None:
    """Make this process die within ~1 s of its worker, however the worker dies.

    ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent goes (Linux); a
    thread watching ``os.getppid()`` covers other systems and the race where the parent
    died before the signal was armed (this process is then re-parented). ``launched``:
    a launcher (torchrun) stands between the worker and this process, so the parent is
    the launcher: the watch is then on the worker's pid itself.
    """
    if parent_pid is None:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); watching the parent instead", exc)
    if not _parent_alive(parent_pid, launched):
        os.kill(os.getpid(), signal.SIGKILL)
    watcher = threading.Thread(
        target=_watch_parent, args=(parent_pid, launched), name="parent-watch", daemon=True
    )
    watcher.start()


def _parent_alive(parent_pid: int, launched: bool) -> bool:
    if not launched:
        return os.getppid() == parent_pid
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, though not ours to signal
        return True
    return True


def _watch_parent(parent_pid: int, launched: bool) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if not _parent_alive(parent_pid, launched):
            os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat:
    """Renews a lease every ``interval_s`` until stopped; calls ``on_lost`` once when the
    lease is gone (refused, or not renewed for a whole ``lease_s`` because the database
    was unreachable: by then another worker may hold it)."""

    def __init__(
        self, queue: JobQueue, lease: Lease, interval_s: float, on_lost: Callable[[str], None]
    ) -> None:
        self.queue = queue
        self.lease = lease
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{lease.job_id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        renewed = time.monotonic()
        while not self._done.wait(self.interval_s):
            try:
                held = self.queue.renew(self.lease)
            except DatabaseError as exc:
                log.warning("heartbeat of retrain job %s failed: %s", self.lease.job_id, exc)
                if time.monotonic() - renewed < self.queue.lease_s:
                    continue
                held = False
            if held:
                renewed = time.monotonic()
                continue
            if self._done.is_set():  # the child ended the job meanwhile
                return
            self.lost = "the lease is no longer held: expired, taken over, cancelled or ended"
            self.on_lost(self.lost)
            return


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class RetrainWorker:
    """Claims jobs and runs each where ``retrain.backend`` says, until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        max_running: int | None = None,
        daily_device_hours: float | None = None,
        owner: str | None = None,
        python: str = sys.executable,
        loglevel: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = JobQueue(engine, owner or default_owner(), settings.retrain.lease_s)
        self.max_running = max_running
        self.daily_device_hours = daily_device_hours
        self.local = LocalBackend(settings, python, loglevel)
        self._stopping = threading.Event()

    @property
    def owner(self) -> str:
        return self.queue.owner

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    def stop(self) -> None:
        """Stop claiming; a running job is stopped and released (see the module doc); a
        remote run goes on, let go for another worker to adopt."""
        self._stopping.set()

    def run(self) -> None:
        log.info("retrain worker %s polling for jobs", self.owner)
        while not self._stopping.is_set():
            try:
                lease = self.queue.claim(
                    max_running=self.max_running, daily_device_hours=self.daily_device_hours
                )
            except DatabaseError as exc:
                log.warning("claiming a retrain job failed: %s", exc)
                lease = None
            if lease is None:
                self._stopping.wait(self.settings.retrain.poll_interval_s)
                continue
            self.run_job(lease)
        log.info("retrain worker %s stopped", self.owner)

    def run_job(self, lease: Lease) -> None:
        """Run one claimed job where it belongs: the remote run a claim adopted (the
        row's ``remote_id``), else as ``retrain.backend`` says."""
        backend, remote_id = self.settings.retrain.backend, None
        try:
            job = get_job(self.engine, lease.job_id)
        except DatabaseError as exc:
            log.warning("reading retrain job %s failed: %s", lease.job_id, exc)
            return  # its lease lapses; another claim takes it
        if job.remote_id is not None:
            backend, remote_id = job.backend, job.remote_id
        if backend == "local":
            self.run_local(lease)
            return
        from genmon.retrain.backends.supervise import supervise

        supervise(self, lease, backend, remote_id)

    def run_local(self, lease: Lease) -> None:
        """Run one claimed job in a child, renewing its lease, and record how it ended."""
        child = self.local.spawn(lease)
        heartbeat = Heartbeat(
            self.queue, lease, self.settings.retrain.heartbeat_s, on_lost=child.kill
        )
        heartbeat.start()
        stopped = False
        try:
            while child.process.poll() is None:
                if self._stopping.is_set() and not stopped:
                    stopped = True
                    child.terminate()
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=0.2)
        finally:
            heartbeat.stop()
            if child.relay is not None:
                child.relay.join(timeout=5)
        self._settle(lease, child, heartbeat.lost, stopped)

    def _settle(self, lease: Lease, child: ChildRun, lost: str | None, stopped: bool) -> None:
        code = child.process.returncode
        if lost is not None:
            if code != 0:
                log.warning("retrain job %s: %s; its process was killed", lease.job_id, lost)
            return
        try:
            if code in (EXIT_LEASE_LOST, EXIT_RECORDED):
                return
            if stopped or (self._stopping.is_set() and code != 0):
                self.queue.release(lease)
                return
            if code == 0:
                if get_job(self.engine, lease.job_id).status in ACTIVE:
                    self.queue.fail(lease, "the job process exited without ending the job")
                return
            tail = " | ".join(line for line in list(child.tail)[-5:] if line.strip())
            self.queue.fail(lease, f"the job process {describe_exit(code)}: {tail}"[:4000])
        except DatabaseError as exc:
            log.error("could not record the end of retrain job %s: %s", lease.job_id, exc)


def _start_agent(settings: Settings, engine: Engine, policy: Any) -> Any:
    """The retrain agent, when its module is installed (it is optional to this loop)."""
    try:
        from genmon.retrain.agent import RetrainAgent
    except ModuleNotFoundError as exc:
        if exc.name != "genmon.retrain.agent":
            raise
        log.warning("genmon.retrain.agent is not installed: this worker only runs jobs")
        return None
    agent = RetrainAgent(settings, engine, policy)
    agent.start()
    return agent


def _start_watcher(settings: Settings, engine: Engine, policy: Any) -> Any:
    """The rollout watcher (:mod:`genmon.retrain.watch`): judges watching challengers."""
    from genmon.retrain.watch import RolloutWatcher

    watcher = RolloutWatcher(settings, engine, policy)
    watcher.start()
    return watcher


def configure_logging(settings: Settings, loglevel: str | None) -> None:
    level = (loglevel or settings.worker.loglevel).upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from genmon.logs import install

    install(settings)


def run_retrain_worker(
    settings: Settings, loglevel: str | None = None, *, with_agent: bool = True
) -> None:
    """``genmon worker --role retrain``: the agent, the rollout watcher
    (:mod:`genmon.retrain.watch`) and the claim loop, until SIGTERM/SIGINT.

    ``with_agent=False`` runs the claim loop alone (a worker that only trains, on a
    machine without the broker).
    """
    from genmon.retrain.policy import load_policy

    configure_logging(settings, loglevel)
    policy = load_policy(settings.retrain.policy_file)
    db.upgrade(settings.database.url)
    engine = db.make_engine(settings.database.url)
    worker = RetrainWorker(
        settings,
        engine,
        max_running=policy.guards.max_running,
        daily_device_hours=policy.guards.daily_device_hours,
        loglevel=loglevel,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("retrain worker: %s, stopping", signal.Signals(signum).name)
        worker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    agent = _start_agent(settings, engine, policy) if with_agent else None
    watcher = _start_watcher(settings, engine, policy) if with_agent else None
    try:
        worker.run()
    finally:
        for helper in (watcher, agent):
            if helper is not None:
                helper.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()


__all__ = [
    "EXIT_LEASE_LOST",
    "EXIT_RECORDED",
    "PARENT_PID_ENV",
    "Heartbeat",
    "RetrainWorker",
    "child_env",
    "default_owner",
    "die_with_parent",
    "launch_rank",
    "run_retrain_worker",
]
