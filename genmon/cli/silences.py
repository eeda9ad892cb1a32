"""``genmon silences``: mute pages that match labels for a while (on-call)."""

from __future__ import annotations

import click

from genmon.cli._common import (
    current_user,
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
    parse_duration,
    when,
)


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
@database_option
def silences_add(
    matchers: tuple[str, ...], duration: str, comment: str, actor: str | None, url: str | None
) -> None:
    """Add a silence starting now; prints its id."""
    from genmon.db import session_scope
    from genmon.incidents.routing import parse_matchers
    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence

    parsed = parse_matchers(matchers)
    now = utcnow()
    silence = Silence(
        matchers=[str(m) for m in parsed],
        starts_at=now,
        ends_at=now + parse_duration(duration),
        created_by=actor or current_user(),
        comment=comment,
    )
    with session_scope(engine_for(url)) as session:
        session.add(silence)
    click.echo(f"{silence.id}  until {when(silence.ends_at)} UTC  {' '.join(silence.matchers)}")


@silences.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@json_option()
@database_option
def silences_list(show_all: bool, as_json: bool, url: str | None) -> None:
    """Active silences (or all of them)."""
    from sqlmodel import Session, select

    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence

    query = select(Silence).order_by(Silence.ends_at)
    if not show_all:
        query = query.where(Silence.ends_at > utcnow())
    with Session(engine_for(url)) as session:
        found = session.exec(query).all()
    if as_json:
        echo_json([silence.model_dump(mode="json") for silence in found])
        return
    if not found:
        click.echo("no silences")
        return
    rows = [
        [s.id, when(s.starts_at), when(s.ends_at), s.created_by, " ".join(s.matchers), s.comment]
        for s in found
    ]
    echo_table(rows, ["ID", "STARTS", "ENDS", "BY", "MATCHERS", "COMMENT"])


@silences.command("expire")
@click.argument("silence_id")
@database_option
def silences_expire(silence_id: str, url: str | None) -> None:
    """End a silence now."""
    from genmon.db import session_scope
    from genmon.incidents.exceptions import IncidentNotFoundError
    from genmon.schemas.events import utcnow
    from genmon.schemas.incidents import Silence

    with session_scope(engine_for(url)) as session:
        silence = session.get(Silence, silence_id)
        if silence is None:
            raise IncidentNotFoundError(f"no silence {silence_id!r}; see `genmon silences list`")
        silence.ends_at = min(silence.ends_at, utcnow())
    click.echo(f"{silence_id}: expired")
