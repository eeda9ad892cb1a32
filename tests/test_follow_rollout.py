"""The serving side of a rollout on the real broker: :class:`~genmon.follow.RolloutFollower`
splits keys between the announced champion and challenger by the challenger's share, sends
everything back to the champion once the challenger is unset, and ``Monitor.follow(...,
alias="rollout")`` logs the version the split chose for each request id."""

from __future__ import annotations

import hashlib
import logging
import math
import queue

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka_support import consume

from genmon.exceptions import ConfigurationError
from genmon.follow import RolloutFollower, traffic_bucket
from genmon.retrain.announce import ModelAnnouncer
from genmon.schemas.codec import decode
from genmon.schemas.events import InferenceEvent, ModelEvent
from genmon.sdk import Monitor
from genmon.settings import Settings

WAIT_S = 60.0
KEYS = [f"request-{i}" for i in range(5000)]


def scoped(settings: Settings, prefix: str, kinds: tuple[str, ...] = ("models",)) -> Settings:
    """``settings`` whose topics start with ``prefix``, those of ``kinds`` created with three
    partitions (so the follower must find its model's one)."""
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
    scoped = settings.model_copy(update={"kafka": kafka})
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(scoped.topic(k), 3, 1) for k in kinds])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    return scoped


def moved(
    model: str, alias: str, version: str | None, action: str, share: float | None = None
) -> ModelEvent:
    return ModelEvent.model_validate(
        {
            "model_id": model,
            "alias": alias,
            "version": version,
            "action": action,
            "traffic_share": share,
        }
    )


def expected_split(model: str, share: float, challenger: str, champion: str) -> dict[str, str]:
    """The documented split, computed independently: sha256(model \\0 key), 8 bytes / 2**64."""
    return {
        key: challenger
        if int.from_bytes(hashlib.sha256(f"{model}\0{key}".encode()).digest()[:8], "big") / 2**64
        < share
        else champion
        for key in KEYS
    }


def next_change(changes: queue.Queue[ModelEvent]) -> ModelEvent:
    return changes.get(timeout=WAIT_S)


def test_the_split_follows_the_share_and_ends_when_the_challenger_is_unset(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = scoped(kafka_settings, unique_name)
    model = "chat"
    champion = moved(model, "champion", "v1", "promoted")
    challenger = moved(model, "challenger", "v2", "challenger", 0.1)
    changes: queue.Queue[ModelEvent] = queue.Queue()
    with ModelAnnouncer(settings) as announcer:
        # Another model's rollout shares the topic and must not leak into this split.
        announcer.announce([champion, challenger, moved("other", "challenger", "v9", "x", 0.9)])
        with RolloutFollower(settings, model, on_change=changes.put) as split:
            assert split.wait_ready(WAIT_S) and split.ready
            assert (split.champion, split.challenger, split.share) == ("v1", "v2", 0.1)
            # The replay's state: one call per alias.
            replayed = {next_change(changes).event_id, next_change(changes).event_id}
            assert replayed == {champion.event_id, challenger.event_id}

            first = {key: split.version_for(key) for key in KEYS}
            on_challenger = sum(version == "v2" for version in first.values())
            # Uniform: Binomial(5000, 0.1) is 500 +- 21; four standard deviations either side.
            assert abs(on_challenger - 500) <= 4 * math.sqrt(5000 * 0.1 * 0.9)
            # Deterministic, and exactly the documented formula (services in other languages).
            assert first == expected_split(model, 0.1, "v2", "v1")
            assert [split.version_for(key) for key in KEYS] == list(first.values())
            assert all(traffic_bucket(model, k) < 0.1 for k, v in first.items() if v == "v2")

            # A larger share of the same version is a change, and keeps the earlier keys.
            wider = moved(model, "challenger", "v2", "challenger", 0.3)
            announcer.announce(wider)
            assert next_change(changes) == wider and split.share == 0.3
            second = {key: split.version_for(key) for key in KEYS}
            assert all(second[key] == "v2" for key, v in first.items() if v == "v2")
            assert abs(sum(v == "v2" for v in second.values()) - 1500) <= 4 * math.sqrt(
                5000 * 0.3 * 0.7
            )

            # Rolled back: the challenger is unset and everything goes to the champion.
            announcer.announce(moved(model, "challenger", None, "rolled_back"))
            assert split.wait_for("challenger", None, WAIT_S)
            assert next_change(changes).action == "rolled_back"
            assert split.share == 0.0 and {split.version_for(key) for key in KEYS} == {"v1"}

            # A new challenger, then its confirmation: the champion moves, the challenger is
            # unset, and everything goes to the new champion.
            announcer.announce(moved(model, "challenger", "v3", "challenger", 0.1))
            assert split.wait_for("challenger", "v3", WAIT_S)
            assert {split.version_for(key) for key in KEYS} == {"v1", "v3"}
            announcer.announce(
                [
                    moved(model, "champion", "v3", "promoted"),
                    moved(model, "previous", "v1", "promoted"),
                    moved(model, "challenger", None, "promoted"),
                ]
            )
            assert split.wait_for("champion", "v3", WAIT_S)
            assert split.wait_for("challenger", None, WAIT_S)
            assert {split.version_for(key) for key in KEYS} == {"v3"}
            with pytest.raises(ConfigurationError, match="champion and challenger"):
                split.wait_for("previous", "v1", 0.1)


def test_a_challenger_announced_without_a_share_gets_no_traffic(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = scoped(kafka_settings, unique_name)
    with ModelAnnouncer(settings) as announcer:
        announcer.announce(
            [moved("chat", "champion", "v1", "promoted"), moved("chat", "challenger", "v2", "set")]
        )
        with RolloutFollower(settings, "chat") as split:
            assert split.wait_ready(WAIT_S) and split.challenger == "v2"
            assert split.share == 0.0 and {split.version_for(key) for key in KEYS} == {"v1"}


def test_monitor_logs_the_version_the_split_chose(
    kafka_settings: Settings, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = scoped(kafka_settings, unique_name, kinds=("models", "inference"))
    fields = {"model_id": "chat", "prompt": "a", "response": "b", "latency_ms": 1.0}
    routed = [f"r-{i}" for i in range(40)]
    after = [f"late-{i}" for i in range(10)]
    with ModelAnnouncer(settings) as announcer, Monitor(settings=settings) as monitor:
        announcer.announce(
            [
                moved("chat", "champion", "v1", "promoted"),
                moved("chat", "challenger", "v2", "challenger", 0.5),
            ]
        )
        split = monitor.follow("chat", alias="rollout")
        assert isinstance(split, RolloutFollower)
        assert split.wait_for("challenger", "v2", WAIT_S) and split.wait_ready(WAIT_S)
        served = {request_id: split.version_for(request_id) for request_id in routed}
        assert set(served.values()) == {"v1", "v2"}
        for request_id in routed:
            monitor.log_inference(request_id=request_id, **fields)
        monitor.log_inference(request_id="pinned", model_version="v7", **fields)
        with caplog.at_level(logging.WARNING, logger="genmon.follow"):
            monitor.log_inference(**fields)  # no request id: one is drawn and split
        assert "without request_id during a rollout" in caplog.text
        announcer.announce(moved("chat", "challenger", None, "rolled_back"))
        assert split.wait_for("challenger", None, WAIT_S)
        for request_id in after:
            monitor.log_inference(request_id=request_id, **fields)
        assert monitor.flush(WAIT_S)
    total = len(routed) + 2 + len(after)
    records = consume(settings, settings.topic("inference"), expected=total, timeout_s=WAIT_S)
    events = [decode(record.value, InferenceEvent) for record in records]
    logged = {event.request_id: event.model_version for event in events}
    assert len(logged) == total
    assert {key: logged.pop(key) for key in routed} == served
    assert logged.pop("pinned") == "v7"
    assert {logged.pop(key) for key in after} == {"v1"}
    ((drawn, version),) = logged.items()
    assert version == ("v2" if traffic_bucket("chat", drawn) < 0.5 else "v1")
