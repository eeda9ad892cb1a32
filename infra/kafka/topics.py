"""genmon's topics on any cluster: created with the durability the settings ask for
(partitions, ``kafka.replication_factor``, ``min.insync.replicas``, retention), and
described back as the cluster holds them (``genmon infra topics``).

The admin client connects with ``settings.kafka``'s security (:mod:`genmon.kafka_config`),
or in plain text to the local broker's own listener; a refused login or certificate is a
:class:`~genmon.exceptions.ConfigurationError` that names the broker and the mechanism, raised
as soon as the broker answers, never a wait for a timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genmon import kafka_config
from genmon.exceptions import KafkaInfraError
from genmon.settings import INTERNAL_TOPIC_KINDS, TOPIC_KINDS, Settings

# Kafka error code of CreateTopics for a topic that is already there.
TOPIC_ALREADY_EXISTS = 36
MIN_INSYNC = "min.insync.replicas"


@dataclass(frozen=True)
class TopicDurability:
    """What ``genmon infra topics`` shows of one topic, as the cluster reports it."""

    name: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int | None


def topic_names(settings: Settings) -> list[str]:
    return [settings.topic(kind) for kind in (*TOPIC_KINDS, *INTERNAL_TOPIC_KINDS)]


def faust_topic_names(admin: Any, settings: Settings) -> list[str]:
    """Topics the workers' Faust apps created (``<app id>-...``: table changelogs, the
    assignor's leader topic), which carry the same durability settings."""
    prefix = f"{settings.worker.app_id}-"
    return sorted(name for name in admin.list_topics() if name.startswith(prefix))


def new_admin(settings: Settings, bootstrap: str, *, secure: bool, timeout_ms: int) -> Any:
    """A kafka-python admin client on ``bootstrap``; ``secure``: with ``settings.kafka``'s
    security options (else plain text, the local broker's own listener)."""
    from kafka.admin import KafkaAdminClient  # heavy: keep `genmon --help` fast

    options: dict[str, Any] = {"client_id": "genmon-infra", "request_timeout_ms": timeout_ms}
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3
        options["bootstrap_timeout_ms"] = timeout_ms
    if secure:
        config = kafka_config.client_config(settings.kafka, bootstrap, **options)
    else:
        config = kafka_config.ClientConfig(bootstrap_servers=bootstrap, **options)
    return KafkaAdminClient(**config)


@contextmanager
def connected(
    settings: Settings, bootstrap: str, *, secure: bool, timeout_ms: int = 15000
) -> Iterator[Any]:
    """An admin client for the ``with`` block; a refused login or certificate, on connect or
    on a request, becomes the clear :func:`genmon.kafka_config.auth_failure`."""
    kafka = settings.kafka
    # One login first: kafka-python retries a refused login or certificate until its
    # timeout, and then says only that it could not connect.
    if secure:
        kafka_config.check_login(kafka, bootstrap)
    try:
        admin = new_admin(settings, bootstrap, secure=secure, timeout_ms=timeout_ms)
    except Exception as error:
        _raise_if_auth(settings, error, bootstrap)
        raise KafkaInfraError(
            f"cannot reach Kafka at {kafka_config.describe(kafka, bootstrap)} "
            f"({type(error).__name__}: {error}); start it with `genmon infra up`, or check "
            "GENMON_KAFKA__BOOTSTRAP_SERVERS and GENMON_KAFKA__SECURITY_PROTOCOL"
        ) from error
    try:
        yield admin
    except Exception as error:
        _raise_if_auth(settings, error, bootstrap)
        raise
    finally:
        admin.close()


def _raise_if_auth(settings: Settings, error: BaseException, bootstrap: str) -> None:
    cause: BaseException | None = error
    while cause is not None:
        if kafka_config.is_auth_failure(cause):
            raise kafka_config.auth_failure(settings.kafka, cause, bootstrap) from None
        cause = cause.__cause__ or cause.__context__


def create_topics(admin: Any, settings: Settings, address: str, log_path: Path) -> list[str]:
    """Create genmon's topics (existing ones are left as they are); returns their names."""
    kafka = settings.kafka
    names = topic_names(settings)
    configs = {"retention.ms": str(kafka.retention_ms), **kafka_config.topic_configs(kafka)}
    spec = {
        name: {
            "num_partitions": kafka.partitions,
            "replication_factor": kafka.replication_factor,
            "configs": configs,
        }
        for name in names
    }
    try:
        result = admin.create_topics(spec, raise_errors=False, wait_for_metadata=True)
    except Exception as error:
        if kafka_config.is_auth_failure(error):
            raise
        raise KafkaInfraError(
            f"creating genmon's topics on {address} failed ({type(error).__name__}: "
            f"{error}); see {log_path}"
        ) from error
    failures = [
        f"{topic['name']}: {topic.get('error_message') or topic['error_code']}"
        for topic in result["topics"]
        if topic["error_code"] not in (0, TOPIC_ALREADY_EXISTS)
    ]
    if failures:
        raise KafkaInfraError(
            f"Kafka at {address} refused some of genmon's topics ({'; '.join(failures)}); "
            "check GENMON_KAFKA__PARTITIONS, GENMON_KAFKA__RETENTION_MS, "
            "GENMON_KAFKA__REPLICATION_FACTOR (at most the number of brokers) and "
            "GENMON_KAFKA__MIN_INSYNC_REPLICAS"
        )
    return names


def describe_topics(admin: Any, names: list[str]) -> list[TopicDurability]:
    """Partitions, replicas and ``min.insync.replicas`` of ``names`` as the cluster has
    them (a topic created before the settings changed keeps what it was created with)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    found = {topic["name"]: topic for topic in admin.describe_topics(names)}
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, configs={MIN_INSYNC: None})
        for name in names
        if name in found
    ]
    described = admin.describe_configs(resources, config_filter="all") if resources else {}
    configs = described.get("topic", {}) if isinstance(described, dict) else {}
    rows = []
    for name in names:
        topic = found.get(name)
        if topic is None or topic.get("error_code"):
            continue
        partitions = topic.get("partitions") or []
        replicas = max(
            (len(p.get("replica_nodes") or p.get("replicas") or []) for p in partitions), default=0
        )
        entry = configs.get(name, {}).get(MIN_INSYNC) or {}
        value = entry.get("value") if isinstance(entry, dict) else None
        rows.append(
            TopicDurability(
                name=name,
                partitions=len(partitions),
                replication_factor=replicas,
                min_insync_replicas=int(value) if value is not None else None,
            )
        )
    return rows
