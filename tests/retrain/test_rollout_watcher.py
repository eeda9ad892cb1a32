"""The rollout watcher's invariants under redelivery and restarts: each closed window counts
once, a restarted watcher goes on where the stored state stopped, and each verdict is acted
on once (one rollback, one finding id), on the real broker and database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka_support import consume
from retrain_support_registry import fake_base

from bench.rollout.simulate import simulate_windows
from genmon.infra.kafka import KafkaBroker
from genmon.retrain.policy import load_policy
from genmon.retrain.registry import aliases, create_version, register_model
from genmon.retrain.rollout import get_rollout, start_rollout
from genmon.retrain.watch import RolloutWatcher
from genmon.schemas.codec import decode
from genmon.schemas.events import Finding, RolloutStatus
from genmon.settings import Settings

pytestmark = pytest.mark.kafka

MODEL = "bank-bot"


def windows(seed: int, worse: bool, duration_s: float = 600.0) -> list[bytes]:
    """A seeded replay's closed windows, as the worker publishes them."""
    records = simulate_windows(
        seed,
        rps=300.0,
        share=0.10,
        segment_share=0.25,
        base_rate=0.10,
        challenger_rate_in_segment=0.16 if worse else 0.10,
        feedback_rate=1.0,
        feedback_delay_s=30.0,
        window_s=10.0,
        duration_s=duration_s,
    )
    return [json.dumps({**r, "model_id": MODEL}).encode() for r in records]


@pytest.fixture
def scoped(kafka_settings: Settings, unique_name: str, database_url: str) -> Settings:
    settings = kafka_settings.model_copy(
        update={
            "kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name}),
            "database": kafka_settings.database.model_copy(update={"url": database_url}),
        }
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    return settings


@pytest.fixture
def rollout_id(engine: Any, tmp_path: Path) -> str:
    register_model(engine, MODEL, str(fake_base(tmp_path / "base")), "v1")
    create_version(engine, MODEL, "v2", str(tmp_path / "adapter"), "v1")
    rollout, _ = start_rollout(engine, MODEL, "v2", 0.10)
    return rollout.rollout_id


def watcher(settings: Settings, engine: Any) -> Iterator[RolloutWatcher]:
    """A watcher whose consumer is the test: ``handle()`` is called by hand."""
    found = RolloutWatcher(settings, engine, load_policy(None))
    found._producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        yield found
    finally:
        found._producer.close()


def findings(settings: Settings, expected: int) -> list[Finding]:
    records = consume(settings, settings.topic("findings"), expected=expected, timeout_s=20)
    return [decode(r.value, Finding) for r in records]


def test_a_window_delivered_twice_counts_once_and_a_restart_goes_on(
    scoped: Settings, engine: Any, rollout_id: str
) -> None:
    replay = windows(seed=3, worse=False, duration_s=120.0)
    half = len(replay) // 2
    for w in watcher(scoped, engine):
        for raw in replay[:half]:
            w.handle(raw)
            w.handle(raw)  # the offset was not committed before a crash: delivered again
    # A new watcher (a restarted worker) reads the stored state and gets the rest, plus the
    # last window of the first half once more.
    for w in watcher(scoped, engine):
        for raw in replay[half - 1 :]:
            w.handle(raw)
        twice = get_rollout(engine, rollout_id).result
    once = _fresh_result(scoped, engine, rollout_id, replay)
    assert twice["comparisons"] == once["comparisons"]
    assert twice["elapsed_s"] == once["elapsed_s"] > 0


def _fresh_result(
    settings: Settings, engine: Any, rollout_id: str, replay: list[bytes]
) -> dict[str, Any]:
    """The result of the same windows applied once each, on a watch started afresh."""
    from genmon.retrain.rollout import save_watch

    save_watch(engine, rollout_id, {}, {}, None, None)
    for w in watcher(settings, engine):
        for raw in replay:
            w.handle(raw)
    return get_rollout(engine, rollout_id).result


def test_a_regression_is_acted_on_once(scoped: Settings, engine: Any, rollout_id: str) -> None:
    replay = windows(seed=1, worse=True, duration_s=900.0)
    decided = None
    for w in watcher(scoped, engine):
        for raw in replay:
            result = w.handle(raw)
            if result is not None and result.decision == "regressed":
                decided = raw
                break
        assert decided is not None, get_rollout(engine, rollout_id).result
        # The deciding window again (a crash before its offset was committed), and more.
        for raw in [decided, *replay[replay.index(decided) + 1 :][:5]]:
            assert w.handle(raw) is None  # the rollout is over: nothing watches it
    rollout = get_rollout(engine, rollout_id)
    assert rollout.status is RolloutStatus.ROLLED_BACK
    assert rollout.incident_finding_id == f"rollout-{rollout_id}"
    assert aliases(engine, MODEL) == {"champion": "v1"}
    (finding,) = findings(scoped, expected=1)
    assert finding.finding_id == f"rollout-{rollout_id}"
    assert (finding.detector, finding.model_version, finding.detected) == (
        "rollout_watch",
        "v2",
        True,
    )
    assert "rolled back to v1" in (finding.title or "")


def test_windows_that_closed_before_the_rollout_are_not_watched(
    scoped: Settings, engine: Any, rollout_id: str
) -> None:
    old = json.loads(windows(seed=2, worse=True, duration_s=30.0)[0])
    old["closed_at"] = "2020-01-01T00:00:00+00:00"
    for w in watcher(scoped, engine):
        assert w.handle(json.dumps(old).encode()) is None
        assert w.handle(b"not json") is None
        assert w.handle(json.dumps({**old, "kind": "hopping"}).encode()) is None
    assert get_rollout(engine, rollout_id).state == {}


def test_the_watch_length_is_forecast_from_the_traffic_before_the_rollout(
    scoped: Settings, engine: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register_model(engine, MODEL, str(fake_base(tmp_path / "base")), "v1")
    create_version(engine, MODEL, "v2", str(tmp_path / "adapter"), "v1")
    before = [json.loads(raw) for raw in windows(seed=4, worse=False, duration_s=300.0)]
    for record in before:
        record["series"] = [s for s in record["series"] if s["model_version"] == "v1"]
    after = windows(seed=5, worse=False, duration_s=300.0)
    caplog.set_level("INFO", logger="genmon.retrain.watch")
    for w in watcher(scoped, engine):
        for record in before:
            assert w.handle(json.dumps(record).encode()) is None  # no rollout yet
        rollout, _ = start_rollout(engine, MODEL, "v2", 0.10)
        w._read_at = -1e9  # the rollout list is read again at the next window
        for raw in after:
            w.handle(raw)
    result = get_rollout(engine, rollout.rollout_id).result
    forecast, planned = result["forecast_watch_s"], result["planned_watch_s"]
    assert forecast is not None and planned is not None
    # The forecast leaves out the feedback's 30 s delay; otherwise the same traffic.
    assert 0.5 * planned <= forecast <= 1.2 * planned, (forecast, planned)
    assert "watch about" in caplog.text and "at current traffic" in caplog.text
