"""Write transactions of the incident pipeline, one at a time per SQLite file and process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlmodel import Session

from genmon.db import session_scope

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Session]:
    """:func:`genmon.db.session_scope`, taking this process's lock for a SQLite file first.

    SQLite has one writer at a time and a waiting writer polls with sleeps of up to
    100 ms (the busy timeout), which adds that much to page latency whenever the agent
    and the dispatcher write together. A Python lock hands over at once. Other
    processes (the CLI) still meet the busy timeout; PostgreSQL needs no lock.
    """
    if engine.dialect.name != "sqlite":
        with session_scope(engine) as session:
            yield session
        return
    key = engine.url.render_as_string(hide_password=False)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock, session_scope(engine) as session:
        yield session
