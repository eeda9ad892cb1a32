"""``genmon incidents``, ``genmon silences`` and ``genmon notify``: the on-call command line.

Registered on :data:`genmon.cli.main`. SQLAlchemy and the pipeline are imported inside the
commands so ``genmon --help`` stays instant.
"""

from __future__ import annotations

import getpass
import json
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from genmon.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

_URL_HELP = "SQLAlchemy URL; default settings.database.url (GENMON_DATABASE__URL)."
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _engine(url: str | None) -> Engine:
    from genmon.db import make_engine

    return make_engine(url)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        )


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d`` -> timedelta."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 2h or 1d")
    return timedelta(seconds=float(found.group(1)) * _UNIT_S[found.group(2)])


# --- incidents ---------------------------------------------------------------------------


@click.group()
def incidents() -> None:
    """List, inspect, acknowledge and resolve incidents."""


@incidents.command("list")
@click.option(
    "--status",
    type=click.Choice(["active", "open", "acknowledged", "resolved", "all"]),
    default="active",
    show_default=True,
    help="active = open or acknowledged.",
)
@click.option("--model", default=None, help="Only this model id.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--url", default=None, help=_URL_HELP)
def incidents_list(
    status: str, model: str | None, limit: int, as_json: bool, url: str | None
) -> None:
    """Incidents, newest first."""
    from sqlmodel import Session, select

    from genmon.schemas.events import IncidentStatus
    from genmon.schemas.incidents import Incident, IncidentPublic

    query = select(Incident).order_by(Incident.opened_at.desc()).limit(limit)
    if status == "active":
        query = query.where(Incident.status != IncidentStatus.RESOLVED)
    elif status != "all":
        query = query.where(Incident.status == IncidentStatus(status))
    if model:
        query = query.where(Incident.model_id == model)
    with Session(_engine(url)) as session:
        found = session.exec(query).all()
    if as_json:
        _echo_json([IncidentPublic.model_validate(i).model_dump(mode="json") for i in found])
        return
    if not found:
        click.echo("no incidents")
        return
    rows = [
        [
            i.id,
            i.status.value,
            i.severity.value,
            i.model_id,
            str(i.finding_count),
            _when(i.last_seen_at),
            (" ↳ " if i.parent_id else "") + i.title[:60],
        ]
        for i in found
    ]
    _table(rows, ["ID", "STATUS", "SEVERITY", "MODEL", "FINDINGS", "LAST SEEN", "TITLE"])


@incidents.command("show")
@click.argument("incident_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--url", default=None, help=_URL_HELP)
def incidents_show(incident_id: str, as_json: bool, url: str | None) -> None:
    """One incident: evidence, chart, runbook, notes, audit trail and notifications."""
    from sqlmodel import Session, select

    from genmon.schemas.incidents import (
        Incident,
        IncidentPublic,
        IncidentTransition,
        Notification,
    )
    from genmon.streams.incidents.exceptions import IncidentNotFoundError

    with Session(_engine(url)) as session:
        incident = session.get(Incident, incident_id)
        if incident is None:
            raise IncidentNotFoundError(
                f"no incident {incident_id!r}; `genmon incidents list --status all` shows ids"
            )
        trail = session.exec(
            select(IncidentTransition)
            .where(IncidentTransition.incident_id == incident_id)
            .order_by(IncidentTransition.id)
        ).all()
        notifications = session.exec(
            select(Notification)
            .where(Notification.incident_id == incident_id)
            .order_by(Notification.id)
        ).all()
        children = session.exec(select(Incident.id).where(Incident.parent_id == incident_id)).all()
    public = IncidentPublic.model_validate(incident).model_dump(mode="json")
    if as_json:
        public["related"] = list(children)
        public["transitions"] = [t.model_dump(mode="json") for t in trail]
        public["notifications"] = [
            n.model_dump(mode="json", exclude={"payload"}) for n in notifications
        ]
        _echo_json(public)
        return
    click.echo(f"{incident.title}")
    click.echo(f"  id {incident.id}  fingerprint {incident.fingerprint}")
    click.echo(
        f"  {incident.status.value}, {incident.severity.value}; {incident.finding_count} findings,"
        f" peak score {incident.peak_score:.4g}, last {incident.last_score:.4g}"
        f" (threshold {incident.threshold:.4g})"
    )
    click.echo(
        f"  opened {_when(incident.opened_at)}, last seen {_when(incident.last_seen_at)},"
        f" resolved {_when(incident.resolved_at)}; reopened {incident.reopen_count}x"
        + (" (flapping)" if incident.flapping else "")
    )
    if incident.parent_id:
        click.echo(f"  related to {incident.parent_id}")
    if children:
        click.echo(f"  related: {', '.join(children)}")
    if incident.runbook_url or incident.remediation:
        click.echo(f"Runbook: {incident.runbook_url or '-'}")
        for number, step in enumerate(incident.remediation, 1):
            click.echo(f"  {number}. {step}")
    click.echo("Recent scores:")
    for point in incident.chart[-10:]:
        mark = "*" if point.get("detected") else " "
        click.echo(f"  {point['at']}  {point['score']:.4g} {mark}")
    click.echo("Evidence:")
    click.echo(json.dumps(incident.evidence, indent=2, default=str))
    if incident.notes:
        click.echo("Notes:")
        click.echo(incident.notes)
    click.echo("Audit trail:")
    for t in trail:
        click.echo(f"  {_when(t.at)}  {t.transition.value:<12} {t.actor:<12} {t.reason}")
    click.echo("Notifications:")
    for n in notifications:
        click.echo(
            f"  #{n.id} {n.event.value:<11} -> {n.destination:<12} {n.status.value:<10}"
            f" attempts {n.attempts}" + (f"  {n.last_error}" if n.last_error else "")
        )


def _manager(url: str | None) -> Any:
    from genmon.streams.incidents.manager import IncidentManager

    return IncidentManager(_engine(url), get_settings())


@incidents.command("ack")
@click.argument("incident_id")
@click.option("--by", "actor", default=None, help="Who acknowledges; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@click.option("--url", default=None, help=_URL_HELP)
def incidents_ack(incident_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Acknowledge an open incident (queues its pages and its incidents-topic event)."""
    incident = _manager(url).acknowledge(incident_id, actor or _actor(), reason)
    click.echo(f"{incident.id}: {incident.status.value}")


@incidents.command("resolve")
@click.argument("incident_id")
@click.option("--by", "actor", default=None, help="Who resolves; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@click.option("--url", default=None, help=_URL_HELP)
def incidents_resolve(incident_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Resolve an incident (queues its pages and its incidents-topic event)."""
    incident = _manager(url).resolve(incident_id, actor or _actor(), reason)
    click.echo(f"{incident.id}: {incident.status.value}")


@incidents.command("notes")
@click.argument("incident_id")
@click.argument("text", required=False)
@click.option("--by", "actor", default=None, help="Who writes; default: your user name.")
@click.option("--url", default=None, help=_URL_HELP)
def incidents_notes(incident_id: str, text: str | None, actor: str | None, url: str | None) -> None:
    """Show an incident's notes, or append TEXT to them."""
    if text:
        incident = _manager(url).add_note(incident_id, actor or _actor(), text)
    else:
        from sqlmodel import Session

        from genmon.schemas.incidents import Incident
        from genmon.streams.incidents.exceptions import IncidentNotFoundError

        with Session(_engine(url)) as session:
            incident = session.get(Incident, incident_id)
        if incident is None:
            raise IncidentNotFoundError(f"no incident {incident_id!r}")
    click.echo(incident.notes or "(no notes)")


# --- silences ----------------------------------------------------------------------------


@click.group()
def silences() -> None:
    """Silence notifications by label matchers for a while (incidents are still kept)."""


@silences.command("add")
@click.option(
    "-m",
    "--matcher",
    "matchers",
    multiple=True,
    required=True,
    help='label OP value, OP one of = != =~ !~; e.g. -m model=chat -m severity=~"warning|error"',
)
@click.option("--duration", default="2h", show_default=True, help="How long, e.g. 30m, 2h, 1d.")
@click.option("--comment", default="", help="Why.")
@click.option("--by", "actor", default=None, help="Who; default: your user name.")
@click.option("--url", default=None, help=_URL_HELP)
def silences_add(
    matchers: tuple[str, ...], duration: str, comment: str, actor: str | None, url: str | None
) -> None:
    """Add a silence starting now; prints its id."""
    from genmon.db import session_scope
    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence
    from genmon.streams.incidents.routing import parse_matchers

    parsed = parse_matchers(matchers)
    now = utcnow()
    silence = Silence(
        matchers=[str(m) for m in parsed],
        starts_at=now,
        ends_at=now + parse_duration(duration),
        created_by=actor or _actor(),
        comment=comment,
    )
    with session_scope(_engine(url)) as session:
        session.add(silence)
    click.echo(f"{silence.id}  until {_when(silence.ends_at)} UTC  {' '.join(silence.matchers)}")


@silences.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@click.option("--url", default=None, help=_URL_HELP)
def silences_list(show_all: bool, url: str | None) -> None:
    """Active silences (or all of them)."""
    from sqlmodel import Session, select

    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence

    query = select(Silence).order_by(Silence.ends_at)
    if not show_all:
        query = query.where(Silence.ends_at > utcnow())
    with Session(_engine(url)) as session:
        found = session.exec(query).all()
    if not found:
        click.echo("no silences")
        return
    rows = [
        [s.id, _when(s.starts_at), _when(s.ends_at), s.created_by, " ".join(s.matchers), s.comment]
        for s in found
    ]
    _table(rows, ["ID", "STARTS", "ENDS", "BY", "MATCHERS", "COMMENT"])


@silences.command("expire")
@click.argument("silence_id")
@click.option("--url", default=None, help=_URL_HELP)
def silences_expire(silence_id: str, url: str | None) -> None:
    """End a silence now."""
    from genmon.db import session_scope
    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence
    from genmon.streams.incidents.exceptions import IncidentNotFoundError

    with session_scope(_engine(url)) as session:
        silence = session.get(Silence, silence_id)
        if silence is None:
            raise IncidentNotFoundError(f"no silence {silence_id!r}; see `genmon silences list`")
        silence.ends_at = min(silence.ends_at, utcnow())
    click.echo(f"{silence_id}: expired")


# --- notify ------------------------------------------------------------------------------


@click.group()
def notify() -> None:
    """Deliver and inspect the notification outbox."""


@notify.command("dispatch")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("--url", default=None, help=_URL_HELP)
def notify_dispatch(once: bool, url: str | None) -> None:
    """Deliver the outbox: pages, and events to the incidents topic (until Ctrl-C or --once)."""
    import asyncio

    from genmon.streams.incidents.dispatcher import Dispatcher

    dispatcher = Dispatcher(_engine(url), get_settings())
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
    type=click.Choice(["pending", "delivering", "delivered", "dead", "suppressed", "all"]),
    default="all",
    show_default=True,
)
@click.option("--incident", "incident_id", default=None, help="Only this incident.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--url", default=None, help=_URL_HELP)
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
    with Session(_engine(url)) as session:
        found = session.exec(query).all()
    if as_json:
        _echo_json([n.model_dump(mode="json", exclude={"payload"}) for n in found])
        return
    if not found:
        click.echo("no notifications")
        return
    rows = [
        [
            str(n.id),
            n.incident_id,
            n.event.value,
            n.destination,
            n.status.value,
            str(n.attempts),
            _when(n.next_attempt_at if n.status.value == "pending" else n.delivered_at),
            (n.last_error or "")[:60],
        ]
        for n in found
    ]
    _table(rows, ["ID", "INCIDENT", "EVENT", "DESTINATION", "STATUS", "TRIES", "WHEN", "ERROR"])


@notify.command("retry")
@click.argument("notification_ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="Requeue every dead notification.")
@click.option("--url", default=None, help=_URL_HELP)
def notify_retry(notification_ids: tuple[int, ...], all_dead: bool, url: str | None) -> None:
    """Requeue dead notifications (same idempotency keys, attempts start again)."""
    import sqlalchemy as sa

    from genmon.db import session_scope
    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Notification, NotificationStatus

    if not notification_ids and not all_dead:
        raise click.UsageError("give notification ids or --all-dead")
    statement = (
        sa.update(Notification)
        .where(Notification.status == NotificationStatus.DEAD)
        .values(status=NotificationStatus.PENDING, attempts=0, next_attempt_at=utcnow())
    )
    if not all_dead:
        statement = statement.where(Notification.id.in_(notification_ids))
    with session_scope(_engine(url)) as session:
        count = session.exec(statement).rowcount
    click.echo(f"requeued {count}")


COMMAND_GROUPS = (incidents, silences, notify)
