"""The usual failures end in one line that says what to run, never a traceback
(genmon.cli._failures through GenmonGroup), and every command that prints a list has
``--json``."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from incident_support import postgres_schema_url

from genmon.cli import main
from genmon.cli._common import ExitCode, GenmonGroup
from genmon.settings import get_settings


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Each test reads the environment it set (get_settings is cached per process)."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _one_line_failure(result: Result) -> str:
    """The failure's single line (click prints it as ``Error: ...``)."""
    assert result.exit_code == ExitCode.FAILED, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_database_never_migrated_says_run_db_upgrade(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    done = subprocess.run(
        [sys.executable, "-m", "genmon.cli", "incidents", "list", "--url", f"sqlite:///{empty}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitCode.FAILED, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "no table 'incident'" in line and "run `genmon db upgrade`" in line


@pytest.mark.postgres
def test_a_postgres_schema_never_migrated_says_run_db_upgrade(postgres_url: str) -> None:
    with postgres_schema_url(postgres_url) as url:
        result = CliRunner().invoke(main, ["incidents", "list", "--url", url])
    line = _one_line_failure(result)
    assert "no table 'incident'" in line and "run `genmon db upgrade`" in line


def test_an_unreachable_database_says_start_postgres(free_port: Callable[[], int]) -> None:
    url = f"postgresql+psycopg://genmon:secret-pw@127.0.0.1:{free_port()}/genmon"
    line = _one_line_failure(CliRunner().invoke(main, ["silences", "list", "--url", url]))
    assert "database unreachable" in line and "`genmon infra up --postgres`" in line
    assert "database.url" in line and "secret-pw" not in line


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENMON_API__PORT", "eighty")
    monkeypatch.setenv("GENMON_POSTGRES__PASSWORD", "")
    monkeypatch.setenv("GENMON_DATABASE__ECHO", "loud")
    line = _one_line_failure(CliRunner().invoke(main, ["incidents", "list"]))
    assert "bad settings" in line
    assert "GENMON_API__PORT='eighty': Input should be a valid integer" in line
    assert "GENMON_DATABASE__ECHO='loud'" in line


@pytest.fixture
def broker_probe() -> click.Group:
    """Commands that reach a broker with genmon's two Kafka clients, as its commands do."""

    @click.group(cls=GenmonGroup)
    def group() -> None:
        pass

    @group.command()
    def aiokafka() -> None:
        from aiokafka import AIOKafkaProducer

        async def start() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=get_settings().kafka.bootstrap_servers)
            try:
                await producer.start()
            finally:
                await producer.stop()

        asyncio.run(start())

    @group.command()
    def kafka_python() -> None:
        from kafka import KafkaProducer

        KafkaProducer(
            bootstrap_servers=get_settings().kafka.bootstrap_servers, bootstrap_timeout_ms=1000
        )

    return group


@pytest.mark.parametrize("client", ["aiokafka", "kafka-python"])
def test_an_unreachable_broker_says_run_infra_up(
    client: str,
    broker_probe: click.Group,
    free_port: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GENMON_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    line = _one_line_failure(CliRunner().invoke(broker_probe, [client]))
    assert f"broker at {bootstrap} unreachable: run `genmon infra up`" in line
    assert "kafka.bootstrap_servers" in line


#: Names of commands that print a list whatever their code looks like.
LIST_NAMES = {"list", "status", "topics", "rollouts", "why"}


def _leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _leaves(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def _prints_a_list(command: click.Command) -> bool:
    if command.name in LIST_NAMES:
        return True
    assert command.callback is not None
    return "echo_table(" in inspect.getsource(command.callback)


def test_every_command_that_prints_a_list_has_json() -> None:
    listing = {name: command for name, command in _leaves(main) if _prints_a_list(command)}
    # The tree is where they come from: a sample that must be found, so the rule cannot
    # silently match nothing.
    assert {"incidents list", "silences list", "infra topics", "models show"} <= set(listing)
    missing = [
        name
        for name, command in listing.items()
        if not any(getattr(param, "name", "") == "as_json" for param in command.params)
    ]
    assert missing == [], f"these print a list without --json: {missing}"


def test_json_output_of_a_list_is_json_only(tmp_path: Path) -> None:
    """``--json`` means one JSON document on stdout, whatever the terminal."""
    import json

    from genmon.db import upgrade

    url = f"sqlite:///{tmp_path / 'genmon.sqlite'}"
    upgrade(url)
    result = CliRunner().invoke(main, ["silences", "list", "--all", "--json", "--url", url])
    assert result.exit_code == ExitCode.OK, result.output
    assert json.loads(result.output) == []
