"""``genmon incidents``: list, inspect, acknowledge and resolve incidents (on-call).

SQLAlchemy and the incident manager are imported inside the commands so ``genmon --help``
stays instant.
"""

from __future__ import annotations

import json
from typing import Any

import click

from genmon.cli._common import (
    current_user,
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
    when,
)
from genmon.settings import get_settings


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
@json_option()
@database_option
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
    with Session(engine_for(url)) as session:
        found = session.exec(query).all()
    if as_json:
        echo_json([IncidentPublic.model_validate(i).model_dump(mode="json") for i in found])
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
            when(i.last_seen_at),
            (" ↳ " if i.parent_id else "") + i.title[:60],
        ]
        for i in found
    ]
    echo_table(rows, ["ID", "STATUS", "SEVERITY", "MODEL", "FINDINGS", "LAST SEEN", "TITLE"])


@incidents.command("show")
@click.argument("incident_id")
@json_option()
@database_option
def incidents_show(incident_id: str, as_json: bool, url: str | None) -> None:
    """One incident: evidence, chart, runbook, notes, audit trail and notifications."""
    from sqlmodel import Session, select

    from genmon.incidents.exceptions import IncidentNotFoundError
    from genmon.schemas.incidents import (
        Incident,
        IncidentPublic,
        IncidentTransition,
        Notification,
    )

    with Session(engine_for(url)) as session:
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
        echo_json(public)
        return
    click.echo(f"{incident.title}")
    click.echo(f"  id {incident.id}  fingerprint {incident.fingerprint}")
    click.echo(
        f"  {incident.status.value}, {incident.severity.value}; {incident.finding_count} findings,"
        f" peak score {incident.peak_score:.4g}, last {incident.last_score:.4g}"
        f" (threshold {incident.threshold:.4g})"
    )
    click.echo(
        f"  opened {when(incident.opened_at)}, last seen {when(incident.last_seen_at)},"
        f" resolved {when(incident.resolved_at)}; reopened {incident.reopen_count}x"
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
        click.echo(f"  {when(t.at)}  {t.transition.value:<12} {t.actor:<12} {t.reason}")
    click.echo("Notifications:")
    for n in notifications:
        click.echo(
            f"  #{n.id} {n.event.value:<11} -> {n.destination:<12} {n.status.value:<10}"
            f" attempts {n.attempts}" + (f"  {n.last_error}" if n.last_error else "")
        )


def _manager(url: str | None) -> Any:
    from genmon.incidents.manager import IncidentManager

    return IncidentManager(engine_for(url), get_settings())


@incidents.command("ack")
@click.argument("incident_id")
@click.option("--by", "actor", default=None, help="Who acknowledges; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@database_option
def incidents_ack(incident_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Acknowledge an open incident (queues its pages and its incidents-topic event)."""
    incident = _manager(url).acknowledge(incident_id, actor or current_user(), reason)
    click.echo(f"{incident.id}: {incident.status.value}")


@incidents.command("resolve")
@click.argument("incident_id")
@click.option("--by", "actor", default=None, help="Who resolves; default: your user name.")
@click.option("--reason", default="", help="Why; kept in the audit trail.")
@database_option
def incidents_resolve(incident_id: str, actor: str | None, reason: str, url: str | None) -> None:
    """Resolve an incident (queues its pages and its incidents-topic event)."""
    incident = _manager(url).resolve(incident_id, actor or current_user(), reason)
    click.echo(f"{incident.id}: {incident.status.value}")


@incidents.command("notes")
@click.argument("incident_id")
@click.argument("text", required=False)
@click.option("--by", "actor", default=None, help="Who writes; default: your user name.")
@database_option
def incidents_notes(incident_id: str, text: str | None, actor: str | None, url: str | None) -> None:
    """Show an incident's notes, or append TEXT to them."""
    if text:
        incident = _manager(url).add_note(incident_id, actor or current_user(), text)
    else:
        from sqlmodel import Session

        from genmon.incidents.exceptions import IncidentNotFoundError
        from genmon.schemas.incidents import Incident

        with Session(engine_for(url)) as session:
            incident = session.get(Incident, incident_id)
        if incident is None:
            raise IncidentNotFoundError(f"no incident {incident_id!r}")
    click.echo(incident.notes or "(no notes)")
