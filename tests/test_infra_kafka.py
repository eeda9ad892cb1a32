"""The local Kafka broker: lifecycle on private brokers, client compatibility on the shared one.

Lifecycle tests start their own broker (own home, own ports) so they can stop it freely;
they never touch the shared broker other tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from genmon.exceptions import KafkaInfraError
from genmon.infra._process import port_answers
from genmon.infra.kafka import KafkaBroker
from genmon.settings import INTERNAL_TOPIC_KINDS, TOPIC_KINDS, KafkaSettings, Settings

pytestmark = pytest.mark.kafka

PRIVATE_PARTITIONS = 3
PRIVATE_RETENTION_MS = 3_600_000


def _private_settings(home: Path, settings: Settings, free_port: Callable[[], int]) -> Settings:
    port = free_port()
    controller_port = free_port()
    while controller_port == port:
        controller_port = free_port()
    private = Settings(
        home=home,
        kafka=KafkaSettings(
            version=settings.kafka.version,
            port=port,
            controller_port=controller_port,
            heap="256m",
            partitions=PRIVATE_PARTITIONS,
            retention_ms=PRIVATE_RETENTION_MS,
        ),
    )
    # Share the jar cache: resolving it again would only repeat the same download.
    libs = KafkaBroker(settings).ensure_jars()
    private_libs = KafkaBroker(private).libs_dir
    private_libs.parent.mkdir(parents=True, exist_ok=True)
    private_libs.symlink_to(libs, target_is_directory=True)
    return private


@contextlib.contextmanager
def _private_home() -> Iterator[Path]:
    # Not tmp_path: concurrent pytest sessions prune each other's numbered basetemp folders,
    # which would delete a broker's data under its feet.
    home = Path(tempfile.mkdtemp(prefix="genmon-kafka-test-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def running_private_broker(
    settings: Settings, free_port: Callable[[], int]
) -> Iterator[KafkaBroker]:
    """A broker only this module uses, started once for the tests that do not stop it."""
    with _private_home() as home:
        broker = KafkaBroker(_private_settings(home, settings, free_port))
        broker.up()
        yield broker
        broker.down()


@pytest.fixture
def private_broker(settings: Settings, free_port: Callable[[], int]) -> Iterator[KafkaBroker]:
    """A broker (not started yet) that the test may start and stop."""
    with _private_home() as home:
        broker = KafkaBroker(_private_settings(home, settings, free_port))
        yield broker
        broker.down()


def _brokers_using(config_path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "kafka.Kafka" in cmdline and str(config_path) in cmdline:
            found.append(process)
    return found


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_up_twice_reuses_the_running_broker(running_private_broker: KafkaBroker) -> None:
    first = running_private_broker.status()
    again = running_private_broker.up()

    assert first.running and again.running
    assert again.pid == first.pid
    assert [p.pid for p in _brokers_using(running_private_broker.config_path)] == [first.pid]


def test_up_creates_every_topic_with_the_configured_partitions(
    running_private_broker: KafkaBroker,
) -> None:
    settings = running_private_broker.settings
    names = [settings.topic(kind) for kind in (*TOPIC_KINDS, *INTERNAL_TOPIC_KINDS)]
    admin = KafkaAdminClient(bootstrap_servers=running_private_broker.bootstrap)
    try:
        described = {topic["name"]: topic for topic in admin.describe_topics(names)}
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        admin.close()

    assert sorted(described) == sorted(names)
    for name in names:
        assert described[name]["error_code"] == 0
        assert len(described[name]["partitions"]) == PRIVATE_PARTITIONS
        assert configs["topic"][name]["retention.ms"]["value"] == str(PRIVATE_RETENTION_MS)


def test_down_stops_the_broker_and_leaves_no_process(private_broker: KafkaBroker) -> None:
    started = private_broker.up()
    assert started.running and started.pid is not None

    assert private_broker.down() is True

    assert not psutil.pid_exists(started.pid)
    assert _brokers_using(private_broker.config_path) == []
    assert not port_answers("127.0.0.1", private_broker.config.port)
    assert not private_broker.pid_path.exists()
    assert private_broker.status().running is False
    assert private_broker.down() is False


def test_stale_pid_file_is_ignored_and_replaced(private_broker: KafkaBroker) -> None:
    private_broker.home.mkdir(parents=True, exist_ok=True)
    private_broker.pid_path.write_text(f"{_dead_pid()}\n")
    assert private_broker.status() == private_broker.status().__class__(
        running=False, pid=None, bootstrap=private_broker.bootstrap,
        log_path=private_broker.log_path,
    )  # fmt: skip

    # A reused pid: this very test process is alive but is no broker, and must survive.
    private_broker.pid_path.write_text(f"{os.getpid()}\n")
    assert private_broker.status().pid is None
    assert private_broker.down() is False
    assert not private_broker.pid_path.exists()

    private_broker.pid_path.write_text(f"{os.getpid()}\n")
    started = private_broker.up()
    assert started.running
    assert started.pid not in (None, os.getpid())
    assert private_broker.pid_path.read_text().strip() == str(started.pid)


def test_up_refuses_a_port_held_by_someone_else(private_broker: KafkaBroker) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", private_broker.config.port))
        squatter.listen()
        with pytest.raises(KafkaInfraError, match=r"already in use.*GENMON_KAFKA__PORT"):
            private_broker.up()

    assert not private_broker.pid_path.exists()
    assert _brokers_using(private_broker.config_path) == []


# --- both Python clients against the shared broker -------------------------------------------


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            {topic: {"num_partitions": 2, "replication_factor": 1}}, wait_for_metadata=True
        )
    finally:
        admin.close()


MESSAGES = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(25)]
HEADERS = [("genmon-schema", b"1")]


def test_kafka_python_producer_to_aiokafka_consumer(
    kafka_settings: Settings, unique_name: str
) -> None:
    from aiokafka import AIOKafkaConsumer

    bootstrap = kafka_settings.kafka.bootstrap_servers
    _create_topic(bootstrap, unique_name)
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip")
    try:
        for key, value in MESSAGES:
            producer.send(unique_name, key=key, value=value, headers=HEADERS)
        producer.flush(timeout=30)
    finally:
        producer.close()

    Received = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]

    async def consume() -> Received:
        consumer = AIOKafkaConsumer(
            unique_name,
            bootstrap_servers=bootstrap,
            group_id=unique_name,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        received: Received = []
        try:
            async with asyncio.timeout(60):
                while len(received) < len(MESSAGES):
                    batches = await consumer.getmany(timeout_ms=1000)
                    for records in batches.values():
                        received.extend((r.key, r.value, list(r.headers)) for r in records)
        finally:
            await consumer.stop()
        return received

    received = asyncio.run(consume())

    assert sorted((key, value) for key, value, _ in received) == sorted(MESSAGES)
    assert all(headers == HEADERS for _, _, headers in received)


def test_aiokafka_producer_to_kafka_python_consumer(
    kafka_settings: Settings, unique_name: str
) -> None:
    from aiokafka import AIOKafkaProducer

    bootstrap = kafka_settings.kafka.bootstrap_servers
    _create_topic(bootstrap, unique_name)

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip")
        await producer.start()
        try:
            for key, value in MESSAGES:
                await producer.send(unique_name, key=key, value=value, headers=HEADERS)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(produce())
    consumer = KafkaConsumer(
        unique_name,
        bootstrap_servers=bootstrap,
        group_id=unique_name,
        auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    received = []
    try:
        for record in consumer:
            received.append((record.key, record.value, list(record.headers)))
            if len(received) == len(MESSAGES):
                break
    finally:
        consumer.close()

    assert sorted((key, value) for key, value, _ in received) == sorted(MESSAGES)
    assert all(headers == HEADERS for _, _, headers in received)


def test_a_cluster_id_that_starts_with_a_dash_still_formats(
    settings: Settings, free_port: Callable[[], int]
) -> None:
    # One random id in 64 starts with "-"; the storage tool once read it as an option.
    with _private_home() as home:
        broker = KafkaBroker(_private_settings(home, settings, free_port))
        broker.ensure_jars()
        broker._write_config()
        broker.cluster_id_path.parent.mkdir(parents=True, exist_ok=True)
        broker.cluster_id_path.write_text("-8UzPnwhTsSBVBa0-eYFQw\n")

        broker._format_storage()

        meta = (broker.data_dir / "meta.properties").read_text()
        assert "cluster.id=-8UzPnwhTsSBVBa0-eYFQw" in meta


def test_new_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from genmon.infra import kafka as kafka_infra

    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    plain = uuid.UUID(bytes=b"\x00" * 16)
    draws = iter([dash_first, plain])
    monkeypatch.setattr(kafka_infra.uuid, "uuid4", lambda: next(draws))

    assert kafka_infra.new_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
