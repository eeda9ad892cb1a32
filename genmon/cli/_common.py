"""What every command group shares: the map from errors to exit codes, ``--json``,
``--url`` (the database), tables.

**Exit codes** (:class:`ExitCode`), the same for every command:

=====  ============  ===============================================================
code   name          when
=====  ============  ===============================================================
0      OK            the command did what it says
1      FAILED        a :class:`~genmon.exceptions.GenmonError` (one line on stderr, no
                     traceback: what went wrong and what to run); one of the usual
                     failures :mod:`genmon.cli._failures` knows (database not migrated
                     or unreachable, broker unreachable, a bad ``GENMON_`` setting),
                     said the same way; or a check that did not pass (``infra
                     status``: Kafka stopped; ``db current``: behind the newest
                     revision; ``health``: the worker does not answer)
2      USAGE         click's own: an unknown command or option, a value it rejects
130    INTERRUPTED   Ctrl-C
=====  ============  ===============================================================

Any other exception is a bug in genmon and keeps its traceback.
"""

from __future__ import annotations

import getpass
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

import click

from genmon.exceptions import GenmonError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    """The exit status of every ``genmon`` command (see the module docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130


class GenmonGroup(click.Group):
    """Applies the exit-code map: genmon's errors and the usual failures
    (:func:`genmon.cli._failures.explain`) become a one-line message and
    :attr:`ExitCode.FAILED`, Ctrl-C :attr:`ExitCode.INTERRUPTED`, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GenmonError as error:
            raise _failed(str(error)) from error
        except KeyboardInterrupt:
            raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            from genmon.cli._failures import explain

            line = explain(error)
            if line is None:
                raise  # a bug in genmon: keep its traceback
            raise _failed(line) from error


def _failed(message: str) -> click.ClickException:
    failure = click.ClickException(message)
    failure.exit_code = ExitCode.FAILED
    return failure


def fail_check() -> None:
    """End a check command that did not pass (its output already says why)."""
    raise SystemExit(ExitCode.FAILED)


DATABASE_URL_HELP = "SQLAlchemy URL; default settings.database.url (GENMON_DATABASE__URL)."


def database_option(function: F) -> F:
    """``--url``: the database a command reads and writes (default from the settings)."""
    return click.option("--url", default=None, help=DATABASE_URL_HELP)(function)


def json_option(help: str = "Print JSON, for scripts.") -> Callable[[F], F]:
    """``--json`` (parameter ``as_json``): machine-readable output instead of text."""

    def decorate(function: F) -> F:
        return click.option("--json", "as_json", is_flag=True, help=help)(function)

    return decorate


def echo_json(value: Any, *, sort_keys: bool = True) -> None:
    """Print ``value`` as indented JSON (datetimes and ids as strings)."""
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=sort_keys))


def engine_for(url: str | None) -> Engine:
    """The SQLAlchemy engine of ``--url`` (imported on use: ``genmon --help`` stays instant)."""
    from genmon.db import make_engine

    return make_engine(url)


def echo_table(rows: list[list[str]], header: list[str]) -> None:
    """Print ``rows`` under ``header`` in left-aligned columns."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        )


def current_user() -> str:
    """Who runs the command, for the audit trail (``--actor`` overrides it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def when(value: datetime | None) -> str:
    """A timestamp as commands print it (UTC, to the second), ``-`` for none."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d`` -> timedelta."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 2h or 1d")
    return timedelta(seconds=float(found.group(1)) * _UNIT_S[found.group(2)])
