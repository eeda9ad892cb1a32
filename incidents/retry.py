"""Retry policy of deliveries: what is worth another try, and when.

Transport errors, 408, 425, 429 and 5xx (:data:`RETRYABLE_STATUS`) are retried after an
exponential backoff with equal jitter (``backoff_initial_s * 2**(attempt-1)``, capped at
``backoff_max_s``, then a random value between half and all of it), so dispatchers that
failed together do not come back together. A ``Retry-After`` header (seconds or HTTP
date, capped at ``retry_after_max_s``) is honoured and also pauses that destination's
:class:`~genmon.incidents.rate_limit.TokenBucket`. Other 4xx answers are permanent.

Retries go on for ``notify.retry_horizon_s`` (6 h by default), not for a number of
tries: a receiver down for an hour gets its pages when it is back. A destination that
keeps failing is paused and probed on the same schedule (:mod:`~genmon.incidents.health`)
so its queue does not burn its tries meanwhile. Past the horizon a notification is
``dead`` (:mod:`~genmon.incidents.expiry`): visible in ``genmon notify list --status
dead``. ``notify.max_attempts``, unset by default, is an optional cap on top, which the
probes of a paused destination do not count against.
"""

from __future__ import annotations

import email.utils
import random
from datetime import datetime

from genmon.incidents.rate_limit import TokenBucket
from genmon.settings import NotifySettings

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Answers that say "slow down", not "down": they do not count against a destination.
THROTTLE_STATUS = frozenset({429})


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
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 s is past any cap; no float overflow
    base = min(config.backoff_max_s, config.backoff_initial_s * 2**exponent)
    return base / 2 + rng.uniform(0, base / 2)


def retry_in_s(
    attempt: int,
    retry_after_s: float | None,
    config: NotifySettings,
    rng: random.Random,
    bucket: TokenBucket | None,
    *,
    capped: bool = True,
) -> float | None:
    """Seconds until the next try after failed ``attempt``; None once the optional
    ``max_attempts`` cap is reached (the retry horizon is enforced by expiry, not here).

    A paused destination's probe is not ``capped``: its failure says the destination is
    down, not that this notification is bad, and the horizon bounds it anyway.

    A ``Retry-After`` of ``retry_after_s`` (capped) lengthens the wait and pauses
    ``bucket``: the receiver asked the whole destination to wait, not this row only.
    """
    if capped and config.max_attempts is not None and attempt >= config.max_attempts:
        return None
    delay = backoff_s(attempt, config, rng)
    if retry_after_s is not None:
        honoured = min(retry_after_s, config.retry_after_max_s)
        delay = max(delay, honoured)
        if bucket is not None:
            bucket.pause(honoured)
    return delay
