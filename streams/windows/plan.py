"""The window plan: which panes and windows an event time falls into, and when they close.

Windows are built from *panes* (the "panes" technique of Li et al., "No pane, no gain",
SIGMOD Record 2005): every event is added to exactly one pane of length
``gcd(tumbling, hopping size, hopping step)``, and a window's statistics are the merge of
its panes when it closes. Everything in :class:`~genmon.streams.windows.stats.WindowStats`
is mergeable (counts, sums, maxima, DDSketch quantile sketches), so this is exact, and each
batch writes one pane per touched series instead of one entry per overlapping hopping
window. A :class:`WindowPlan` holds that geometry and the lateness rules, apart from the
statistics, so the native path and the closing timer share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

#: The closed end of a kind with no closed window.
NEVER = -(2**62)


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window family: tumbling when ``step_ms == size_ms``."""

    kind: str
    size_ms: int
    step_ms: int

    def windows_containing(self, t_ms: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every window of this family that contains instant ``t_ms``."""
        last_start = t_ms - t_ms % self.step_ms
        start = last_start
        while start > t_ms - self.size_ms:
            yield start, start + self.size_ms
            start -= self.step_ms

    def last_end_containing(self, t_ms: int) -> int:
        return t_ms - t_ms % self.step_ms + self.size_ms

    def first_end_containing(self, t_ms: int) -> int:
        """The end of the earliest-ending window of this family that contains ``t_ms``."""
        last_start = t_ms - t_ms % self.step_ms
        earlier = (last_start - t_ms + self.size_ms - 1) // self.step_ms
        return last_start - earlier * self.step_ms + self.size_ms


class WindowPlan:
    """The window families, their common pane length and the lateness rules.

    >>> plan = WindowPlan(tumbling_s=60, hopping_size_s=300, hopping_step_s=60,
    ...                   allowed_lateness_s=10, expires_s=3600)
    >>> plan.pane_ms
    60000
    >>> sorted(plan.windows_of_pane(120_000))[:2]
    [('hopping', -120000, 180000), ('hopping', -60000, 240000)]
    """

    def __init__(
        self,
        tumbling_s: float,
        hopping_size_s: float,
        hopping_step_s: float,
        allowed_lateness_s: float,
        expires_s: float,
    ) -> None:
        sizes = {
            "tumbling_s": tumbling_s,
            "hopping_size_s": hopping_size_s,
            "hopping_step_s": hopping_step_s,
        }
        for name, value in sizes.items():
            if value <= 0 or abs(value * 1000 - round(value * 1000)) > 1e-6:
                raise ValueError(
                    f"windows.{name}={value} must be a positive whole number of milliseconds"
                )
        if hopping_size_s < hopping_step_s:
            raise ValueError(
                f"windows.hopping_size_s={hopping_size_s} must be >= "
                f"windows.hopping_step_s={hopping_step_s}"
            )
        if allowed_lateness_s < 0:
            raise ValueError(f"windows.allowed_lateness_s={allowed_lateness_s} must be >= 0")
        tumbling = round(tumbling_s * 1000)
        hop_size, hop_step = round(hopping_size_s * 1000), round(hopping_step_s * 1000)
        self.specs = (
            WindowSpec("tumbling", tumbling, tumbling),
            WindowSpec("hopping", hop_size, hop_step),
        )
        self.pane_ms = math.gcd(tumbling, hop_size, hop_step)
        self.lateness_ms = round(allowed_lateness_s * 1000)
        longest = max(tumbling, hop_size) + self.lateness_ms
        self.longest_ms = longest
        if expires_s * 1000 < longest:
            raise ValueError(
                f"windows.expires_s={expires_s} must cover the longest window plus the allowed "
                f"lateness ({longest / 1000:g} s), or windows would expire before they close"
            )
        self.expires_ms = round(expires_s * 1000)

    def windows_of_pane(self, pane_start: int) -> Iterator[tuple[str, int, int]]:
        for spec in self.specs:
            for start, end in spec.windows_containing(pane_start):
                yield spec.kind, start, end

    def pane_done(self, pane_start: int, watermark_ms: int) -> bool:
        """True when every window the pane belongs to has closed (or the pane expired)."""
        last_end = max(spec.last_end_containing(pane_start) for spec in self.specs)
        return (
            last_end + self.lateness_ms <= watermark_ms
            or pane_start + self.expires_ms <= watermark_ms
        )

    def too_late(self, t_ms: int, watermark_ms: int, closed: Mapping[str, int]) -> bool:
        """True when an event at ``t_ms`` comes too late for a model at ``watermark_ms``
        whose windows have closed up to ``closed`` (kind -> largest closed end): one of
        the windows holding it has closed, or its pane expired.

        Such an event goes into no window and is counted late. Were it added to its pane
        because *some* of the pane's windows are still open (a 5-minute hopping window
        outlives the 1-minute tumbling one), the closed windows would never hold it and
        no counter would say so: every window record holds exactly the events not counted
        late or future. A window closes once the watermark passes its end plus the allowed
        lateness, at the closing timer's next tick; until then it still takes events.
        """
        pane = t_ms - t_ms % self.pane_ms
        if pane + self.expires_ms <= watermark_ms:
            return True
        return any(
            spec.first_end_containing(pane) <= closed.get(spec.kind, NEVER) for spec in self.specs
        )

    def closable(self, end_ms: int, watermark_ms: int) -> bool:
        return end_ms + self.lateness_ms <= watermark_ms
