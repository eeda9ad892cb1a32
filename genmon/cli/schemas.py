"""``genmon schemas``: the wire contract for producers in other languages."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
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
