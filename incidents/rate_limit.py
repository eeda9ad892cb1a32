"""Rate limits per destination: a token bucket of ``rate_per_s`` and ``burst``.

Receivers throttle senders that page in bursts (they answer 429), so the dispatcher takes
a token before it claims a row for a destination and leaves the row queued when there is
none. A ``Retry-After`` answer
:meth:`~TokenBucket.pause`\\ s the whole destination, not only the row that got it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` deliveries per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.paused_until = 0.0

    def _refill(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return now

    def try_take(self) -> bool:
        now = self._refill()
        if now < self.paused_until or self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_s(self) -> float:
        """Seconds until :meth:`try_take` can succeed."""
        now = self._refill()
        return max(self.paused_until - now, (1 - self.tokens) / self.rate, 0.0)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)
