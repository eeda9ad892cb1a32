"""One seeded replay of a rollout, judged three ways on the same windows.

- **sequential**: :class:`~genmon.detectors.rollout.RolloutWatch` with the given policy,
  looked at after every window; it decides ``regressed``, ``clean`` (at its own planned
  watch) or, past the replay, stays ``watching``.
- **fixed horizon**: one test at ``horizon_s`` (the planned watch of the scenario): for
  every comparison of the watch (same :class:`~genmon.detectors.rollout.WindowTally`
  counts) with ``min_samples`` per version, the house's one-sided rate test
  (``genmon.detectors._stats.compare_proportions``: z with Yates' correction, Fisher's
  exact test for small expected counts), Benjamini-Hochberg over the family, flagged at
  ``q <= alpha`` with the challenger worse: exactly the watch's family rule, with
  fixed-sample p-values.
- **fixed horizon, looked at after every window**: the same test after every window up
  to ``horizon_s``; the first flag counts. This is what a dashboard of p-values does, and
  why the watch is sequential.

A *false rollback* is a flag on a replay whose challenger equals the champion; *power* is
the share of regression replays flagged (for the sequential watch: ``regressed`` before it
decided ``clean``); times are event time since the first window with challenger traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.rollout.simulate import iter_windows
from genmon.detectors._stats import benjamini_hochberg, compare_proportions
from genmon.detectors.rollout import WATCH_SIGNALS, RolloutWatch, WindowTally


@dataclass(frozen=True)
class Outcome:
    """What each method decided on one replay (``*_s``: event time of the flag)."""

    seed: int
    sequential: str
    sequential_s: float | None
    planned_watch_s: float | None
    fixed_flagged: bool
    fixed_s: float | None
    peek_flagged: bool
    peek_s: float | None
    windows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fixed_flags(tally: WindowTally, alpha: float, min_samples: int) -> bool:
    """The watch's family rule with fixed-sample p-values: any comparison flagged?"""
    tested, p_values = [], []
    for xb, nb, xc, nc in tally.counts.values():
        if min(nb, nc) >= min_samples:
            tested.append(xc / nc - xb / nb)
            p_values.append(compare_proportions(xc, nc, xb, nb, "greater").p_value)
    if not tested:
        return False
    q = benjamini_hochberg(p_values)
    return any(qi <= alpha and d > 0 for qi, d in zip(q, tested, strict=True))


def run_replay(
    seed: int, scenario: dict[str, Any], policy: dict[str, Any], horizon_s: float
) -> Outcome:
    """Feed one seeded replay to the three methods until all have decided."""
    watch = RolloutWatch("v1", "v2", **policy)
    signals = [s for s in WATCH_SIGNALS if s in watch.min_regression]
    tally = WindowTally(
        "v1",
        "v2",
        signals,
        watch.latency_quantile,
        watch.calibration_windows,
        watch.max_segments,
    )
    sequential, sequential_s, planned = "watching", None, None
    fixed: bool | None = None
    fixed_s = peek_s = None
    windows = 0
    for record in iter_windows(seed, **scenario):
        windows += 1
        if sequential == "watching":
            result = watch.update(record)
            sequential, planned = result.decision, result.planned_watch_s
            if sequential != "watching":
                sequential_s = result.elapsed_s
        tally.apply(record)
        if tally.start_ms is None or tally.end_ms is None:
            continue
        elapsed = (tally.end_ms - tally.start_ms) / 1000.0
        if fixed is None and (peek_s is None or elapsed >= horizon_s):
            flagged = fixed_flags(tally, watch.alpha, watch.min_samples)
            if peek_s is None and flagged and elapsed <= horizon_s:
                peek_s = elapsed
            if elapsed >= horizon_s:
                fixed, fixed_s = flagged, elapsed
        if sequential != "watching" and fixed is not None:
            break
    return Outcome(
        seed=seed,
        sequential=sequential,
        sequential_s=sequential_s,
        planned_watch_s=planned,
        fixed_flagged=bool(fixed),
        fixed_s=fixed_s,
        peek_flagged=peek_s is not None,
        peek_s=peek_s,
        windows=windows,
    )


def run_many(
    seeds: list[int], scenario: dict[str, Any], policy: dict[str, Any], horizon_s: float
) -> list[dict[str, Any]]:
    """:func:`run_replay` over ``seeds`` (one worker process's share), as JSON rows."""
    return [run_replay(s, scenario, policy, horizon_s).to_json() for s in seeds]


def planned_horizon(
    scenario: dict[str, Any], policy: dict[str, Any], seeds: list[int], window_s: float
) -> float:
    """The scenario's planned watch: the median plan of the watch on equal-challenger
    replays when it decides, rounded up to whole windows (the fixed test's horizon)."""
    plans = []
    for seed in seeds:
        watch = RolloutWatch("v1", "v2", **policy)
        for record in iter_windows(seed, **scenario):
            result = watch.update(record)
            if result.decision != "watching":
                break
        if result.planned_watch_s is not None:
            plans.append(result.planned_watch_s)
    if not plans:
        raise RuntimeError("no pilot replay was planned; lengthen duration_s")
    plans.sort()
    median = plans[len(plans) // 2]
    return float(-(-median // window_s) * window_s)
