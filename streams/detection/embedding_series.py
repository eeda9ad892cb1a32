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
import math
from datetime import datetime
from typing import Any

from genmon.exceptions import ConfigurationError
from genmon.settings import Settings

#: ``last_end`` kind of embedding samples (a series applies each sub-sample once).
EMBEDDING_KIND = "embedding"
#: Largest JSON state of one record (one changelog message): under Kafka's default 1 MB.
STATE_MAX_BYTES = 900_000
#: Seconds of event time the drift test pools its latest sub-samples over, each a scale
#: of :class:`~genmon.detectors.EmbeddingShiftDrift` (in looks of
#: ``embedding.flush_interval_s``): the short ones find an abrupt shift within seconds of
#: traffic, the long ones (to 16 minutes) a small sustained one or a quiet stream.
SCALES_S: tuple[float, ...] = (5, 10, 20, 40, 80, 240, 960)
#: Fewest texts a scale's pool needs to be tested (its mean's null law is approximate).
MIN_POOL_ROWS = 20


def drift_params(settings: Settings) -> dict[str, Any]:
    """The drift detector's parameters in looks, from settings stated in time: its scales
    (:data:`SCALES_S`), its reference (``detectors.drift_reference_windows`` windows of
    event time) and its refresh (``detectors.baseline_refresh_windows`` windows)."""
    look_s, window_s = settings.embedding.flush_interval_s, settings.windows.tumbling_s
    d = settings.detectors

    def looks(seconds: float) -> int:
        return max(1, math.ceil(seconds / look_s - 1e-9))

    return {
        "components": d.drift_components,
        "reference_windows": max(2, looks(d.drift_reference_windows * window_s)),
        "refresh_windows": max(2, looks(d.baseline_refresh_windows * window_s)),
        "scales": tuple(sorted({looks(seconds) for seconds in SCALES_S})),
        "min_window_rows": MIN_POOL_ROWS,
    }


def matches(detector: Any, params: dict[str, Any]) -> bool:
    """Whether a stored detector runs with ``params`` (:func:`drift_params`). One that does
    not (stored before sub-samples, or before ``embedding.flush_interval_s`` or the
    reference and refresh settings changed) counts its scales and reference in other
    looks, so its series starts again."""
    wanted = type(detector)(**{**params, "alpha": detector.alpha})  # normalised as it would
    return bool(detector.get_params() == wanted.get_params())


def publishes(entry: dict[str, Any], detected: bool, end_ms: int, window_ms: int) -> bool:
    """Whether a look's result goes out as a finding: every detection, but a clear look at
    most once per window (``entry["published_ms"]``), so incidents count quiet *windows*
    before they auto-resolve, as for windowed signals, however often the series looks."""
    if not detected and end_ms - entry.get("published_ms", -(2**62)) < window_ms:
        return False
    entry["published_ms"] = end_ms
    return True


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
