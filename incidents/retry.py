"""Retry policy of deliveries: what is worth another try, and when.

Transport errors, 408, 425, 429 and 5xx (:data:`RETRYABLE_STATUS`) are retried after an
exponential backoff with equal jitter (``backoff_initial_s * 2**(attempt-1)``, capped at
``backoff_max_s``, then a random value between half and all of it), so dispatchers that
failed together do not come back together. A ``Retry-After`` header (seconds or HTTP
date, capped at ``retry_after_max_s``) is honoured and also pauses that destination's
:class:`~genmon.incidents.rate_limit.TokenBucket`. Other 4xx answers are permanent.
After ``max_attempts`` a row is ``dead``: visible in ``genmon notify list --status dead``.
"""

from __future__ import annotations

import email.utils
import random
from datetime import datetime

from genmon.incidents.rate_limit import TokenBucket
from genmon.settings import NotifySettings

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - now).total_seconds(), 0.0)


def backoff_s(attempt: int, config: NotifySettings, rng: random.Random) -> float:
    """Exponential backoff after failed ``attempt`` (1-based), with equal jitter."""
    base = min(config.backoff_max_s, config.backoff_initial_s * 2 ** (attempt - 1))
    return base / 2 + rng.uniform(0, base / 2)


def retry_in_s(
    attempt: int,
    retry_after_s: float | None,
    config: NotifySettings,
    rng: random.Random,
    bucket: TokenBucket | None,
) -> float | None:
    """Seconds until the next try after failed ``attempt``; None once attempts are used up.

    A ``Retry-After`` of ``retry_after_s`` (capped) lengthens the wait and pauses
    ``bucket``: the receiver asked the whole destination to wait, not this row only.
    """
    if attempt >= config.max_attempts:
        return None
    delay = backoff_s(attempt, config, rng)
    if retry_after_s is not None:
        honoured = min(retry_after_s, config.retry_after_max_s)
        delay = max(delay, honoured)
        if bucket is not None:
            bucket.pause(honoured)
    return delay
