"""`genmon tokens create|list|revoke` on a real SQLite database, and `genmon api`'s
one-line errors (port taken, the `api` extra missing)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from incident_support import migrated_engine, sqlite_url

from genmon.api.tokens import verify_token
from genmon.cli import main
from genmon.schemas.access import Scope


def _run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_tokens_are_shown_once_listed_without_secrets_and_revoked(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    out = _run("tokens", "create", "oncall", "--scope", "operate", "--url", url)
    token, warning = out.splitlines()[0], out.splitlines()[-1]
    assert token.startswith("gm_") and "not shown again" in warning
    caller = verify_token(engine, token)
    assert caller is not None and caller.token_name == "oncall"
    assert caller.can(Scope.READ) and not caller.can(Scope.ADMIN)

    made = _run(
        "tokens", "create", "ci", "--scope", "ingest", "--scope", "read",
        "--expires-in", "30d", "--json", "--url", url,
    )  # fmt: skip
    created = json.loads(made[: made.rindex("}") + 1])
    assert sorted(created["scopes"]) == ["ingest", "read"] and created["expires_at"]
    assert "secret_hash" not in created

    listed = _run("tokens", "list", "--json", "--url", url)
    assert [t["name"] for t in json.loads(listed)] == ["oncall", "ci"]
    assert token.split("_")[-1] not in listed and "secret_hash" not in listed
    assert "oncall" in _run("tokens", "list", "--url", url)

    assert "revoked" in _run("tokens", "revoke", "oncall", "--url", url)
    assert verify_token(engine, token) is None
    assert [t["name"] for t in json.loads(_run("tokens", "list", "--json", "--url", url))] == ["ci"]
    again = _run("tokens", "revoke", "oncall", "--url", url, code=1)
    assert "no live token named 'oncall'" in again and "Traceback" not in again


def test_token_create_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    migrated_engine(url)
    _run("tokens", "create", "a", "--scope", "read", "--url", url)
    duplicate = _run("tokens", "create", "a", "--scope", "read", "--url", url, code=1)
    assert "a token named 'a' exists" in duplicate
    assert "lifetime" in _run(
        "tokens", "create", "b", "--scope", "read", "--expires-in", "soon", "--url", url, code=2
    )
    assert "Invalid value" in _run("tokens", "create", "c", "--scope", "root", "--url", url, code=2)


def test_api_says_in_one_line_that_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = _run("api", "--host", "127.0.0.1", "--port", port, code=1)
    assert f"127.0.0.1:{port} is in use" in out and "--port" in out
    assert "Traceback" not in out


def test_api_names_the_extra_when_fastapi_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "genmon.api.app", None)  # what a missing extra looks like
    out = _run("api", code=1)
    assert "pip install 'genmon[api]'" in out and "Traceback" not in out
