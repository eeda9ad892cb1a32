"""The feedback loop in ``genmon demo``: a model that refuses, an incident, a retraining job,
a gate, a new version served, the incident resolved.

It runs beside the monitoring part of the demo, on the same broker, database and worker:

1. builds a tiny causal LM on the spot (:mod:`genmon.retrain.tiny_lm`: a tokenizer trained
   here, a GPT-2-style model pre-trained on banking77's questions with one canned answer per
   intent, and taught to refuse questions about cards) and registers it as ``bank-bot``;
2. starts ``genmon worker --role retrain`` with a demo policy (refusal incidents retrain);
3. serves the model through :class:`genmon.retrain.follower.AdapterFollower` and logs every
   answer through the SDK; healthy traffic first, then customers start asking about cards:
   the model refuses them, the refusal incident opens, users send corrections;
4. delivers the finding and the retraining request a second time (as Kafka may) and shows
   that there is still one job;
5. waits for the gate's verdict, the alias move, the follower serving the new version and the
   incident resolving on the new version's traffic, then prints the lineage.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from genmon.settings import Settings

LOOP_MODEL = "bank-bot"
#: Requests per second the bank-bot serves, answered in one batch a second (generation
#: runs on CPU beside everything else; a batch costs little more than one answer).
LOOP_RATE = 10.0
#: Share of questions about cards once customers start asking about them.
CARDS_SHARE = 0.35
#: Users who correct a refusal (the rest leave a thumb down or nothing).
CORRECTION_RATE = 0.6
#: The demo's retrain policy: refusal incidents retrain once 60 corrections are in (12 of
#: them, the latest, held out for the gate). A version that passes the gate becomes the
#: champion at once (``rollout.mode: direct``): the demo shows the loop, and a canary's
#: watch would take longer than the demo runs.
POLICY = """\
version: 1
triggers:
  incidents:
    - name: refusals
      match: {signal: refusal_rate, model: bank-bot}
      after_firings: 1
  manual: true
guards:
  cooldown_s: 0
  min_examples_per_class: 60
  max_running: 1
  daily_device_hours: 2
  require_approval: false
gate:
  min_eval_examples: 12
  behaviour_min_prompts: 10
rollout:
  mode: direct
"""


@dataclass
class _Counts:
    sent: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    cards: Counter[str] = field(default_factory=Counter)
    corrections: int = 0

    def refusal_line(self) -> str:
        parts = [
            f"{version}: {self.refused[version]} of {self.cards[version]} card questions refused"
            for version in sorted(self.sent)
        ]
        return "; ".join(parts)


class _BankService(threading.Thread):
    """A small service: answers with whatever version the follower loaded, logs it all."""

    def __init__(
        self,
        settings: Settings,
        follower: Any,
        healthy: list[Any],
        cards: list[Any],
        launch_at: float,
        seed: int = 11,
    ) -> None:
        super().__init__(name="demo-bank-bot", daemon=True)
        self.settings = settings
        self.follower = follower
        self.healthy = healthy
        self.cards = cards
        self.launch_at = launch_at
        self.rng = random.Random(seed)
        self.counts = _Counts()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from genmon.sdk import Monitor

        try:
            with Monitor(settings=self.settings) as monitor:
                while not self.stopping.is_set():
                    started = time.monotonic()
                    self._serve(monitor, batch=round(LOOP_RATE))
                    self.stopping.wait(max(0.0, 1.0 - (time.monotonic() - started)))
                monitor.flush(timeout=30)
        except BaseException as exc:  # shown by the demo, which then stops
            self.error = exc

    def _serve(self, monitor: Any, batch: int) -> None:
        from genmon.detectors.quality.refusal import is_refusal

        launched = time.monotonic() >= self.launch_at
        picks = [
            (True, self.rng.choice(self.cards))
            if launched and self.rng.random() < CARDS_SHARE
            else (False, self.rng.choice(self.healthy))
            for _ in range(batch)
        ]
        started = time.monotonic()
        version, answers = self.follower.generate(
            [pair.prompt for _, pair in picks], max_new_tokens=40
        )
        latency_ms = (time.monotonic() - started) * 1000.0 / batch
        for (is_cards, pair), answer in zip(picks, answers, strict=True):
            prompt, correct = pair.prompt, pair.answer
            request_id = f"bank-{time.time_ns()}-{self.rng.randrange(1 << 30)}"
            topic = "cards" if is_cards else "banking"
            monitor.log_inference(
                request_id=request_id,
                model_id=LOOP_MODEL,
                model_version=version,
                prompt=prompt,
                response=answer,
                latency_ms=latency_ms,
                segment={"topic": topic},
            )
            refused = is_refusal(answer)
            self.counts.sent[version] += 1
            self.counts.cards[version] += is_cards
            self.counts.refused[version] += is_cards and refused
            if refused and self.rng.random() < CORRECTION_RATE:
                monitor.log_feedback(
                    request_id=request_id,
                    model_id=LOOP_MODEL,
                    thumbs="down",
                    correction=correct,
                    segment={"topic": topic},
                )
                self.counts.corrections += 1
            elif not refused and self.rng.random() < 0.2:
                monitor.log_feedback(
                    request_id=request_id,
                    model_id=LOOP_MODEL,
                    thumbs="up",
                    segment={"topic": topic},
                )


@dataclass
class LoopSetup:
    """What the loop adds to the demo's worker environment, built before the worker starts."""

    env: dict[str, str]
    base_path: Path


def prepare(work: Path, data_dir: Path, say: Callable[[str], None]) -> LoopSetup:
    """Builds (or reuses) the tiny model and writes the demo's policy and detector plan."""
    from genmon.detectors.calibration.plan import defaults_path
    from genmon.retrain.tiny_lm import build_tiny_lm

    started = time.monotonic()
    say("feedback loop: building a tiny causal LM for bank-bot (cached after the first run)")
    base_path = build_tiny_lm(Path(Settings().home) / "tiny-lm", data_dir=data_dir)
    say(f"  model ready in {time.monotonic() - started:.0f} s: {base_path}")
    policy_path = work / "retrain-policy.yaml"
    policy_path.write_text(POLICY)
    # bank-bot is watched for its refusal rate only (the window test, not the per-segment
    # bias test too), so the story has one incident to follow.
    plan_path = work / "detectors.yaml"
    plan_path.write_text(
        defaults_path().read_text()
        + f'  - match: "{LOOP_MODEL}"\n    signals:\n'
        + "      refusal_rate:\n        - detector: rate_cusum\n          share: 0.08\n"
        + "".join(f"      {signal}: []\n" for signal in _signals_off())
    )
    env = {
        "GENMON_DETECTORS__CONFIG_FILE": str(plan_path),
        "GENMON_RETRAIN__POLICY_FILE": str(policy_path),
        "GENMON_RETRAIN__ARTIFACTS_URI": str(work / "artifacts"),
        "GENMON_RETRAIN__HEARTBEAT_S": "2",
        "GENMON_RETRAIN__LEASE_S": "20",
        "GENMON_RETRAIN__POLL_INTERVAL_S": "1",
        "GENMON_RETRAIN__VOLUME_CHECK_INTERVAL_S": "2",
    }
    return LoopSetup(env=env, base_path=base_path)


def _signals_off() -> list[str]:
    import yaml

    from genmon.detectors.calibration.plan import defaults_path

    plan = yaml.safe_load(defaults_path().read_text())
    signals = {name for block in plan["models"] for name in block.get("signals", {})}
    return sorted(signals - {"refusal_rate"})


@dataclass
class Lineage:
    """What the loop did, step by step (printed at the end; ``--json`` for tests)."""

    incident_id: str | None = None
    incident_title: str = ""
    job_id: str | None = None
    jobs: int = 0
    dataset_hash: str | None = None
    version: str | None = None
    verdict: dict[str, Any] = field(default_factory=dict)
    served_version: str | None = None
    resolved: bool = False
    resolution: str = ""
    redelivered: list[str] = field(default_factory=list)
    announcements: int = 0
    refusals: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.started, 1)


def run(
    settings: Settings,
    engine: Any,
    setup: LoopSetup,
    data_dir: Path,
    *,
    warmup_s: float,
    deadline_s: float,
    receiver: Any,
    say: Callable[[str], None],
    stopping: threading.Event,
) -> Lineage:
    """Registers bank-bot, serves it, and follows the loop until the incident resolves."""
    from genmon.retrain.announce import ModelAnnouncer
    from genmon.retrain.follower import AdapterFollower
    from genmon.retrain.registry import register_model
    from genmon.retrain.tiny_lm import support_pairs

    announcer = ModelAnnouncer(settings)
    try:
        register_model(
            engine, LOOP_MODEL, str(setup.base_path), "v1", "demo", announce=announcer.announce
        )
    finally:
        announcer.close()
    say(f"feedback loop: registered {LOOP_MODEL} (base {setup.base_path.name}, serving v1)")
    healthy, cards = support_pairs(data_dir, refuse_class="cards", split="test")
    follower = AdapterFollower(settings, LOOP_MODEL)
    if not follower.wait_loaded("v1", timeout=120):
        follower.close()
        raise click.ClickException(f"the follower did not load v1: {follower.last_error}")
    service = _BankService(
        settings, follower, healthy, cards, launch_at=time.monotonic() + warmup_s
    )
    service.start()
    say(
        f"  serving {LOOP_MODEL} at {LOOP_RATE:g} req/s; after {warmup_s:.0f} s customers start "
        f"asking about cards ({CARDS_SHARE:.0%} of questions), which v1 refuses"
    )
    lineage = Lineage()
    clock = _Clock()
    try:
        _follow(
            settings, engine, follower, service, lineage, clock, deadline_s, receiver, say, stopping
        )
    finally:
        service.stopping.set()
        service.join(timeout=60)
        follower.close()
    lineage.refusals = service.counts.refusal_line()
    return lineage


def _follow(
    settings: Settings,
    engine: Any,
    follower: Any,
    service: _BankService,
    lineage: Lineage,
    clock: _Clock,
    deadline_s: float,
    receiver: Any,
    say: Callable[[str], None],
    stopping: threading.Event,
) -> None:
    deadline = time.monotonic() + deadline_s
    last_progress = ""
    while time.monotonic() < deadline and not stopping.is_set():
        if service.error is not None:
            raise click.ClickException(f"the bank-bot service failed: {service.error!r}")
        incident = _incident(engine)
        if incident is not None and lineage.incident_id is None:
            lineage.incident_id, lineage.incident_title = incident.id, incident.title
            lineage.timings["incident_opened_s"] = clock()
            say(f"  [{clock():>5.1f} s] incident opened: {incident.title}")
        job = _job(engine)
        if job is not None and lineage.job_id is None:
            lineage.job_id = job.job_id
            lineage.timings["job_queued_s"] = clock()
            say(f"  [{clock():>5.1f} s] retraining job {job.job_id[:12]} queued ({job.reason})")
            lineage.redelivered = _redeliver(settings, incident, job)
            say(f"  [{clock():>5.1f} s] delivered again: {', '.join(lineage.redelivered)}")
        if job is not None:
            progress = _progress_line(job)
            if progress != last_progress:
                say(f"  [{clock():>5.1f} s] job {job.status.value}: {progress}")
                last_progress = progress
            if job.status.value in {"promoted", "rejected", "failed"} and not lineage.verdict:
                lineage.verdict = dict(job.verdict)
                lineage.dataset_hash = job.dataset_hash
                lineage.version = job.candidate_version
                lineage.timings["job_finished_s"] = clock()
                if job.status.value != "promoted":
                    raise click.ClickException(
                        f"the job ended {job.status.value}: {job.error or job.verdict}"
                    )
        if lineage.version and follower.version == lineage.version and not lineage.served_version:
            lineage.served_version = follower.version
            lineage.timings["served_s"] = clock()
            say(f"  [{clock():>5.1f} s] the follower serves {follower.version} now")
        if incident is None and lineage.incident_id is not None:
            reason = _resolution(engine, lineage.incident_id)
            if reason is not None:
                lineage.resolved = True
                lineage.resolution = reason
                lineage.timings["resolved_s"] = clock()
                say(f"  [{clock():>5.1f} s] incident resolved: {reason}")
                break
        stopping.wait(1.0)
    lineage.jobs = _job_count(engine)
    lineage.announcements = sum(
        1 for received in receiver.unique.values() if "alias" in (received.json or {})
    )


def _progress_line(job: Any) -> str:
    progress = job.progress or {}
    if job.status.value == "running" and progress.get("step"):
        return (
            f"step {progress.get('step')}/{progress.get('total')}, "
            f"loss {float(progress.get('loss', 0.0)):.3f}"
        )
    return job.hold_reason or job.status.value


def _incident(engine: Any) -> Any:
    from sqlmodel import select

    from genmon.db import session_scope
    from genmon.schemas.incidents import Incident

    with session_scope(engine) as session:
        rows = session.exec(
            select(Incident).where(Incident.model_id == LOOP_MODEL, Incident.status != "resolved")
        ).all()
        for row in rows:
            session.expunge(row)
    return rows[0] if rows else None


def _resolution(engine: Any, incident_id: str) -> str | None:
    """Why the incident resolved (its last transition's reason); ``None`` while open."""
    from sqlmodel import select

    from genmon.db import session_scope
    from genmon.schemas.incidents import IncidentTransition

    with session_scope(engine) as session:
        last = session.exec(
            select(IncidentTransition)
            .where(IncidentTransition.incident_id == incident_id)
            .order_by(IncidentTransition.id.desc())
        ).first()
        if last is None or last.transition.value != "resolved":
            return None
        return last.reason


def _job(engine: Any) -> Any:
    from sqlmodel import select

    from genmon.db import session_scope
    from genmon.schemas.tables import RetrainJob

    with session_scope(engine) as session:
        row = session.exec(
            select(RetrainJob)
            .where(RetrainJob.model_id == LOOP_MODEL)
            .order_by(RetrainJob.created_at)
        ).first()
        if row is not None:
            session.expunge(row)
    return row


def _job_count(engine: Any) -> int:
    import sqlalchemy as sa

    from genmon.db import session_scope
    from genmon.schemas.tables import RetrainJob

    with session_scope(engine) as session:
        return int(
            session.exec(  # type: ignore[call-overload]
                sa.select(sa.func.count()).where(RetrainJob.model_id == LOOP_MODEL)
            ).scalar_one()
        )


def _redeliver(settings: Settings, incident: Any, job: Any) -> list[str]:
    """Sends the incident's first finding and the job's request again, as a redelivery would."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from genmon.kafka_config import client_config
    from genmon.schemas import Finding, RetrainRequest

    wanted = {
        settings.topic("findings"): lambda raw: (
            (f := Finding.model_validate_json(raw)).detected
            and incident is not None
            and f.fingerprint == incident.fingerprint
        ),
        settings.topic("retrain"): lambda raw: (
            RetrainRequest.model_validate_json(raw).job_id == job.job_id
        ),
    }
    consumer = KafkaConsumer(**client_config(settings.kafka), enable_auto_commit=False)
    producer = KafkaProducer(**client_config(settings.kafka, producer=True))
    sent: list[str] = []
    try:
        for topic, matches in wanted.items():
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
            ]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            ends = consumer.end_offsets(partitions)
            found = None
            while found is None and any(consumer.position(tp) < ends[tp] for tp in partitions):
                for records in consumer.poll(timeout_ms=1000).values():
                    found = next((r for r in records if _safe(matches, r.value)), found)
            if found is not None:
                producer.send(topic, found.value, key=found.key)
                sent.append(f"{topic.rsplit('.', 1)[-1]} message (offset {found.offset})")
        producer.flush(timeout=30)
    finally:
        consumer.close()
        producer.close()
    return sent


def _safe(matches: Callable[[bytes], bool], raw: bytes) -> bool:
    try:
        return bool(matches(raw))
    except ValueError:
        return False


def report(lineage: Lineage, say: Callable[[str], None]) -> None:
    """One line per step: incident -> job -> dataset -> version -> verdict -> resolve."""
    reasons = "; ".join(lineage.verdict.get("reasons", [])[:3])
    say("feedback loop lineage:")
    click.echo(f"    incident  {lineage.incident_id}  {lineage.incident_title}")
    click.echo(
        f"    job       {lineage.job_id}  ({lineage.jobs} job(s) after redelivering "
        f"{len(lineage.redelivered)} message(s))"
    )
    click.echo(f"    dataset   {lineage.dataset_hash}")
    click.echo(
        f"    version   {lineage.version}  (served by the follower: {lineage.served_version})"
    )
    click.echo(f"    verdict   {lineage.verdict.get('decision')}: {reasons}")
    click.echo(
        f"    resolved  {lineage.resolution or 'no'}  "
        f"(model announcements to on-call: {lineage.announcements})"
    )
    click.echo(f"    refusals  {lineage.refusals}")
    steps = ", ".join(
        f"{name[:-2].replace('_', ' ')} {at:.0f} s" for name, at in lineage.timings.items()
    )
    click.echo(f"    timeline  {steps} (from the first request)")
