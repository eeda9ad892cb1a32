"""``genmon infra``: the local Kafka broker and PostgreSQL cluster (genmon.infra)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from genmon.cli._common import fail_check
from genmon.settings import get_settings

SERVICES = ("kafka", "postgres")


@click.group()
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
        fail_check()


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
