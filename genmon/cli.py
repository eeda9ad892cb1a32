"""The ``genmon`` command line.

One section per command group. Heavy modules (Kafka clients, Faust, torch, SQLAlchemy)
are imported inside the commands so that ``genmon --help`` stays instant; add a group by
copying a section and registering it with ``@main.group()``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from genmon.exceptions import GenmonError
from genmon.settings import get_settings


class _GenmonGroup(click.Group):
    """Turns genmon's own errors into a one-line message and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GenmonError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=_GenmonGroup)
@click.version_option(package_name="genmon")
def main() -> None:
    """genmon: Kafka-native monitoring for generative-AI models in production."""


# --- infra: the local Kafka broker and PostgreSQL cluster ----------------------------------

SERVICES = ("kafka", "postgres")


@main.group()
def infra() -> None:
    """Start, stop and inspect the local Kafka broker (and PostgreSQL)."""


@infra.command("prepare")
@click.option("--postgres/--no-postgres", default=True, help="Also install PostgreSQL.")
def infra_prepare(postgres: bool) -> None:
    """Fetch the Kafka jars and install PostgreSQL without starting anything."""
    from genmon.infra.kafka import KafkaBroker

    settings = get_settings()
    click.echo(f"kafka jars: {KafkaBroker(settings).ensure_jars()}")
    if postgres:
        from genmon.infra.postgres import PostgresCluster

        click.echo(f"postgres binaries: {PostgresCluster(settings).ensure_binaries()}")


@infra.command("up")
@click.option("--postgres/--no-postgres", default=False, help="Also start PostgreSQL.")
def infra_up(postgres: bool) -> None:
    """Start the broker (reusing a running one) and create genmon's topics."""
    from genmon.infra.kafka import KafkaBroker

    settings = get_settings()
    broker = KafkaBroker(settings).up()
    click.echo(f"kafka: running (pid {broker.pid}) on {broker.bootstrap}; log {broker.log_path}")
    if postgres:
        from genmon.infra.postgres import PostgresCluster

        cluster = PostgresCluster(settings).up()
        click.echo(f"postgres: running (pid {cluster.pid}); log {cluster.log_path}")
        click.echo(f"  export GENMON_DATABASE__URL={cluster.url}")


@infra.command("topics")
def infra_topics() -> None:
    """Create genmon's topics on GENMON_KAFKA__BOOTSTRAP_SERVERS (any cluster)."""
    from genmon.infra.kafka import KafkaBroker

    settings = get_settings()
    names = KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    click.echo(f"topics on {settings.kafka.bootstrap_servers}: {', '.join(names)}")


@infra.command("down")
def infra_down() -> None:
    """Stop the broker and PostgreSQL if genmon started them."""
    from genmon.infra.kafka import KafkaBroker
    from genmon.infra.postgres import PostgresCluster

    settings = get_settings()
    stopped = KafkaBroker(settings).down()
    click.echo("kafka: stopped" if stopped else "kafka: was not running")
    stopped = PostgresCluster(settings).down()
    click.echo("postgres: stopped" if stopped else "postgres: was not running")


@infra.command("status")
def infra_status() -> None:
    """Say whether each local service runs; exit 1 when Kafka does not."""
    from genmon.infra.kafka import KafkaBroker
    from genmon.infra.postgres import PostgresCluster

    settings = get_settings()
    broker = KafkaBroker(settings).status()
    cluster = PostgresCluster(settings).status()
    state = f"running (pid {broker.pid})" if broker.running else "stopped"
    click.echo(f"kafka: {state} on {broker.bootstrap}; log {broker.log_path}")
    state = f"running (pid {cluster.pid})" if cluster.running else "stopped"
    click.echo(f"postgres: {state} at {cluster.url}; log {cluster.log_path}")
    if not broker.running:
        raise SystemExit(1)


@infra.command("logs")
@click.option("--service", type=click.Choice(SERVICES), default="kafka", show_default=True)
@click.option("-n", "lines", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
def infra_logs(service: str, lines: int, follow: bool) -> None:
    """Print the last lines of a local service's log."""
    from genmon.infra._process import tail

    settings = get_settings()
    if service == "kafka":
        from genmon.infra.kafka import KafkaBroker

        path = KafkaBroker(settings).log_path
    else:
        from genmon.infra.postgres import PostgresCluster

        path = PostgresCluster(settings).log_path
    if not path.exists() and not follow:
        raise click.ClickException(f"{path} does not exist yet; start it with `genmon infra up`")
    click.echo(tail(path, lines), nl=False)
    if follow:
        _follow(path)


def _follow(path: Path) -> None:
    position = path.stat().st_size if path.exists() else 0
    try:
        while True:
            size = path.stat().st_size if path.exists() else 0
            if size < position:  # the log rolled over
                position = 0
            if size > position:
                with open(path, "rb") as handle:
                    handle.seek(position)
                    click.echo(handle.read().decode(errors="replace"), nl=False)
                    position = handle.tell()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


# --- db: migrations of the incident / retrain database -------------------------------------

_URL_HELP = "SQLAlchemy URL; default settings.database.url (GENMON_DATABASE__URL)."


@main.group()
def db() -> None:
    """Migrate the database and show its revision."""


@db.command("upgrade")
@click.option("--url", default=None, help=_URL_HELP)
@click.option("--revision", default="head", show_default=True, help="Revision to migrate to.")
def db_upgrade(url: str | None, revision: str) -> None:
    """Migrate the database forward (creating it if it is a new SQLite file)."""
    from genmon import db as database

    database.upgrade(url, revision)
    click.echo(f"{database.safe_url(url)}: at {database.current(url)}")


@db.command("downgrade")
@click.option("--url", default=None, help=_URL_HELP)
@click.option("--revision", required=True, help="Revision to go back to; `base` drops all.")
def db_downgrade(url: str | None, revision: str) -> None:
    """Migrate the database back to an older revision."""
    from genmon import db as database

    database.downgrade(url, revision)
    click.echo(f"{database.safe_url(url)}: at {database.current(url) or 'base (empty)'}")


@db.command("current")
@click.option("--url", default=None, help=_URL_HELP)
def db_current(url: str | None) -> None:
    """Print the database's revision; exit 1 when it is behind the newest."""
    from genmon import db as database

    revision = database.current(url)
    head = database.head_revision()
    click.echo(f"{database.safe_url(url)}: at {revision or 'base (empty)'}, newest {head}")
    if revision != head:
        raise SystemExit(1)


# --- schemas: the wire contract for producers in other languages --------------------------


@main.group()
def schemas() -> None:
    """Export the JSON Schema of genmon's events."""


@schemas.command("export")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas-json"),
    show_default=True,
    help="Folder to write <kind>.schema.json and index.json into.",
)
def schemas_export(out: Path) -> None:
    """Write one JSON Schema file per event kind, plus an index."""
    from genmon.schema_export import export_schemas

    for path in export_schemas(out):
        click.echo(str(path))


# --- worker: the Faust stream processor ---------------------------------------------------


@main.command()
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Default settings.worker.loglevel (GENMON_WORKER__LOGLEVEL).",
)
@click.option(
    "--web-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of /metrics and /stats; default settings.worker.web_port.",
)
@click.option(
    "--role",
    type=click.Choice(["all", "embed", "incidents"]),
    default="all",
    show_default=True,
    help="embed: only the text encoder (genmon.streams.embedding); incidents: only "
    "findings -> incidents -> pages (genmon.streams.incidents.agent).",
)
def worker(loglevel: str | None, web_port: int | None, role: str) -> None:
    """Run the stream worker (ingest, dead letters, pipeline) until Ctrl-C or SIGTERM."""
    from genmon.streams.app import run_worker
    from genmon.streams.embedding import run_embed_worker
    from genmon.streams.incidents.agent import run_incidents_worker

    settings = get_settings()
    if web_port is not None:
        settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update={"web_port": web_port})}
        )
    runners = {"all": run_worker, "embed": run_embed_worker, "incidents": run_incidents_worker}
    runners[role](settings, loglevel=loglevel)


# --- incidents, silences, notify: on-call (genmon.streams.incidents.commands) ------------


def _add_incident_commands() -> None:
    from genmon.streams.incidents.commands import COMMAND_GROUPS

    for group in COMMAND_GROUPS:
        main.add_command(group)


_add_incident_commands()

# --- config and demo -------------------------------------------------------------------


@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the README's table of every setting.")
def config(markdown: bool) -> None:
    """Show the settings in effect (from GENMON_ variables and .env), secrets masked."""
    if markdown:
        from genmon.config_doc import settings_markdown

        click.echo(settings_markdown())
        return
    click.echo(get_settings().model_dump_json(indent=2))


def _add_demo_command() -> None:
    from genmon.alerts_cli import detectors, replay
    from genmon.demo import demo

    main.add_command(demo)
    main.add_command(detectors)
    main.add_command(replay)


_add_demo_command()


if __name__ == "__main__":
    main()
