"""A model's detector state: one table record, its series aged and bounded.

The runner keeps all it knows of a model in one JSON record (one changelog message):
``last_end`` (per window kind, the end of the last window applied), ``series`` (one
entry per judged series under :func:`series_key`: the detector's ``det`` state,
``seen_ms``, the end of the last window that judged it, and the ``clears``/``fired_ms``
of its clear signals), ``baselines`` and ``refreshed_at`` (the latest reference refresh
by the clock it applied, :mod:`~genmon.streams.detection.reference_refresh`; absent in
states stored before it). Segments that come and go would grow it without end, past
what Kafka takes in one record, so each applied window first drops the series not
judged for ``detectors.series_ttl_s`` (:func:`expire`); after judging, the least
recently judged series (ties by key) go while there are more than
``detectors.max_series_per_model`` or the record would exceed :data:`STATE_MAX_BYTES`
(:func:`cap`). Eviction depends on window ends only, so a replay evicts the same. The
runner counts evictions by :data:`EVICTION_REASONS` for
``genmon_detector_series_evicted{reason}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from genmon.streams.detection.embedding_series import STATE_MAX_BYTES

log = logging.getLogger(__name__)

#: Why a series left a model's state: ``detectors.series_ttl_s``,
#: ``detectors.max_series_per_model``, :data:`STATE_MAX_BYTES`, or a stored detector state
#: this genmon no longer reads (its class's ``state_version`` changed: the series restarts).
EVICTION_REASONS = ("ttl", "cap", "size", "format")


def copy_state(state: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``state`` the runner may change (the stored one stays as it was), or a
    new model's empty state."""
    if state is None:
        return {"last_end": {}, "series": {}, "baselines": {}, "fired": {}}
    copied = {
        "last_end": dict(state["last_end"]),
        "series": {k: dict(v) for k, v in state["series"].items()},
        "baselines": dict(state.get("baselines", {})),
        "fired": dict(state.get("fired", {})),
    }
    if "refreshed_at" in state:  # the latest reference refresh applied (reference_refresh.py)
        copied["refreshed_at"] = state["refreshed_at"]
    return copied


def series_key(signal: str, detector: str, version: str, segment: str) -> str:
    return f"{signal}\x1f{detector}\x1f{version}\x1f{segment}"


def sibling_key(skey: str) -> tuple[str, str]:
    """``(signal, detector and segment; version)`` of a series key: series of one signal,
    detector and segment on different versions are siblings."""
    *series, version, segment = skey.split("\x1f")  # embedding keys have no detector part
    return "\x1f".join([*series, segment]), version


def mark_fired(state: dict[str, Any], skey: str, end_ms: int, keep_ms: int) -> None:
    """Remember that ``skey`` fired (for its siblings), forgetting firings older than
    ``keep_ms``: the record stays as small as the recent incidents."""
    fired = state.setdefault("fired", {})
    for key in [k for k, (_, at) in fired.items() if end_ms - at >= keep_ms]:
        del fired[key]
    sibling, version = sibling_key(skey)
    fired[sibling] = [version, end_ms]


def sibling_fired(state: dict[str, Any], skey: str, end_ms: int, keep_ms: int) -> bool:
    """Whether a sibling of ``skey`` on another version fired within ``keep_ms``."""
    sibling, version = sibling_key(skey)
    mark = state.get("fired", {}).get(sibling)
    return mark is not None and mark[0] != version and end_ms - mark[1] < keep_ms


def save(state: dict[str, Any], skey: str, det: dict[str, Any], seen_ms: int) -> None:
    """Store a series' detector state, judged in the window ending at ``seen_ms``."""
    entry = state["series"].setdefault(skey, {"clears": 0})
    entry["det"] = det
    entry["seen_ms"] = seen_ms


def expire(state: dict[str, Any], now_ms: int, ttl_ms: int) -> int:
    """Drop the series not judged for ``ttl_ms`` before ``now_ms``; return how many."""
    series = state["series"]
    expired = [k for k, e in series.items() if now_ms - e["seen_ms"] > ttl_ms]
    for skey in expired:
        del series[skey]
    return len(expired)


def cap(state: dict[str, Any], now_ms: int, max_series: int, model_id: str) -> tuple[int, int]:
    """Drop the least recently judged series beyond ``max_series``, then while the state
    would exceed :data:`STATE_MAX_BYTES` (one changelog record); return how many went for
    each of the two."""
    series = state["series"]
    # Ties (series judged in the same window) go by key, so a replay evicts the same.
    lru = sorted(series, key=lambda k: (series[k]["seen_ms"], k))
    over = max(len(series) - max_series, 0)
    dropped = {skey: series.pop(skey) for skey in lru[:over]}
    size = len(json.dumps(state))
    for skey in lru[over:]:
        if size <= STATE_MAX_BYTES:
            break
        # The entry and its separators: '"key": value, '.
        size -= len(json.dumps(skey)) + len(json.dumps(series[skey])) + 4
        dropped[skey] = series.pop(skey)
    judged_now = sum(entry["seen_ms"] == now_ms for entry in dropped.values())
    if judged_now:
        log.warning(
            "model %s: dropped %d detector series judged in this window (more live series"
            " than detectors.max_series_per_model=%d or %d bytes of state); they restart"
            " every window: raise the cap or lower windows.max_segment_values",
            model_id,
            judged_now,
            max_series,
            STATE_MAX_BYTES,
        )
    return over, len(dropped) - over
