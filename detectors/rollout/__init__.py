"""Safe rollout: a challenger on a share of traffic, judged against the champion.

:class:`RolloutWatch` reads closed windows and decides ``regressed`` (roll back),
``clean`` (confirm) or ``inconclusive``; :mod:`~genmon.detectors.rollout.msprt` holds the
always-valid statistics and the watch's planning.
"""

from genmon.detectors.rollout.msprt import (
    always_valid_p,
    challenger_samples_needed,
    default_tau,
    mixture_boundary,
)
from genmon.detectors.rollout.result import (
    DEFAULT_MIN_REGRESSION,
    WATCH_SIGNALS,
    Comparison,
    WatchResult,
    watch_minutes_text,
)
from genmon.detectors.rollout.tally import WindowTally
from genmon.detectors.rollout.watch import RolloutWatch

__all__ = [
    "DEFAULT_MIN_REGRESSION",
    "WATCH_SIGNALS",
    "Comparison",
    "RolloutWatch",
    "WatchResult",
    "WindowTally",
    "always_valid_p",
    "challenger_samples_needed",
    "default_tau",
    "mixture_boundary",
    "watch_minutes_text",
]
