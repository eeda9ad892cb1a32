"""Opening the database and migrating it: engines, sessions, alembic from code.

The URL comes from ``settings.database.url`` (``GENMON_DATABASE__URL``) unless given.
SQLite files get their folder created, WAL journaling and enforced foreign keys;
PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://...``).

>>> import tempfile, pathlib
>>> url = f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'sub' / 'g.sqlite'}"
>>> upgrade(url)
>>> current(url) == head_revision()
True
"""

from __future__ import annotations

import fcntl
import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlmodel import Session, SQLModel

import genmon.schemas.migrations as migrations_package
from genmon.exceptions import DatabaseError
from genmon.settings import get_settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations_package.__file__).parent
SQLITE_BUSY_TIMEOUT_MS = 5000
#: How long a SQLite migration waits for another process's migration to finish (every
#: service may upgrade at start; a long migration must make the others wait, not fail).
SQLITE_MIGRATION_WAIT_MS = 600_000
#: PostgreSQL advisory lock held while migrating ("genmon" in ASCII).
MIGRATION_LOCK_KEY = 0x67656E6D6F6E

#: Modules whose SQLModel tables the migrations create; optional ones may be absent.
TABLE_MODULES = (
    "genmon.schemas.tables",
    "genmon.schemas.retrain",
    "genmon.schemas.governance",
    "genmon.schemas.access",
    "genmon.schemas.signals",
)
OPTIONAL_TABLE_MODULES = ("genmon.schemas.incidents",)


def table_metadata() -> sa.MetaData:
    """``SQLModel.metadata`` with every genmon table registered on it."""
    for module in TABLE_MODULES:
        importlib.import_module(module)
    for module in OPTIONAL_TABLE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return SQLModel.metadata


def _resolve(url: str | URL | None) -> URL:
    raw = url if url is not None else get_settings().database.url
    try:
        return make_url(raw)
    except ArgumentError as exc:
        raise DatabaseError(
            f"the database URL is not a SQLAlchemy URL ({exc}); set GENMON_DATABASE__URL "
            "to e.g. sqlite:///.build/genmon.sqlite or "
            "postgresql+psycopg://genmon:genmon@127.0.0.1:55432/genmon"
        ) from exc


def safe_url(url: str | URL | None) -> str:
    """The URL with its password masked, for messages and logs."""
    return _resolve(url).render_as_string(hide_password=True)


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's statement dump and help link."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    return " ".join(str(cause).split())


def _is_sqlite_file(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # First, so that the statements below wait for a lock too instead of failing.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets the worker write while the CLI and the notifier read.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str | URL | None = None, *, echo: bool | None = None) -> Engine:
    """An engine for ``url`` (default: ``settings.database.url``)."""
    resolved = _resolve(url)
    if _is_sqlite_file(resolved):
        assert resolved.database is not None
        path = Path(resolved.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create {path.parent} for the SQLite database ({exc}); "
                "choose a writable location with GENMON_DATABASE__URL"
            ) from exc
    try:
        engine = sa.create_engine(
            resolved,
            echo=get_settings().database.echo if echo is None else echo,
            pool_pre_ping=True,
        )
    except (ArgumentError, ImportError) as exc:
        raise DatabaseError(
            f"cannot open {safe_url(resolved)}: {exc}; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from exc
    if resolved.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    Objects stay readable after the commit (``expire_on_commit=False``). A database
    that cannot be reached or lacks a table raises :class:`DatabaseError` saying what to
    do; other SQLAlchemy errors (``IntegrityError`` for a duplicate, say) pass through
    for the caller to handle.
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except (OperationalError, ProgrammingError) as exc:
            session.rollback()
            raise DatabaseError(
                f"database {safe_url(engine.url)} failed: {_reason(exc)}; check that it is "
                "running (`genmon infra up --postgres`) and migrated (`genmon db upgrade`)"
            ) from exc
        except BaseException:
            session.rollback()
            raise


def alembic_config() -> Config:
    """Alembic's configuration, built in code from the installed migrations package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    """The newest revision the installed migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}; reinstall genmon")
    return head


@contextmanager
def _sqlite_migration_lock(url: str | URL | None) -> Iterator[None]:
    """One migrator of a SQLite file at a time, across threads and processes: an OS lock
    on ``<file>.migrate.lock``, taken before any connection, so a second migrator waits
    its turn however long the first takes (SQLite's own locks answer "database is
    locked" in some of the races of two fresh connections, the switch to WAL among them)."""
    resolved = _resolve(url)
    if not _is_sqlite_file(resolved):
        yield
        return
    assert resolved.database is not None
    lock_path = Path(f"{resolved.database}.migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(action: str, url: str | URL | None, step: Any, revision: str) -> None:
    with _sqlite_migration_lock(url):
        _migrate(action, url, step, revision)


def _migrate(action: str, url: str | URL | None, step: Any, revision: str) -> None:
    engine = make_engine(url)
    config = alembic_config()
    try:
        # The engine is disposed below, so the connection's settings and locks end with it.
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch operations recreate tables; with enforced foreign keys that
                # would cascade into the rows of referencing tables.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                # One migrator at a time, and all-or-nothing DDL (pysqlite would
                # otherwise run each statement on its own). The others wait their turn
                # however long it takes, as PostgreSQL's advisory lock makes them.
                connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_MIGRATION_WAIT_MS}")
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            elif connection.dialect.name == "postgresql":
                # Every service may upgrade at start; one at a time, the others then
                # find the database already at head.
                connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
            config.attributes["connection"] = connection
            step(config, revision)
            connection.commit()
    except CommandError as exc:
        raise DatabaseError(
            f"cannot {action} {safe_url(url)} to {revision!r}: {exc}; "
            "`genmon db current` shows where it is, `genmon db upgrade` goes to the newest"
        ) from exc
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot {action} {safe_url(url)} to {revision!r}: {_reason(exc)}; check that the "
            "database is running and reachable (`genmon infra up --postgres` for the "
            "local one) and that no other process is migrating it"
        ) from exc
    finally:
        engine.dispose()
    log.info("%s %s to %s", action, safe_url(url), revision)


def upgrade(url: str | URL | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` forward to ``revision`` (default: newest)."""
    _run("upgrade", url, command.upgrade, revision)


def downgrade(url: str | URL | None, revision: str) -> None:
    """Migrate the database at ``url`` back to ``revision`` (``base`` removes every table)."""
    _run("downgrade", url, command.downgrade, revision)


def current(url: str | URL | None = None) -> str | None:
    """The revision the database is at, or ``None`` when it was never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            heads = MigrationContext.configure(connection).get_current_heads()
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot read the revision of {safe_url(url)}: {_reason(exc)}; check that the database "
            "is running and reachable"
        ) from exc
    finally:
        engine.dispose()
    if len(heads) > 1:
        raise DatabaseError(
            f"{safe_url(url)} is at several revisions {heads}; merge the branches "
            "with alembic before upgrading"
        )
    return heads[0] if heads else None


def schema_differences(url: str | URL | None = None) -> list[Any]:
    """What alembic autogenerate finds between the database and the models; empty when in step.

    After ``upgrade(url)`` a non-empty list means a model changed without a migration.
    """
    metadata = table_metadata()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, metadata))
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot compare {safe_url(url)} with the models: {_reason(exc)}; check that the "
            "database is running and reachable"
        ) from exc
    finally:
        engine.dispose()
