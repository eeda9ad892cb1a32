"""`genmon replay` measured: speed, false pages on healthy real traffic, detection delays.

    .venv/bin/python -m bench.replay.run                 # the recorded run (~15 min)
    .venv/bin/python -m bench.replay.run --quick         # a smoke run (~2 min)

One command, three tables (results in BENCHMARKS.md):

1. **Speed**, embeddings off, events per second from the first event to the report,
   against a baseline in the same run: ``json.loads`` of every line (the least any replay
   must do). Streams: the pipeline benchmark's dense synthetic stream (8 models, 500
   events/s, short texts, no feedback; ``bench/pipeline/run.py``'s) and real traffic
   (the three production traces, 5 req/s each, 1 KB texts, 20 % feedback, 9 apps).
2. **False pages on healthy real traffic**: block-bootstrapped Azure (code, conversation)
   and Mooncake traces, six hours per model and seed, default settings (embeddings off
   here: they are judged in ``tests/replay/test_replay.py``), in pages per model-week with a
   95 % upper bound.
3. **Detection delay** of each injected change, per trace, in seconds of traffic from the
   change to the first page, with its signal, segment and severity.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scipy import stats

from bench.replay import traffic
from genmon.replay.engine import Replay, ReplayReport
from genmon.settings import Settings

START = datetime(2026, 1, 5, tzinfo=UTC)
TRACES = ("azure_code", "azure_conv", "mooncake")
CHANGES = {
    "error_burst": {},
    "latency_regime": {},
    "refusal_jump": {},
    "bad_deploy": {},
    "negative_feedback": {"segment": {"app": "LinkedIn"}},
}


def dense_lines(n: int, span_s: float) -> list[bytes]:
    """The pipeline benchmark's stream (bench/pipeline/run.py), as JSON lines."""
    models = [f"bench-model-{k}" for k in range(8)]
    locales, tiers = ["en", "fr", "de", "es"], ["free", "pro"]
    rng = random.Random(1)
    start = START.timestamp()
    lines = []
    for i in range(n):
        started = datetime.fromtimestamp(start + span_s * i / n, UTC).isoformat()
        status = "error" if rng.random() < 0.01 else "ok"
        lines.append(
            (
                f'{{"request_id":"b{i}","model_id":"{models[i % 8]}","model_version":"v1",'
                f'"started_at":"{started}","prompt":"What is the weather like today in Paris?",'
                f'"response":"The weather in Paris is mild with light rain in the afternoon.",'
                f'"latency_ms":{rng.lognormvariate(6.0, 0.5):.1f},'
                f'"time_to_first_token_ms":{rng.lognormvariate(4.0, 0.5):.1f},'
                f'"prompt_tokens":{rng.randint(5, 200)},"completion_tokens":{rng.randint(5, 400)},'
                f'"status":"{status}","segment":{{"locale":"{locales[i % 4]}",'
                f'"tier":"{tiers[i % 2]}"}}}}'
            ).encode()
        )
    return lines


def encode(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(event).encode() for event in events]


def replay(lines: list[bytes], **options: Any) -> tuple[ReplayReport, float]:
    engine = Replay(Settings(), embeddings=False, **options)
    began = time.perf_counter()
    engine.feed(lines)
    report = engine.finish()
    return report, time.perf_counter() - began


def speed(data_dir: Path, quick: bool) -> None:
    real = traffic.merge(
        *(
            traffic.stationary(data_dir, t, 1 if quick else 2, seed=1, model_id=t, start=START)
            for t in TRACES
        )
    )
    streams = {
        "dense synthetic (8 models)": dense_lines(100_000 if quick else 400_000, 600.0),
        "real traffic (3 models)": encode(real),
    }
    print("\n## 1. Speed, embeddings off (events/s)\n")
    print("| stream | events | json.loads only | genmon replay | ratio |")
    print("|---|---|---|---|---|")
    for name, lines in streams.items():
        began = time.perf_counter()
        for line in lines:
            json.loads(line)
        ceiling = len(lines) / (time.perf_counter() - began)
        _, elapsed = replay(lines)
        rate = len(lines) / elapsed
        print(f"| {name} | {len(lines):,} | {ceiling:,.0f} | {rate:,.0f} | {rate / ceiling:.3f} |")


def false_pages(data_dir: Path, quick: bool) -> None:
    seeds = range(2 if quick else 8)
    hours = 6.0
    print("\n## 2. False pages on healthy real traffic (default settings)\n")
    print("| trace | model-hours | pages | titles |")
    print("|---|---|---|---|")
    total_pages, total_hours = 0, 0.0
    for trace in TRACES:
        pages, titles = 0, []
        for seed in seeds:
            events = traffic.stationary(
                data_dir, trace, hours, seed=100 + seed, model_id=f"{trace}-{seed}", start=START
            )
            report, _ = replay(encode(events))
            pages += len(report.triggers)
            titles += [page.title for page in report.triggers]
        model_hours = hours * len(seeds)
        total_pages, total_hours = total_pages + pages, total_hours + model_hours
        print(f"| {trace} | {model_hours:.0f} | {pages} | {'; '.join(titles[:3]) or '-'} |")
    weeks = total_hours / 168.0
    upper = stats.chi2.ppf(0.95, 2 * total_pages + 2) / 2 / weeks
    print(
        f"\n{total_pages} page(s) in {total_hours:.0f} model-hours ({weeks:.2f} model-weeks): "
        f"{total_pages / weeks:.2f} per model-week, 95 % upper bound {upper:.2f} "
        f"(budget: {Settings().detectors.false_pages_per_week:g})"
    )


def delays(data_dir: Path, quick: bool) -> None:
    print("\n## 3. Detection delay of injected changes (seconds of traffic to the first page)\n")
    print("| change | trace | delay | signal | segment | severity | title | other pages |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, extra in CHANGES.items():
        for trace in TRACES[1:] if quick else TRACES:
            at = timedelta(hours=4) if kind == "negative_feedback" else timedelta(minutes=90)
            hours = 6.0 if kind == "negative_feedback" else 2.5
            change = traffic.Change(kind, at, **extra)
            _, changed, truth = traffic.scenario(
                data_dir, trace, hours, change, seed=7, model_id="bot", start=START
            )
            report, _ = replay(encode(changed))
            incidents = {i["id"]: i for i in report.incidents}
            paged = [
                (datetime.fromisoformat(p.at), incidents[p.incident_id]) for p in report.triggers
            ]
            after = [(t, i) for t, i in paged if t >= truth.start]
            before = len(paged) - len(after)
            if not after:
                print(f"| {kind} | {trace} | not found | | | | | {before} before |")
                continue
            when, first = after[0]
            print(
                f"| {kind} | {trace} | {truth.delay(when).total_seconds():.0f} s "
                f"| {first['signal']} | {first['segment']} | {first['severity']} "
                f"| {first['title']} | {before} before, {len(after) - 1} after |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=traffic.DEFAULT_DATA_DIR)
    parser.add_argument("--quick", action="store_true", help="fewer seeds and streams")
    parser.add_argument("--only", choices=("speed", "false_pages", "delays"), default=None)
    args = parser.parse_args()
    sections = {"speed": speed, "false_pages": false_pages, "delays": delays}
    for name, section in sections.items():
        if args.only in (None, name):
            section(args.data_dir, args.quick)


if __name__ == "__main__":
    main()
