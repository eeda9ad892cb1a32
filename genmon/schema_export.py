"""JSON Schema of every wire event, for producers written in other languages.

``genmon schemas export --out DIR`` writes ``<kind>.schema.json`` per topic kind
(inference, feedback, ...) and ``index.json`` listing them. The schemas describe what
the worker accepts; the few cross-field rules JSON Schema cannot say (such as
``finished_at`` not before ``started_at``) are still checked by the worker, which
dead-letters events that break them.

>>> schema = event_json_schema("inference")
>>> schema["$id"], schema["properties"]["schema_version"]["const"]
('urn:genmon:schema:v1:inference', 1)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from genmon.exceptions import ConfigurationError, GenmonError
from genmon.schemas.events import EVENT_MODELS, SCHEMA_VERSION

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
INDEX_FILE = "index.json"


def schema_id(kind: str) -> str:
    """Stable identifier of ``kind``'s schema; changes only with the wire version."""
    return f"urn:genmon:schema:v{SCHEMA_VERSION}:{kind}"


def schema_file_name(kind: str) -> str:
    return f"{kind}.schema.json"


def event_json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of the events on topic kind ``kind``."""
    try:
        model = EVENT_MODELS[kind]
    except KeyError:
        raise ConfigurationError(
            f"no event kind {kind!r}; choose one of {', '.join(sorted(EVENT_MODELS))}"
        ) from None
    body = model.model_json_schema(mode="validation")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_id(kind),
        **body,
        "title": model.__name__,
        "description": inspect.cleandoc(model.__doc__ or model.__name__),
    }


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_schemas(out_dir: Path) -> list[Path]:
    """Write one schema file per event kind and an index into ``out_dir``; return the paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        entries = []
        for kind in EVENT_MODELS:
            schema = event_json_schema(kind)
            path = out_dir / schema_file_name(kind)
            path.write_text(_dump(schema), encoding="utf-8")
            written.append(path)
            entries.append(
                {"kind": kind, "title": schema["title"], "$id": schema["$id"], "file": path.name}
            )
        index = {"schema_version": SCHEMA_VERSION, "schemas": entries}
        index_path = out_dir / INDEX_FILE
        index_path.write_text(_dump(index), encoding="utf-8")
    except OSError as exc:
        raise GenmonError(
            f"cannot write the schemas to {out_dir} ({exc}); choose a writable folder with --out"
        ) from exc
    return [*written, index_path]
