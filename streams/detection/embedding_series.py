"""Keys and bounds of a model's embedding drift series (one table record each).

Each ``(model, version, field)`` series is its own record under :func:`embedding_key`; a
model's series are listed, each with the end of the last window it was sampled in, in one
more record under :func:`embedding_index_key`, which :func:`admit` keeps bounded before a
series takes a sample: series not sampled for ``detectors.series_ttl_s`` go, then the
least recently sampled beyond ``detectors.max_embedding_series_per_model`` (one series may
hold ~100 KB, so that cap is not ``max_series_per_model``). Only window ends decide, so a
replay evicts the same series.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from genmon.exceptions import ConfigurationError

#: ``last_end`` kind of embedding samples (a series applies each window's sample once).
EMBEDDING_KIND = "embedding"
#: Largest JSON state of one record (one changelog message): under Kafka's default 1 MB.
STATE_MAX_BYTES = 900_000


def embedding_key(model_id: str, model_version: str, field: str) -> str:
    """Table key of one embedding series: unambiguous whatever characters the ids hold."""
    return json.dumps([model_id, model_version, field], ensure_ascii=False)


def embedding_index_key(model_id: str) -> str:
    """Table key of a model's embedding series index (one element: never a series key)."""
    return json.dumps([model_id], ensure_ascii=False)


def embedding_series_model(key: str) -> str | None:
    """The model of an :func:`embedding_key`, ``None`` for any other key of the table."""
    try:
        parts = json.loads(key)
    except ValueError:
        return None
    return str(parts[0]) if isinstance(parts, list) and len(parts) == 3 else None


def admit(
    index: dict[str, Any] | None,
    key: str,
    window_end: datetime,
    ttl_ms: int,
    max_series: int,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The index once series ``key`` takes a sample of ``window_end``, and the keys to
    delete first: ``(index, expired, capped)``. The sampled series itself is among the
    expired when it is back after the TTL (it starts fresh)."""
    seen: dict[str, int] = dict((index or {}).get("series", {}))
    end_ms = round(window_end.timestamp() * 1000)
    expired = sorted(k for k, ms in seen.items() if end_ms - ms > ttl_ms)
    for stale in expired:
        del seen[stale]
    seen[key] = max(seen.get(key, end_ms), end_ms)
    lru = sorted((k for k in seen if k != key), key=lambda k: (seen[k], k))
    capped = lru[: max(len(seen) - max_series, 0)]
    for stale in capped:
        del seen[stale]
    return {"series": seen}, expired, capped


def field_series(index: dict[str, Any], field: str) -> int:
    """How many embedding series of ``field`` an index lists (they share its budget)."""
    return sum(1 for key in index.get("series", {}) if json.loads(key)[2] == field)


def check_size(state: dict[str, Any], series: str) -> None:
    """Refuse a state that would not fit one changelog record."""
    size = len(json.dumps(state))
    if size > STATE_MAX_BYTES:
        raise ConfigurationError(
            f"the embedding drift state of {series} would be {size} bytes, over "
            f"{STATE_MAX_BYTES} (Kafka refuses changelog records over 1 MB by default); "
            "lower detectors.drift_components"
        )
