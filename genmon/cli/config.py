"""``genmon config``: the settings in effect, or the README's table of them."""

from __future__ import annotations

import json

import click

from genmon.settings import get_settings


@click.command("config")
@click.option("--markdown", is_flag=True, help="Print the README's table of every setting.")
def config(markdown: bool) -> None:
    """Show the settings in effect (from GENMON_ variables and .env), secrets masked.

    Passwords, tokens, keys and destination URLs print as ***, and a URL's password is
    hidden (its user, host and path stay): the output is safe to paste into a ticket.
    """
    if markdown:
        from genmon.config_doc import settings_markdown

        click.echo(settings_markdown())
        return
    from genmon.secrets import masked

    click.echo(json.dumps(masked(get_settings()), indent=2))
