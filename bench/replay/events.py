"""Helpers on the wire events of a replay stream, shared by the stream and the changes.

Events are :class:`genmon.schemas.events.InferenceEvent` / ``FeedbackEvent`` dicts.
Timestamps are ISO 8601 in UTC with microseconds (``2024-01-01T00:00:00.100276+00:00``),
whatever the zone of the stream's ``start``.

A failed request is rate-limited (``status="error"``, ``error_code="429"``, the code
LLMPerf's failing providers, lepton and perplexity, return): empty response, 0 completion
tokens, no ttft.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

ERROR_CODE = "429"


def is_inference(event: Mapping[str, Any]) -> bool:
    return "started_at" in event


def event_time(event: Mapping[str, Any]) -> datetime:
    """When the event happened: an inference's ``started_at``, a feedback's ``created_at``."""
    return datetime.fromisoformat(event["started_at" if is_inference(event) else "created_at"])


def arrival_time(event: Mapping[str, Any]) -> datetime:
    """When the service logs the event, the order a topic holds them in: an inference when
    it finished (``started_at`` + latency), feedback when it was given."""
    if not is_inference(event):
        return datetime.fromisoformat(event["created_at"])
    return datetime.fromisoformat(event["started_at"]) + timedelta(milliseconds=event["latency_ms"])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_us(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


def _iso_utc(epoch_us: np.ndarray) -> list[str]:
    """ISO 8601 UTC timestamps of microseconds since the epoch (vectorised: ~1 us each)."""
    text = np.datetime_as_string(epoch_us.astype("datetime64[us]"), unit="us")
    return [t + "+00:00" for t in text.tolist()]


def _iso(when: datetime) -> str:
    """The same format as :func:`_iso_utc` (UTC, microseconds always), so times sort as text."""
    naive = when.astimezone(UTC).replace(tzinfo=None)
    return naive.isoformat(timespec="microseconds") + "+00:00"


def _fail(event: dict[str, Any]) -> None:
    """Turn an inference into a rate-limited failure (in place)."""
    event.update(
        status="error",
        error_code=ERROR_CODE,
        response="",
        completion_tokens=0,
        time_to_first_token_ms=None,
        finish_reason=None,
    )
