"""Safe rollout end to end, on the real broker and PostgreSQL: a challenger that makes one
segment worse is rolled back within the planned watch (incident, page, models-topic event,
the serving side's follower stops routing to it), and one equal to the champion is
confirmed.

Two models share the workers: ``<name>-worse``, whose challenger raises negative feedback on
``region=eu`` (25 % of traffic) from 10 % to 16 %, and ``<name>-same``, whose challenger is
the champion's twin. The challenger gets 10 % of traffic through
:class:`~genmon.follow.RolloutFollower` (the split a service would use), and every request
gets a thumbs up or down 30 s (event time) after it. Traffic is stamped in the past and
replayed faster than real time: windows close on event time, so the watch runs on its
traffic, not on the test's clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from incident_support import postgres_schema_url
from kafka import KafkaProducer
from kafka_support import consume
from retrain_support_registry import fake_base
from sqlmodel import Session, select

from genmon.db import make_engine, upgrade
from genmon.follow import RolloutFollower
from genmon.incidents.receiver import WebhookReceiver
from genmon.infra.kafka import KafkaBroker
from genmon.retrain.announce import ModelAnnouncer
from genmon.retrain.registry import aliases, create_version, register_model
from genmon.retrain.rollout import get_rollout, start_rollout
from genmon.schemas.codec import decode
from genmon.schemas.events import ModelEvent, RolloutStatus
from genmon.schemas.incidents import Incident
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

GENMON = str(Path(sys.executable).parent / "genmon")
SECRET = "rollout-test-secret"
RPS = 300.0  # requests per second of event time, per model
CHUNK_S = 10.0  # event time produced between looks at the rollouts
#: How far the produced event time may run ahead of the newest window the watch applied.
AHEAD_S = 120.0
FEEDBACK_DELAY_S = 30.0
BASE_NEGATIVE = 0.10
WORSE_NEGATIVE = 0.16
EU_SHARE = 0.25
WALL_LIMIT_S = 420.0


class Traffic:
    """Requests of one model routed by its follower, and their feedback 30 s later."""

    def __init__(self, model: str, follower: RolloutFollower, worse: bool, seed: int) -> None:
        self.model, self.follower, self.worse = model, follower, worse
        self.rng = random.Random(seed)
        self.pending: list[tuple[float, dict[str, Any]]] = []
        self.count = 0
        self.served: dict[str, int] = {}

    def requests(self, start: float, end: float) -> Iterator[tuple[str, dict[str, Any]]]:
        """Inferences stamped in ``[start, end)`` and the feedback that falls due there."""
        t = start
        while t < end:
            self.count += 1
            request_id = f"{self.model}-{self.count}"
            version = self.follower.version_for(request_id)
            assert version is not None, "the follower knows the champion"
            self.served[version] = self.served.get(version, 0) + 1
            region = "eu" if self.rng.random() < EU_SHARE else "us"
            error = self.rng.random() < 0.01
            yield (
                "inference",
                {
                    "request_id": request_id,
                    "model_id": self.model,
                    "model_version": version,
                    "started_at": _iso(t),
                    "prompt": "what is my balance?",
                    "response": "" if error else "Your balance is in the app.",
                    "latency_ms": self.rng.lognormvariate(6.0, 0.4),
                    "status": "error" if error else "ok",
                    "segment": {"region": region},
                },
            )
            negative = BASE_NEGATIVE
            if self.worse and version == "v2" and region == "eu":
                negative = WORSE_NEGATIVE
            score = 0.0 if self.rng.random() < negative else 1.0
            self.pending.append(
                (
                    t + FEEDBACK_DELAY_S,
                    {
                        "request_id": request_id,
                        "model_id": self.model,
                        "score": score,
                        "created_at": _iso(t + FEEDBACK_DELAY_S),
                    },
                )
            )
            t += self.rng.expovariate(RPS)
        due = [item for item in self.pending if item[0] < end]
        self.pending = [item for item in self.pending if item[0] >= end]
        for _, feedback in due:
            yield "feedback", feedback


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait(condition: Callable[[], Any], timeout_s: float, what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def test_a_worse_challenger_is_rolled_back_and_an_equal_one_confirmed(
    kafka_settings: Settings,
    postgres_url: str,
    unique_name: str,
    free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    bootstrap = kafka_settings.kafka.bootstrap_servers
    worse, same = f"{unique_name}-worse", f"{unique_name}-same"
    with (
        postgres_schema_url(postgres_url) as url,
        WebhookReceiver(secret=SECRET) as receiver,
    ):
        destinations = tmp_path / "destinations.yaml"
        destinations.write_text(
            yaml.safe_dump(
                {"destinations": [{"name": "hook", "url": receiver.url, "secret": SECRET}]}
            )
        )
        settings = Settings(
            kafka={"bootstrap_servers": bootstrap, "topic_prefix": unique_name},
            database={"url": url},
            notify={"destinations_file": str(destinations)},
        )
        KafkaBroker(settings).ensure_topics(bootstrap)
        upgrade(url)
        engine = make_engine(url)
        base = fake_base(tmp_path / "base")
        with ModelAnnouncer(settings) as announcer:
            for model in (worse, same):
                register_model(engine, model, str(base), "v1", announce=announcer.announce)
                create_version(engine, model, "v2", str(tmp_path / f"{model}-adapter"), "v1")
        env = {
            **os.environ,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
            "GENMON_WORKER__APP_ID": unique_name,
            "GENMON_HOME": str(tmp_path / "home"),
            "GENMON_DATABASE__URL": url,
            "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
            "GENMON_NOTIFY__POLL_INTERVAL_S": "0.2",
            "GENMON_WINDOWS__TUMBLING_S": "10",
            "GENMON_WINDOWS__HOPPING_SIZE_S": "20",
            "GENMON_WINDOWS__HOPPING_STEP_S": "10",
            # Feedback is read beside the inferences it follows, not after them: a minute of
            # lateness keeps it in its window whichever topic the worker reads first.
            "GENMON_WINDOWS__ALLOWED_LATENESS_S": "60",
            # Event time is the replay's: the wall clock must not move the watermarks.
            "GENMON_WINDOWS__IDLE_TIMEOUT_S": "3600",
            "GENMON_WINDOWS__CLOSE_INTERVAL_S": "0.5",
            "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
            "GENMON_EMBEDDING__ENABLED": "false",
            "GENMON_RETRAIN__POLL_INTERVAL_S": "0.5",
        }
        logs = [tmp_path / "worker.log", tmp_path / "retrain.log"]
        with (
            process(
                [GENMON, "worker", "--loglevel", "warning"],
                {**env, "GENMON_WORKER__WEB_PORT": str(free_port())},
                logs[0],
            ),
            process([GENMON, "worker", "--role", "retrain", "--loglevel", "info"], env, logs[1]),
            RolloutFollower(settings, worse) as follow_worse,
            RolloutFollower(settings, same) as follow_same,
        ):
            for follower in (follow_worse, follow_same):
                assert follower.wait_for("champion", "v1", 60), follower
            rollouts = {}
            with ModelAnnouncer(settings) as announcer:
                for model in (worse, same):
                    rollout, events = start_rollout(engine, model, "v2", 0.10, actor="test")
                    assert announcer.announce(events).ok
                    rollouts[model] = rollout.rollout_id
            # The serving side sees the announcement: 10 % of requests go to v2.
            for follower in (follow_worse, follow_same):
                assert follower.wait_for("challenger", "v2", 60), follower
                assert follower.share == pytest.approx(0.10)
            _run_traffic(bootstrap, settings, engine, rollouts, (follow_worse, follow_same), logs)
            rolled = get_rollout(engine, rollouts[worse])
            confirmed = get_rollout(engine, rollouts[same])
            # The serving side sees the rollback and the confirmation.
            assert follow_worse.wait_for("challenger", None, 60)
            assert follow_worse.version_for("any-request") == "v1"
            assert follow_same.wait_for("champion", "v2", 60)
            assert follow_same.version_for("any-request") == "v2"

        print({"rolled back": rolled.result, "confirmed": confirmed.result})
        assert rolled.status is RolloutStatus.ROLLED_BACK, rolled
        assert rolled.planned_watch_s is not None
        assert rolled.result["elapsed_s"] <= rolled.planned_watch_s, rolled.result
        assert rolled.result["worst"]["segment"] == "region=eu", rolled.result["worst"]
        assert aliases(engine, worse) == {"champion": "v1"}
        assert confirmed.status is RolloutStatus.CONFIRMED, confirmed.result
        assert confirmed.result["elapsed_s"] >= confirmed.planned_watch_s
        assert aliases(engine, same) == {"champion": "v2", "previous": "v1"}

        # The regression opened an incident that paged; the equal challenger opened none.
        with Session(engine) as session:
            incidents = session.exec(
                select(Incident).where(Incident.detector == "rollout_watch")
            ).all()
        assert [(i.model_id, i.model_version, i.segment) for i in incidents] == [
            (worse, "v2", "region=eu")
        ]
        pages = _wait(
            lambda: [
                r.json
                for r in receiver.unique.values()
                if r.json.get("event") == "trigger"
                and str(r.json["incident"].get("id")) == str(incidents[0].id)
            ],
            60,
            "the rollback's page",
            logs,
        )
        assert len(pages) == 1, pages
        # The models topic and the webhooks carry the rollback and the confirmation.
        models = [
            decode(r.value, ModelEvent)
            for r in consume(settings, settings.topic("models"), expected=6, timeout_s=30)
        ]
        moves = [(e.model_id, e.alias.value, e.version, e.action) for e in models]
        assert (worse, "challenger", None, "rolled_back") in moves, moves
        assert (same, "champion", "v2", "confirmed") in moves, moves
        hooks = {r.json.get("event") for r in receiver.unique.values()}
        assert {"model.challenger", "model.rolled_back"} <= hooks, hooks


def _run_traffic(
    bootstrap: str,
    settings: Settings,
    engine: Any,
    rollouts: dict[str, str],
    followers: tuple[RolloutFollower, RolloutFollower],
    logs: list[Path],
) -> None:
    """Produce both models' traffic, chunk by chunk, until both rollouts are decided."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256_000)
    traffic = [
        Traffic(follower.model_id, follower, worse=(i == 0), seed=i)
        for i, follower in enumerate(followers)
    ]
    clock = start = time.time() - 50 * 60
    deadline = time.monotonic() + WALL_LIMIT_S
    try:
        while True:
            states = {m: get_rollout(engine, r).status for m, r in rollouts.items()}
            if all(s is not RolloutStatus.WATCHING for s in states.values()):
                return
            if time.monotonic() > deadline or clock > time.time() + 200:
                tails = "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)
                details = {m: get_rollout(engine, r).result for m, r in rollouts.items()}
                raise AssertionError(f"rollouts not decided: {states}\n{details}\n{tails}")
            if not _caught_up(engine, rollouts, clock, start):
                time.sleep(0.5)
                continue
            for source in traffic:
                for kind, event in source.requests(clock, clock + CHUNK_S):
                    producer.send(
                        settings.topic(kind),
                        key=event["model_id"].encode(),
                        value=json.dumps(event).encode(),
                    )
            producer.flush()
            clock += CHUNK_S
    finally:
        producer.close()


def _caught_up(engine: Any, rollouts: dict[str, str], clock: float, start: float) -> bool:
    """Whether every watch applied windows up to ``AHEAD_S`` before the produced time."""
    for rollout_id in rollouts.values():
        rollout = get_rollout(engine, rollout_id)
        if rollout.status is not RolloutStatus.WATCHING:
            continue
        if rollout.watch_from_ms is None:
            return clock - start < 3 * AHEAD_S  # the first windows are still coming
        newest = rollout.watch_from_ms / 1000 + float(rollout.result.get("elapsed_s") or 0)
        if clock - newest > AHEAD_S:
            return False
    return True
