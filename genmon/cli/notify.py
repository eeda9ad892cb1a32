"""``genmon notify``: the outbox of pages: deliver, list, destinations' health, retry dead
ones (on-call)."""

from __future__ import annotations

import dataclasses

import click

from genmon.cli._common import (
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
    when,
)
from genmon.settings import get_settings


@click.group()
def notify() -> None:
    """Deliver and inspect the notification outbox."""


@notify.command("dispatch")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@database_option
def notify_dispatch(once: bool, url: str | None) -> None:
    """Deliver the outbox: pages, and events to the incidents topic (until Ctrl-C or --once)."""
    import asyncio

    from genmon.incidents.dispatcher import Dispatcher

    dispatcher = Dispatcher(engine_for(url), get_settings())
    if once:
        report = asyncio.run(dispatcher.drain())
        click.echo(
            f"delivered {report.delivered}, retrying {report.retried}, dead {report.dead}, "
            f"rate-limited {report.rate_limited}, silenced {report.suppressed}, "
            f"paged after their silence ended {report.unsilenced}"
        )
        return
    try:
        asyncio.run(dispatcher.run())
    except KeyboardInterrupt:
        click.echo("stopped")


@notify.command("list")
@click.option(
    "--status",
    type=click.Choice(
        ["pending", "delivering", "delivered", "dead", "suppressed", "superseded", "all"]
    ),
    default="all",
    show_default=True,
)
@click.option("--incident", "incident_id", default=None, help="Only this incident.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option()
@database_option
def notify_list(
    status: str, incident_id: str | None, limit: int, as_json: bool, url: str | None
) -> None:
    """Notifications in the outbox, newest first (``--status dead`` for the failed ones)."""
    from sqlmodel import Session, select

    from genmon.schemas.incidents import Notification, NotificationStatus

    query = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if status != "all":
        query = query.where(Notification.status == NotificationStatus(status))
    if incident_id:
        query = query.where(Notification.incident_id == incident_id)
    with Session(engine_for(url)) as session:
        found = session.exec(query).all()
    if as_json:
        echo_json([n.model_dump(mode="json", exclude={"payload"}) for n in found])
        return
    if not found:
        click.echo("no notifications")
        return
    rows = [
        [
            str(n.id),
            n.incident_id or "-",
            n.event.value,
            n.destination,
            n.status.value,
            str(n.attempts),
            when(n.next_attempt_at if n.status.value == "pending" else n.delivered_at),
            (n.last_error or "")[:60],
        ]
        for n in found
    ]
    echo_table(rows, ["ID", "INCIDENT", "EVENT", "DESTINATION", "STATUS", "TRIES", "WHEN", "ERROR"])


@notify.command("status")
@json_option()
@database_option
def notify_status(as_json: bool, url: str | None) -> None:
    """Each destination: ok, failing or paused (next probe), queued and dead notifications."""
    from genmon.db import session_scope
    from genmon.incidents.health import statuses
    from genmon.incidents.routing import Router

    configured = Router(get_settings().notify).destinations
    with session_scope(engine_for(url)) as session:
        found = statuses(session, configured)
    if as_json:
        echo_json([dataclasses.asdict(status) for status in found])
        return
    if not found:
        click.echo("no destinations")
        return
    rows = [
        [
            status.destination,
            status.state,
            str(status.consecutive_failures),
            when(status.failing_since),
            when(status.next_probe_at),
            str(status.pending),
            str(status.dead),
            (status.last_error or "")[:60],
        ]
        for status in found
    ]
    echo_table(
        rows,
        [
            "DESTINATION",
            "STATE",
            "FAILURES",
            "FAILING SINCE",
            "NEXT PROBE",
            "QUEUED",
            "DEAD",
            "ERROR",
        ],
    )


@notify.command("retry")
@click.argument("notification_ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="Requeue every dead notification.")
@database_option
def notify_retry(notification_ids: tuple[int, ...], all_dead: bool, url: str | None) -> None:
    """Requeue dead notifications in their order (same idempotency keys, tries and retry
    horizon start again); one a later notification of its incident already delivered is
    left out, as it would arrive after it."""
    from genmon.incidents.requeue import requeue_dead
    from genmon.schemas.events import utcnow

    if not notification_ids and not all_dead:
        raise click.UsageError("give notification ids or --all-dead")
    ids = None if all_dead else notification_ids
    done = requeue_dead(engine_for(url), utcnow(), ids)
    message = f"requeued {done.requeued}"
    if done.superseded:
        message += (
            f"; {done.superseded} superseded (a later notification of the same incident "
            "already reached that destination)"
        )
    click.echo(message)
