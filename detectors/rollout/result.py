"""What a rollout watch reports: each comparison, the decision and its one-line title."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

WATCH_SIGNALS = ("negative_feedback", "refusal_rate", "error_rate", "slow_rate")
#: Absolute rate increases the plan must catch with ``power`` (the policy's defaults).
DEFAULT_MIN_REGRESSION = {
    "negative_feedback": 0.05,
    "refusal_rate": 0.03,
    "error_rate": 0.02,
    "slow_rate": 0.05,
}
ALL = "*"
Decision = Literal["watching", "regressed", "clean", "inconclusive"]


@dataclass(frozen=True, slots=True)
class Comparison:
    """One signal on one segment: the counts of both versions on the same windows.

    ``p_value`` (always valid) and ``q_value`` (BH over the tested family) are None until
    both versions have ``min_samples`` observations; ``needed_n`` is the challenger
    observations the plan asks of a ``required`` comparison.
    """

    signal: str
    segment: str
    champion_events: int
    champion_n: int
    challenger_events: int
    challenger_n: int
    difference: float | None
    p_value: float | None
    q_value: float | None
    flagged: bool
    needed_n: int | None
    required: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class WatchResult:
    """The watch after a window: the decision, its evidence and a one-line title."""

    decision: Decision
    elapsed_s: float
    planned_watch_s: float | None
    comparisons: tuple[Comparison, ...]
    worst: Comparison | None
    title: str
    #: Start of the first window with challenger traffic (epoch ms), None before it.
    watch_from_ms: int | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "elapsed_s": self.elapsed_s,
            "planned_watch_s": self.planned_watch_s,
            "comparisons": [c.to_json() for c in self.comparisons],
            "worst": self.worst.to_json() if self.worst is not None else None,
            "title": self.title,
            "watch_from_ms": self.watch_from_ms,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WatchResult:
        worst = data.get("worst")
        return cls(
            decision=data["decision"],
            elapsed_s=float(data["elapsed_s"]),
            planned_watch_s=data.get("planned_watch_s"),
            comparisons=tuple(Comparison.from_json(c) for c in data.get("comparisons", ())),
            worst=Comparison.from_json(worst) if worst else None,
            title=str(data.get("title", "")),
            watch_from_ms=data.get("watch_from_ms"),
            notes=tuple(data.get("notes", ())),
        )


def _duration(seconds: float) -> str:
    """``"50 s"``, ``"38 min"``, ``"2.5 h"``, ``"3 days"``: the unit a person reads it in."""
    if seconds < 120:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def watch_minutes_text(planned_watch_s: float | None) -> str:
    """What the rollout's announcement says about its length.

    >>> watch_minutes_text(2400.0)
    'watch about 40 minutes at current traffic'
    >>> watch_minutes_text(None)
    'watch length not known yet: waiting for traffic on every watched signal'
    """
    if planned_watch_s is None:
        return "watch length not known yet: waiting for traffic on every watched signal"
    if planned_watch_s < 90 * 60:
        minutes = max(1, round(planned_watch_s / 60))
        return f"watch about {minutes} minute{'s' if minutes != 1 else ''} at current traffic"
    if planned_watch_s < 48 * 3600:
        return f"watch about {planned_watch_s / 3600:.1f} hours at current traffic"
    return f"watch about {planned_watch_s / 86400:.1f} days at current traffic"


def _describe(c: Comparison) -> str:
    where = "overall" if c.segment == ALL else f"on {c.segment}"
    rate_c = c.challenger_events / c.challenger_n if c.challenger_n else 0.0
    rate_b = c.champion_events / c.champion_n if c.champion_n else 0.0
    q = "" if c.q_value is None else f" (q={c.q_value:.2g})"
    return f"{c.signal.replace('_', ' ')} {where}: {rate_c:.1%} vs {rate_b:.1%}{q}"


def make_title(
    challenger: str,
    champion: str,
    decision: Decision,
    elapsed_s: float,
    planned_s: float | None,
    worst: Comparison | None,
    notes: list[str],
) -> str:
    """One line for the incident, the CLI and the rollout row.

    >>> make_title("v2", "v1", "clean", 2280.0, 2280.0, None, [])
    'Challenger v2 watched clean for 38 min: no signal worse than v1'
    """
    so_far = _duration(elapsed_s)
    of_plan = (
        f"{so_far} of a planned {_duration(planned_s)} watch"
        if planned_s is not None
        else f"{so_far} (watch length not planned yet)"
    )
    if decision == "regressed" and worst is not None:
        return f"Challenger {challenger} raised {_describe(worst)}, after {of_plan}"
    if decision == "clean":
        return (
            f"Challenger {challenger} watched clean for {so_far}: no signal worse than {champion}"
        )
    if decision == "inconclusive":
        why = "; ".join(notes) or "the planned watch was not reached"
        return f"Challenger {challenger} inconclusive after {so_far}: {why}"
    closest = f" (closest: {_describe(worst)})" if worst is not None else ""
    return f"Challenger {challenger} on watch, {of_plan}: nothing worse yet{closest}"
