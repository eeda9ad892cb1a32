"""``genmon db``: migrations of the incident and retraining database (genmon.db)."""

from __future__ import annotations

import click

from genmon.cli._common import database_option, fail_check


@click.group()
def db() -> None:
    """Migrate the database and show its revision."""


@db.command("upgrade")
@database_option
@click.option("--revision", default="head", show_default=True, help="Revision to migrate to.")
def db_upgrade(url: str | None, revision: str) -> None:
    """Migrate the database forward (creating it if it is a new SQLite file)."""
    from genmon import db as database

    database.upgrade(url, revision)
    click.echo(f"{database.safe_url(url)}: at {database.current(url)}")


@db.command("downgrade")
@database_option
@click.option("--revision", required=True, help="Revision to go back to; `base` drops all.")
def db_downgrade(url: str | None, revision: str) -> None:
    """Migrate the database back to an older revision."""
    from genmon import db as database

    database.downgrade(url, revision)
    click.echo(f"{database.safe_url(url)}: at {database.current(url) or 'base (empty)'}")


@db.command("current")
@database_option
def db_current(url: str | None) -> None:
    """Print the database's revision; exit 1 when it is behind the newest."""
    from genmon import db as database

    revision = database.current(url)
    head = database.head_revision()
    click.echo(f"{database.safe_url(url)}: at {revision or 'base (empty)'}, newest {head}")
    if revision != head:
        fail_check()
