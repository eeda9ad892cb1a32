"""Helpers of the retrain worker tests (not a test module): trainers the job process loads
by ``module:attr`` (this folder is on the child's PYTHONPATH), worker processes, seeding.

A test steers a job process through the environment, which the worker passes on:

- ``GENMON_TEST_STEP_S``: seconds each step of :data:`fast` takes (default 0.05);
- ``GENMON_TEST_HOLD=STEP:MARKER:RELEASE``: after reporting step ``STEP`` the trainer
  writes its pid to ``MARKER`` and waits until ``RELEASE`` exists (never, if the test
  kills it there). A test thus stops a job at a known step instead of guessing a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Engine

from genmon.db import session_scope
from genmon.retrain.examples import SftExample
from genmon.retrain.queue import JOBS
from genmon.retrain.trainer import LoraTrainer, TrainContext, TrainingParams, TrainResult
from genmon.schemas.tables import LabelledExample, RetrainJob

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEP_S_ENV = "GENMON_TEST_STEP_S"
HOLD_ENV = "GENMON_TEST_HOLD"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- trainers the job process loads ---------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    step: int
    marker: Path
    release: Path

    @classmethod
    def from_env(cls) -> Hold | None:
        raw = os.environ.get(HOLD_ENV)
        if not raw:
            return None
        step, marker, release = raw.split(":", 2)
        return cls(int(step), Path(marker), Path(release))

    def spec(self) -> str:
        return f"{self.step}:{self.marker}:{self.release}"

    def reached(self) -> int | None:
        """The pid of the job process held at the step, once it is there."""
        text = self.marker.read_text() if self.marker.exists() else ""
        return int(text) if text.strip() else None

    def at(self, step: int) -> None:
        if step != self.step:
            return
        self.marker.write_text(str(os.getpid()))
        while not self.release.exists():
            time.sleep(0.02)


class HeldContext:
    """A job's context that stops at :class:`Hold`'s step after reporting it."""

    def __init__(self, ctx: TrainContext, hold: Hold | None) -> None:
        self.ctx = ctx
        self.hold = hold

    def progress(self, step: int, total: int, *rest: Any) -> None:
        self.ctx.progress(step, total, *rest)
        if self.hold is not None:
            self.hold.at(step)

    def checkpoint(self, step: int, local_dir: Path) -> None:
        self.ctx.checkpoint(step, local_dir)

    def resume(self) -> tuple[int, Path] | None:
        return self.ctx.resume()


class FastTrainer:
    """Counts steps (no model): progress every step, a checkpoint every
    ``checkpoint_every``, resume after the recorded checkpoint. The adapter folder says
    which steps this process ran."""

    def train(
        self,
        base_uri: str,
        examples: Sequence[SftExample],
        params: TrainingParams,
        ctx: TrainContext,
        out_dir: Path,
    ) -> TrainResult:
        step_s = float(os.environ.get(STEP_S_ENV, "0.05"))
        ctx = HeldContext(ctx, Hold.from_env())
        resumed = ctx.resume()
        first = resumed[0] + 1 if resumed else 1
        for step in range(first, params.max_steps + 1):
            time.sleep(step_s)
            ctx.progress(step, params.max_steps, 1.0 / step, 8 / step_s, 64 / step_s, None)
            if params.checkpoint_every and step % params.checkpoint_every == 0:
                folder = out_dir / f"step-{step}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "state.json").write_text(json.dumps({"step": step}))
                ctx.checkpoint(step, folder)
        adapter = out_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        ran = {"first_step": first, "pid": os.getpid()}
        (adapter / "ran.json").write_text(json.dumps(ran))
        return TrainResult(adapter, params.max_steps, 1.0 / params.max_steps)


class HeldLoraTrainer:
    """The real :class:`LoraTrainer`, with :class:`Hold` honoured (the maths untouched)."""

    def train(
        self,
        base_uri: str,
        examples: Sequence[SftExample],
        params: TrainingParams,
        ctx: TrainContext,
        out_dir: Path,
    ) -> TrainResult:
        import torch

        torch.set_num_threads(1)
        held = HeldContext(ctx, Hold.from_env())
        return LoraTrainer().train(base_uri, examples, params, held, out_dir)


fast = FastTrainer()
held_lora = HeldLoraTrainer()


# --- seeding the database and the policy ----------------------------------------------------


def write_policy(
    path: Path, trainer: str, params: dict[str, Any], *, min_eval_examples: int = 1000
) -> Path:
    """A policy for the worker tests: no running limit or budget, the given trainer, and a
    gate that asks for more evidence than the tests give (no promotion, no announcement:
    these tests are about the queue, the gate has its own)."""
    policy = {
        "version": 1,
        "guards": {"max_running": None, "daily_device_hours": None},
        "training": {"trainer": trainer, "params": params},
        "gate": {"min_eval_examples": min_eval_examples},
    }
    path.write_text(yaml.safe_dump(policy))
    return path


def add_jobs(engine: Engine, model_id: str, count: int, **fields: Any) -> list[str]:
    ids = [f"{model_id}-job-{i}" for i in range(count)]
    with session_scope(engine) as session:
        for i, job_id in enumerate(ids):
            session.add(
                RetrainJob(
                    job_id=job_id,
                    model_id=model_id,
                    base_version="v1",
                    created_at=T0 + timedelta(seconds=i),
                    **fields,
                )
            )
    return ids


def add_examples(engine: Engine, model_id: str, pairs: Sequence[tuple[str, str]]) -> None:
    """Labelled examples with corrections, one minute apart (the split is by time)."""
    with session_scope(engine) as session:
        for i, (prompt, answer) in enumerate(pairs):
            session.add(
                LabelledExample(
                    request_id=f"r{i}",
                    model_id=model_id,
                    model_version="v1",
                    prompt=prompt,
                    response="I'm sorry, but I can't help with that.",
                    correction=answer,
                    score=0.0,
                    segment={"topic": "cards"},
                    created_at=T0 + timedelta(minutes=i),
                )
            )


# --- worker processes -----------------------------------------------------------------------


def worker_env(
    database_url: str,
    policy: Path,
    artifacts: Path,
    *,
    lease_s: float,
    heartbeat_s: float,
    hold: Hold | None = None,
    **extra: str,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
            "GENMON_DATABASE__URL": database_url,
            "GENMON_RETRAIN__POLICY_FILE": str(policy),
            "GENMON_RETRAIN__ARTIFACTS_URI": str(artifacts),
            "GENMON_RETRAIN__LEASE_S": str(lease_s),
            "GENMON_RETRAIN__HEARTBEAT_S": str(heartbeat_s),
            "GENMON_RETRAIN__POLL_INTERVAL_S": "0.2",
            "GENMON_RETRAIN__DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            **extra,
        }
    )
    env.pop(HOLD_ENV, None)
    if hold is not None:
        env[HOLD_ENV] = hold.spec()
    return env


class WorkerProcess:
    """``run_retrain_worker`` (without the Kafka agent) in its own process group, so a
    test can stop or kill the worker and its job process together or apart."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        code = (
            "from genmon.retrain.runner import run_retrain_worker\n"
            "from genmon.settings import Settings\n"
            "run_retrain_worker(Settings(), 'info', with_agent=False)\n"
        )
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int, *, group: bool = False) -> None:
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the worker and whatever is left of its process group (job processes
        included), stopped or not: a failed test leaves nothing running."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL the group if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def job_unlocked(engine: Engine, job_id: str) -> bool:
    """Whether nobody holds a write lock on the job now (SQLite: the database's one write
    lock; PostgreSQL: the job's row)."""
    if engine.dialect.name == "sqlite":
        probe = sqlite3.connect(str(engine.url.database), timeout=0.1)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            probe.close()
    with engine.connect() as conn:
        try:
            query = sa.select(JOBS.c.job_id).where(JOBS.c.job_id == job_id)
            conn.execute(query.with_for_update(nowait=True))
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            conn.rollback()


def pause_between_writes(worker: WorkerProcess, engine: Engine, job_id: str) -> None:
    """SIGSTOP the worker and its job process at a moment neither holds a lock on the job.

    A process stopped inside a write transaction keeps its locks: on SQLite every other
    writer then waits (there is no remedy but to continue it); on PostgreSQL the server
    ends the transaction after ``lease_s`` (``idle_in_transaction_session_timeout``).
    The tests pause between writes so that what they check does not depend on the luck
    of where the pause lands.
    """
    for _ in range(100):
        worker.signal(signal.SIGSTOP, group=True)
        if job_unlocked(engine, job_id):
            return
        worker.signal(signal.SIGCONT, group=True)
        time.sleep(0.02)
    raise AssertionError(f"worker {worker.pid} was inside a write at each of 100 pauses")


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)
