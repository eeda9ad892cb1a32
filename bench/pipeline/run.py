"""Pipeline throughput on the real broker: genmon worker vs. a bare JSON-decoding consumer.

    .venv/bin/python bench/pipeline/run.py --events 200000      # the recorded run
    .venv/bin/python bench/pipeline/run.py --events 1000000     # the documented full run

One run, one broker, one machine, printed as one table:

(a) ceiling: a bare aiokafka consumer that only ``json.loads`` every message of the
    inference topic (no validation, no state);
(b) genmon: a real ``genmon worker`` subprocess (ingest validation + dead-letter check,
    windowed aggregates with sketches and quality signals, the feedback-join table write
    per inference, window closing, detectors) reading the same pre-produced topic;
(c) the same worker with the embedding stage on (its default settings: sampling plus the
    sentence-transformers encoder on the CPU); ``--no-embeddings`` skips it;
(b') ``--workers`` copies of (b) in one consumer group (the partitions split between
    them), the way one machine scales out; its rate is also given from 25 % of the events
    on, after the copies have joined and the group has rebalanced, next to (b)'s.

(a2) is the worker with only the ingest installer, so (b)/(a2) is the cost of the pipeline
over genmon's own validation; (b) runs with ``GENMON_EMBEDDING__ENABLED=false``.

Throughput is measured from the first to the last event processed, so worker start-up
and recovery are excluded. Also printed: p99 of window close -> finding published (every
window fires: an SLO ``latency_p99 <= 1ms`` is set below the scripted latencies), and the
worker's RSS when it became ready and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer
from kafka import KafkaConsumer, KafkaProducer

from genmon.infra.kafka import KafkaBroker
from genmon.kafka_config import client_config
from genmon.settings import Settings

MODELS = [f"bench-model-{k}" for k in range(8)]
LOCALES = ["en", "fr", "de", "es"]
TIERS = ["free", "pro"]


def produce(settings: Settings, n: int, span_s: float) -> None:
    """N inference events over ``span_s`` seconds of event time ending a minute ago."""
    # acks=1 on purpose: the bench measures the worker, not the producer's durability.
    producer = KafkaProducer(
        **client_config(settings.kafka),
        linger_ms=20,
        batch_size=256 * 1024,
        compression_type=None,
        acks=1,
    )
    rng = random.Random(1)
    start = time.time() - 60 - span_s
    topic = settings.topic("inference")
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        started = datetime.fromtimestamp(start + span_s * i / n, UTC).isoformat()
        status = "error" if rng.random() < 0.01 else "ok"
        value = (
            f'{{"request_id":"b{i}","model_id":"{model}","model_version":"v1",'
            f'"started_at":"{started}","prompt":"What is the weather like today in Paris?",'
            f'"response":"The weather in Paris is mild with light rain in the afternoon.",'
            f'"latency_ms":{rng.lognormvariate(6.0, 0.5):.1f},'
            f'"time_to_first_token_ms":{rng.lognormvariate(4.0, 0.5):.1f},'
            f'"prompt_tokens":{rng.randint(5, 200)},"completion_tokens":{rng.randint(5, 400)},'
            f'"status":"{status}","segment":{{"locale":"{LOCALES[i % 4]}",'
            f'"tier":"{TIERS[i % 2]}"}}}}'
        )
        producer.send(topic, key=model.encode(), value=value.encode())
    producer.flush()
    producer.close()


async def bare_consumer(settings: Settings, n: int) -> float:
    """Events/s of a consumer that only decodes JSON (first message -> n-th message)."""
    consumer = AIOKafkaConsumer(
        settings.topic("inference"),
        **client_config(settings.kafka),
        auto_offset_reset="earliest",
        group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        max_poll_records=1000,
    )
    await consumer.start()
    seen, first = 0, 0.0
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
            for records in batches.values():
                for record in records:
                    json.loads(record.value)
                    if seen == 0:
                        first = time.perf_counter()
                    seen += 1
        return n / (time.perf_counter() - first)
    finally:
        await consumer.stop()


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
        return json.loads(reply.read())["metrics"]


def processed(port: int, ingest_only: bool) -> int:
    try:
        metrics = stats(port)
    except OSError:
        return 0
    if ingest_only:
        return int(sum(metrics.get("genmon_ingest_valid_total", {}).values()))
    return int(metrics.get("genmon_pipeline_events_total", {}).get("kind=inference", 0))


#: A worker with only the ingest installer: validation and dead letters, no pipeline.
INGEST_ONLY = (
    "import faust; from genmon.streams.app import create_app; "
    "faust.Worker(create_app(installers=['genmon.streams.ingest:install']), loglevel='info'"
    ").execute_from_commandline()"
)


#: Progress points (fractions of the events) at which the worker's RSS is sampled.
RSS_POINTS = (0.1, 0.25, 0.5, 0.75, 1.0)


def run_worker(
    env: dict[str, str],
    port: int,
    n: int,
    log: Path,
    *,
    ingest_only: bool = False,
    copies: int = 1,
) -> tuple[float, float, float, list[float], float]:
    """One worker, or ``copies`` of it in one consumer group (web ports ``port + i``).

    Returns (events/s from the first to the last event, RSS MiB when ready, RSS MiB at the
    end, RSS MiB at RSS_POINTS, events/s from 25 % to the last event). RSS is summed over
    the copies; the last rate leaves out the start, where copies join and the group
    rebalances.
    """
    genmon = str(Path(sys.executable).parent / "genmon")
    command = [sys.executable, "-c", INGEST_ONLY] if ingest_only else [genmon, "worker"]
    ports = [port + i for i in range(copies)]
    logs = [log] if copies == 1 else [log.with_suffix(f".{i}.log") for i in range(copies)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, path in enumerate(logs):
            with path.open("wb") as handle:
                procs.append(
                    subprocess.Popen(
                        command,
                        env={**env, "GENMON_WORKER__WEB_PORT": str(ports[i])},
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for proc, path in zip(procs, logs, strict=True):
            while "[^Worker]: Ready" not in path.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise SystemExit(f"worker died:\n{path.read_text()[-3000:]}")
                time.sleep(0.2)
        workers = [psutil.Process(proc.pid) for proc in procs]

        def rss() -> float:
            return sum(worker.memory_info().rss for worker in workers) / 2**20

        rss_start = rss()
        rss_along: list[float] = []
        first_seen = quarter_seen = None
        while True:
            done = sum(processed(each, ingest_only) for each in ports)
            now = time.perf_counter()
            if done and first_seen is None:
                first_seen, first_count = now, done
            if done >= n / 4 and quarter_seen is None:
                quarter_seen, quarter_count = now, done
            while len(rss_along) < len(RSS_POINTS) and done >= RSS_POINTS[len(rss_along)] * n:
                rss_along.append(rss())
            if done >= n:
                break
            time.sleep(0.05)
        assert first_seen is not None and quarter_seen is not None
        rate = (n - first_count) / (now - first_seen)
        steady = (n - quarter_count) / (now - quarter_seen)
        if not ingest_only:
            time.sleep(env_float(env, "GENMON_WINDOWS__IDLE_TIMEOUT_S") + 4)  # last windows
        return rate, rss_start, rss(), rss_along, steady
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def env_float(env: dict[str, str], name: str) -> float:
    return float(env[name])


def close_to_finding_p99(settings: Settings) -> tuple[float, int]:
    """p99 seconds from a window's close to its latency finding, over every window."""
    consumer = KafkaConsumer(
        settings.topic("windows"),
        settings.topic("findings"),
        **client_config(settings.kafka),
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )
    closed: dict[tuple[str, str], float] = {}
    found: dict[tuple[str, str], float] = {}
    for message in consumer:
        value = json.loads(message.value)
        if message.topic.endswith(".windows"):
            if value["kind"] == "tumbling":
                key = (value["model_id"], datetime.fromisoformat(value["window_end"]).isoformat())
                closed.setdefault(key, datetime.fromisoformat(value["closed_at"]).timestamp())
        elif value["detector"] == "slo" and value["signal"] == "latency_p99":
            key = (value["model_id"], datetime.fromisoformat(value["window_end"]).isoformat())
            found.setdefault(key, datetime.fromisoformat(value["emitted_at"]).timestamp())
    consumer.close()
    delays = [found[k] - closed[k] for k in found if k in closed]
    return (float(np.percentile(delays, 99)) if delays else float("nan")), len(delays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--span-s", type=float, default=120.0, help="event-time span of the scripted stream"
    )
    parser.add_argument(
        "--no-embeddings", action="store_true", help="skip (c), the embedding stage"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="(b') runs this many (b) workers in one consumer group (0 skips it)",
    )
    args = parser.parse_args()

    base = Settings()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    # base.kafka's security settings (TLS, SASL) carry over to the bench's clients.
    settings = Settings(kafka=base.kafka.model_copy(update={"topic_prefix": prefix}))
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    home = Path(tempfile.mkdtemp(prefix="genmon-bench-"))
    print(f"producing {args.events:,} events to {settings.topic('inference')} ...", flush=True)
    started = time.perf_counter()
    produce(settings, args.events, args.span_s)
    print(f"  produced in {time.perf_counter() - started:.1f} s", flush=True)

    ceiling = asyncio.run(bare_consumer(settings, args.events))
    print(f"  (a) done: {ceiling:,.0f} events/s; starting genmon worker ...", flush=True)

    port = 17000 + random.randint(0, 999)
    env = {
        **os.environ,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": prefix,
        "GENMON_WORKER__APP_ID": prefix,
        "GENMON_WORKER__WEB_PORT": str(port),
        "GENMON_HOME": str(home),
        "GENMON_DATABASE__URL": f"sqlite:///{home / 'genmon.sqlite'}",
        "GENMON_WINDOWS__TUMBLING_S": "10",
        "GENMON_WINDOWS__HOPPING_SIZE_S": "30",
        "GENMON_WINDOWS__HOPPING_STEP_S": "10",
        "GENMON_WINDOWS__ALLOWED_LATENESS_S": "2",
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
        "GENMON_WINDOWS__EXPIRES_S": "600",
        "GENMON_DETECTORS__SLOS": '{"*": ["latency_p99 <= 1ms"]}',
        "GENMON_FEEDBACK__JOIN_TTL_S": "60",
        "GENMON_DETECTORS__MIN_WINDOW_REQUESTS": "1",
    }
    ingest_env = {**env, "GENMON_WORKER__APP_ID": f"{prefix}-ingest"}
    ingest_rate, *_ = run_worker(
        ingest_env, port, args.events, home / "ingest.log", ingest_only=True
    )
    print(f"  ingest only: {ingest_rate:,.0f} events/s; starting the full worker ...", flush=True)
    rate, rss_start, rss_end, rss_along, steady = run_worker(
        {**env, "GENMON_EMBEDDING__ENABLED": "false"}, port, args.events, home / "worker.log"
    )
    print(f"  (b) done: {rate:,.0f} events/s; reading windows and findings ...", flush=True)
    p99, n_windows = close_to_finding_p99(settings)
    scaled: tuple[float, float] | None = None
    if args.workers > 1:
        group_env = {
            **env,
            "GENMON_WORKER__APP_ID": f"{prefix}-group",
            "GENMON_EMBEDDING__ENABLED": "false",
        }
        scaled_rate, *_, scaled_steady = run_worker(
            group_env, port, args.events, home / "group.log", copies=args.workers
        )
        scaled = scaled_rate, scaled_steady
        print(f"  (b') done: {scaled_steady:,.0f} events/s from 25 %", flush=True)
    embed_rate: float | None = None
    if not args.no_embeddings:
        embed_env = {**env, "GENMON_WORKER__APP_ID": f"{prefix}-embed"}
        embed_rate, *embed_rss, embed_along, _ = run_worker(
            embed_env, port, args.events, home / "embed.log"
        )
        print(f"  (c) done: {embed_rate:,.0f} events/s", flush=True)

    print()
    print(
        f"events: {args.events:,}   partitions: {settings.kafka.partitions}   "
        f"models: {len(MODELS)}   cpus: {os.cpu_count()}"
    )
    print(f"{'(a) bare aiokafka + json.loads (ceiling)':<52}{ceiling:>12,.0f} events/s")
    print(f"{'(a2) genmon worker, ingest only (validate + DLQ)':<52}{ingest_rate:>12,.0f} events/s")
    print(f"{'(b) genmon worker: ingest + aggregates + join':<52}{rate:>12,.0f} events/s")
    if embed_rate is None:
        print(f"{'(c) (b) + embedding stage':<52}{'skipped':>12}")
    else:
        print(
            f"{'(c) (b) + embedding stage (sampling + encoder)':<52}{embed_rate:>12,.0f} "
            f"events/s, RSS {embed_rss[0]:.0f} / {embed_rss[1]:.0f} MiB"
        )
        along = " / ".join(f"{rss:.0f}" for rss in embed_along)
        print(f"{'    its RSS along the run (as for (b) below)':<52}{along} MiB")
    if scaled is not None:
        label = f"(b') {args.workers} (b) workers in one consumer group"
        print(f"{label:<52}{scaled[0]:>12,.0f} events/s")
        label = "    from 25 % of the events on: (b) / (b')"
        print(f"{label:<52}{steady:>12,.0f} / {scaled[1]:,.0f} events/s, x{scaled[1] / steady:.2f}")
        label = "ratio (b')/(a)"
        print(f"{label:<52}{scaled[0] / ceiling:>12.2f}")
    print(f"{'ratio (b)/(a)':<52}{rate / ceiling:>12.2f}")
    print(f"{'ratio (b)/(a2): the pipeline over bare ingest':<52}{rate / ingest_rate:>12.2f}")
    print(
        f"{'p99 window close -> finding published':<52}{p99 * 1000:>12.1f} ms ({n_windows} windows)"
    )
    print(f"{'worker RSS at ready / at end':<52}{rss_start:>8.0f} / {rss_end:.0f} MiB")
    along = " / ".join(f"{rss:.0f}" for rss in rss_along)
    points = " / ".join(f"{point:.0%}" for point in RSS_POINTS)
    print(f"{'worker RSS after ' + points + ' of the events':<52}{along} MiB")
    print(f"{'RSS growth over the second half (end / 50%)':<52}{rss_end / rss_along[2]:>12.2f}")


if __name__ == "__main__":
    main()
