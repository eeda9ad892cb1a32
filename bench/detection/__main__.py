"""Detection benchmark: genmon against its old fixed thresholds and River's ADWIN and
PageHinkley, on the same streams of real traffic with known changes.

    .venv/bin/python -m bench.detection            # the recorded run (see below)
    .venv/bin/python -m bench.detection --quick    # a smoke run (2-4 min)
    .venv/bin/python -m bench.detection --markdown # also print the BENCHMARKS.md section
    .venv/bin/python -m bench.detection --from-json .build/bench/detection/results.json

The full run is sized for ~30 minutes on two idle cores at the replay speed recorded on
2026-12-06; on 2026-12-07 (replays slower, machine shared) it took 55 minutes, two
thirds of it in the 6 model-days of stationary replay.

Streams (:mod:`bench.detection.variants`): seeded variants of five classes of change
(87 % error burst, smaller error bursts, latency regime, refusal jump, topic switch) on the
three production traces, and long stationary replays for the false-page rate. Every
configuration sees the same requests: genmon replays them (``genmon.replay.engine.Replay``,
whatever it does today; embeddings on for the topic switch and the stationary replays),
the old fixed thresholds and River read them one request at a time
(:mod:`bench.detection.jobs`). Scoring: :mod:`bench.detection.scoring`; River's tuning to
genmon's budget and the curves: :mod:`bench.detection.results`. Results go to a JSON
file (``--out``, default ``.build/bench/detection/results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.detection import report, results, variants
from bench.detection.jobs import Job, run_job
from bench.detection.variants import EMBEDDING_CLASSES, Stationary
from bench.replay import traffic
from bench.replay.sources import REPO_ROOT, _xstest_texts

BUILD = REPO_ROOT / ".build" / "bench" / "detection"
SWEEP = (0.1, 10.0, 100.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.detection", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: few, short streams")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    p.add_argument("--out", type=Path, default=BUILD / "results.json")
    p.add_argument("--data-dir", type=Path, default=traffic.DEFAULT_DATA_DIR)
    p.add_argument(
        "--cache",
        type=Path,
        default=BUILD / "embeddings.sqlite",
        help="embedding cache (persistent: reruns do not encode again)",
    )
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--variants", type=int, help="variants per class (full 20, quick 2)")
    p.add_argument(
        "--stationary-hours",
        type=float,
        help="hours of stationary replay per trace (full 48, quick 0.5)",
    )
    p.add_argument("--sweep-variants", type=int, help="variants per class in the sweep")
    p.add_argument("--sweep-hours", type=float, help="stationary hours per trace in the sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip genmon's budget sweep")
    p.add_argument(
        "--from-json",
        type=Path,
        help="print the tables of an earlier run's results file (no replays)",
    )
    return p


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "variants": args.variants or (2 if quick else 20),
        "stationary_hours": args.stationary_hours or (0.5 if quick else 48.0),
        "sweep_variants": args.sweep_variants or (1 if quick else 3),
        "sweep_hours": args.sweep_hours or (0.5 if quick else 4.0),
        # None: each class's own range (variants.AT_MIN); the smoke run changes early.
        "at_min": (20.0, 22.0) if quick else None,
        "after_min": 5.0 if quick else 15.0,
    }


def jobs(args: argparse.Namespace, sizes: dict[str, Any]) -> list[Job]:
    plan = variants.plan(sizes["variants"], sizes["after_min"], sizes["at_min"])

    def job(v: Any, s: Any, ppw: float | None, compare: bool) -> Job:
        emb = s is not None or (v is not None and v.cls in EMBEDDING_CLASSES)
        return Job(v, s, ppw, emb, compare, args.data_dir, args.cache)

    out = [job(v, None, None, True) for v in plan]
    out += [
        job(None, Stationary(t, sizes["stationary_hours"], seed=7 + i), None, True)
        for i, t in enumerate(traffic.TRACES)
    ]
    if not args.no_sweep:
        subset = [v for v in plan if v.index < sizes["sweep_variants"]]
        for ppw in SWEEP:
            out += [job(v, None, ppw, False) for v in subset]
            out += [
                job(None, Stationary(t, sizes["sweep_hours"], seed=7 + i), ppw, False)
                for i, t in enumerate(traffic.TRACES)
            ]
    return sorted(out, key=lambda j: -j.weight)


def prewarm(args: argparse.Namespace, plan: list[Job]) -> dict[str, Any]:
    """Encode, once, every text a replay may sample (the prompt and answer pools and the
    topic switches' utterances) into the persistent cache, so that the worker processes
    only read it."""
    from genmon.replay.engine import EmbeddingCache
    from genmon.settings import Settings
    from genmon.streams.embedding.encoder import shared_encoder

    settings = Settings().embedding
    cut = settings.max_text_chars
    pool = traffic.load_texts(args.data_dir)
    texts = {t.prompt[:cut] for t in pool.texts} | {t.response[:cut] for t in pool.texts}
    for model in {j.variant.knobs.get("refusal_model") for j in plan if j.variant} - {None}:
        texts |= {t.response[:cut] for t in _xstest_texts(args.data_dir, model).values()}
    for j in plan:
        if j.variant is not None and j.variant.cls == "topic_switch":
            domain = j.variant.knobs["domain"]
            source = "banking77" if domain == "banking77" else f"clinc150:{domain}"
            texts |= {text[:cut] for _, text in traffic.load_utterances(args.data_dir, source)}
    texts = {t for t in texts if t}
    began = time.perf_counter()
    cache = EmbeddingCache(args.cache)
    try:
        cache.encode(lambda: shared_encoder(settings), sorted(texts))
        encoded = cache.misses
    finally:
        cache.close()
    return {"texts": len(texts), "encoded": encoded, "seconds": time.perf_counter() - began}


def run_all(plan: list[Job], workers: int, failed: list[str]) -> list[dict[str, Any]]:
    """Every job's result, in the order they finished; ``failed`` gets the jobs that
    raised (reported, never silently dropped)."""
    out = []
    began = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j): j for j in plan}
        for k, future in enumerate(as_completed(futures), 1):
            try:
                result = future.result()
            except Exception as exc:  # one broken replay must not lose the others
                print(f"FAILED {futures[future].id}: {exc!r}", file=sys.stderr, flush=True)
                failed.append(f"{futures[future].id}: {exc!r}")
                continue
            out.append(result)
            print(
                f"[{time.perf_counter() - began:6.0f} s] {k}/{len(plan)} {result['job']}:"
                f" {result['events']:,} events, replay {result['replay_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        return rerender(args)
    sizes = _sizes(args)
    began = time.perf_counter()
    plan = jobs(args, sizes)
    warm = prewarm(args, plan)
    print(
        f"embedding cache: {warm['texts']:,} texts, {warm['encoded']:,} encoded now"
        f" ({warm['seconds']:.0f} s)",
        file=sys.stderr,
    )
    failed: list[str] = []
    done = run_all(plan, args.workers, failed)
    wall = time.perf_counter() - began
    main_runs = [r for r in done if r["pages_per_week"] is None]
    sweep_runs = [r for r in done if r["pages_per_week"] is not None]
    text, summary = render(main_runs, sweep_runs, sizes, wall, warm, args)
    summary["failed"] = failed
    summary["embedding_cache"] = warm
    summary["date"] = time.strftime("%Y-%m-%d")
    print(text)
    if failed:
        print(f"\n{len(failed)} replay(s) FAILED and are not in the tables:", *failed, sep="\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "streams": done}, indent=1, default=str))
    print(f"\nresults: {args.out}", file=sys.stderr)
    return 0


def rerender(args: argparse.Namespace) -> int:
    """The tables of a results file written by an earlier run (reporting changes apply;
    the measurements are the file's)."""
    saved = json.loads(args.from_json.read_text())
    done, summary = saved["streams"], saved["summary"]
    main_runs = [r for r in done if r["pages_per_week"] is None]
    sweep_runs = [r for r in done if r["pages_per_week"] is not None]
    warm = summary.get("embedding_cache") or {"texts": 0, "encoded": 0}
    args.date = summary.get("date")
    text, _ = render(main_runs, sweep_runs, summary["sizes"], summary["wall_s"], warm, args)
    print(text)
    return 0


def render(
    main_runs: list[dict[str, Any]],
    sweep_runs: list[dict[str, Any]],
    sizes: dict[str, Any],
    wall: float,
    warm: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[str, dict[str, Any]]:
    from genmon.settings import Settings

    budget = Settings().detectors.false_pages_per_week
    tuned = results.tune(main_runs, budget)
    configs = report.configurations(main_runs, tuned)
    adwin = results.tuned_keys(tuned["adwin"])
    genmon = results.summaries(main_runs, "genmon")
    verdicts = results.acceptance(
        genmon,
        results.summaries(main_runs, adwin),
        results.within(main_runs, "error_burst", "genmon", 15.0, "traffic_delay_s"),
        results.within(main_runs, "error_burst", "genmon", 15.0),
    )
    curves = results.genmon_curve(main_runs, sweep_runs)
    for family in results.families():
        curves += results.river_curve(main_runs, family)
    warmup = sum(r["genmon_warmup_pages"] for r in main_runs)
    quiet = results.stationaries(main_runs)
    days = sum(r["exposure_s"] for r in quiet) / 86_400
    parts = [
        f"Run: {len(main_runs) + len(sweep_runs)} replays, {wall / 60:.1f} min wall on"
        f" {os.cpu_count()} cores ({platform.processor() or platform.machine()}),"
        f" {args.workers} worker processes; sizes {json.dumps(sizes)};"
        f" {days:.2f} stationary model-days judged; embedding cache {warm['texts']:,} texts"
        f" ({warm['encoded']:,} encoded this run).",
        "### Streams\n\n" + report.streams_table(main_runs),
        "### Detection (change streams, default settings)\n\n"
        + report.detection_table(main_runs, configs),
        "### False pages (after the warm-up; change streams before the change)\n\n"
        + report.false_table(main_runs, configs)
        + f"\n\ngenmon also paged {warmup} time(s) during the warm-ups (not counted above).",
        "### River tuned to genmon's budget on the stationary replays\n\n"
        + report.tuning_table(tuned),
        "### By magnitude: genmon vs ADWIN (tuned)\n\n" + report.magnitude_table(main_runs, adwin),
        "### Delay versus false alarms\n\n" + report.curve_table(curves),
        "```\n"
        + "\n\n".join(report.ascii_chart(curves, c.name) for c in variants.CLASSES)
        + "\n```",
        "### Acceptance (measured)\n\n```\n" + report.verdict_lines(verdicts) + "\n```",
        "### Time\n\n" + report.timing_table(main_runs + sweep_runs),
    ]
    summary = {
        "sizes": sizes,
        "wall_s": wall,
        "budget_per_week": budget,
        "tuned": {f: {s: t.param.key for s, t in by.items()} for f, by in tuned.items()},
        "verdicts": [v.__dict__ for v in verdicts],
        "detection": {
            label: {c: s.to_dict() for c, s in results.summaries(main_runs, key).items()}
            for label, key in configs
        },
        "false_pages": {
            label: results.false_rate(main_runs, key).to_dict() for label, key in configs
        },
        "curves": [
            {
                "config": p.config,
                "setting": p.setting,
                **p.rate.to_dict(),
                "classes": {c: s.to_dict() for c, s in p.classes.items()},
            }
            for p in curves
        ],
    }
    text = "\n\n".join(parts)
    if args.markdown:
        text = markdown_section(text, args)
    return text, summary


def markdown_section(body: str, args: argparse.Namespace) -> str:
    command = ".venv/bin/python -m bench.detection" + (" --quick" if args.quick else "")
    return (
        "## Detection not bounded by the window: genmon vs River ADWIN and PageHinkley"
        " (`bench/detection/`)\n\n"
        f"`{command} --markdown` ({getattr(args, 'date', None) or time.strftime('%Y-%m-%d')})."
        "\n\n" + body
    )


if __name__ == "__main__":
    sys.exit(main())
