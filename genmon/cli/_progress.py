"""Progress for people, nothing for scripts: bars and spinners on long work (``rich``).

They are drawn on stderr, and only when stderr is a terminal and the command was not
asked for ``--json``: a script, a pipe, a log file or a test sees exactly the output it
saw before. ``rich`` comes with the worker extra and is imported only when something is
drawn, so ``genmon --help`` stays instant; without it, nothing is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: What :func:`progress` yields: call it with how much more work is done.
Advance = Callable[[float], None]


def interactive(as_json: bool = False) -> bool:
    """Whether to draw progress: a person watches stderr, and no JSON was asked for."""
    if as_json:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _console() -> Any | None:
    try:
        from rich.console import Console
    except ImportError:  # the SDK-only install: no progress, same output
        return None
    return Console(stderr=True)


@contextmanager
def spinner(text: str, *, as_json: bool = False) -> Iterator[None]:
    """A spinner saying ``text`` while the block runs (work whose size is unknown)."""
    console = _console() if interactive(as_json) else None
    if console is None:
        yield
        return
    with console.status(text):
        yield


@contextmanager
def progress(
    description: str,
    total: float | None,
    *,
    as_json: bool = False,
    unit: str = "items",
) -> Iterator[Advance]:
    """A bar over ``total`` (``unit`` ``"bytes"`` shows sizes and speed, ``"s"`` time);
    yields the function that moves it. Nothing is drawn for scripts, so callers
    need no second code path."""
    console = _console() if interactive(as_json) else None
    if console is None:
        yield _nothing
        return
    from rich.progress import Progress

    with Progress(*_columns(unit), console=console) as bar:
        task = bar.add_task(description, total=total)

        def advance(amount: float) -> None:
            bar.advance(task, amount)

        yield advance


def _nothing(amount: float) -> None:
    """What :func:`progress` yields when nothing is drawn."""


def _columns(unit: str) -> list[Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    elif unit == "s":
        columns += [TimeElapsedColumn()]
    else:
        columns += [MofNCompleteColumn(), TimeRemainingColumn()]
    return columns
