"""``genmon tokens``: create, list and revoke the API's bearer tokens.

A token's secret is shown once, when it is created; genmon keeps only its hash.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from genmon.schemas.access import ApiToken

_SCOPES = ("ingest", "read", "operate", "admin")
_EXPIRY = re.compile(r"^(\d+)([hdw])$")
_EXPIRY_S = {"h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str) -> timedelta:
    """``12h``, ``30d``, ``8w`` -> timedelta."""
    found = _EXPIRY.match(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a lifetime like 12h, 30d or 8w")
    return timedelta(seconds=int(found.group(1)) * _EXPIRY_S[found.group(2)])


@click.group()
def tokens() -> None:
    """Bearer tokens of the HTTP API: scopes ingest, read, operate (+read), admin (all)."""


@tokens.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    type=click.Choice(_SCOPES),
    multiple=True,
    required=True,
    help="What it may do; repeat for several (admin implies the others).",
)
@click.option("--expires-in", default=None, help="Lifetime, e.g. 12h, 30d, 8w (default: never).")
@click.option("--by", "actor", default=None, help="Who creates it; default: your user name.")
@json_option()
@database_option
def tokens_create(
    name: str,
    scopes: tuple[str, ...],
    expires_in: str | None,
    actor: str | None,
    as_json: bool,
    url: str | None,
) -> None:
    """Create token NAME and print it, once: genmon stores only its hash."""
    from genmon.api.tokens import create_token, parse_scopes
    from genmon.schemas.events import utcnow

    lifetime = parse_expiry(expires_in) if expires_in else None
    row, text = create_token(
        engine_for(url),
        name,
        parse_scopes(list(scopes)),
        created_by=actor or current_user(),
        expires_at=utcnow() + lifetime if lifetime else None,
    )
    if as_json:
        echo_json({**_public(row), "token": text})
    else:
        click.echo(text)
    click.echo(
        f"token {row.name!r} ({', '.join(row.scopes)}) created; copy it now: it is not shown "
        "again (`genmon tokens revoke NAME` if it leaks)",
        err=True,
    )


@tokens.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include revoked tokens.")
@json_option()
@database_option
def tokens_list(show_all: bool, as_json: bool, url: str | None) -> None:
    """Tokens with their scopes and last use (never their secrets)."""
    from genmon.api.tokens import list_tokens

    found = list_tokens(engine_for(url), include_revoked=show_all)
    if as_json:
        echo_json([_public(row) for row in found])
        return
    if not found:
        click.echo("no tokens; `genmon tokens create NAME --scope read` makes one")
        return
    rows = [
        [
            row.name,
            row.id,
            ",".join(row.scopes),
            when(row.created_at),
            when(row.expires_at),
            when(row.last_used_at),
            when(row.revoked_at),
        ]
        for row in found
    ]
    echo_table(rows, ["NAME", "ID", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "REVOKED"])


@tokens.command("revoke")
@click.argument("name_or_id")
@database_option
def tokens_revoke(name_or_id: str, url: str | None) -> None:
    """Revoke a token by name or id: the API refuses it (401) from now on."""
    from genmon.api.tokens import revoke_token

    row = revoke_token(engine_for(url), name_or_id)
    click.echo(f"token {row.name!r} ({row.id}) revoked")


def _public(row: ApiToken) -> dict[str, Any]:
    """A token's row without its hash."""
    shown = row.model_dump(mode="json")
    shown.pop("secret_hash", None)
    return shown
