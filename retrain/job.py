"""One retrain job, run by ``python -m genmon.retrain.job JOB_ID EPOCH OWNER``.

The worker (:mod:`genmon.retrain.runner`) starts this process for a job it claimed under
lease ``(EPOCH, OWNER)``. The job goes

1. **dataset** -- the model's labelled examples since its last promoted job
   (:func:`genmon.retrain.dataset.build_dataset`), stored under the artifacts URI. An
   earlier attempt's recorded dataset is read back instead, so a resumed run trains on
   exactly the data its checkpoint saw;
2. **train** -- the policy's trainer (:func:`genmon.retrain.trainer.load_trainer`) with a
   :class:`FencedContext`: progress and checkpoints are fenced writes on the job row,
   checkpoints are uploaded under ``jobs/<job>/epoch-<epoch>/`` first and resume takes the
   last recorded one. An adapter recorded by an earlier attempt is reused;
3. **gate** (status ``evaluating``) -- the candidate (base + new adapter) against the
   serving version (base + champion adapter) on the held-out split, with the behaviour
   check aimed at the incident's signal and segment (:func:`genmon.retrain.gate.evaluate`),
   then the servable check;
4. **registry** -- on ``pass`` a version with its lineage, then, as the policy's
   ``rollout.mode`` says: ``canary`` (with a champion to compare with) starts a rollout,
   the version the challenger on the policy's share of traffic
   (:func:`genmon.retrain.rollout.start_rollout`, replacing an older challenger's watch);
   ``direct`` makes it the champion. The move is announced and the job ends ``promoted``.
   Otherwise it ends ``rejected`` with the verdict and its reasons.

A job always starts from the champion (its adapter, and the gate's comparison): never from
the challenger on trial, nor from a version rolled back (a rollback moves the champion off
it, so the job queued on it starts from the version that took its place).

Every write is fenced on the lease (:class:`genmon.retrain.queue.JobQueue`). The first one
refused raises :class:`~genmon.retrain.exceptions.LeaseLost` and the process exits at once
with :data:`~genmon.retrain.runner.EXIT_LEASE_LOST`, writing nothing more. Registry writes
are checked against the fence just before they are made.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from genmon.retrain.exceptions import LeaseLost
from genmon.retrain.plan import Plan
from genmon.retrain.queue import JobQueue, Lease, get_job
from genmon.schemas.events import ModelAlias, RetrainStatus
from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.dataset import BuiltDataset
    from genmon.retrain.gate import BehaviourTarget, Verdict
    from genmon.retrain.lm import CausalLM
    from genmon.retrain.policy import RolloutPolicy
    from genmon.schemas.events import ModelEvent

log = logging.getLogger("genmon.retrain.job")

#: Least seconds between two progress writes (the last step is always written).
PROGRESS_EVERY_S = 1.0
#: Incident signals named without their ``_rate`` suffix by some detectors.
SIGNAL_ALIASES = {"refusal": "refusal_rate", "empty": "empty_rate"}


# --- the fenced training context -----------------------------------------------------------


class FencedContext:
    """:class:`genmon.retrain.trainer.TrainContext` whose writes need the lease."""

    def __init__(self, run: JobRun, device_seconds: float) -> None:
        self.run = run
        self.before = device_seconds
        self.started = time.monotonic()
        self.last_write = float("-inf")
        #: Where this attempt started: the checkpoint it resumed after, its first step.
        self.resumed_from: int | None = None
        self.first_step: int | None = None

    def device_seconds(self) -> float:
        return self.before + (time.monotonic() - self.started)

    def progress(
        self,
        step: int,
        total: int,
        loss: float,
        examples_per_s: float,
        tokens_per_s: float,
        gpu_memory_mb: float | None,
    ) -> None:
        if self.first_step is None:
            self.first_step = step
        now = time.monotonic()
        if step < total and now - self.last_write < PROGRESS_EVERY_S:
            return
        self.last_write = now
        progress = {
            "step": step,
            "total": total,
            "loss": loss,
            "examples_per_s": examples_per_s,
            "tokens_per_s": tokens_per_s,
            "gpu_memory_mb": gpu_memory_mb,
            "epoch": self.run.lease.epoch,
            "resumed_from": self.resumed_from,
            "first_step": self.first_step,
        }
        self.run.write(progress=progress, device_seconds=self.device_seconds())

    def checkpoint(self, step: int, local_dir: Path) -> None:
        self.run.check("uploading a checkpoint")
        uri = self.run.store.put_dir(local_dir, self.run.key(f"checkpoints/step-{step:06d}"))
        self.run.write(
            checkpoint_uri=uri, checkpoint_step=step, device_seconds=self.device_seconds()
        )

    def resume(self) -> tuple[int, Path] | None:
        job = get_job(self.run.engine, self.run.lease.job_id)
        if job.checkpoint_uri is None or job.checkpoint_step is None:
            return None
        local = self.run.work_dir / "resume" / f"step-{job.checkpoint_step:06d}"
        self.run.store.get_dir(job.checkpoint_uri, local)
        self.resumed_from = job.checkpoint_step
        log.info("retrain job %s resumes after step %d", job.job_id, job.checkpoint_step)
        return job.checkpoint_step, local


class LazyLM:
    """A model loaded on first use: a gate that answers ``insufficient_evidence`` from
    the sizes alone never pays for loading two models."""

    def __init__(self, base_uri: str, adapter_uri: str | None, device: str) -> None:
        self._args = (base_uri, adapter_uri, device)
        self._lm: CausalLM | None = None

    def __getattr__(self, name: str) -> Any:
        if self._lm is None:
            from genmon.retrain.lm import load_lm

            self._lm = load_lm(*self._args)
        return getattr(self._lm, name)


def redactor(settings: Settings) -> Callable[[str], str] | None:
    """genmon's redactor when the settings ask for redaction of training data
    (``retrain.redact``)."""
    if not settings.retrain.redact:
        return None
    from genmon.schemas.redact import redact

    return redact


def behaviour_target(context: dict[str, Any]) -> BehaviourTarget | None:
    """The behaviour check an incident asks for: its signal on its segment.

    An incident segment is ``k=v,k=v``; ``model_version`` is left out, since the
    evaluation prompts are compared on the traffic's own attributes."""
    from genmon.retrain.gate import BehaviourTarget

    signal_name = context.get("signal")
    if not signal_name:
        return None
    raw = context.get("segment") or {}
    if isinstance(raw, str):
        pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
        raw = {key.strip(): value.strip() for key, value in pairs}
    segment = {str(k): str(v) for k, v in raw.items() if k != "model_version"}
    return BehaviourTarget(SIGNAL_ALIASES.get(signal_name, signal_name), segment)


def starting_point(engine: Engine, model_id: str) -> tuple[str, str | None]:
    """``(version, adapter)`` a job tunes from and is gated against: the champion now,
    whatever the job was queued on. Never the challenger on trial (it serves a share at
    most) nor a version rolled back (a rollback moves the champion off it)."""
    from genmon.retrain.registry import adapter_uri, aliases, get_model, get_version

    champion = aliases(engine, model_id).get(ModelAlias.CHAMPION.value)
    version = champion or get_model(engine, model_id).serving_version
    return version, adapter_uri(get_version(engine, model_id, version))


# --- the job --------------------------------------------------------------------------------


@dataclass
class JobRun:
    """One attempt at one job, under ``lease``: each step's writes are fenced on it.

    The registry's writes (version, alias) run in the registry's own transactions, so
    they are checked against the fence just before they are made, not within it: a lease
    lost in that instant could still record the version. ``create_version`` is idempotent
    per job, and the next owner then finds that version and moves the same alias.
    """

    settings: Settings
    engine: Engine
    queue: JobQueue
    lease: Lease
    store: ArtifactStore
    work_dir: Path

    def key(self, name: str) -> str:
        """Artifact key of this attempt: another epoch never overwrites it."""
        return f"jobs/{self.lease.job_id}/epoch-{self.lease.epoch}/{name}"

    def write(self, **columns: Any) -> None:
        if not self.queue.update(self.lease, **columns):
            raise LeaseLost(self.lease.job_id, self.lease.epoch, self.lease.owner)

    def check(self, action: str) -> None:
        if not self.queue.check(self.lease):
            raise LeaseLost(self.lease.job_id, self.lease.epoch, self.lease.owner, action)

    def finish(self, status: RetrainStatus, **columns: Any) -> None:
        if not self.queue.finish(self.lease, status, **columns):
            raise LeaseLost(self.lease.job_id, self.lease.epoch, self.lease.owner, "finishing")

    def run(self) -> RetrainStatus:
        from genmon.retrain.registry import get_model

        self.check("starting")
        job = get_job(self.engine, self.lease.job_id)
        plan = Plan.of(job, self.settings)
        model = get_model(self.engine, job.model_id)
        serving, serving_adapter = starting_point(self.engine, job.model_id)
        dataset = self.dataset(job)
        if not dataset.train:
            return self.reject_empty(dataset)
        if job.artifact_uri is None:
            artifact = self.train(job, plan, model.base_uri, serving_adapter, dataset)
        else:
            artifact = job.artifact_uri
            self.write(status=RetrainStatus.EVALUATING, reason="adapter of an earlier attempt")
        verdict = self.gate(job, plan, model.base_uri, artifact, serving_adapter, dataset)
        return self.record(job, verdict, artifact, serving, dataset, plan.rollout)

    def dataset(self, job: RetrainJob) -> BuiltDataset:
        """The recorded dataset of an earlier attempt, else a new one, stored and recorded:
        for the plan's strategy, without opted-out subjects, at most
        ``retrain.max_examples_per_subject`` per subject and class, and the segment of a
        bias incident up-weighted."""
        from sqlmodel import Session

        from genmon.retrain.consent import load_opted_out
        from genmon.retrain.dataset import build_dataset, load_examples, read_dataset, write_dataset
        from genmon.retrain.usable import examples_since

        if job.dataset_uri is not None:
            return read_dataset(job.dataset_uri, self.store)
        mark = job.params.get("examples_since")
        with Session(self.engine) as session:
            since = datetime.fromisoformat(mark) if mark else examples_since(session, job.model_id)
            rows = load_examples(session, job.model_id, since)
            opted_out = load_opted_out(session)
        trigger = {
            "job_id": job.job_id,
            "trigger": job.trigger,
            "trigger_key": job.trigger_key,
            "incident_id": job.incident_id,
            "context": job.context,
        }
        strategy = Plan.of(job, self.settings).strategy
        target = behaviour_target(job.context) if job.context.get("kind") == "bias" else None
        built = build_dataset(
            rows,
            trigger=trigger,
            redact=redactor(self.settings),
            strategy=strategy,
            opted_out=opted_out,
            max_per_subject=self.settings.retrain.max_examples_per_subject,
            upweight=dict(target.segment) if target is not None and target.segment else None,
            min_per_class=int(job.params.get("min_examples") or 1),
            negative_score_below=self.settings.feedback.negative_score_below,
        )
        self.check("storing the dataset")
        uri = write_dataset(built, self.store, self.key("dataset"))
        sizes = {**built.manifest.get("sizes", {}), "strategy": built.manifest.get("strategy")}
        job.metrics = {**job.metrics, "dataset": sizes}
        self.write(dataset_uri=uri, dataset_hash=built.content_hash, metrics=job.metrics)
        return built

    def reject_empty(self, dataset: BuiltDataset) -> RetrainStatus:
        """Nothing to train on: the strategy's reason (``no usable feedback: 12 rows, 0
        corrections, 3 thumbs up or good scores, 0 down or bad; ...``), or every example
        went to the evaluation split."""
        manifest = dataset.manifest
        sizes = manifest.get("sizes", {})
        if manifest.get("strategy") is None and manifest.get("strategy_reason"):
            why = f"{manifest['strategy_reason']}; send corrections or thumbs first"
        elif sizes.get("examples"):
            why = (
                f"no training examples: all {sizes['examples']} {manifest.get('strategy')}"
                " examples are in the evaluation split (near-duplicates of its prompts)"
            )
        else:
            why = (
                f"no training examples ({sizes.get('rows', 0)} labelled rows, none with a"
                " usable correction); send feedback with corrections first"
            )
        reason = f"insufficient evidence: {why}"
        verdict = {"decision": "insufficient_evidence", "reasons": [reason], "metrics": sizes}
        self.finish(RetrainStatus.REJECTED, verdict=verdict, reason=reason)
        return RetrainStatus.REJECTED

    def train(
        self,
        job: RetrainJob,
        plan: Plan,
        base_uri: str,
        serving_adapter: str | None,
        dataset: BuiltDataset,
    ) -> str:
        """Trains from the serving version's adapter (``init_adapter``) when it has one,
        with the strategy's trainer (:func:`genmon.retrain.preference.trainer_for_strategy`)."""
        from genmon.retrain.preference import trainer_for_strategy
        from genmon.retrain.trainer import TrainingParams

        params = TrainingParams.from_dict({"init_adapter": serving_adapter, **plan.params})
        strategy = plan.trained_strategy(dataset)
        trainer = trainer_for_strategy(strategy, plan.trainer)
        context = FencedContext(self, job.device_seconds)
        result = trainer.train(base_uri, dataset.train, params, context, self.work_dir / "out")
        self.check("uploading the adapter")
        artifact = self.store.put_dir(result.adapter_dir, self.key("adapter"))
        training = {
            "trainer": plan.trainer,
            "strategy": strategy,
            "steps": result.steps,
            "final_loss": result.final_loss,
        }
        job.metrics = {**job.metrics, "training": training}
        self.write(
            status=RetrainStatus.EVALUATING,
            artifact_uri=artifact,
            metrics=job.metrics,
            device_seconds=context.device_seconds(),
            reason=f"trained {strategy} {result.steps} steps, final loss {result.final_loss:.4f}",
        )
        return artifact

    def gate(
        self,
        job: RetrainJob,
        plan: Plan,
        base_uri: str,
        artifact: str,
        serving_adapter: str | None,
        dataset: BuiltDataset,
    ) -> Verdict:
        from typing import cast

        from genmon.retrain.gate import check_servable, evaluate
        from genmon.retrain.golden import load_golden

        device = self.settings.retrain.device
        config = plan.gate
        candidate = cast("CausalLM", LazyLM(base_uri, artifact, device))
        serving = cast("CausalLM", LazyLM(base_uri, serving_adapter, device))
        # A bias-triggered job that up-weighted a segment is judged on it too.
        upweight = (dataset.manifest.get("upweight") or {}).get("segment")
        golden = load_golden(config.golden_set, self.store) if config.golden_set else None
        target = behaviour_target(job.context)
        verdict = evaluate(
            candidate, serving, dataset.eval, config, target, upweight=upweight, golden=golden
        )
        if verdict.decision == "pass":
            ok, why = check_servable(base_uri, artifact, config.servable_budget_s, device)
            verdict = verdict.with_servable(ok, why)
        return verdict

    def record(
        self,
        job: RetrainJob,
        verdict: Verdict,
        artifact: str,
        serving: str,
        dataset: BuiltDataset,
        rollout: RolloutPolicy,
    ) -> RetrainStatus:
        summary = f"gate: {verdict.decision}: {'; '.join(verdict.reasons)}"[:4000]
        if verdict.decision != "pass":
            self.finish(RetrainStatus.REJECTED, verdict=verdict.to_json(), reason=summary)
            return RetrainStatus.REJECTED
        from genmon.retrain.registry import create_version

        self.check("recording the version")
        version = create_version(
            self.engine,
            job.model_id,
            None,
            artifact,
            serving,
            job_id=job.job_id,
            dataset_hash=dataset.content_hash,
            incident_ids=[job.incident_id] if job.incident_id else [],
            metrics=verdict.metrics,
        )
        self.check("moving the alias")
        events, released = self.release(job, version.version, rollout)
        self.announce(events)
        self.write_card(job, version.version, artifact, verdict)
        self.finish(
            RetrainStatus.PROMOTED,
            candidate_version=version.version,
            verdict=verdict.to_json(),
            reason=f"{released}; {summary}"[:4000],
        )
        return RetrainStatus.PROMOTED

    def write_card(self, job: RetrainJob, version: str, artifact: str, verdict: Verdict) -> None:
        """``card.md`` next to the adapter's weights, so the card travels with them; a
        failure is logged (the version is recorded either way, and ``genmon models card``
        renders it again from the registry)."""
        from genmon.retrain.card import model_card, write_card

        try:
            text = model_card(self.engine, self.store, job.model_id, version, verdict=verdict)
            write_card(self.store, artifact, text)
        except Exception as exc:  # the card is documentation, not part of the release
            log.warning("writing the model card of %s %s failed: %s", job.model_id, version, exc)

    def release(
        self, job: RetrainJob, version: str, rollout: RolloutPolicy
    ) -> tuple[list[ModelEvent], str]:
        """The version on its way to traffic, as ``rollout.mode`` says; the alias events
        and what happened, for the job's reason. A model without a champion has nothing to
        watch the version against: it becomes the champion whatever the mode."""
        from genmon.retrain.registry import aliases, move_alias
        from genmon.retrain.rollout import share_text, start_rollout

        actor = f"retrain-job:{job.job_id}"[:256]
        reason = f"passed the gate (job {job.job_id})"
        champion = aliases(self.engine, job.model_id).get(ModelAlias.CHAMPION.value)
        if rollout.mode == "canary" and champion is not None and champion != version:
            started, events = start_rollout(
                self.engine,
                job.model_id,
                version,
                rollout.share,
                actor=actor,
                reason=reason,
                job_id=job.job_id,
                replace=True,
            )
            share = share_text(started.share)
            return events, f"challenger on {share} of traffic (rollout {started.rollout_id})"
        events = move_alias(self.engine, job.model_id, ModelAlias.CHAMPION, version, actor, reason)
        why = "rollout.mode direct" if rollout.mode == "direct" else "no champion to watch against"
        return events, f"champion ({why})"

    def announce(self, events: list[Any]) -> None:
        """Publish the alias moves; a failure is logged (the alias moved regardless, and
        ``genmon models announce`` publishes the current aliases again)."""
        if not events:
            return
        from genmon.retrain.announce import ModelAnnouncer

        announcer = ModelAnnouncer(self.settings)
        try:
            report = announcer.announce(events)
            for failure in report.failures:
                log.warning("announcing %s: %s", events[0].model_id, failure)
        except Exception as exc:  # the version is recorded either way
            log.warning("announcing %s failed: %s", events[0].model_id, exc)
        finally:
            close = getattr(announcer, "close", None)
            if close is not None:
                close()


def run_job(
    settings: Settings, engine: Engine, queue: JobQueue, lease: Lease, work_dir: Path
) -> RetrainStatus:
    """Run the job ``lease`` holds to its end; :class:`LeaseLost` when the lease goes."""
    from genmon.retrain.artifacts import ArtifactStore

    store = ArtifactStore(settings.retrain.artifacts_uri)
    return JobRun(settings, engine, queue, lease, store, work_dir).run()


def main(argv: list[str] | None = None) -> int:
    """``JOB_ID EPOCH OWNER [--remote]``: run the attempt under that lease.

    ``--remote``: a Ray or Kubernetes run; OWNER is then its remote id and its writes are
    fenced on it (:mod:`genmon.retrain.queue`, "Remote runs"), so the worker that
    submitted it may be replaced without fencing it out. Under ``torchrun``/``accelerate``
    only rank 0 runs the job (the row, the dataset, the artifacts); other ranks end at
    once, since genmon's trainers train in one process.
    """
    from genmon.db import make_engine
    from genmon.retrain.backends.base import REMOTE_FLAG
    from genmon.retrain.runner import (
        EXIT_LEASE_LOST,
        EXIT_RECORDED,
        PARENT_PID_ENV,
        configure_logging,
        die_with_parent,
        launch_rank,
    )
    from genmon.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    remote = REMOTE_FLAG in args
    args = [arg for arg in args if arg != REMOTE_FLAG]
    if len(args) != 3 or not args[1].isdigit():
        print("usage: python -m genmon.retrain.job JOB_ID EPOCH OWNER [--remote]", file=sys.stderr)
        return 2
    rank = launch_rank()
    if rank:
        print(f"retrain job {args[0]}: rank {rank} idle, rank 0 runs the job", file=sys.stderr)
        return 0
    parent = os.environ.get(PARENT_PID_ENV)
    die_with_parent(int(parent) if parent else None, launched=rank is not None)
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when its
    # job stops (SIGTERM, then the job is released), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = get_settings()
    configure_logging(settings, None)
    remote_id = args[2] if remote else None
    lease = Lease(job_id=args[0], owner=args[2], epoch=int(args[1]), remote_id=remote_id)
    engine = make_engine(settings.database.url)
    queue = JobQueue(engine, lease.owner, settings.retrain.lease_s)
    try:
        with tempfile.TemporaryDirectory(prefix="genmon-job-") as work:
            status = run_job(settings, engine, queue, lease, Path(work))
        log.info("retrain job %s ended %s", lease.job_id, status.value)
        return 0
    except LeaseLost as exc:
        log.warning("%s", exc)
        return EXIT_LEASE_LOST
    except Exception as exc:  # recorded on the job; the worker requeues or fails it
        log.exception("retrain job %s failed", lease.job_id)
        try:
            recorded = queue.fail(lease, f"{type(exc).__name__}: {exc}"[:4000])
        except Exception:  # the database itself: the worker records what it can
            recorded = False
        return EXIT_RECORDED if recorded else 1
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
