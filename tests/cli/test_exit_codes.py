"""One map from errors to exit codes for every command (genmon.cli._common.ExitCode)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import click
import pytest
from click.testing import CliRunner

from genmon.cli import COMMANDS, main
from genmon.cli._common import ExitCode, GenmonGroup
from genmon.exceptions import ConfigurationError


@pytest.fixture
def probe() -> click.Group:
    """A group built like ``genmon``'s, whose commands raise on request."""

    @click.group(cls=GenmonGroup)
    def group() -> None:
        pass

    @group.command()
    def config_error() -> None:
        raise ConfigurationError("GENMON_X must be positive; set GENMON_X=1")

    @group.command()
    def interrupted() -> None:
        raise KeyboardInterrupt

    @group.command()
    def bug() -> None:
        raise RuntimeError("a bug keeps its traceback")

    return group


def test_genmon_errors_are_one_line_and_exit_failed(probe: click.Group) -> None:
    result = CliRunner().invoke(probe, ["config-error"])
    assert result.exit_code == ExitCode.FAILED == 1
    assert result.output.strip() == "Error: GENMON_X must be positive; set GENMON_X=1"


def test_usage_errors_exit_usage_and_ctrl_c_exits_interrupted(probe: click.Group) -> None:
    assert CliRunner().invoke(probe, ["nope"]).exit_code == ExitCode.USAGE == 2
    assert CliRunner().invoke(main, ["worker", "--role", "nope"]).exit_code == ExitCode.USAGE
    assert CliRunner().invoke(probe, ["interrupted"]).exit_code == ExitCode.INTERRUPTED == 130


def test_any_other_exception_is_a_bug_with_its_traceback(probe: click.Group) -> None:
    result = CliRunner().invoke(probe, ["bug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_every_group_is_registered_once() -> None:
    names = [command.name for command in COMMANDS]
    assert len(names) == len(set(names)) == len(main.commands)


@pytest.fixture
def stats_server() -> Iterator[Callable[[], str]]:
    class Stats(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ingest": {"valid": 3}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Stats)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield lambda: f"http://127.0.0.1:{server.server_address[1]}/stats"
    server.shutdown()
    server.server_close()


def test_health_exits_ok_when_the_worker_answers(stats_server: Callable[[], str]) -> None:
    url = stats_server()
    result = CliRunner().invoke(main, ["health", "--url", url])
    assert result.exit_code == ExitCode.OK and "up" in result.output
    as_json = CliRunner().invoke(main, ["health", "--url", url, "--json"])
    assert json.loads(as_json.output) == {"ingest": {"valid": 3}}


def test_health_fails_the_check_when_nothing_answers(free_port: Callable[[], int]) -> None:
    url = f"http://127.0.0.1:{free_port()}/stats"
    result = CliRunner().invoke(main, ["health", "--url", url, "--timeout", "2"])
    assert result.exit_code == ExitCode.FAILED
    assert "is `genmon worker` running?" in result.output
