"""``retrain.backend: ray`` on a real local Ray head (issue #18's acceptance): a job trains
on the tiny LM as a Ray Job end to end against PostgreSQL; a worker SIGKILLed while its
Ray Job runs is replaced by one that adopts the run: one submission, one result.

One head for the module (it takes seconds to start), on free ports, in a temp dir of its
own, in its own process group; it is stopped, and its processes killed by pid, whatever
the tests did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from incident_support import migrated_engine, postgres_schema_url
from retrain_support_worker import (
    Hold,
    WorkerProcess,
    add_examples,
    add_jobs,
    wait_for,
    worker_env,
    write_policy,
)
from sqlalchemy.engine import Engine

from genmon.retrain.backends.base import dns_label
from genmon.retrain.queue import TERMINAL, audit_trail, db_now, get_job
from genmon.retrain.registry import register_model, versions
from genmon.schemas.events import RetrainStatus

pytest.importorskip("ray.job_submission", reason="the ray package (genmon[ray]) is missing")
pytestmark = pytest.mark.postgres

JOB_TIMEOUT_S = 90.0
ONE_EXAMPLE = [("How do I activate my new card?", "Open the app, choose Cards, then Activate.")]
#: Two LoRA steps on the tiny LM; the gate answers insufficient_evidence from the sizes.
PARAMS = {"max_steps": 2, "batch_size": 1, "learning_rate": 5e-3}
PASSED_ON = ["PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE"]
PASSED_ON += ["GENMON_TEST_HOLD"]
Spawn = Callable[[dict[str, str], str], WorkerProcess]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _kill_ray(head: subprocess.Popen[bytes], temp_dir: str) -> None:
    """The head's process group, then any process still naming its temp dir, by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=3)  # `ray start --block` seldom ends on SIGTERM alone
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
                left.append(proc)
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray head with its dashboard (the Jobs API), one CPU, no GPU."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="gmray", dir="/tmp")  # Ray's socket paths are short
    names = ["port", "dashboard-port", "dashboard-agent-listen-port"]
    names += ["dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port"]
    names += ["object-manager-port", "runtime-env-agent-port", "ray-client-server-port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray), "start", "--head", "--block", "--num-cpus", "1", "--num-gpus", "0"]
    command += ["--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir]
    command += [f"--{name}={port}" for name, port in ports.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:

        def answers() -> bool:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
            try:
                JobSubmissionClient(address).list_jobs()
                return True
            except Exception:
                return False

        wait_for(answers, 60, "the Ray Jobs API")
        yield address
        client = JobSubmissionClient(address)
        for info in client.list_jobs():  # a failed test leaves nothing training
            if not info.status.is_terminal():
                client.stop_job(info.submission_id)
    finally:
        _kill_ray(head, temp_dir)
        log.close()


@pytest.fixture
def postgres(postgres_url: str) -> Iterator[tuple[Engine, str]]:
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine, url
        engine.dispose()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str) -> WorkerProcess:
        started.append(WorkerProcess(env, tmp_path / f"{name}.log"))
        return started[-1]

    yield start
    for worker in started:
        worker.kill_group()


def ray_env(base: dict[str, str], address: str, **extra: str) -> dict[str, str]:
    return {
        **base,
        "GENMON_RETRAIN__BACKEND": "ray",
        "GENMON_RETRAIN__RAY_ADDRESS": address,
        "GENMON_RETRAIN__GPUS_PER_JOB": "0",
        "GENMON_RETRAIN__REMOTE_POLL_S": "0.3",
        "GENMON_RETRAIN__REMOTE_PYTHON": sys.executable,
        "GENMON_RETRAIN__REMOTE_ENV_VARS": '["' + '","'.join(PASSED_ON) + '"]',
        **extra,
    }


def submissions(address: str, job_id: str) -> list[tuple[str, str]]:
    """Every Ray Job of ``job_id``, once none is running (the run's process exits just
    after it ends the job)."""
    from ray.job_submission import JobSubmissionClient

    def settled() -> list[Any] | None:
        jobs = JobSubmissionClient(address).list_jobs()
        mine = [j for j in jobs if (j.metadata or {}).get("genmon_job_id") == job_id]
        return mine if all(j.status.is_terminal() for j in mine) else None

    mine = wait_for(settled, 30, "the Ray Jobs to exit")
    return [(str(j.submission_id), str(j.status)) for j in mine]


def transitions(engine: Engine, job_id: str) -> list[tuple[str | None, str, int]]:
    return [(a.from_status, a.to_status, a.lease_epoch) for a in audit_trail(engine, job_id)]


def seed(engine: Engine, model_id: str, tiny_lm: Path) -> str:
    register_model(engine, model_id, str(tiny_lm), "v1")
    add_examples(engine, model_id, ONE_EXAMPLE)
    (job_id,) = add_jobs(engine, model_id, 1)
    return job_id


def ended(engine: Engine, job_id: str) -> bool:
    return get_job(engine, job_id).status in TERMINAL


def test_a_ray_job_trains_end_to_end_and_outlives_its_worker_by_adoption(
    ray_address: str,
    postgres: tuple[Engine, str],
    tiny_lm_path: Path,
    unique_name: str,
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    engine, url = postgres
    job_id = seed(engine, unique_name, tiny_lm_path)
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:held_lora", PARAMS)
    artifacts = tmp_path / "artifacts"
    hold = Hold(1, tmp_path / "held", tmp_path / "go-on")
    first_env = worker_env(url, policy, artifacts, lease_s=4, heartbeat_s=0.3, hold=hold)
    first = spawn(ray_env(first_env, ray_address), "first")
    run = psutil.Process(wait_for(hold.reached, JOB_TIMEOUT_S, "the Ray Job at step 1"))

    first.signal(signal.SIGKILL)
    first.process.wait()

    def lease_passed() -> bool:
        expires = get_job(engine, job_id).lease_expires_at
        with engine.connect() as conn:
            return expires is not None and db_now(conn) > expires

    wait_for(lease_passed, 30, "the dead worker's lease to pass")
    assert run.is_running(), "the Ray Job died with the worker that submitted it"
    second_env = worker_env(url, policy, artifacts, lease_s=10, heartbeat_s=0.3)
    second = spawn(ray_env(second_env, ray_address), "second")

    def adopted() -> bool:
        return any(f":{second.pid}:" in a.actor for a in audit_trail(engine, job_id))

    try:
        wait_for(adopted, JOB_TIMEOUT_S, "the second worker to adopt the run")
        hold.release.touch()
        wait_for(lambda: ended(engine, job_id), JOB_TIMEOUT_S, "the adopted run to end the job")
    finally:
        hold.release.touch()
        second.stop()
    job = get_job(engine, job_id)
    remote_id = dns_label(job_id, 1)
    assert job.status == RetrainStatus.REJECTED, (job.error, first.text(), second.text())
    assert job.verdict["decision"] == "insufficient_evidence" and job.artifact_uri is not None
    assert job.backend == "ray"
    # One attempt, one epoch: the run was never fenced out, and it ran from step 1 on.
    assert (job.attempts, job.lease_epoch, job.remote_id) == (1, 1, remote_id)
    assert (job.progress["step"], job.progress["first_step"]) == (2, 1)
    assert submissions(ray_address, job_id) == [(remote_id, "SUCCEEDED")]
    assert [v.job_id for v in versions(engine, unique_name)] == [None]  # v1 alone
    trail = audit_trail(engine, job_id)
    # A loaded machine may delay the first worker's heartbeat past its lease, and it then
    # adopts its own run again: adoptions (status unchanged) are counted apart.
    adoptions = [a for a in trail if a.from_status == a.to_status]
    assert [(a.from_status, a.to_status, a.lease_epoch) for a in trail if a not in adoptions] == [
        ("queued", "running", 1),
        ("running", "evaluating", 1),
        ("evaluating", "rejected", 1),
    ]
    assert adoptions and all(remote_id in a.reason and a.lease_epoch == 1 for a in adoptions)
    assert f":{second.pid}:" in adoptions[-1].actor
    # The worker claimed; the Ray Job, fenced on its submission id, wrote the rest.
    assert [a.actor for a in trail[-2:]] == [remote_id, remote_id]
    assert "submitted to ray" in first.text()
    assert "submitted to ray" not in second.text()
    psutil.wait_procs([run], timeout=10)
    assert not run.is_running()
