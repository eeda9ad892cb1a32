"""The false-alarm budget: how often a healthy model may page, stated in time and shared out.

One setting, ``detectors.false_pages_per_week`` (default 1), says how many pages a model
with nothing wrong may cost on-call in a week. Each detector of the model's plan
(:mod:`~genmon.detectors.calibration.plan`: genmon's ``defaults.yaml`` unless
``detectors.config_file`` names another) has a share of it, so its own allowance is a
time between false alarms::

    ARL (windows) = windows per week / (false_pages_per_week * share)

and every test is calibrated to that, in windows of traffic, never in samples:

- the sequential rate tests (:class:`~genmon.detectors.RateCUSUM`: errors, refusals,
  empty and truncated answers, negative feedback, and the share of requests above the
  baseline's latency quantile) alarm when their CUSUM passes ``log(2 x ARL x series)``,
  or when one window alone has a p-value under ``1 / (2 x ARL x series)``: a CUSUM's
  in-control run length is at least ``exp(threshold)`` windows (Wald), so each of the
  ``series`` it runs at once (versions, segments) may spend ``1/series`` of the share
  (Bonferroni), half on each part, however often it looks;
- the embedding drift test (:class:`~genmon.detectors.EmbeddingShiftDrift`) looks at
  each sub-sample of sampled texts, at most once per ``embedding.flush_interval_s``, with
  false-alarm probability ``1 / (ARL in looks x series)`` per look (:meth:`Budget.look_alpha`);
- every other detector of the plan inside the budget gets the parameter that sets its
  false-alarm rate from its share (:class:`~genmon.detectors.calibration.catalog.Calibration`:
  a per-window alpha ``1 / (ARL x series)``, a z threshold, a CUSUM interval).

A test that fires opens an incident: one page. Its share is an upper bound in every case
(the Wald bound is conservative), so a healthy model pages at most
``false_pages_per_week`` times a week in expectation, however many versions, segments and
windows it has. Entries with share 0 are outside the budget (their thresholds are the
user's). ``genmon detectors list`` prints the table in users' units.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from genmon.detectors import REGISTRY
from genmon.detectors.calibration import signals as sig
from genmon.detectors.calibration.catalog import (
    EMBEDDING_SHIFT,
    RATE_CUSUM,
    SAMPLE,
    SIGNALS,
)
from genmon.detectors.calibration.plan import (
    SECONDS_PER_WEEK,
    DetectorPlan,
    PlanEntry,
    construction_params,
    load_plan,
)
from genmon.schemas.events import FindingKind
from genmon.settings import Settings

__all__ = ["ANY_MODEL", "SECONDS_PER_WEEK", "Budget"]

#: The model id a question about "any model" asks the plan for (its ``*`` entries).
ANY_MODEL = "*"


class Budget:
    """The budget of one configuration and plan, in windows and in users' units."""

    def __init__(self, settings: Settings, plan: DetectorPlan | None = None) -> None:
        self.settings = settings
        self.plan = plan if plan is not None else load_plan(settings)
        self.pages_per_week = settings.detectors.false_pages_per_week
        self.window_s = settings.windows.tumbling_s
        self.windows_per_week = SECONDS_PER_WEEK / self.window_s

    # -- the built-in tests, by signal ----------------------------------------------------
    def entry(self, signal: str, model_id: str = ANY_MODEL) -> PlanEntry | None:
        """The plan's built-in test of ``signal`` for the model (rate CUSUM, or embedding
        shift for an embedding signal), if the plan runs one."""
        detector = EMBEDDING_SHIFT if signal.startswith("embedding_") else RATE_CUSUM
        return self.plan.entry(model_id, signal, detector)

    def share(self, signal: str, model_id: str = ANY_MODEL) -> float:
        """The built-in test's share of ``false_pages_per_week`` (0: none, or outside)."""
        entry = self.entry(signal, model_id)
        return entry.share if entry is not None else 0.0

    def pages_per_week_of(self, signal: str, model_id: str = ANY_MODEL) -> float:
        """False pages per model-week the signal's built-in test may cost."""
        return self.pages_per_week * self.share(signal, model_id)

    def arl_windows(self, signal: str, model_id: str = ANY_MODEL) -> float:
        """Windows between false alarms the signal's test is allowed, at least (inf when
        it is outside the budget)."""
        pages = self.pages_per_week_of(signal, model_id)
        return self.windows_per_week / pages if pages > 0 else math.inf

    def rate_test(self, signal: str, series: int, model_id: str = ANY_MODEL) -> tuple[float, float]:
        """``(CUSUM threshold, per-window alpha)`` of a rate test that is one of ``series``
        sharing the signal's allowance: each half of it (their expected false alarms per
        window add up to at most ``1 / (ARL x series)``). Outside the budget: the entry's
        own ``threshold`` and ``window_alpha``."""
        entry = self.entry(signal, model_id)
        if entry is not None and not entry.calibrated:
            return float(entry.params["threshold"]), float(entry.params.get("window_alpha", 0.0))
        windows = 2.0 * self.arl_windows(signal, model_id) * max(series, 1)
        return math.log(windows), 1.0 / windows

    def window_alpha(self, signal: str, series: int, model_id: str = ANY_MODEL) -> float:
        """False-alarm probability per window of a test that is one of ``series``."""
        return 1.0 / (self.arl_windows(signal, model_id) * max(series, 1))

    def look_alpha(
        self, signal: str, series: int, look_s: float, model_id: str = ANY_MODEL
    ) -> float:
        """False-alarm probability per look of a test that looks at most once every
        ``look_s`` seconds of event time and is one of ``series``: its allowance in looks
        is ``week / look_s / (pages per week x share)``, so the budget holds in time
        whatever the interval (expected alarms add up over looks, however correlated).
        Outside the budget: the entry's own ``alpha``."""
        entry = self.entry(signal, model_id)
        if entry is not None and not entry.calibrated:
            default = inspect.signature(REGISTRY[EMBEDDING_SHIFT].__init__).parameters["alpha"]
            return float(entry.params.get("alpha", default.default))
        pages = self.pages_per_week_of(signal, model_id)
        if pages <= 0:
            return 0.0
        arl_looks = SECONDS_PER_WEEK / look_s / pages
        return 1.0 / (arl_looks * max(series, 1))

    # -- any entry ------------------------------------------------------------------------
    def judgement_s(self, entry: PlanEntry) -> float:
        """Event time between two judgements of an entry's series: a window, or a look at
        a sub-sample of sampled texts."""
        if SIGNALS[entry.signal].source == SAMPLE:
            return self.settings.embedding.flush_interval_s
        return self.window_s

    def entry_arl(self, entry: PlanEntry) -> float:
        """Judgements between false alarms an entry's share allows (inf outside)."""
        if entry.share <= 0:
            return math.inf
        per_week = SECONDS_PER_WEEK / self.judgement_s(entry)
        return per_week / (self.pages_per_week * entry.share)

    def params(self, entry: PlanEntry, series: int = 1) -> dict[str, Any]:
        """An entry's constructor arguments, calibrated for ``series`` series judged at
        once (what :func:`~genmon.detectors.calibration.plan.construction_params` gives)."""
        return construction_params(entry, self.entry_arl(entry), series)

    def table(self, model_id: str = ANY_MODEL) -> list[dict[str, Any]]:
        """One row per entry of the model's plan, in users' units (``genmon detectors
        list``): calibrated parameters as for one series."""
        rows: list[dict[str, Any]] = []
        for entry in self.plan.for_model(model_id):
            pages = self.pages_per_week * entry.share
            arl = self.entry_arl(entry)
            rows.append(
                {
                    "signal": entry.signal,
                    "detector": entry.detector,
                    "kind": finding_kind(entry),
                    "params": _shown(self.params(entry)),
                    "severity": entry.severity.value if entry.severity else "auto",
                    "share": entry.share,
                    "false_pages_per_model_week": pages,
                    "hours_between_false_pages": (
                        arl * self.judgement_s(entry) / 3600.0 if pages > 0 else None
                    ),
                    "inside_budget": entry.calibrated,
                    "source": entry.source,
                    "what": SIGNALS[entry.signal].what,
                }
            )
        return rows


def finding_kind(entry: PlanEntry) -> str:
    """The kind of an entry's findings: a built-in rate test's is its signal's (errors and
    latency are anomalies, refusals and answers quality; a segment's feedback is bias),
    any other detector's its own."""
    if entry.detector == RATE_CUSUM:
        kinds = {s.signal: s.kind for s in (*sig.RATE_SIGNALS, *sig.LATENCY_SIGNALS, sig.FEEDBACK)}
        return kinds.get(entry.signal, FindingKind.QUALITY).value
    return REGISTRY[entry.detector].kind.value


def _shown(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters for people: floats to 4 significant digits."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in params.items()}


def plan_markdown(budget: Budget, model_id: str = ANY_MODEL) -> str:
    """The README's table of what a plan runs for a model (genmon's defaults there)."""
    lines = [
        "| signal | detector | kind | share | false pages / model-week | one every | params |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in budget.table(model_id):
        hours = row["hours_between_false_pages"]
        every = "outside the budget" if hours is None else f"{hours / 24 / 7:.3g} weeks"
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(
            f"| `{row['signal']}` | `{row['detector']}` | {row['kind']} | {row['share']:.0%} |"
            f" {row['false_pages_per_model_week']:.3g} | {every} | {params} |"
        )
    return "\n".join(lines)
