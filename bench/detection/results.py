"""From the jobs' outcomes to the benchmark's numbers: rates, River's tuning, curves, verdicts.

**Configurations.** ``genmon`` (the replay at the default settings, or at a swept
``detectors.false_pages_per_week``), ``fixed`` (the old thresholds) and River's grid points.
River is *tuned* per signal and detector family (ADWIN; PageHinkley at each ``delta``): the
most sensitive grid point whose false pages on the stationary replays, on that signal, are
at most ``floor(budget x stationary model-weeks / signals)`` (genmon's budget,
``detectors.false_pages_per_week``, shared evenly over River's signals, as genmon shares
it over its own). With a few model-weeks of replay that allowance is 0: River gets the most
sensitive setting that never false-pages on them. Where no grid point is that quiet, the
least sensitive is taken and flagged.

**False pages** of a configuration: its pages before the change point of the change
streams plus every page of the stationary replays, after the warm-up, over the same model
time (the exposure). Tuning uses the stationary replays alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.detection.jobs import RIVER_SIGNALS
from bench.detection.river_side import SIGNALS as RIVER_SIGNAL_NAMES
from bench.detection.river_side import Param, grid
from bench.detection.scoring import SECONDS_PER_DAY, Outcome, Rate, Summary
from bench.detection.variants import BY_NAME, CLASSES

Result = Mapping[str, Any]


def outcome(result: Result, key: str) -> Outcome:
    o = result["outcomes"][key]
    return Outcome(
        o["false_pages"],
        o["detected_at"],
        o["delay_s"],
        o["delay_events"],
        o["via"],
        o.get("traffic_delay_s"),
    )


def changes(results: Iterable[Result]) -> list[Result]:
    return [r for r in results if r["kind"] == "change"]


def stationaries(results: Iterable[Result]) -> list[Result]:
    return [r for r in results if r["kind"] == "stationary"]


def summaries(results: Sequence[Result], key_of: Mapping[str, str] | str) -> dict[str, Summary]:
    """Per class, the configuration's detection summary; ``key_of``: the outcome key, or
    one per River signal (a tuned River configuration)."""
    out = {c.name: Summary() for c in CLASSES}
    for r in changes(results):
        key = key_of if isinstance(key_of, str) else key_of[_river_signal(r["cls"])]
        if key in r["outcomes"]:
            out[r["cls"]].add(outcome(r, key))
    return out


def _river_signal(cls: str) -> str:
    return RIVER_SIGNALS[BY_NAME[cls].kind][0]


def false_rate(
    results: Sequence[Result],
    key_of: Mapping[str, str] | str,
    *,
    stationary_only: bool = False,
    signals: Iterable[str] | None = None,
) -> Rate:
    """False pages of a configuration (``key_of`` as in :func:`summaries`; a mapping names
    the outcome key per signal and counts only those signals)."""
    chosen = set(signals) if signals is not None else None
    pages, exposure = 0, 0.0
    for r in results:
        if stationary_only and r["kind"] != "stationary":
            continue
        exposure += r["exposure_s"]
        if isinstance(key_of, str):
            found = r["outcomes"].get(key_of, {}).get("false_pages", {})
            pages += sum(n for s, n in found.items() if chosen is None or s in chosen)
        else:
            for signal, key in key_of.items():
                pages += r["outcomes"].get(key, {}).get("false_pages", {}).get(signal, 0)
    return Rate(pages, exposure)


# -- River's tuning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuned:
    """River's chosen grid point for one signal and detector family."""

    signal: str
    family: str
    param: Param
    false_pages: int  # on the stationary replays, on this signal
    allowed: int
    within: bool  # False: no grid point was quiet enough (the least sensitive is used)
    next_pages: int | None  # the next more sensitive point's false pages (None: none)


def families() -> list[str]:
    return sorted({p.family for p in grid()}, key=lambda f: (f != "adwin", f))


def tune(results: Sequence[Result], pages_per_week: float) -> dict[str, dict[str, Tuned]]:
    """``{family: {signal: Tuned}}`` on the stationary replays of ``results``."""
    quiet = stationaries(results)
    weeks = sum(r["exposure_s"] for r in quiet) / SECONDS_PER_DAY / 7.0
    allowed = math.floor(pages_per_week * weeks / len(RIVER_SIGNAL_NAMES) + 1e-9)
    out: dict[str, dict[str, Tuned]] = {}
    for family in families():
        params = sorted((p for p in grid() if p.family == family), key=lambda p: p.rank)
        out[family] = {}
        for signal in RIVER_SIGNAL_NAMES:
            counts = [false_rate(quiet, {signal: p.key}).pages for p in params]
            ok = [i for i, n in enumerate(counts) if n <= allowed]
            i = ok[0] if ok else len(params) - 1
            out[family][signal] = Tuned(
                signal,
                family,
                params[i],
                counts[i],
                allowed,
                bool(ok),
                counts[i - 1] if i > 0 else None,
            )
    return out


def tuned_keys(tuned: Mapping[str, Tuned]) -> dict[str, str]:
    return {signal: t.param.key for signal, t in tuned.items()}


# -- curves ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurvePoint:
    """One setting of one configuration: its false-page rate and per-class detection."""

    config: str  # "genmon", "adwin", "ph:delta=0.1", ...
    setting: str  # "1/week", "delta=1e-06", ...
    rate: Rate
    classes: dict[str, Summary]


def genmon_curve(main: Sequence[Result], sweep: Sequence[Result]) -> list[CurvePoint]:
    """genmon at each ``false_pages_per_week``: the swept settings and the default."""
    points = []
    settings = sorted({r["pages_per_week"] for r in sweep})
    for setting in settings:
        runs = [r for r in sweep if r["pages_per_week"] == setting]
        points.append(
            CurvePoint(
                "genmon", f"{setting:g}/week", false_rate(runs, "genmon"), summaries(runs, "genmon")
            )
        )
    points.append(
        CurvePoint("genmon", "default", false_rate(main, "genmon"), summaries(main, "genmon"))
    )
    return sorted(points, key=lambda p: p.rate.per_week)


def river_curve(main: Sequence[Result], family: str) -> list[CurvePoint]:
    """One River family at each grid point (the same parameter on every signal)."""
    points = []
    for p in sorted((p for p in grid() if p.family == family), key=lambda p: p.rank):
        setting = p.key.split(":", 1)[1] if family == "adwin" else f"threshold={p.threshold:g}"
        points.append(CurvePoint(family, setting, false_rate(main, p.key), summaries(main, p.key)))
    return points


# -- acceptance ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    criterion: str
    passed: bool
    measured: str
    info: bool = False  # context beside the acceptance, not part of it


def acceptance(
    genmon: Mapping[str, Summary],
    adwin: Mapping[str, Summary],
    within_15s_of_traffic: tuple[int, int],
    within_15s: tuple[int, int],
) -> list[Verdict]:
    """The issue's acceptance, measured: per class >= 95 % detected and a median delay at
    most 2x ADWIN's (tuned to the budget); >= 95 % of the abrupt error bursts within 15 s
    of traffic (from the first request after the change). The clock from the change point
    is shown beside it (``info``): on the bursty traces no request arrives for up to two
    minutes after some change points, which no detector can see through."""
    out = []
    for c in CLASSES:
        g = genmon[c.name]
        rate = g.rate or 0.0
        out.append(
            Verdict(
                f"{c.name}: >= 95 % of variants detected",
                rate >= 0.95,
                f"{g.detected}/{g.variants} ({100 * rate:.0f} %)",
            )
        )
    for c in CLASSES:
        gm, am = genmon[c.name].quantile_s(0.5), adwin[c.name].quantile_s(0.5)
        passed = math.isfinite(gm) and (not math.isfinite(am) or gm <= 2.0 * am)
        out.append(
            Verdict(
                f"{c.name}: median delay <= 2x River ADWIN's",
                passed,
                f"genmon {fmt_s(gm)}, ADWIN {fmt_s(am)} (ratio {ratio(gm, am)})",
            )
        )
    n_fast, n = within_15s_of_traffic
    out.append(
        Verdict(
            "error_burst: >= 95 % detected within 15 s of traffic (from its first request)",
            n > 0 and n_fast >= 0.95 * n,
            f"{n_fast}/{n} within 15 s",
        )
    )
    n_fast, n = within_15s
    out.append(
        Verdict(
            "error_burst: detected within 15 s of the change point, lulls included",
            n > 0 and n_fast >= 0.95 * n,
            f"{n_fast}/{n} within 15 s",
            info=True,
        )
    )
    return out


def within(
    results: Sequence[Result], cls: str, key: str, seconds: float, delay: str = "delay_s"
) -> tuple[int, int]:
    """(variants of ``cls`` detected within ``seconds`` of ``delay``, variants)."""
    runs = [r for r in changes(results) if r["cls"] == cls]
    fast = sum(1 for r in runs if (d := r["outcomes"][key].get(delay)) is not None and d <= seconds)
    return fast, len(runs)


def fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "missed"
    return f"{x:,.0f} s" if x >= 10 else f"{x:.1f} s"


def ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return "-"
    return f"{a / b:.2f}"
