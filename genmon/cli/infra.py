"""``genmon infra``: the local Kafka broker and PostgreSQL cluster (genmon.infra)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from genmon.cli._common import echo_json, fail_check, json_option
from genmon.cli._progress import spinner
from genmon.secrets import mask_url
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
    with spinner("fetching the Kafka jars"):
        jars = KafkaBroker(settings).ensure_jars()
    click.echo(f"kafka jars: {jars}")
    if postgres:
        from genmon.infra.postgres import PostgresCluster

        with spinner("installing PostgreSQL"):
            binaries = PostgresCluster(settings).ensure_binaries()
        click.echo(f"postgres binaries: {binaries}")


@infra.command("up")
@click.option("--postgres/--no-postgres", default=False, help="Also start PostgreSQL.")
@click.option(
    "--sasl/--no-sasl",
    default=None,
    help="Add a SASL_SSL listener on settings.kafka.sasl_port (a CA and a user of its own, "
    "PLAIN and SCRAM); default: when `openssl` is installed.",
)
def infra_up(postgres: bool, sasl: bool | None) -> None:
    """Start the broker (reusing a running one) and create genmon's topics."""
    from genmon.infra.kafka import KafkaBroker
    from genmon.infra.kafka.security import openssl_available

    settings = get_settings()
    local = KafkaBroker(settings)
    with spinner(f"starting Kafka on {settings.kafka.bootstrap_servers}"):
        broker = local.up(sasl=sasl)
    click.echo(f"kafka: running (pid {broker.pid}) on {broker.bootstrap}; log {broker.log_path}")
    if broker.sasl_bootstrap is not None:
        # The password stays in the file: this line may end up in a CI log.
        click.echo(
            f"  SASL_SSL on {broker.sasl_bootstrap} (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), "
            f"CA {local.security.ca_path}; to use it: set -a; . {local.security.env_path}; set +a"
        )
    elif sasl is None and openssl_available():
        click.echo(
            "  no SASL_SSL listener: this broker was started without it; "
            "`genmon infra down && genmon infra up` adds it"
        )
    if postgres:
        from genmon.infra.postgres import PostgresCluster

        with spinner("starting PostgreSQL"):
            cluster = PostgresCluster(settings).up()
        click.echo(f"postgres: running (pid {cluster.pid}); log {cluster.log_path}")
        click.echo(
            f"  export GENMON_DATABASE__URL={mask_url(cluster.url)}"
            "  # *** is GENMON_POSTGRES__PASSWORD"
        )


@infra.command("topics")
@json_option()
def infra_topics(as_json: bool) -> None:
    """Create genmon's topics on GENMON_KAFKA__BOOTSTRAP_SERVERS (any cluster, with
    settings.kafka's TLS/SASL) and show their partitions, replication and min.insync.replicas."""
    from dataclasses import asdict

    from genmon.infra.kafka import KafkaBroker

    settings = get_settings()
    kafka = settings.kafka
    broker = KafkaBroker(settings)
    with spinner(f"creating genmon's topics on {kafka.bootstrap_servers}", as_json=as_json):
        broker.ensure_topics(kafka.bootstrap_servers)
        rows = broker.describe_topics(kafka.bootstrap_servers)
    if as_json:
        echo_json([asdict(row) for row in rows], sort_keys=False)
        return
    click.echo(
        f"topics on {kafka.bootstrap_servers} (settings: replication {kafka.replication_factor}, "
        f"min.insync.replicas {kafka.min_insync_replicas}, producer acks {kafka.acks}):"
    )
    width = max((len(row.name) for row in rows), default=5)
    click.echo(f"  {'topic':<{width}}  partitions  replication  min.insync.replicas")
    for row in rows:
        isr = "?" if row.min_insync_replicas is None else str(row.min_insync_replicas)
        differs = (row.replication_factor, row.min_insync_replicas) != (
            kafka.replication_factor,
            kafka.min_insync_replicas,
        )
        note = "  (created before; differs from the settings)" if differs else ""
        click.echo(
            f"  {row.name:<{width}}  {row.partitions:>10}  {row.replication_factor:>11}  "
            f"{isr:>19}{note}"
        )


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
@json_option()
def infra_status(as_json: bool) -> None:
    """Say whether each local service runs; exit 1 when Kafka does not."""
    from dataclasses import asdict

    from genmon.infra.kafka import KafkaBroker
    from genmon.infra.postgres import PostgresCluster

    settings = get_settings()
    broker = KafkaBroker(settings).status()
    cluster = PostgresCluster(settings).status()
    if as_json:
        postgres = {**asdict(cluster), "url": mask_url(cluster.url)}
        echo_json({"kafka": asdict(broker), "postgres": postgres})
        if not broker.running:
            fail_check()
        return
    state = f"running (pid {broker.pid})" if broker.running else "stopped"
    click.echo(f"kafka: {state} on {broker.bootstrap}; log {broker.log_path}")
    if broker.sasl_bootstrap is not None:
        click.echo(f"  SASL_SSL on {broker.sasl_bootstrap}")
    state = f"running (pid {cluster.pid})" if cluster.running else "stopped"
    click.echo(f"postgres: {state} at {mask_url(cluster.url)}; log {cluster.log_path}")
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
