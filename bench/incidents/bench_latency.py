"""Benchmark: finding produced -> incident row -> signed webhook received, on loopback.

Each finding has its own fingerprint (model ``bench-<i>``), so each one opens an incident
and queues one trigger; the receiver verifies the HMAC and timestamps arrivals.
Findings are produced at a steady ``--rate`` (a burst would only measure queueing).

Two paths, measured in the same run so the ratio is meaningful on any machine:

- ``inprocess`` (baseline): IncidentManager + Dispatcher in one process, no Kafka;
- ``kafka``: a real ``genmon worker`` subprocess consuming the findings topic, with the
  dispatcher running inside the worker (``notify.run_in_worker``).

    .venv/bin/python bench/incidents/bench_latency.py --findings 10000 --rate 50

(``--mode kafka-incidents-only`` runs ``genmon worker --role incidents``: the incident
path without the detector pipeline.)

Needs the local broker (`genmon infra up`) for the kafka path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

from genmon import db
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.schemas import Finding
from genmon.schemas.codec import encode
from genmon.settings import DestinationSettings, Settings

SECRET = "bench-secret"


def make_finding(i: int, run: str) -> Finding:
    now = datetime.now(UTC)
    return Finding(
        model_id=f"bench-{run}-{i}",
        detector="page_hinkley",
        kind="anomaly",
        signal="latency_ms",
        window_end=now,
        score=2.0,
        threshold=1.0,
        detected=True,
        emitted_at=now,
    )


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": q(0.50) * 1000,
        "p90_ms": q(0.90) * 1000,
        "p99_ms": q(0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def latencies(
    receiver: WebhookReceiver, produced: dict[str, float], exclude: frozenset[str] = frozenset()
) -> tuple[list[float], list[float]]:
    """(produced -> webhook received, produced -> incident row) per finding, in seconds."""
    to_webhook, to_row = [], []
    for received in receiver.unique.values():
        incident = json.loads(received.body)["incident"]
        if incident["model_id"] in exclude:
            continue
        start = produced[incident["model_id"]]
        to_webhook.append(received.received_at - start)
        row_at = datetime.fromisoformat(incident["first_seen_at"]).timestamp()
        to_row.append(row_at - start)
    return to_webhook, to_row


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings_for(receiver: WebhookReceiver) -> Settings:
    settings = Settings.model_validate({})
    hook = DestinationSettings.model_validate(
        {"name": "hook", "url": receiver.url, "secret": SECRET, "rate_per_s": 1e5, "burst": 100_000}
    )
    return settings.model_copy(
        update={
            "notify": settings.notify.model_copy(update={"destinations": [hook]}),
            # The in-process mode has no broker: incident events are the Kafka modes' part.
            "incidents": settings.incidents.model_copy(
                update={"group_window_s": 0, "publish_events": False}
            ),
        }
    )


def run_inprocess(count: int, rate: float, workdir: Path) -> dict[str, object]:
    url = f"sqlite:///{workdir / 'inprocess.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    run = uuid.uuid4().hex[:8]
    produced: dict[str, float] = {}
    with WebhookReceiver(secret=SECRET) as receiver:
        settings = settings_for(receiver)
        manager = IncidentManager(engine, settings)
        dispatcher = Dispatcher(engine, settings)

        async def scenario() -> None:
            stop = asyncio.Event()
            runner = asyncio.create_task(dispatcher.run(stop))
            started = time.monotonic()
            for i in range(count):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                finding = make_finding(i, run)
                produced[finding.model_id] = time.time()
                await asyncio.to_thread(manager.process, finding)
                dispatcher.wake()
            await asyncio.to_thread(receiver.wait_for, count, 120)
            stop.set()
            await runner

        asyncio.run(scenario())
        to_webhook, to_row = latencies(receiver, produced)
    engine.dispose()
    return {"to_webhook": percentiles(to_webhook), "to_row": percentiles(to_row)}


def run_kafka(
    count: int, rate: float, workdir: Path, bootstrap: str, *, incidents_only: bool = False
) -> dict[str, object]:
    from kafka import KafkaProducer

    from genmon.infra.kafka import KafkaBroker
    from genmon.kafka_config import client_config

    workdir.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-{run}"
    url = f"sqlite:///{workdir / 'kafka.sqlite'}"
    produced: dict[str, float] = {}
    with WebhookReceiver(secret=SECRET) as receiver:
        destinations = workdir / "destinations.yaml"
        destinations.write_text(
            yaml.safe_dump(
                {
                    "destinations": [
                        {
                            "name": "hook",
                            "url": receiver.url,
                            "secret": SECRET,
                            "rate_per_s": 100_000,
                            "burst": 100_000,
                        }
                    ]
                }
            )
        )
        base = Settings.model_validate({})
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(
                    update={"topic_prefix": prefix, "bootstrap_servers": bootstrap}
                )
            }
        )
        KafkaBroker(settings).ensure_topics(bootstrap)
        env = {
            **os.environ,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "GENMON_KAFKA__TOPIC_PREFIX": prefix,
            "GENMON_DATABASE__URL": url,
            "GENMON_HOME": str(workdir / "home"),
            "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
            "GENMON_INCIDENTS__GROUP_WINDOW_S": "0",
            "GENMON_WORKER__APP_ID": prefix,
            "GENMON_WORKER__WEB_PORT": str(free_port()),
            "GENMON_WORKER__BATCH_WITHIN_S": "0.05",
        }
        log = (workdir / "worker.log").open("wb")
        command = [str(Path(sys.executable).with_name("genmon")), "worker", "--loglevel", "warning"]
        if incidents_only:
            command += ["--role", "incidents"]
            env["GENMON_INCIDENTS__RUN_IN_WORKER"] = "false"
        worker = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            producer = KafkaProducer(**client_config(settings.kafka), acks=1, linger_ms=0)
            topic = settings.topic("findings")
            # Warm-up finding: wait until the worker pages it, so startup is not measured.
            warm = make_finding(-1, run)
            produced[warm.model_id] = time.time()
            producer.send(topic, key=warm.fingerprint.encode(), value=encode(warm))
            producer.flush()
            if not receiver.wait_for(1, 240):
                raise SystemExit(f"worker did not page the warm-up finding; see {log.name}")
            started = time.monotonic()
            for i in range(count):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                finding = make_finding(i, run)
                produced[finding.model_id] = time.time()
                producer.send(topic, key=finding.fingerprint.encode(), value=encode(finding))
            producer.flush()
            producer.close()
            if not receiver.wait_for(count + 1, 300):
                print(f"only {len(receiver.unique)} of {count + 1} arrived", file=sys.stderr)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
            log.close()
        to_webhook, to_row = latencies(receiver, produced, frozenset({warm.model_id}))
    return {"to_webhook": percentiles(to_webhook), "to_row": percentiles(to_row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--findings", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=50.0, help="findings per second")
    parser.add_argument(
        "--mode",
        choices=["all", "inprocess", "kafka", "kafka-incidents-only"],
        default="all",
        help="kafka: the full `genmon worker`; kafka-incidents-only: its `--role incidents`",
    )
    parser.add_argument("--bootstrap", default=Settings.model_validate({}).kafka.bootstrap_servers)
    args = parser.parse_args()
    results: dict[str, object] = {"findings": args.findings, "rate_per_s": args.rate}
    with tempfile.TemporaryDirectory(prefix="genmon-bench-") as tmp:
        workdir = Path(tmp)
        if args.mode in ("all", "inprocess"):
            results["inprocess"] = run_inprocess(args.findings, args.rate, workdir)
        if args.mode in ("all", "kafka-incidents-only"):
            results["kafka_incidents_only"] = run_kafka(
                args.findings, args.rate, workdir / "only", args.bootstrap, incidents_only=True
            )
        if args.mode in ("all", "kafka"):
            results["kafka"] = run_kafka(args.findings, args.rate, workdir / "full", args.bootstrap)
    base = results.get("inprocess")
    for name in ("kafka_incidents_only", "kafka"):
        if base is not None and name in results:
            p99 = results[name]["to_webhook"]["p99_ms"]  # type: ignore[index]
            results[f"{name}_vs_inprocess_p99"] = p99 / base["to_webhook"]["p99_ms"]  # type: ignore[index]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
