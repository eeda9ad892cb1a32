"""docker-compose.yml and the Dockerfile stay consistent with genmon's settings and CLI."""

from __future__ import annotations

import json
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

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
DOCKERFILE = COMPOSE_FILE.parent / "Dockerfile"
GENMON_SERVICES = ("kafka-topics", "db-migrate", "worker", "api")


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
    for name in ("db-migrate", "worker", "api"):
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


def test_api_serves_on_its_published_port_and_links_there(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _settings_from(services["api"]["environment"], monkeypatch).api

    assert api.host == "0.0.0.0"
    assert _published(services["api"], api.port) == ("127.0.0.1", api.port)
    # The worker's pages link where people reach the API from the host.
    worker = _settings_from(services["worker"]["environment"], monkeypatch).api
    assert worker.link_base() == f"http://127.0.0.1:{api.port}"


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    assert services["kafka-topics"]["command"] == ["genmon", "infra", "topics"]
    assert services["db-migrate"]["command"] == ["genmon", "db", "upgrade"]
    assert services["worker"]["command"] == ["genmon", "worker"]
    assert services["api"]["command"] == ["genmon", "api"]
    for name in ("worker", "api"):  # both start on a migrated database
        assert services[name]["depends_on"]["db-migrate"] == {
            "condition": "service_completed_successfully"
        }


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` with the CLI's own parser without running it; raise if it is refused."""
    assert argv[0] == "genmon", argv
    command: click.Command = main
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        found = command.get_command(click.Context(command), args[0])
        assert found is not None, f"`{' '.join(argv)}`: genmon has no command {args[0]!r}"
        command, args = found, args[1:]
    try:
        command.make_context(" ".join(argv[:1]), list(args))
    except click.exceptions.Exit as done:  # --help, --version: valid, they exit at once
        assert done.exit_code == 0, argv


def _dockerfile_commands() -> list[list[str]]:
    """Every exec-form CMD, ENTRYPOINT and HEALTHCHECK CMD of the Dockerfile."""
    commands = []
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if not words or words[0] not in {"CMD", "ENTRYPOINT", "HEALTHCHECK"}:
            continue
        form = line[line.index("[") :] if "[" in line else None
        assert form is not None, f"use the exec form (a JSON array): {line}"
        commands.append(json.loads(form))
    return commands


def test_every_command_the_images_run_exists_in_the_cli(
    services: dict[str, dict[str, Any]],
) -> None:
    dockerfile = _dockerfile_commands()
    assert ["genmon", "health"] in dockerfile, "the worker image needs its healthcheck"
    compose = [service["command"] for service in services.values() if "build" in service]
    assert len(compose) == len(GENMON_SERVICES)
    for argv in dockerfile + compose:
        _parse(argv)


def test_the_parser_check_refuses_what_the_cli_would() -> None:
    with pytest.raises(AssertionError, match="no command 'dashboard'"):
        _parse(["genmon", "dashboard"])
    with pytest.raises(AssertionError, match="no command 'worker'"):
        _parse(["genmon", "retrain", "worker"])
    with pytest.raises(click.UsageError):
        _parse(["genmon", "worker", "--role", "nope"])
