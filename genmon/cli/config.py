"""``genmon config``: the settings in effect, or the README's table of them."""

from __future__ import annotations

import click

from genmon.settings import get_settings


@click.command("config")
@click.option("--markdown", is_flag=True, help="Print the README's table of every setting.")
def config(markdown: bool) -> None:
    """Show the settings in effect (from GENMON_ variables and .env), secrets masked."""
    if markdown:
        from genmon.config_doc import settings_markdown

        click.echo(settings_markdown())
        return
    click.echo(get_settings().model_dump_json(indent=2))
