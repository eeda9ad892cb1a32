"""Safe rollout: false rollbacks and detection power of the watch, over seeded replays.

    .venv/bin/python -m bench.rollout                  # 1000 replays per row
    .venv/bin/python -m bench.rollout --replays 200    # a quicker run
    .venv/bin/python -m bench.rollout --json           # the summary as JSON

Scenario (the issue's acceptance): 200 requests/s, a 10 % challenger share, 10 s
tumbling windows, a segment ``region=eu`` of 25 % of the traffic, negative feedback 10 %
for both versions everywhere except the challenger on ``region=eu`` (16 % in the
regression replays, 10 % in the equal ones), feedback on every answered request (and on
half of them in the second scenario) arriving 30 s late; errors 1 %, refusals 2 %, the
same latency for both. The watch runs with the policy's defaults. Each replay is judged
by the sequential watch, by a fixed-horizon test at the scenario's planned watch, and by
that test looked at after every window (:mod:`bench.rollout.replays`). A third set of
replays puts the challenger at exactly the policy's ``min_regression`` (15 % on the
segment), where the plan promises 80 % power.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from bench.rollout.replays import planned_horizon, run_many
from genmon.detectors._stats import wilson_interval
from genmon.detectors.rollout import DEFAULT_MIN_REGRESSION

SCENARIO: dict[str, Any] = {
    "rps": 200.0,
    "share": 0.10,
    "segment_share": 0.25,
    "base_rate": 0.10,
    "feedback_delay_s": 30.0,
    "window_s": 10.0,
}
REGRESSED_RATE = 0.16
#: The policy's smallest regression of interest on the segment: the plan's 80 % power.
MIN_REGRESSION_RATE = 0.10 + DEFAULT_MIN_REGRESSION["negative_feedback"]
FEEDBACK_RATES = (1.0, 0.5)
POLICY: dict[str, Any] = {"share": 0.10, "alpha": 0.05, "power": 0.80}
PILOT_SEEDS = list(range(1_000_000, 1_000_100))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n")[0])
    p.add_argument("--replays", type=int, default=1000, help="replays per row (default 1000)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _run(
    seeds: list[int], scenario: dict[str, Any], horizon: float, workers: int
) -> list[dict[str, Any]]:
    if workers <= 1:
        return run_many(seeds, scenario, POLICY, horizon)
    chunks = [seeds[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        parts = pool.map(
            run_many, chunks, [scenario] * workers, [POLICY] * workers, [horizon] * workers
        )
        return sorted((row for part in parts for row in part), key=lambda r: r["seed"])


def _rate(hits: int, n: int) -> dict[str, Any]:
    ci = wilson_interval(hits, n)
    return {"hits": hits, "n": n, "rate": hits / n if n else None, "ci95": [ci.low, ci.high]}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(
    equal: list[dict[str, Any]], regressed: list[dict[str, Any]], at_min: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per method: false rollbacks on ``equal``, power and median detection on ``regressed``,
    power on ``at_min`` (the challenger worse by exactly the policy's min_regression)."""
    plans = sorted(r["planned_watch_s"] for r in equal if r["planned_watch_s"] is not None)
    return {
        "planned_watch_s": {
            "median": _median(plans),
            "p10": plans[len(plans) // 10] if plans else None,
            "p90": plans[(9 * len(plans)) // 10] if plans else None,
        },
        "undecided_equal": sum(r["sequential"] == "watching" for r in equal),
        "sequential": {
            "false_rollbacks": _rate(
                sum(r["sequential"] == "regressed" for r in equal), len(equal)
            ),
            "power": _rate(sum(r["sequential"] == "regressed" for r in regressed), len(regressed)),
            "power_at_min": _rate(sum(r["sequential"] == "regressed" for r in at_min), len(at_min)),
            "median_detection_s": _median(
                [r["sequential_s"] for r in regressed if r["sequential"] == "regressed"]
            ),
            "median_clean_s": _median(
                [r["sequential_s"] for r in equal if r["sequential"] == "clean"]
            ),
        },
        "fixed": {
            "false_rollbacks": _rate(sum(r["fixed_flagged"] for r in equal), len(equal)),
            "power": _rate(sum(r["fixed_flagged"] for r in regressed), len(regressed)),
            "power_at_min": _rate(sum(r["fixed_flagged"] for r in at_min), len(at_min)),
            "median_detection_s": _median([r["fixed_s"] for r in regressed if r["fixed_flagged"]]),
        },
        "peeking": {
            "false_rollbacks": _rate(sum(r["peek_flagged"] for r in equal), len(equal)),
            "power": _rate(sum(r["peek_flagged"] for r in regressed), len(regressed)),
            "power_at_min": _rate(sum(r["peek_flagged"] for r in at_min), len(at_min)),
            "median_detection_s": _median([r["peek_s"] for r in regressed if r["peek_flagged"]]),
        },
    }


def run(replays: int, workers: int) -> dict[str, Any]:
    out: dict[str, Any] = {"scenarios": []}
    began = time.perf_counter()
    for feedback_rate in FEEDBACK_RATES:
        base = {**SCENARIO, "feedback_rate": feedback_rate}
        pilot = {**base, "challenger_rate_in_segment": base["base_rate"], "duration_s": 7200.0}
        horizon = planned_horizon(pilot, POLICY, PILOT_SEEDS, base["window_s"])
        duration = 2.0 * horizon + 120.0
        seeds = list(range(replays))
        rows = {}
        variants = (
            ("equal", base["base_rate"]),
            ("regressed", REGRESSED_RATE),
            ("at_min", MIN_REGRESSION_RATE),
        )
        for name, rate in variants:
            scenario = {**base, "challenger_rate_in_segment": rate, "duration_s": duration}
            rows[name] = _run(seeds, scenario, horizon, workers)
            print(
                f"[{time.perf_counter() - began:5.0f} s] feedback {feedback_rate:.0%}: {name} done",
                file=sys.stderr,
                flush=True,
            )
        out["scenarios"].append(
            {
                "feedback_rate": feedback_rate,
                "scenario": {**base, "regressed_rate_in_segment": REGRESSED_RATE},
                "horizon_s": horizon,
                "replays": replays,
                **summarise(rows["equal"], rows["regressed"], rows["at_min"]),
            }
        )
    out["policy"] = {
        **POLICY,
        "min_regression": DEFAULT_MIN_REGRESSION,
        "min_segment_share": 0.25,
        "min_samples": 30,
        "latency_quantile": 0.95,
        "calibration_windows": 3,
    }
    out["wall_s"] = time.perf_counter() - began
    out["machine"] = f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    out["workers"] = workers
    out["date"] = time.strftime("%Y-%m-%d")
    return out


def _pct(r: dict[str, Any]) -> str:
    low, high = r["ci95"]
    return f"{r['rate']:.1%} ({r['hits']}/{r['n']}; {low:.1%}-{high:.1%})"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def render(summary: dict[str, Any]) -> str:
    lines = []
    for s in summary["scenarios"]:
        plan = s["planned_watch_s"]
        lines += [
            f"**Feedback on {s['feedback_rate']:.0%} of answered requests, 30 s late** -"
            f" planned watch {_minutes(plan['median'])} (median; 10-90 %:"
            f" {_minutes(plan['p10'])}-{_minutes(plan['p90'])}), fixed horizon"
            f" {_minutes(s['horizon_s'])}, {s['replays']} replays per column"
            f" ({s['undecided_equal']} equal replays still watching at the end).",
            "",
            "| test | false rollbacks (equal challenger) | power (16 % on region=eu) |"
            " median time to detection (16 %) | power at min_regression (15 %) |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("sequential", "sequential watch (mSPRT, BH; the watch)"),
            ("fixed", "fixed horizon, one test at the planned watch"),
            ("peeking", "fixed horizon looked at after every window"),
        ):
            m = s[key]
            lines.append(
                f"| {label} | {_pct(m['false_rollbacks'])} | {_pct(m['power'])} |"
                f" {_minutes(m['median_detection_s'])} | {_pct(m['power_at_min'])} |"
            )
        lines.append("")
    lines.append(
        f"Run: {summary['wall_s']:.0f} s wall on {summary['machine']},"
        f" {summary['workers']} worker processes, {summary['date']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary = run(args.replays, args.workers)
    print(json.dumps(summary, indent=1) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
