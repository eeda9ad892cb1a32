"""Shared fixtures.

Real services only: ``kafka_settings`` and ``postgres_url`` make sure the local broker /
cluster started by ``genmon infra up`` is running (starting it when needed and stopping
at the end of the session only what the session started). Nothing here is autouse, so a
test that asks for neither never touches Kafka or PostgreSQL.

Tests sharing the broker must not collide: use ``unique_name`` for topics and consumer
groups.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from incident_support import migrated_engine, postgres_schema_url, sqlite_url
from sqlalchemy.engine import Engine

from genmon.incidents.receiver import WebhookReceiver
from genmon.settings import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Settings read from the environment (GENMON_...), as the services would."""
    return Settings()


@pytest.fixture(scope="session")
def kafka_settings(settings: Settings) -> Iterator[Settings]:
    """Settings whose ``kafka.bootstrap_servers`` answers, with genmon's topics created.

    A broker that already answers there (ours from `genmon infra up`, or one given with
    GENMON_KAFKA__BOOTSTRAP_SERVERS) is reused and left running.
    """
    from genmon.infra.kafka import KafkaBroker

    broker = KafkaBroker(settings)
    if _kafka_answers(settings.kafka.bootstrap_servers):
        broker.ensure_topics(settings.kafka.bootstrap_servers)
        yield settings
        return
    broker.up(sasl=None)
    try:
        yield settings
    finally:
        broker.down()


def _kafka_answers(bootstrap: str) -> bool:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    from genmon.infra._process import port_answers

    addresses = [address.rsplit(":", 1) for address in bootstrap.split(",")]
    # kafka-python needs ~30 s to give up on a closed port; a TCP probe needs none.
    if not any(port_answers(host, int(port)) for host, port in addresses):
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    except KafkaError:
        return False
    try:
        admin.describe_cluster()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


@pytest.fixture(scope="session")
def postgres_url(settings: Settings) -> Iterator[str]:
    """SQLAlchemy URL of the genmon database on the local PostgreSQL cluster.

    A server that already accepts the configured role there is reused and left running.
    """
    from genmon.infra.postgres import PostgresCluster

    cluster = PostgresCluster(settings)
    if _postgres_answers(cluster.url):
        yield cluster.url
        return
    cluster.up()
    try:
        yield cluster.url
    finally:
        cluster.down()


def _postgres_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test uses (topics, consumer groups, model ids)."""
    test = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:40]
    return f"t-{test}-{uuid.uuid4().hex[:12]}"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Call it for each port you need: ``port = free_port()``."""
    return find_free_port


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database on SQLite, then on the shared PostgreSQL (a schema of its own)."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with postgres_schema_url(request.getfixturevalue("postgres_url")) as schema_url:
        yield schema_url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on ``database_url`` with genmon's migrations applied."""
    engine = migrated_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """genmon's reference webhook receiver on loopback, without a signing secret (a test
    module whose pages are signed defines its own, with the secret)."""
    with WebhookReceiver() as running:
        yield running


@pytest.fixture(params=["python", "native"])
def join_tables(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with each join table (:mod:`genmon.streams.windows.join` and its native
    twin): the test module's ``WindowState`` is bound to that table."""
    from functools import partial

    from genmon.streams.windows.state import WindowState

    native_joins = request.param == "native"
    core = partial(WindowState, native_joins=native_joins)
    monkeypatch.setattr(request.module, "WindowState", core)
    return str(request.param)
