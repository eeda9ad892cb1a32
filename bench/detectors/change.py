"""Change-detector benchmark: genmon CUSUM / Page-Hinkley / EWMA against River's detectors.

Same streams for every detector: detection delay after a known change point, false alarms
per 10,000 pre-change points, and throughput (points/s) with a ratio against River's
PageHinkley. River (``river.drift``) updates one point at a time by design; genmon's
detectors take batches (``BATCH`` points per ``update``), which is how the Faust agents
call them.

Streams (each standardised by the mean and sd of its first ``WARMUP`` points, for every
detector, so River's raw-unit thresholds mean sigmas as genmon's do):

- synthetic: a +1 sigma mean shift, a slow drift (+2 sigma over 1,000 points), a variance
  change (sd x3), and a long stationary N(0, 1) stream for false alarms and throughput;
- llmperf: end-to-end latency resampled from one provider's measured requests, then from
  another's (``llmperf_leaderboard_latency``);
- xstest: refusal rate per window of 20 prompts answered by GPT-4, the prompt mix going from
  10% to 25% unsafe prompts; refusals judged by ``genmon``'s ``is_refusal`` (``xstest``;
  how well it agrees with XSTest's human labels: ``bench/detectors/refusal_phrases.py``);
- azure: requests per 2 s bucket of the real conversation trace; from minute ~29 the code
  trace's arrivals are added (spike) or half the requests are dropped (drop)
  (``azure_llm_inference_trace_2023``).

Run standalone (``--quick`` for a smoke run)::

    .venv/bin/python bench/detectors/change.py [--quick] [--data-dir ../shared/datasets]

or call :func:`run` from the detector benchmark harness.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from river import drift

from genmon.detectors import CUSUM, EWMAZScore, PageHinkley
from genmon.detectors.quality import is_refusal

WARMUP = 200
BATCH = 100
PRE, POST = 2000, 1000
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@dataclass
class Scenario:
    name: str
    replicates: list[np.ndarray]
    change: int | None  # index of the first changed point; None for a stationary stream


# -- detectors --------------------------------------------------------------------------


def genmon_detectors() -> dict[str, Callable[[], Any]]:
    return {
        "genmon CUSUM (k=0.5, h=5)": lambda: CUSUM(k=0.5, h=5.0, warmup=WARMUP),
        "genmon PageHinkley (delta=0.5, lambda=8)": lambda: PageHinkley(
            delta=0.5, threshold=8.0, warmup=WARMUP
        ),
        "genmon EWMAZScore (alpha=0.02, 4 sigma)": lambda: EWMAZScore(
            alpha=0.02, threshold=4.0, warmup=WARMUP
        ),
    }


RIVER_PH = "river PageHinkley (delta=0.5, lambda=8)"
RIVER_KSWIN = "river KSWIN (alpha=0.005, w=100)"
#: KSWIN runs a KS test per point (about 1,000-3,000 points/s here): it sees fewer
#: replicates and a shorter stationary stream to keep the section within a few minutes.
SLOW_REPLICATES = {RIVER_KSWIN: 3}
SLOW_STATIONARY = {RIVER_KSWIN: 10_000}


def river_detectors() -> dict[str, Callable[[], Any]]:
    return {
        "river ADWIN (delta=0.002)": lambda: drift.ADWIN(delta=0.002),
        RIVER_PH: lambda: drift.PageHinkley(
            min_instances=WARMUP, delta=0.5, threshold=8.0, alpha=1.0
        ),
        RIVER_KSWIN: lambda: drift.KSWIN(alpha=0.005, window_size=100, stat_size=30, seed=0),
    }


def count_before(detector: Any, values: np.ndarray, change: int) -> tuple[int, int | None]:
    """(alarms before ``change``, first alarm at or after it) for either library."""
    if hasattr(detector, "drift_detected"):
        alarms = []
        for i, x in enumerate(values.tolist()):
            detector.update(x)
            if detector.drift_detected:
                alarms.append(i)
        before = sum(1 for a in alarms if a < change)
        after = next((a for a in alarms if a >= change), None)
        return before, after
    # genmon: batches are aligned with the change point, so a batch is either before it
    # (count every alarm) or after it (its first alarm is exact).
    before = 0
    after = None
    for start in range(0, values.size, BATCH):
        result = detector.update(values[start : start + BATCH])
        if not result.detected:
            continue
        if start < change:
            before += int(result.evidence.value("n_alarms"))
        elif after is None:
            after = start + int(result.evidence.value("alarm_index"))
    return before, after


# -- streams ------------------------------------------------------------------------------


def standardise(values: np.ndarray) -> np.ndarray:
    head = values[:WARMUP]
    sd = float(head.std(ddof=1)) or 1.0
    return (values - float(head.mean())) / sd


def synthetic(reps: int, seed: int) -> list[Scenario]:
    rng = np.random.default_rng(seed)
    ramp = np.arange(1, POST + 1) * (2.0 / POST)
    shift, slow, variance = [], [], []
    for _ in range(reps):
        shift.append(np.r_[rng.normal(0, 1, PRE), rng.normal(1, 1, POST)])
        slow.append(np.r_[rng.normal(0, 1, PRE), rng.normal(0, 1, POST) + ramp])
        variance.append(np.r_[rng.normal(0, 1, PRE), rng.normal(0, 3, POST)])
    return [
        Scenario("synthetic mean shift +1 sd", shift, PRE),
        Scenario("synthetic slow drift +2 sd/1000", slow, PRE),
        Scenario("synthetic variance x3", variance, PRE),
    ]


def llmperf(data: Path, reps: int, seed: int) -> list[Scenario]:
    def latencies(name: str) -> np.ndarray:
        rows = json.loads((data / "llmperf_leaderboard_latency/individual" / name).read_text())
        return np.array([r["end_to_end_latency_s"] for r in rows if r["error_code"] is None])

    rng = np.random.default_rng(seed)
    out = []
    for before, after in (
        ("anyscale_70b.json", "together_70b.json"),
        ("fireworks_70b.json", "perplexity_70b.json"),
    ):
        a, b = latencies(before), latencies(after)
        streams = [np.r_[rng.choice(a, PRE), rng.choice(b, POST)] for _ in range(reps)]
        label = f"llmperf latency {before[:-5]} -> {after[:-5]}"
        out.append(Scenario(label, streams, PRE))
    return out


def xstest(data: Path, reps: int, seed: int, window: int = 20) -> list[Scenario]:
    with (data / "xstest/xstest_v2_completions_gpt4.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    unsafe = np.array(
        [is_refusal(r["completion"]) for r in rows if r["type"].startswith("contrast")]
    )
    safe = np.array(
        [is_refusal(r["completion"]) for r in rows if not r["type"].startswith("contrast")]
    )
    rng = np.random.default_rng(seed)

    def rates(share_unsafe: float, n: int) -> np.ndarray:
        n_unsafe = rng.binomial(window, share_unsafe, n)
        hits = [rng.choice(unsafe, k).sum() + rng.choice(safe, window - k).sum() for k in n_unsafe]
        return np.array(hits, dtype=float) / window

    streams = [np.r_[rates(0.10, PRE), rates(0.25, POST)] for _ in range(reps)]
    return [Scenario("xstest refusal rate, unsafe mix 10% -> 25%", streams, PRE)]


def azure(data: Path, reps: int, seed: int, bucket: float = 2.0) -> list[Scenario]:
    def arrivals(name: str) -> np.ndarray:
        with (data / "azure_llm_inference_trace_2023" / name).open(newline="") as fh:
            stamps = [dt.datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in csv.DictReader(fh)]
        return np.array([(t - stamps[0]).total_seconds() for t in stamps])

    conv, code = (
        arrivals("AzureLLMInferenceTrace_conv.csv"),
        arrivals("AzureLLMInferenceTrace_code.csv"),
    )
    n_buckets = int(conv.max() // bucket) + 1
    change = (n_buckets // 2) // BATCH * BATCH
    change_time = change * bucket

    def counts(times: np.ndarray) -> np.ndarray:
        return np.bincount((times // bucket).astype(int), minlength=n_buckets)[:n_buckets].astype(
            float
        )

    spike = counts(np.r_[conv, code + change_time])
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(reps):
        keep = (conv < change_time) | (rng.random(conv.size) < 0.5)
        drops.append(counts(conv[keep]))
    return [
        Scenario("azure conv trace + code trace arrivals (spike)", [spike], change),
        Scenario("azure conv trace, half the requests dropped", drops, change),
    ]


# -- the section --------------------------------------------------------------------------


def evaluate(scenario: Scenario, make: Callable[[], Any], max_runs: int) -> dict[str, Any]:
    assert scenario.change is not None
    delays, before, pre_points = [], 0, 0
    runs = scenario.replicates[:max_runs]
    for values in runs:
        z = standardise(values)
        alarms_before, first_after = count_before(make(), z, scenario.change)
        before += alarms_before
        pre_points += scenario.change - WARMUP
        if first_after is not None:
            delays.append(first_after - scenario.change)
    return {
        "runs": len(runs),
        "detection_rate": len(delays) / len(runs),
        "median_delay": statistics.median(delays) if delays else None,
        "false_alarms_per_10k": 10_000 * before / pre_points,
    }


def timed_run(make: Callable[[], Any], values: np.ndarray, batch: int) -> tuple[int, float]:
    """(alarm count, points/s): River one point at a time, genmon ``batch`` points per update."""
    detector = make()
    alarms = 0
    start = time.perf_counter()
    if hasattr(detector, "drift_detected"):
        for x in values.tolist():
            detector.update(x)
            alarms += detector.drift_detected
    elif batch == 1:
        for x in values.tolist():
            alarms += detector.update([x]).detected
    else:
        for i in range(0, values.size, batch):
            alarms += int(detector.update(values[i : i + batch]).evidence.value("n_alarms"))
    return alarms, values.size / (time.perf_counter() - start)


def run(quick: bool, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """Rows of the change-detector section (one per stream x detector, plus throughput)."""
    data = data_dir or Path(os.environ.get("GENMON_BENCH_DATA", str(DEFAULT_DATA)))
    reps = 3 if quick else 10
    real_reps = 2 if quick else 5
    scenarios = synthetic(reps, seed=1)
    if data.is_dir():
        scenarios += llmperf(data, real_reps, seed=2)
        scenarios += xstest(data, real_reps, seed=3)
        scenarios += azure(data, real_reps, seed=4)
    detectors = {**genmon_detectors(), **river_detectors()}
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        for name, make in detectors.items():
            max_runs = SLOW_REPLICATES.get(name, len(scenario.replicates))
            rows.append(
                {
                    "section": "change",
                    "stream": scenario.name,
                    "detector": name,
                    **evaluate(scenario, make, max_runs),
                    "points_per_s": None,
                    "ratio_vs_river": None,
                }
            )

    rng = np.random.default_rng(5)
    n_stationary = 20_000 if quick else 100_000
    stationary = rng.normal(size=n_stationary)
    label = "stationary N(0,1)"
    measured: list[tuple[str, int, int | None, float]] = []
    for name, make in detectors.items():
        n = min(n_stationary, SLOW_STATIONARY.get(name, n_stationary))
        alarms, speed = timed_run(make, stationary[:n], 1_000)
        measured.append((name, n, alarms, speed))
    for name, make in genmon_detectors().items():
        n = 5_000 if quick else 20_000
        _, speed = timed_run(make, stationary[:n], 1)
        measured.append((f"{name}, 1 point/update", n, None, speed))
    river_ph = next(speed for name, _, _, speed in measured if name == RIVER_PH)
    for name, n, count, speed in measured:
        rows.append(
            {
                "section": "change",
                "stream": label,
                "detector": name,
                "runs": f"{n:,} points",
                "detection_rate": None,
                "median_delay": None,
                "false_alarms_per_10k": None if count is None else 10_000 * count / (n - WARMUP),
                "points_per_s": speed,
                "ratio_vs_river": speed / river_ph,
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"
    return str(value)


def markdown(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few replicates, short streams")
    parser.add_argument("--data-dir", type=Path, default=None, help="the shared datasets folder")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.quick, args.data_dir)
    columns = [
        "stream",
        "detector",
        "runs",
        "detection_rate",
        "median_delay",
        "false_alarms_per_10k",
        "points_per_s",
        "ratio_vs_river",
    ]
    print(markdown(rows, columns))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
