"""Retrain workers as real processes on the real databases (issue #15's acceptance):
exclusive claims, a killed worker's job resumed at the checkpoint's next step with the same
held-out loss, a paused worker that writes nothing, a graceful stop that releases its job.

Jobs stop at a known step (``retrain_support_worker.Hold``), never after a guessed sleep.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from incident_support import migrated_engine, postgres_schema_url
from retrain_support_model import SupportData
from retrain_support_worker import (
    Hold,
    WorkerProcess,
    add_examples,
    add_jobs,
    pause_between_writes,
    wait_for,
    worker_env,
    write_policy,
)
from sqlalchemy.engine import Engine

from genmon.retrain.queue import TERMINAL, audit_trail, cancel, db_now, get_job
from genmon.retrain.registry import register_model
from genmon.schemas.events import RetrainStatus

JOB_TIMEOUT_S = 120.0
Spawn = Callable[[dict[str, str], str], WorkerProcess]
#: One correction: a dataset of one training example and no evaluation split, so the
#: gate answers insufficient_evidence from the sizes (no model is loaded, no embedder).
ONE_EXAMPLE = [("How do I activate my new card?", "Open the app, choose Cards, then Activate.")]


def pid_of(owner: str) -> int:
    """The worker pid inside a lease owner (``host:pid:random``)."""
    return int(owner.split(":")[1])


def transitions(engine: Engine, job_id: str) -> list[tuple[str | None, str, int]]:
    return [(a.from_status, a.to_status, a.lease_epoch) for a in audit_trail(engine, job_id)]


def ended(engine: Engine, *job_ids: str) -> bool:
    return all(get_job(engine, job_id).status in TERMINAL for job_id in job_ids)


def lease_passed(engine: Engine, job_id: str) -> bool:
    expires = get_job(engine, job_id).lease_expires_at
    with engine.connect() as conn:
        return expires is not None and db_now(conn) > expires


@pytest.fixture
def model_id(engine: Engine, tiny_lm_path: Path, unique_name: str) -> str:
    register_model(engine, unique_name, str(tiny_lm_path), "v1")
    return unique_name


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Starts worker processes (``spawn(env, name)``; the log is ``<name>.log``) and kills
    what is left of them and their job processes when the test ends, passed or not."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str) -> WorkerProcess:
        started.append(WorkerProcess(env, tmp_path / f"{name}.log"))
        return started[-1]

    yield start
    for worker in started:
        worker.kill_group()


@pytest.fixture
def postgres(postgres_url: str) -> Iterator[tuple[Engine, str]]:
    """A migrated schema of its own on the shared PostgreSQL, and its URL: workers on
    several machines share a server, not a SQLite file."""
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine, url
        engine.dispose()


def test_two_workers_run_six_jobs_each_on_exactly_one(
    engine: Engine, database_url: str, model_id: str, spawn: Spawn, tmp_path: Path
) -> None:
    add_examples(engine, model_id, ONE_EXAMPLE)
    ids = add_jobs(engine, model_id, 6)
    params = {"max_steps": 6, "checkpoint_every": 3}
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:fast", params)
    env = worker_env(database_url, policy, tmp_path / "artifacts", lease_s=10, heartbeat_s=0.5)
    workers = [spawn(env, f"worker-{i}") for i in range(2)]
    try:
        wait_for(lambda: ended(engine, *ids), JOB_TIMEOUT_S, "the six jobs to end")
    finally:
        codes = [worker.stop() for worker in workers]
    logs = "\n".join(worker.text() for worker in workers)
    assert codes == [0, 0], logs

    pids = {worker.pid for worker in workers}
    job_processes = set()
    for job_id in ids:
        job = get_job(engine, job_id)
        assert job.status == RetrainStatus.REJECTED, (job.error, logs)
        assert job.verdict["decision"] == "insufficient_evidence"
        assert (job.attempts, job.lease_epoch) == (1, 1)
        assert (job.progress["step"], job.checkpoint_step, job.progress["first_step"]) == (6, 6, 1)
        trail = audit_trail(engine, job_id)
        assert transitions(engine, job_id) == [
            ("queued", "running", 1),
            ("running", "evaluating", 1),
            ("evaluating", "rejected", 1),
        ]
        # One owner did the whole run, and it is one of the two workers.
        assert len({row.actor for row in trail}) == 1
        assert pid_of(trail[0].actor) in pids
        assert job.artifact_uri is not None
        ran = Path(job.artifact_uri, "ran.json").read_text()
        job_processes.add(ran)
    assert len(job_processes) == 6  # six job processes, each ran one job from step 1


@pytest.mark.postgres
def test_a_killed_workers_job_resumes_at_the_next_step_with_the_same_loss(
    postgres: tuple[Engine, str],
    tiny_lm_path: Path,
    support_data: SupportData,
    unique_name: str,
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    import torch

    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.dataset import read_dataset
    from genmon.retrain.lm import load_lm
    from genmon.retrain.trainer import LoraTrainer, NullContext, TrainingParams

    engine, database_url = postgres
    model_id = unique_name
    register_model(engine, model_id, str(tiny_lm_path), "v1")
    torch.set_num_threads(1)
    refused = support_data.refused
    add_examples(engine, model_id, [(p.prompt, p.answer) for p in refused[:24]])
    (job_id,) = add_jobs(engine, model_id, 1)
    params = {"max_steps": 10, "checkpoint_every": 4, "batch_size": 4, "learning_rate": 5e-3}
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:held_lora", params)
    artifacts = tmp_path / "artifacts"
    hold = Hold(6, tmp_path / "held", tmp_path / "never")
    first = spawn(
        worker_env(database_url, policy, artifacts, lease_s=3, heartbeat_s=0.5, hold=hold),
        "first",
    )
    child = psutil.Process(wait_for(hold.reached, JOB_TIMEOUT_S, "step 6"))
    job = get_job(engine, job_id)
    # Mid-training: checkpoint 4 recorded, step 6 done (progress is written at most once
    # a second, so the row may show an earlier step).
    assert (job.status, job.checkpoint_step) == (RetrainStatus.RUNNING, 4), first.text()

    first.signal(signal.SIGKILL)
    first.process.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert alive == [], "the job process outlived its worker by 10 s"

    second = spawn(
        worker_env(database_url, policy, artifacts, lease_s=3, heartbeat_s=0.5),
        "second",
    )
    try:
        wait_for(lambda: ended(engine, job_id), JOB_TIMEOUT_S, "the job to end")
    finally:
        second.stop()
    job = get_job(engine, job_id)
    assert job.status == RetrainStatus.REJECTED, (job.error, second.text())
    assert (job.attempts, job.lease_epoch) == (2, 2)
    assert (job.progress["resumed_from"], job.progress["first_step"]) == (4, 5)
    assert job.progress["step"] == 10
    assert transitions(engine, job_id) == [
        ("queued", "running", 1),
        ("running", "running", 2),
        ("running", "evaluating", 2),
        ("evaluating", "rejected", 2),
    ]
    takeover = audit_trail(engine, job_id)[1]
    assert "took over from" in takeover.reason and pid_of(takeover.actor) == second.pid

    # The same run never interrupted, in this process, on the dataset the job recorded.
    assert job.dataset_uri is not None and job.artifact_uri is not None
    dataset = read_dataset(job.dataset_uri, ArtifactStore(str(artifacts)))
    reference = LoraTrainer().train(
        str(tiny_lm_path),
        dataset.train,
        TrainingParams.from_dict({**params, "device": "cpu"}),
        NullContext(),
        tmp_path / "reference",
    )
    held_out = refused[24:56]
    prompts, answers = [p.prompt for p in held_out], [p.answer for p in held_out]

    def loss(adapter: str | None) -> float:
        lm = load_lm(str(tiny_lm_path), adapter, device="cpu")
        return float(np.mean(lm.completion_nll(prompts, answers)))

    resumed, uninterrupted = loss(job.artifact_uri), loss(str(reference.adapter_dir))
    assert abs(resumed - uninterrupted) < 1e-3
    assert abs(uninterrupted - loss(None)) > 1e-2  # the training did change the model


def test_a_worker_paused_past_its_lease_writes_nothing_when_it_continues(
    engine: Engine, database_url: str, model_id: str, spawn: Spawn, tmp_path: Path
) -> None:
    add_examples(engine, model_id, ONE_EXAMPLE)
    (job_id,) = add_jobs(engine, model_id, 1)
    params = {"max_steps": 8, "checkpoint_every": 4}
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:fast", params)
    artifacts = tmp_path / "artifacts"
    # Held after reporting step 4, just before uploading and recording checkpoint 4.
    hold = Hold(4, tmp_path / "paused-held", tmp_path / "paused-go-on")
    paused = spawn(
        worker_env(database_url, policy, artifacts, lease_s=2, heartbeat_s=0.3, hold=hold),
        "paused",
    )
    child = psutil.Process(wait_for(hold.reached, JOB_TIMEOUT_S, "step 4"))

    # The worker and its job process stop together, as on a paused machine.
    pause_between_writes(paused, engine, job_id)
    wait_for(lambda: lease_passed(engine, job_id), 30, "the lease to pass")
    # Another worker takes the job over and is in the middle of it (held at step 6, its
    # lease valid for 30 s), then stands still while the paused one continues.
    other_hold = Hold(6, tmp_path / "other-held", tmp_path / "other-go-on")
    other = spawn(
        worker_env(database_url, policy, artifacts, lease_s=30, heartbeat_s=0.3, hold=other_hold),
        "other",
    )
    try:
        wait_for(other_hold.reached, JOB_TIMEOUT_S, "the other worker to reach step 6")
        pause_between_writes(other, engine, job_id)
        before = get_job(engine, job_id).model_dump()
        trail = transitions(engine, job_id)
        assert (before["status"], before["lease_epoch"]) == (RetrainStatus.RUNNING, 2)
        assert before["checkpoint_step"] == 4 and pid_of(before["lease_owner"]) == other.pid

        # The job process continues first: its next write (checkpoint 4) must be refused.
        hold.release.touch()
        child.send_signal(signal.SIGCONT)
        wait_for(lambda: child.status() == psutil.STATUS_ZOMBIE, 30, "the job process to stop")
        # Then the worker: its heartbeat is refused; it records nothing for the job.
        paused.signal(signal.SIGCONT, group=True)
        lost = "lost the lease of retrain job"
        wait_for(lambda: lost in paused.text(), 30, "the job process's LeaseLost in the log")
        assert paused.stop() == 0

        assert f"{lost} {job_id} (epoch 1" in paused.text()
        assert "before uploading a checkpoint" in paused.text()
        assert get_job(engine, job_id).model_dump() == before
        assert transitions(engine, job_id) == trail
        assert not (artifacts / "jobs" / job_id / "epoch-1" / "checkpoints").exists()
    finally:
        other.signal(signal.SIGCONT, group=True)
        other_hold.release.touch()
    try:
        wait_for(lambda: ended(engine, job_id), JOB_TIMEOUT_S, "the other worker to end it")
    finally:
        other.stop()
    assert get_job(engine, job_id).status == RetrainStatus.REJECTED
    assert {epoch for *_, epoch in transitions(engine, job_id)[1:]} == {2}


def test_sigterm_releases_the_running_job_for_another_worker(
    engine: Engine, database_url: str, model_id: str, spawn: Spawn, tmp_path: Path
) -> None:
    add_examples(engine, model_id, ONE_EXAMPLE)
    (job_id,) = add_jobs(engine, model_id, 1)
    params = {"max_steps": 6, "checkpoint_every": 2}
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:fast", params)
    hold = Hold(3, tmp_path / "held", tmp_path / "never")
    worker = spawn(
        worker_env(
            database_url, policy, tmp_path / "artifacts", lease_s=30, heartbeat_s=0.5, hold=hold
        ),
        "worker",
    )
    child = psutil.Process(wait_for(hold.reached, JOB_TIMEOUT_S, "step 3"))

    assert worker.stop() == 0, worker.text()
    assert not child.is_running()
    job = get_job(engine, job_id)
    # Queued again at once (no waiting for a 30 s lease), the attempt given back, the
    # checkpoint kept for whoever resumes it.
    assert (job.status, job.attempts, job.lease_owner) == (RetrainStatus.QUEUED, 0, None)
    assert job.checkpoint_step == 2
    (_, released) = audit_trail(engine, job_id)
    assert (released.from_status, released.to_status) == ("running", "queued")
    assert released.reason == "released: worker shutting down"


def test_cancelling_a_running_job_kills_its_process(
    engine: Engine, database_url: str, model_id: str, spawn: Spawn, tmp_path: Path
) -> None:
    add_examples(engine, model_id, ONE_EXAMPLE)
    (job_id,) = add_jobs(engine, model_id, 1)
    policy = write_policy(tmp_path / "policy.yaml", "retrain_support_worker:fast", {})
    hold = Hold(2, tmp_path / "held", tmp_path / "never")
    worker = spawn(
        worker_env(
            database_url, policy, tmp_path / "artifacts", lease_s=30, heartbeat_s=0.3, hold=hold
        ),
        "worker",
    )
    child = psutil.Process(wait_for(hold.reached, JOB_TIMEOUT_S, "step 2"))

    assert cancel(engine, job_id, "alice", "wrong data") == RetrainStatus.RUNNING
    # The next heartbeat is refused: the worker kills the job process, far sooner than
    # the 30 s lease would lapse.
    _, alive = psutil.wait_procs([child], timeout=10)
    assert alive == [], worker.text()
    assert worker.stop() == 0
    assert "killing job process" in worker.text()
    job = get_job(engine, job_id)
    assert (job.status, job.lease_epoch, job.error) == (RetrainStatus.CANCELLED, 2, None)
    assert transitions(engine, job_id) == [("queued", "running", 1), ("running", "cancelled", 2)]
