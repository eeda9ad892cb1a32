"""Helpers of the privacy tests (not a test module): search every place genmon writes."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from genmon.privacy.subject import table_metadata


def database_texts(engine: Engine) -> list[tuple[str, str, str]]:
    """``(table, column, value)`` of every non-null string, text or JSON value of every
    table genmon's migrations created, JSON as the database returns it (re-encoded)."""
    import json

    present = set(sa.inspect(engine).get_table_names())
    found = []
    with engine.connect() as connection:
        for table in table_metadata().sorted_tables:
            if table.name not in present:
                continue
            columns = [
                c for c in table.columns if isinstance(c.type, sa.String | sa.Text | sa.JSON)
            ]
            if not columns:
                continue
            for row in connection.execute(sa.select(*columns)):
                for column, value in zip(columns, row, strict=True):
                    if value is None:
                        continue
                    text = (
                        value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                    )
                    found.append((table.name, column.name, text))
    return found


def places_holding(engine: Engine, needle: str) -> set[str]:
    """``table.column`` of every database value holding ``needle``."""
    return {f"{t}.{c}" for t, c, text in database_texts(engine) if needle in text}


def files_holding(root: Path, needle: str) -> set[str]:
    """Files under ``root`` whose bytes hold ``needle`` (UTF-8), relative to ``root``."""
    data = needle.encode("utf-8")
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and data in path.read_bytes()
    }
