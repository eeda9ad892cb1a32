"""HTTP ingest throughput against the SDK's, in the same run, on the same broker.

    .venv/bin/python -m bench.http_ingest                  # the recorded run (~1 min)
    .venv/bin/python -m bench.http_ingest --events 50000 --clients 8 --repeats 5
    .venv/bin/python -m bench.http_ingest --json

Each row sends the same inference events (8 models, short prompt and response, segment
attributes) to topics of their own on the local broker (``genmon infra up``), and counts
an event once the broker acknowledged it (``kafka.acks``, ``all`` by default):

* **sdk**: one :class:`genmon.Monitor` in this process, ``log_inference`` per event,
  then ``flush`` (the baseline);
* **http batch**: the API (``uvicorn`` running :func:`genmon.api.app.create_app` in a
  subprocess, one worker process) receiving ``POST /v1/inferences`` with ``--batch``
  events per request from ``--clients`` concurrent keep-alive connections; a request is
  answered 202 only after the broker acknowledged its events;
* **http single**: the same with one event per request (the fewest events per call a
  service might send), on ``--events / 10`` events.

The client pre-serializes every body, so the rate is the API's, not the client's. Rates
run from the first call to the last acknowledgement, after one warm-up call for both (the
producer connects); each cell is the fastest of ``--repeats`` runs (on a shared machine
other work only slows a run down), in the order sdk, http batch, http single per repeat.
The load average before and after is printed: the API, the client and the broker share
the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from genmon import Monitor
from genmon.api.tokens import create_token
from genmon.db import make_engine, upgrade
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.access import Scope
from genmon.settings import Settings

MODELS = [f"bench-model-{k}" for k in range(8)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.http_ingest", description=__doc__.split("\n")[0]
    )
    p.add_argument("--events", type=int, default=20_000, help="events per sdk / http batch run")
    p.add_argument("--batch", type=int, default=500, help="events per HTTP request")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP connections")
    p.add_argument("--repeats", type=int, default=3, help="runs per row (the fastest counts)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def events(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "request_id": f"b{offset + i}",
            "model_id": MODELS[i % len(MODELS)],
            "model_version": "v1",
            "prompt": "What is the weather like today in Paris?",
            "response": "The weather in Paris is mild with light rain in the afternoon.",
            "latency_ms": 300.0 + i % 500,
            "prompt_tokens": 12,
            "completion_tokens": 17,
            "segment": {"locale": ("en", "fr", "de", "es")[i % 4], "tier": ("free", "pro")[i % 2]},
        }
        for i in range(n)
    ]


def sdk_rate(settings: Settings, batch: list[dict[str, Any]]) -> float:
    with Monitor(settings=settings) as monitor:
        monitor.log_inference(batch[0])  # warm, as the API is: the producer connects
        assert monitor.flush(timeout=60), "the SDK did not connect in a minute"
        started = time.perf_counter()
        for event in batch[1:]:
            monitor.log_inference(event)
        assert monitor.flush(timeout=300), "the SDK did not deliver in 5 minutes"
        elapsed = time.perf_counter() - started
        assert monitor.stats.sent == len(batch), monitor.stats
    return (len(batch) - 1) / elapsed


def http_rate(url: str, token: str, bodies: list[bytes], clients: int, per_body: int) -> float:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=120, limits=httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients
    )) as client:  # fmt: skip

        def post(body: bytes) -> int:
            reply = client.post("/v1/inferences", content=body)
            assert reply.status_code == 202, reply.text[:500]
            accepted: int = reply.json()["accepted"]
            return accepted

        post(bodies[0])  # warm: the producer connects on the first request
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            accepted = sum(pool.map(post, bodies[1:]))
        elapsed = time.perf_counter() - started
    assert accepted == (len(bodies) - 1) * per_body
    return accepted / elapsed


class Api:
    """The API in a uvicorn subprocess, on its own topics and SQLite database."""

    def __init__(self, settings: Settings, home: Path) -> None:
        self.port = _free_port()
        db_url = f"sqlite:///{home / 'api.sqlite'}"
        upgrade(db_url)
        engine = make_engine(db_url)
        _, self.token = create_token(engine, "bench", [Scope.INGEST])
        engine.dispose()
        env = {
            **os.environ,
            "GENMON_HOME": str(home),
            "GENMON_DATABASE__URL": db_url,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "GENMON_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "GENMON_API__MAX_BATCH_EVENTS": "10000",
            "GENMON_API__MAX_BODY_BYTES": str(64 * 1024 * 1024),
        }
        self.log = (home / "api.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "genmon.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
             "--no-access-log"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, (home / "api.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{self.url}/openapi.json", timeout=2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the API did not start in 60 s"
                time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = Settings()
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(
                update={"topic_prefix": f"bench-http-{uuid.uuid4().hex[:8]}"}
            )
        }
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    data = events(args.events)
    batched = [
        json.dumps({"events": data[i : i + args.batch]}).encode()
        for i in range(0, len(data), args.batch)
    ]
    single_n = max(args.events // 10, 2)
    singles = [json.dumps(event).encode() for event in data[:single_n]]
    runs: dict[str, list[float]] = {"sdk": [], "http batch": [], "http single": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as home:
        api = Api(settings, Path(home))
        try:
            rows: list[tuple[str, Callable[[], float]]] = [
                ("sdk", lambda: sdk_rate(settings, data)),
                (
                    "http batch",
                    lambda: http_rate(api.url, api.token, batched, args.clients, args.batch),
                ),
                ("http single", lambda: http_rate(api.url, api.token, singles, args.clients, 1)),
            ]
            for _ in range(args.repeats):
                for name, run in rows:
                    runs[name].append(run())
        finally:
            api.close()
    load_after = os.getloadavg()
    return {
        "events": args.events,
        "single_events": single_n,
        "batch": args.batch,
        "clients": args.clients,
        "acks": settings.kafka.acks,
        "runs": runs,
        "best": {name: max(rates) for name, rates in runs.items()},
        "load_before": load_before,
        "load_after": load_after,
        "machine": f"{os.cpu_count()} cores ({platform.machine()}), "
        f"python {platform.python_version()}",
    }


def table(result: dict[str, Any]) -> str:
    best = result["best"]
    sdk = best["sdk"]
    lines = [
        "| sender | events | events per call | events/s | vs SDK |",
        "|---|---:|---:|---:|---:|",
        f"| SDK (`Monitor.log_inference`, flush) | {result['events']:,} | 1 | {sdk:,.0f} | 1.00 |",
        f"| HTTP `POST /v1/inferences`, {result['clients']} clients | {result['events']:,} | "
        f"{result['batch']} | {best['http batch']:,.0f} | {best['http batch'] / sdk:.2f} |",
        f"| HTTP `POST /v1/inferences`, {result['clients']} clients | {result['single_events']:,} "
        f"| 1 | {best['http single']:,.0f} | {best['http single'] / sdk:.2f} |",
        "",
        f"acks={result['acks']}; fastest of {len(result['runs']['sdk'])} runs; "
        f"{result['machine']}; load average before "
        f"{'/'.join(f'{x:.2f}' for x in result['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in result['load_after'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
