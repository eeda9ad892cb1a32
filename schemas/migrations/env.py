"""Alembic environment, driven from code by :mod:`genmon.db` (there is no alembic.ini).

``genmon.db`` hands over an open connection in ``config.attributes["connection"]``;
``alembic -x url=...`` style use is not supported, use ``genmon db upgrade --url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from genmon.db import table_metadata

target_metadata = table_metadata()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through genmon.db.upgrade()/downgrade()")
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run genmon db upgrade")
run_migrations_online()
