"""docker-compose.yml stays consistent with genmon's settings and command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from genmon.cli import main
from genmon.settings import KafkaSettings, PostgresSettings, Settings

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
GENMON_SERVICES = ("kafka-topics", "worker", "api", "retrain-worker")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(compose["services"])


def _settings_from(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container with exactly this environment would build."""
    for name in list(os.environ):
        if name.startswith("GENMON_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings(_env_file=None)


def _published(service: dict[str, Any], container_port: int) -> tuple[str, int]:
    """(host address, host port) publishing ``container_port``."""
    for mapping in service.get("ports", []):
        address, host_port, port = str(mapping).split(":")
        if int(port) == container_port:
            return address, int(host_port)
    raise AssertionError(f"container port {container_port} is not published: {service}")


def _field_exists(path: list[str]) -> bool:
    model: type[BaseModel] = Settings
    for depth, name in enumerate(path):
        field = model.model_fields.get(name)
        if field is None:
            return False
        annotation = field.annotation
        if depth < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_the_expected_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"kafka", "postgres", *GENMON_SERVICES}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    for name in GENMON_SERVICES:
        assert services[name]["build"] == "."


def test_every_genmon_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    names = {
        name
        for service in services.values()
        for name in service.get("environment", {})
        if name.startswith("GENMON_")
    }
    assert names, "the genmon services should be configured through GENMON_ variables"
    unknown = [
        name
        for name in sorted(names)
        if not _field_exists(name.removeprefix("GENMON_").lower().split("__"))
    ]
    assert unknown == []


def test_kafka_is_reachable_where_the_settings_point(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = services["kafka"]["environment"]
    advertised = {
        listener.split("://", 1)[1] for listener in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    host_defaults = KafkaSettings()  # what a producer on the host uses unless told otherwise

    # Producers on the host keep genmon's default bootstrap address.
    assert _published(services["kafka"], host_defaults.port) == ("127.0.0.1", host_defaults.port)
    assert host_defaults.bootstrap_servers in advertised
    for name in GENMON_SERVICES:
        inside = _settings_from(services[name]["environment"], monkeypatch).kafka
        assert inside.bootstrap_servers in advertised, name
        assert inside.partitions == int(kafka["KAFKA_NUM_PARTITIONS"]), name


def test_database_url_matches_the_postgres_service(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    postgres = services["postgres"]["environment"]
    host_defaults = PostgresSettings()

    assert _published(services["postgres"], 5432) == ("127.0.0.1", host_defaults.port)
    for name in ("worker", "api", "retrain-worker"):
        url = make_url(_settings_from(services[name]["environment"], monkeypatch).database.url)
        assert url.drivername == "postgresql+psycopg", name
        assert (url.host, url.port) == ("postgres", 5432), name
        assert url.username == postgres["POSTGRES_USER"] == host_defaults.user
        assert url.password == postgres["POSTGRES_PASSWORD"] == host_defaults.password
        assert url.database == postgres["POSTGRES_DB"] == host_defaults.database


def test_worker_serves_metrics_on_its_published_port(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _settings_from(services["worker"]["environment"], monkeypatch).worker

    assert worker.web_host == "0.0.0.0"
    assert _published(services["worker"], worker.web_port) == ("127.0.0.1", worker.web_port)


def test_retrain_worker_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["retrain-worker"]["deploy"]["resources"]["reservations"]["devices"]

    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    assert services["kafka-topics"]["command"] == ["genmon", "infra", "topics"]
    assert services["worker"]["command"] == ["genmon", "worker"]
    assert services["api"]["command"] == ["genmon", "api"]
    assert services["retrain-worker"]["command"] == ["genmon", "retrain", "worker"]


def test_services_started_by_default_run_existing_commands(
    services: dict[str, dict[str, Any]],
) -> None:
    """Services outside a profile start with `docker compose up`: their commands must exist."""
    missing = []
    for name in GENMON_SERVICES:
        service = services[name]
        if service.get("profiles"):
            continue
        command: click.Command | None = main
        for word in service["command"][1:]:
            assert isinstance(command, click.Group), (name, word)
            command = command.get_command(click.Context(command), word)
            if command is None:
                missing.append(f"{name}: {' '.join(service['command'])}")
                break
    assert missing == []
