"""Realistic LLM traffic streams from real production traces, for replaying through genmon.

genmon must page 0 times on hours of healthy traffic and quickly on a real problem. Made-up
Poisson streams prove neither: real traffic has bursts, lulls and heavy-tailed token counts.
This module builds hours of one model's traffic from public production traces, as wire
events (:class:`genmon.schemas.events.InferenceEvent` / ``FeedbackEvent`` dicts), and the
same stream with one known change injected, with its ground truth (:func:`scenario`).

Everything is pure Python + numpy and deterministic for a seed (and model id); 6 hours of
``azure_conv`` (~120k inferences, ~24k feedbacks) build in a few seconds.

The parts, one module each: :mod:`bench.replay.sources` reads the data sets (traces, LLMPerf
records, texts, utterances), :mod:`bench.replay.latency` is the latency model,
:mod:`bench.replay.events` holds the event helpers and the timestamp format, and
:mod:`bench.replay.changes` injects the changes. This module builds the stationary stream,
is the command line, and re-exports the others' public names (``traffic.Change``,
``traffic.load_trace``, ...).

**Arrivals and token counts: block bootstrap.** A trace (``azure_code``, ``azure_conv``:
azure_llm_inference_trace_2023; ``mooncake``: mooncake_conversation_trace) is cut into
blocks of ``block_s`` seconds (default 300, at least 300, so that the bursts and lulls of
a few minutes that rate detectors see stay whole) from its first request; the last,
partial block is dropped. ``hours`` of traffic are the concatenation of blocks drawn with
replacement; each block keeps its requests' offsets within the block (so their
inter-arrival times) and their (prompt, completion) token counts exactly. Requests are
never resampled one by one: i.i.d. draws would turn the trace into a Poisson stream and
hide the burstiness genmon's detectors must tolerate. (Mooncake stamps most arrivals to the
second, so requests of one second share a time, as in the trace.)

**Latency**: one LLMPerf record of ``provider`` drawn per request, see
:mod:`bench.replay.latency`.

**Texts** (English, ``locale=en``; token counts stay the trace's, texts do not match them):
PandaLM's human-annotated test set and XSTest's safe prompts with their apps and human
verdicts, see :mod:`bench.replay.sources`.

**Errors**: ``error_rate`` of requests fail as rate-limited (429, see
:mod:`bench.replay.events`): empty response, 0 completion tokens, no ttft; the latency is
the record's ttft without prefill (the gateway rejects before any model work).

**Feedback**: each answered request gets a thumbs ``FeedbackEvent`` with probability
``feedback_share``, from its text's human label, ``FEEDBACK_DELAY_S`` after the inference
finished (log-uniform: most users react within a minute, a few much later).

**Changes** (:func:`inject`, :class:`Change`, in :mod:`bench.replay.changes`):
``latency_regime``, ``error_burst``, ``refusal_jump``, ``language_switch``,
``topic_switch``, ``negative_feedback`` and ``bad_deploy``; see :class:`Change` for what
each does, and :class:`GroundTruth` for what a detector should report.

Timestamps are ISO 8601 in UTC with microseconds, whatever the zone of ``start``. Every
event carries ``metadata`` naming where it came from (``replay_trace``, ``text_source``
like ``pandalm:17:1`` or ``xstest_gpt4:v2-12``, ``latency_record`` like
``fireworks_70b:12``), so a replay can be checked against its sources.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.replay.changes import CHANGE_KINDS, SIGNALS, Change, GroundTruth, inject
from bench.replay.events import (
    ERROR_CODE,
    _epoch_us,
    _fail,
    _iso,
    _iso_utc,
    arrival_time,
    event_time,
    is_inference,
)
from bench.replay.latency import (
    DEFAULT_PROVIDER,
    PREFILL_MS_PER_TOKEN,
    SLOW_PROVIDER,
    _record,
    timings,
)
from bench.replay.sources import (
    DEFAULT_DATA_DIR,
    LOCALE,
    PANDALM_APPS,
    REPO_ROOT,
    TRACES,
    XSTEST_APP,
    XSTEST_SHARE,
    Provider,
    Text,
    TextPool,
    Trace,
    load_provider,
    load_texts,
    load_trace,
    load_utterances,
)

__all__ = [
    "CHANGE_KINDS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PROVIDER",
    "ERROR_CODE",
    "FEEDBACK_DELAY_S",
    "LOCALE",
    "MIN_BLOCK_S",
    "PANDALM_APPS",
    "PREFILL_MS_PER_TOKEN",
    "REPO_ROOT",
    "SIGNALS",
    "SLOW_PROVIDER",
    "TRACES",
    "XSTEST_APP",
    "XSTEST_SHARE",
    "Change",
    "GroundTruth",
    "Provider",
    "Text",
    "TextPool",
    "Trace",
    "arrival_time",
    "bootstrap",
    "event_time",
    "inject",
    "is_inference",
    "load_provider",
    "load_texts",
    "load_trace",
    "load_utterances",
    "main",
    "merge",
    "scenario",
    "stationary",
    "timings",
    "write_jsonl",
]

#: Blocks shorter than this would cut the few-minute bursts the trace is used for.
MIN_BLOCK_S = 300.0
#: Feedback arrives this long after the inference finished (log-uniform).
FEEDBACK_DELAY_S = (5.0, 120.0)
#: Seed streams, one per random aspect, so that e.g. changing feedback_share keeps arrivals.
_ARRIVALS, _LATENCY, _TEXTS, _ERRORS, _FEEDBACK, _DELAYS = range(6)


# -- the stationary stream -------------------------------------------------------------------


def bootstrap(
    trace: Trace, hours: float, block_s: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(arrival offsets in s, trace row of each request) of ``hours`` of block-bootstrapped
    traffic: slot ``k`` holds a random block's requests shifted by ``k * block_s``."""
    if block_s < MIN_BLOCK_S:
        raise ValueError(f"block_s must be >= {MIN_BLOCK_S:.0f} s, got {block_s}")
    n_blocks = int(trace.span_s // block_s)
    if n_blocks < 1:
        raise ValueError(f"block_s={block_s} is longer than the trace ({trace.span_s:.0f} s)")
    horizon = hours * 3600.0
    edges = np.searchsorted(trace.offsets_s, np.arange(n_blocks + 1) * block_s, side="left")
    chosen = rng.integers(n_blocks, size=math.ceil(horizon / block_s))
    rows = [np.arange(edges[b], edges[b + 1]) for b in chosen]
    offsets = [
        slot * block_s + trace.offsets_s[r] - b * block_s
        for slot, (b, r) in enumerate(zip(chosen, rows, strict=True))
    ]
    times, picks = np.concatenate(offsets), np.concatenate(rows)
    keep = times < horizon
    return times[keep], picks[keep]


def stationary(
    data_dir: Path,
    trace: str,
    hours: float,
    *,
    seed: int,
    model_id: str,
    model_version: str = "v1",
    start: datetime,
    feedback_share: float = 0.2,
    error_rate: float = 0.003,
    block_s: float = MIN_BLOCK_S,
    provider: str = DEFAULT_PROVIDER,
) -> list[dict[str, Any]]:
    """``hours`` of healthy traffic of one model: inference and feedback dicts in the SDK
    wire schema, in arrival order: inferences when they finished, feedback when given, as
    a service's SDK would produce them (see the module docstring for how they are made)."""
    _check_stream_args(hours, start, feedback_share, error_rate)
    data_dir = Path(data_dir)
    rng = _rngs(seed, model_id)
    source = load_trace(data_dir, trace)
    offsets, rows = bootstrap(source, hours, block_s, rng[_ARRIVALS])
    n = len(offsets)
    prompt_tokens, completion = source.prompt_tokens[rows], source.completion_tokens[rows]
    perf = load_provider(data_dir, provider)
    records = rng[_LATENCY].integers(len(perf.ttft_s), size=n)
    ttft, latency = timings(perf, records, prompt_tokens, completion)
    failed = rng[_ERRORS].random(n) < error_rate
    latency = np.where(failed, perf.ttft_s[records] * 1e3, latency)
    pool = load_texts(data_dir)
    texts = rng[_TEXTS].choice(len(pool.texts), size=n, p=pool.weights)
    rated = (rng[_FEEDBACK].random(n) < feedback_share) & ~failed
    low, high = np.log(FEEDBACK_DELAY_S)
    delays = np.exp(rng[_DELAYS].uniform(low, high, size=n))
    started_us = _epoch_us(start) + np.rint(offsets * 1e6).astype(np.int64)
    finished_us = started_us + np.rint(latency * 1e3).astype(np.int64)
    created_us = (finished_us + np.rint(delays * 1e6).astype(np.int64))[rated]
    started, finished, created = map(_iso_utc, (started_us, finished_us, created_us))
    inferences = []
    for i in range(n):
        text = pool.texts[texts[i]]
        event = {
            "schema_version": 1,
            "request_id": _request_id(model_id, seed, i),
            "model_id": model_id,
            "model_version": model_version,
            "started_at": started[i],
            "finished_at": finished[i],
            "prompt": text.prompt,
            "response": text.response,
            "latency_ms": float(latency[i]),
            "time_to_first_token_ms": float(ttft[i]),
            "prompt_tokens": int(prompt_tokens[i]),
            "completion_tokens": int(completion[i]),
            "status": "ok",
            "error_code": None,
            "finish_reason": "stop",
            "segment": {"app": text.app, "locale": LOCALE},
            "metadata": {
                "replay_trace": trace,
                "text_source": text.source,
                "latency_record": _record(perf, records[i]),
            },
        }
        if failed[i]:
            _fail(event)
        inferences.append(event)
    feedback = [
        _feedback(inferences[i], when, pool.texts[texts[i]].thumbs)
        for i, when in zip(np.flatnonzero(rated), created, strict=True)
    ]
    return sorted(inferences + feedback, key=arrival_time)


def _check_stream_args(
    hours: float, start: datetime, feedback_share: float, error_rate: float
) -> None:
    if not hours > 0:
        raise ValueError(f"hours must be > 0, got {hours}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (the wire schema requires it)")
    for name, value in (("feedback_share", feedback_share), ("error_rate", error_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _rngs(seed: int, model_id: str) -> list[np.random.Generator]:
    """Independent generators per aspect; the model id is mixed in so that two models of one
    merged file with the same seed do not get the very same traffic."""
    root = np.random.SeedSequence([seed, zlib.crc32(model_id.encode())])
    return [np.random.default_rng(child) for child in root.spawn(6)]


def _request_id(model_id: str, seed: int, i: int) -> str:
    return f"{model_id[:200]}-{seed}-{i:07d}"


def _feedback(inference: Mapping[str, Any], created: str, thumbs: str) -> dict[str, Any]:
    request_id = inference["request_id"]
    return {
        "schema_version": 1,
        "feedback_id": f"fb-{request_id}",
        "request_id": request_id,
        "model_id": inference["model_id"],
        "created_at": created,
        "thumbs": thumbs,
        "segment": dict(inference["segment"]),
    }


# -- streams: merged, written, changed -------------------------------------------------------


def merge(*streams: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several streams (e.g. one per model) in one, in arrival order (stable on ties)."""
    events = [e for stream in streams for e in stream]
    ids = Counter(e["request_id"] for e in events if is_inference(e))
    dupes = [rid for rid, count in ids.items() if count > 1]
    if dupes:
        raise ValueError(f"{len(dupes)} request ids occur twice, e.g. {dupes[0]!r}")
    return sorted(events, key=arrival_time)


def write_jsonl(events: Iterable[Mapping[str, Any]], path: Path) -> int:
    """One JSON object per line; returns how many were written."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


def scenario(
    data_dir: Path,
    trace: str,
    hours: float,
    change: Change,
    *,
    seed: int,
    model_id: str,
    start: datetime,
    **stream_args: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], GroundTruth]:
    """(healthy stream, the same stream with ``change``, its ground truth) in one call."""
    healthy = stationary(
        data_dir, trace, hours, seed=seed, model_id=model_id, start=start, **stream_args
    )
    changed, truth = inject(healthy, change, data_dir, seed=seed, start=start)
    return healthy, changed, truth


# -- command line ----------------------------------------------------------------------------


def _segment_arg(text: str) -> dict[str, str]:
    items = [part.partition("=") for part in text.split(",") if part]
    if any(not key or not sep for key, sep, _ in items):
        raise argparse.ArgumentTypeError(f"segment must be key=value[,key=value], got {text!r}")
    return {key: value for key, _, value in items}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.replay.traffic",
        description="Write a realistic LLM traffic stream (JSON lines) from a real trace.",
    )
    p.add_argument("--trace", choices=TRACES, required=True)
    p.add_argument("--hours", type=float, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", required=True, help="model_id of the events")
    p.add_argument("--model-version", default="v1")
    p.add_argument("--start", default="2024-01-01T00:00:00+00:00", help="ISO 8601, with offset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--feedback-share", type=float, default=0.2)
    p.add_argument("--error-rate", type=float, default=0.003)
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="LLMPerf provider file")
    p.add_argument("--change", choices=CHANGE_KINDS)
    p.add_argument("--at-min", type=float, default=60.0, help="change start, minutes")
    p.add_argument("--duration-min", type=float, help="change length, minutes (default: to end)")
    p.add_argument("--segment", type=_segment_arg, help="limit the change, e.g. app=Gmail")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = datetime.fromisoformat(args.start)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    events = stationary(
        args.data_dir,
        args.trace,
        args.hours,
        seed=args.seed,
        model_id=args.model,
        model_version=args.model_version,
        start=start,
        feedback_share=args.feedback_share,
        error_rate=args.error_rate,
        provider=args.provider,
    )
    if args.change:
        duration = None if args.duration_min is None else timedelta(minutes=args.duration_min)
        change = Change(args.change, timedelta(minutes=args.at_min), duration, segment=args.segment)
        events, truth = inject(events, change, args.data_dir, seed=args.seed, start=start)
        print("change:", json.dumps(truth.to_dict(), ensure_ascii=False))
    write_jsonl(events, args.out)
    n_inference = sum(map(is_inference, events))
    first, last = event_time(events[0]), event_time(events[-1])
    hours = (last - first).total_seconds() / 3600
    print(
        f"{args.out}: {n_inference} inference, {len(events) - n_inference} feedback events,"
        f" {_iso(first)} .. {_iso(last)} ({hours:.2f} h)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
