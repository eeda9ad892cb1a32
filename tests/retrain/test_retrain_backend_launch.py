"""Multi-process launch configuration (``retrain.launcher``): the command lines built for
``python``/``torchrun``/``accelerate``, locally and for a remote run, and a real
``torchrun --nproc-per-node 2`` of the job entry point on CPU: only rank 0 runs the job
(writes the row and the artifacts), rank 1 ends at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from incident_support import migrated_engine
from retrain_support_worker import HERE, add_examples, add_jobs, write_policy

from genmon.retrain.backends.base import REMOTE_FLAG, training_command
from genmon.retrain.backends.local import LocalBackend, child_env
from genmon.retrain.backends.ray import RayBackend
from genmon.retrain.job import main
from genmon.retrain.queue import JobQueue, Lease, audit_trail, get_job
from genmon.retrain.registry import register_model
from genmon.schemas.events import RetrainStatus
from genmon.settings import Settings

LEASE = Lease("job-7", "host:12:abc", 4)
JOB = ["-m", "genmon.retrain.job", "job-7", "4"]


def launch(launcher: str, processes: int = 1) -> Settings:
    return Settings(retrain={"launcher": launcher, "processes_per_job": processes})


def test_the_training_command_under_each_launcher() -> None:
    python = training_command(launch("python"), LEASE, "py")
    assert python == ["py", *JOB, "host:12:abc"]
    torchrun = training_command(launch("torchrun", 4), LEASE, "py")
    head = ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert torchrun[:6] == head
    assert torchrun[-5:] == [*JOB, "host:12:abc"] and "--max-restarts" in torchrun
    accelerate = training_command(launch("accelerate", 2), LEASE, "py")
    assert accelerate == [
        "py",
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--multi_gpu",
        *JOB,
        "host:12:abc",
    ]
    single = training_command(launch("accelerate", 1), LEASE, "py")
    assert "--multi_gpu" not in single


def test_a_remote_run_is_fenced_on_its_remote_id_and_uses_the_remote_python() -> None:
    retrain = {"launcher": "torchrun", "processes_per_job": 2}
    settings = Settings(retrain={**retrain, "remote_python": "/opt/venv/bin/python"})
    ray = RayBackend(settings)
    remote_id = ray.remote_id(LEASE)
    command = ray.command(LEASE)
    assert command[0] == "/opt/venv/bin/python" and "torch.distributed.run" in command
    assert command[-5:] == ["genmon.retrain.job", "job-7", "4", remote_id, REMOTE_FLAG]
    assert LocalBackend(settings, python="py").command(LEASE)[-1] == "host:12:abc"


def test_a_rank_other_than_zero_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 ends before it reads the settings: an unreachable database is no matter."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("GENMON_DATABASE__URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert main(["job-7", "4", "host:12:abc"]) == 0


def test_torchrun_two_processes_run_the_job_once_on_rank_zero(
    tiny_lm_path: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'genmon.db'}"
    engine = migrated_engine(url)
    register_model(engine, "chat", str(tiny_lm_path), "v1")
    add_examples(engine, "chat", [("How do I activate my card?", "Open the app, then Cards.")])
    (job_id,) = add_jobs(engine, "chat", 1)
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:fast", {})
    settings = Settings(
        database={"url": url},
        retrain={
            "launcher": "torchrun",
            "processes_per_job": 2,
            "policy_file": policy,
            "artifacts_uri": str(tmp_path / "artifacts"),
            "device": "cpu",
        },
    )
    lease = JobQueue(engine, "launcher-test", 60).claim()
    assert lease is not None
    env = {**child_env(settings), "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    env["GENMON_TEST_STEP_S"] = "0.01"
    done = subprocess.run(
        LocalBackend(settings, sys.executable).command(lease),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 idle" in done.stderr
    job = get_job(engine, job_id)
    assert job.status == RetrainStatus.REJECTED, job.error
    trail = [(a.from_status, a.to_status, a.actor) for a in audit_trail(engine, job_id)]
    assert trail == [
        ("queued", "running", "launcher-test"),
        ("running", "evaluating", "launcher-test"),
        ("evaluating", "rejected", "launcher-test"),
    ]
    engine.dispose()
