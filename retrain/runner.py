"""``genmon worker --role retrain``: the process that claims retrain jobs and runs them.

Any number of these run, on any machines that share the database. Each one

1. starts the retrain agent (:class:`genmon.retrain.agent.RetrainAgent`): it turns
   incidents and retrain requests into job rows and commits its Kafka offsets at once, so
   training never runs inside a Kafka poll loop (a job longer than
   ``max.poll.interval.ms`` would be redelivered forever);
2. loops: claim a job (:class:`genmon.retrain.queue.JobQueue`, guarded by the policy's
   ``max_running`` and ``daily_device_hours``) -> run it in a child process
   (``python -m genmon.retrain.job JOB EPOCH OWNER``) -> renew the lease from a heartbeat
   thread every ``retrain.heartbeat_s`` while the child runs.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from sqlalchemy.engine import Engine

from genmon import db, kafka_config
from genmon.exceptions import DatabaseError
from genmon.retrain.queue import ACTIVE, JobQueue, Lease, get_job
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: The child found its lease gone and stopped without writing (EX_TEMPFAIL).
EXIT_LEASE_LOST = 75
#: The child failed and recorded it (``JobQueue.fail``) itself (EX_SOFTWARE).
EXIT_RECORDED = 70
#: Environment variable naming the worker's pid to its child (see :func:`die_with_parent`).
PARENT_PID_ENV = "GENMON_RETRAIN_PARENT_PID"
#: Lines of the child's stderr kept for the error of a crashed job.
TAIL_LINES = 30
#: Seconds a stopping child gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 10.0
#: prctl option: the signal a process gets when the thread that forked it ends.
PR_SET_PDEATHSIG = 1
#: Seconds between two looks at the parent (the fallback where prctl is missing).
PARENT_POLL_S = 1.0


def default_owner() -> str:
    """``host:pid:random``: unique per worker process, readable in audit rows."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def child_env(settings: Settings, loglevel: str | None = None) -> dict[str, str]:
    """The child's environment: the worker's, with the settings the job needs spelled out
    (the worker may have been given settings that differ from its environment; the rest,
    such as ``notify`` for announcements, the job reads from the environment as is)."""
    env = dict(os.environ)
    retrain = settings.retrain
    env.update(
        {
            "GENMON_DATABASE__URL": settings.database.url,
            "GENMON_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "GENMON_RETRAIN__ARTIFACTS_URI": retrain.artifacts_uri,
            "GENMON_RETRAIN__LEASE_S": str(retrain.lease_s),
            "GENMON_RETRAIN__HEARTBEAT_S": str(retrain.heartbeat_s),
            "GENMON_RETRAIN__DEVICE": retrain.device,
            "GENMON_RETRAIN__REDACT": str(retrain.redact).lower(),
            PARENT_PID_ENV: str(os.getpid()),
        }
    )
    env.update(kafka_config.environment(settings.kafka))  # address, TLS/SASL, durability
    if retrain.policy_file is not None:
        env["GENMON_RETRAIN__POLICY_FILE"] = str(retrain.policy_file)
    env["GENMON_WORKER__LOGLEVEL"] = (loglevel or settings.worker.loglevel).lower()
    return env


def die_with_parent(parent_pid: int | None) -> None:
    """Make this process die within ~1 s of its worker, however the worker dies.

    ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent goes (Linux); a
    thread watching ``os.getppid()`` covers other systems and the race where the parent
    died before the signal was armed (this process is then re-parented).
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
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    watcher = threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
    )
    watcher.start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
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


def _relay(stream: IO[str], tail: deque[str]) -> None:
    """Pass the child's stderr through to ours, keeping its last lines for the error."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        sys.stderr.write(line)
        sys.stderr.flush()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class RetrainWorker:
    """Claims jobs and runs each in a child process until :meth:`stop`."""

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
        self.python = python
        self.loglevel = loglevel
        self._stopping = threading.Event()

    @property
    def owner(self) -> str:
        return self.queue.owner

    def stop(self) -> None:
        """Stop claiming; a running job is stopped and released (see the module doc)."""
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
        """Run one claimed job in a child, renewing its lease, and record how it ended."""
        child = self._spawn(lease)
        heartbeat = Heartbeat(
            self.queue, lease, self.settings.retrain.heartbeat_s, on_lost=child.kill
        )
        heartbeat.start()
        stopped = False
        try:
            while child.process.poll() is None:
                if self._stopping.is_set() and not stopped:
                    stopped = True
                    self._terminate(child)
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=0.2)
        finally:
            heartbeat.stop()
            if child.relay is not None:
                child.relay.join(timeout=5)
        self._settle(lease, child, heartbeat.lost, stopped)

    def _spawn(self, lease: Lease) -> ChildRun:
        command = [
            self.python,
            "-m",
            "genmon.retrain.job",
            lease.job_id,
            str(lease.epoch),
            lease.owner,
        ]
        # Started from the thread that runs the loop (the main thread under
        # run_retrain_worker): PR_SET_PDEATHSIG fires when the *thread* that forked ends.
        process = subprocess.Popen(
            command,
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

    def _terminate(self, child: ChildRun) -> None:
        log.info("stopping job process %d (worker shutting down)", child.process.pid)
        child.process.terminate()
        try:
            child.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill(f"still running {STOP_GRACE_S:g} s after SIGTERM")
            child.process.wait()

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
    "Heartbeat",
    "RetrainWorker",
    "child_env",
    "default_owner",
    "die_with_parent",
    "run_retrain_worker",
]
