"""Helpers of the registry and follower tests: fake base weights, a models topic of a
test's own, reading it back."""

from __future__ import annotations

import json
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka_support import consume

from genmon.schemas.codec import decode
from genmon.schemas.events import ModelEvent
from genmon.settings import Settings


def fake_base(folder: Path, seed: int = 0) -> Path:
    """A folder :func:`genmon.retrain.lm.resolve_base` accepts, with weights of its own
    (``seed`` picks the bytes, so two seeds fingerprint differently)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": seed}))
    (folder / "model.safetensors").write_bytes(
        bytes((seed * 31 + i * 7) % 256 for i in range(4096))
    )
    return folder


def with_prefix(
    settings: Settings, prefix: str, partitions: int = 3, kinds: tuple[str, ...] = ("models",)
) -> Settings:
    """``settings`` whose topics start with ``prefix``, with the topics of ``kinds``
    created (several partitions, so followers must find their model's one)."""
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
    scoped = settings.model_copy(update={"kafka": kafka})
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    topics = [
        NewTopic(scoped.topic(k), num_partitions=partitions, replication_factor=1) for k in kinds
    ]
    try:
        admin.create_topics(topics)
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    return scoped


def read_models_topic(settings: Settings, expected: int) -> list[tuple[bytes, ModelEvent]]:
    """``(key, event)`` of the models topic, in the order of each partition."""
    records = consume(settings, settings.topic("models"), expected=expected, timeout_s=30)
    return [(record.key, decode(record.value, ModelEvent)) for record in records]
