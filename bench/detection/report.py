"""The benchmark's tables (markdown) and delay-versus-false-alarm charts (ASCII)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from bench.detection import results as res
from bench.detection.jobs import FIXED_SIGNALS, RIVER_SIGNALS
from bench.detection.results import CurvePoint, Result, Tuned, fmt_s
from bench.detection.scoring import Rate, Summary
from bench.detection.variants import BY_NAME, CLASSES

LABELS = {
    "adwin": "River ADWIN",
    "ph:delta=0.1": "River PageHinkley (delta 0.1 SD)",
    "ph:delta=0.5": "River PageHinkley (delta 0.5 SD)",
}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %" if x < 0.1 else f"{100 * x:.0f} %"


def events(x: float) -> str:
    if math.isnan(x):
        return "-"
    return "missed" if math.isinf(x) else f"{x:,.0f}"


def rate_cells(rate: Rate) -> list[str]:
    return [
        str(rate.pages),
        f"{rate.days:.2f}",
        f"{rate.per_day:.3g}",
        f"{rate.per_week:.3g}",
        f"{rate.upper_per_week:.3g}",
    ]


# -- streams ---------------------------------------------------------------------------------------


def streams_table(main: Sequence[Result]) -> str:
    rows = []
    for c in CLASSES:
        runs = [r for r in res.changes(main) if r["cls"] == c.name]
        if not runs:
            continue
        stated = sorted({r["stated"] for r in runs})
        ats = [r["at_s"] / 60 for r in runs]
        traces = sorted({r["trace"] for r in runs})
        rows.append(
            [
                c.name,
                len(runs),
                ", ".join(traces),
                "; ".join(stated),
                _measured(c.name, runs),
                f"{min(ats):.0f}-{max(ats):.0f} min",
                f"{sum(r['hours'] for r in runs):.1f}",
                f"{sum(r['inferences'] for r in runs):,}",
            ]
        )
    for r in res.stationaries(main):
        rows.append(
            [
                "stationary",
                1,
                r["id"].split("-", 1)[1].rsplit("-", 1)[0],
                "none",
                "-",
                "-",
                f"{r['hours']:.0f}",
                f"{r['inferences']:,}",
            ]
        )
    header = [
        "class",
        "streams",
        "traces",
        "stated magnitudes",
        "measured (median of variants)",
        "change point",
        "model-hours",
        "requests",
    ]
    return table(header, rows)


def _measured(cls: str, runs: Sequence[Result]) -> str:
    def med(name: str) -> float:
        values = [r["magnitude"][name] for r in runs if r["magnitude"].get(name) is not None]
        return statistics.median(values) if values else math.nan

    kind = BY_NAME[cls].kind
    if kind == "error_burst":
        return f"errors {pct(med('error_rate_before'))} -> {pct(med('error_rate_after'))}"
    if kind == "refusal_jump":
        return f"refusals {pct(med('refusal_rate_before'))} -> {pct(med('refusal_rate_after'))}"
    if kind == "latency_regime":
        return (
            f"TTFT p50 {med('ttft_p50_ms_before'):,.0f} -> {med('ttft_p50_ms_after'):,.0f} ms,"
            f" p95 {med('ttft_p95_ms_before'):,.0f} -> {med('ttft_p95_ms_after'):,.0f} ms"
        )
    shares = [r["affected_share"] for r in runs if r["affected_share"] is not None]
    return f"{pct(statistics.median(shares))} of prompts replaced" if shares else "-"


# -- detection and false pages ------------------------------------------------------------------


def configurations(
    main: Sequence[Result], tuned: Mapping[str, Mapping[str, Tuned]]
) -> list[tuple[str, Any]]:
    """(label, outcome key or per-signal keys) of every compared configuration."""
    out: list[tuple[str, Any]] = [
        ("genmon defaults", "genmon"),
        ("fixed thresholds (old)", "fixed"),
    ]
    for family, by_signal in tuned.items():
        out.append((f"{LABELS.get(family, family)}, tuned", res.tuned_keys(by_signal)))
    return out


def detection_table(main: Sequence[Result], configs: Sequence[tuple[str, Any]]) -> str:
    rows = []
    for c in CLASSES:
        for label, key in configs:
            s = res.summaries(main, key)[c.name]
            if not s.variants:
                continue
            if key == "fixed" and not FIXED_SIGNALS[c.kind]:
                rows.append([c.name, label, "no detector", "-", "-", "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    c.name,
                    label,
                    f"{s.detected}/{s.variants}",
                    fmt_s(s.quantile_s(0.5)),
                    fmt_s(s.quantile_s(0.9)),
                    fmt_s(s.quantile_traffic_s(0.5)),
                    fmt_s(s.quantile_traffic_s(0.9)),
                    events(s.quantile_events(0.5)),
                    events(s.quantile_events(0.9)),
                ]
            )
    header = [
        "class",
        "configuration",
        "detected",
        "median delay",
        "p90 delay",
        "median of traffic",
        "p90 of traffic",
        "median events",
        "p90 events",
    ]
    return table(header, rows)


def false_table(main: Sequence[Result], configs: Sequence[tuple[str, Any]]) -> str:
    rows = []
    for label, key in configs:
        for scope, only in (("all", False), ("stationary", True)):
            rate = res.false_rate(main, key, stationary_only=only)
            rows.append([label, scope, *rate_cells(rate), _by_signal(main, key, only)])
    header = [
        "configuration",
        "streams",
        "false pages",
        "model-days",
        "per model-day",
        "per model-week",
        "95 % upper / week",
        "by signal",
    ]
    return table(header, rows)


def _by_signal(main: Sequence[Result], key: Any, stationary_only: bool) -> str:
    counts: dict[str, int] = defaultdict(int)
    for r in main:
        if stationary_only and r["kind"] != "stationary":
            continue
        keys = {key: None} if isinstance(key, str) else {k: s for s, k in key.items()}
        for k, only in keys.items():
            for signal, n in r["outcomes"].get(k, {}).get("false_pages", {}).items():
                if only is None or signal == only:
                    counts[signal] += n
    return ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "-"


def tuning_table(tuned: Mapping[str, Mapping[str, Tuned]]) -> str:
    rows = []
    for family, by_signal in tuned.items():
        for signal, t in by_signal.items():
            rows.append(
                [
                    LABELS.get(family, family),
                    signal,
                    t.param.key.split(":", 1)[1]
                    if family == "adwin"
                    else f"threshold={t.param.threshold:g}",
                    t.false_pages,
                    t.allowed,
                    "-" if t.next_pages is None else t.next_pages,
                    "yes" if t.within else "NO (least sensitive grid point)",
                ]
            )
    header = [
        "detector",
        "signal",
        "chosen",
        "stationary false pages",
        "allowed",
        "next more sensitive point",
        "within budget",
    ]
    return table(header, rows)


def magnitude_table(main: Sequence[Result], adwin: Mapping[str, str]) -> str:
    rows = []
    for c in CLASSES:
        runs = [r for r in res.changes(main) if r["cls"] == c.name]
        for stated in sorted({r["stated"] for r in runs}):
            group = [r for r in runs if r["stated"] == stated]
            g, a = Summary(), Summary()
            for r in group:
                g.add(res.outcome(r, "genmon"))
                a.add(res.outcome(r, adwin[RIVER_SIGNALS[c.kind][0]]))
            rows.append(
                [
                    c.name,
                    stated,
                    f"{g.detected}/{g.variants}",
                    fmt_s(g.quantile_s(0.5)),
                    f"{a.detected}/{a.variants}",
                    fmt_s(a.quantile_s(0.5)),
                ]
            )
    header = [
        "class",
        "stated magnitude",
        "genmon detected",
        "genmon median",
        "ADWIN detected",
        "ADWIN median",
    ]
    return table(header, rows)


# -- curves --------------------------------------------------------------------------------------


def curve_table(points: Sequence[CurvePoint]) -> str:
    rows = []
    for p in points:
        cells = [
            LABELS.get(p.config, p.config),
            p.setting,
            f"{p.rate.days:.1f}",
            f"{p.rate.per_week:.3g}",
        ]
        for c in CLASSES:
            s = p.classes[c.name]
            cells.append(f"{fmt_s(s.quantile_s(0.5))} ({s.detected}/{s.variants})")
        rows.append(cells)
    header = [
        "configuration",
        "setting",
        "model-days",
        "false pages / week",
        *[f"{c.name} median (detected)" for c in CLASSES],
    ]
    return table(header, rows)


SYMBOLS = {"genmon": "G", "adwin": "A", "ph:delta=0.1": "p", "ph:delta=0.5": "P"}


def ascii_chart(points: Sequence[CurvePoint], cls: str, width: int = 56, height: int = 12) -> str:
    """Median delay (log) against false pages per model-week (log; 0 on the left edge)."""
    xy = []
    for p in points:
        d = p.classes[cls].quantile_s(0.5)
        if math.isfinite(d) and math.isfinite(p.rate.per_week):
            xy.append((p.rate.per_week, max(d, 0.1), SYMBOLS.get(p.config, "?")))
    if not xy:
        return f"{cls}: nothing detected"
    lo_x, hi_x = -2.0, max(3.0, math.log10(max(x for x, _, _ in xy) + 1e-9))
    ys = [math.log10(y) for _, y, _ in xy]
    lo_y, hi_y = min([*ys, 0.0]), max([*ys, 1.0])
    grid = [[" "] * width for _ in range(height)]
    for x, y, sym in xy:
        lx = math.log10(x) if x > 0 else lo_x
        col = round((max(lx, lo_x) - lo_x) / (hi_x - lo_x) * (width - 1))
        line = height - 1 - round((math.log10(y) - lo_y) / ((hi_y - lo_y) or 1) * (height - 1))
        cell = grid[line][col]
        grid[line][col] = sym if cell in (" ", sym) else "*"
    lines = [f"{cls}: median delay (s, log) vs false pages per model-week (log; 0 at left)"]
    for i, row in enumerate(grid):
        label = 10 ** (hi_y - i * (hi_y - lo_y) / max(height - 1, 1))
        lines.append(f"{label:>8.3g} |" + "".join(row))
    lines.append(" " * 9 + "+" + "-" * width)
    ticks = " " * 10 + "0"
    for k in range(-1, int(hi_x) + 1):
        col = round((k - lo_x) / (hi_x - lo_x) * (width - 1))
        ticks = ticks.ljust(10 + col) + f"{10.0**k:g}"
    lines.append(ticks)
    lines.append(" " * 10 + "G genmon, A ADWIN, p PageHinkley delta 0.1, P delta 0.5, * several")
    return "\n".join(lines)


def verdict_lines(verdicts: Sequence[res.Verdict]) -> str:
    def mark(v: res.Verdict) -> str:
        return "INFO" if v.info else "PASS" if v.passed else "FAIL"

    return "\n".join(f"{mark(v)}  {v.criterion}: {v.measured}" for v in verdicts)


def timing_table(results: Sequence[Result]) -> str:
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        setting = "default" if r["pages_per_week"] is None else f"{r['pages_per_week']:g}/week"
        name = r["cls"] if r["kind"] == "change" else "stationary"
        groups[f"{name} @ {setting}"].append(r)
    rows = []
    for name, runs in sorted(groups.items()):
        ev = sum(r["events"] for r in runs)
        replay = sum(r["replay_s"] for r in runs)
        compare = sum(r.get("compare_s", 0.0) for r in runs)
        rows.append(
            [
                name,
                len(runs),
                f"{ev:,}",
                f"{replay:,.0f}",
                f"{ev / replay:,.0f}" if replay else "-",
                f"{compare:,.0f}",
            ]
        )
    header = ["streams", "runs", "events", "genmon replay (s)", "events/s", "fixed + River (s)"]
    return table(header, rows)
