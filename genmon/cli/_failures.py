"""The usual failures that are not genmon's bugs, said in one line with the command to run.

A database that was never migrated, a database or broker that does not answer, a
``GENMON_`` variable that does not parse: each reaches the command line as a library's
exception (SQLAlchemy, kafka-python, aiokafka, pydantic) from deep inside a command.
:func:`explain` turns those into the line :class:`~genmon.cli._common.GenmonGroup`
prints (exit :attr:`~genmon.cli._common.ExitCode.FAILED`); anything it does not know
stays a bug with its traceback.

The libraries are looked at by their exceptions' module and class names, never imported
here: ``genmon --help`` stays instant and the SDK-only install (no SQLAlchemy) works.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

#: How many problems of one bad-settings error the line names.
MAX_SETTINGS_PROBLEMS = 3

_MISSING_TABLE = re.compile(
    r"no such table: (?P<sqlite>\w+)|relation \"(?P<postgres>[\w.]+)\" does not exist"
)
_MISSING_COLUMN = re.compile(
    r"no such column|column \"?[\w.]+\"? (of relation \S+ )?does not exist"
)
_BROKER_ERRORS = {"NoBrokersAvailable", "KafkaConnectionError", "NodeNotReadyError"}
#: Settings whose value the line never repeats (it may be pasted into a ticket).
_SECRET_WORDS = ("password", "secret", "token", "key", "url", "sasl")


def explain(error: BaseException) -> str | None:
    """One line that says what went wrong and what to run, or ``None`` (a bug)."""
    for cause in _chain(error):
        module = type(cause).__module__.split(".")[0]
        if module == "sqlalchemy":
            found = _database(cause)
        elif module in ("kafka", "aiokafka"):
            found = _broker(cause)
        elif module in ("pydantic_core", "pydantic"):
            found = _settings(cause)
        else:
            continue
        if found is not None:
            return found
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from, innermost last (each once)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _database(error: BaseException) -> str | None:
    name = type(error).__name__
    if name not in ("OperationalError", "ProgrammingError"):
        return None
    text = str(getattr(error, "orig", None) or error)
    missing = _MISSING_TABLE.search(text)
    if missing is not None:
        table = missing.group("sqlite") or missing.group("postgres")
        return (
            f"the database has no table {table!r}: it is not migrated; "
            "run `genmon db upgrade` (with the same --url or GENMON_DATABASE__URL)"
        )
    if _MISSING_COLUMN.search(text):
        return (
            "the database is older than this genmon (a column is missing); "
            "run `genmon db upgrade` (with the same --url or GENMON_DATABASE__URL)"
        )
    if name == "OperationalError":
        first = text.strip().splitlines()[0] if text.strip() else name
        return (
            f"database unreachable ({first}); run `genmon infra up --postgres`, "
            "or check database.url (GENMON_DATABASE__URL, or --url)"
        )
    return None


def _broker(error: BaseException) -> str | None:
    name = type(error).__name__
    unreachable = name in _BROKER_ERRORS or (
        name == "KafkaTimeoutError" and "bootstrap" in str(error).lower()
    )
    if not unreachable:
        return None
    return (
        f"broker at {_bootstrap_servers()} unreachable: run `genmon infra up`, or check "
        "kafka.bootstrap_servers (GENMON_KAFKA__BOOTSTRAP_SERVERS)"
    )


def _bootstrap_servers() -> str:
    from genmon.settings import get_settings

    try:
        return get_settings().kafka.bootstrap_servers
    except Exception:  # the settings themselves may be what is wrong
        return "kafka.bootstrap_servers"


def _settings(error: BaseException) -> str | None:
    """A :class:`~genmon.settings.Settings` that does not validate: name the variable."""
    if type(error).__name__ != "ValidationError" or getattr(error, "title", "") != "Settings":
        return None
    problems: list[dict[str, Any]] = error.errors()  # type: ignore[attr-defined]
    said = [_problem(problem) for problem in problems[:MAX_SETTINGS_PROBLEMS]]
    more = len(problems) - len(said)
    tail = f" (and {more} more)" if more > 0 else ""
    return (
        "bad settings: " + "; ".join(said) + tail + "; fix the variable (or .env), "
        "then `genmon config` shows what is in effect"
    )


def _problem(problem: dict[str, Any]) -> str:
    path = [str(part) for part in problem.get("loc", ())]
    variable = "GENMON_" + "__".join(part.upper() for part in path) if path else "a setting"
    message = str(problem.get("msg", "invalid"))
    value = problem.get("input")
    secret = any(word in variable.lower() for word in _SECRET_WORDS)
    if isinstance(value, str | int | float) and not isinstance(value, bool) and not secret:
        shown = repr(value) if len(str(value)) <= 40 else repr(str(value)[:40] + "...")
        return f"{variable}={shown}: {message}"
    return f"{variable}: {message}"
