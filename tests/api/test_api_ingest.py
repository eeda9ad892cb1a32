"""HTTP ingest (`POST /v1/inferences`, `/v1/feedback`) against the real broker and a real
`genmon worker`: what is accepted is counted exactly once by the worker, in order; what is
refused names the event and the field and never reaches Kafka."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_ingest_support import end_offsets, running_api, topic_settings

from genmon.api.metrics import metrics_of
from genmon.api.tokens import create_token
from genmon.schemas.access import Scope
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka]

INFERENCES = 10_000
FEEDBACK = 2_000
BATCH = 500
MODELS = [f"m{i}" for i in range(5)]


def _start_worker(settings: Settings, name: str, port: int, tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_DATABASE__URL": f"sqlite:///{tmp_path / 'worker.sqlite'}",
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "GENMON_WORKER__APP_ID": name,
        "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
        "GENMON_EMBEDDING__ENABLED": "false",
    }
    log = (tmp_path / "worker.log").open("wb")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "genmon.cli", "worker", "--loglevel", "warning",
             "--web-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _worker_ingest(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
            stats: dict[str, Any] = json.loads(reply.read())["ingest"]
            return stats
    except OSError:
        return None  # not serving yet


@pytest.fixture
def worker(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> Iterator[tuple[Settings, int, Path]]:
    settings = topic_settings(kafka_settings, unique_name)
    port = free_port()
    process = _start_worker(settings, unique_name, port, tmp_path)
    try:
        yield settings, port, tmp_path / "worker.log"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _inferences(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "request_id": f"r{i}",
            "model_id": MODELS[(i * 3 + i // 7) % len(MODELS)],
            "latency_ms": float(i % 500),
            "prompt": f"q{i}",
            "response": f"a{i}",
        }
        for i in range(start, start + count)
    ]


def test_posted_events_reach_the_worker_exactly_and_refused_ones_never_reach_kafka(
    worker: tuple[Settings, int, Path], tmp_path: Path, free_port: Callable[[], int]
) -> None:
    settings, worker_port, worker_log = worker
    with (
        running_api(settings, tmp_path, free_port()) as api,
        httpx.Client(base_url=api.url, headers=api.headers, timeout=60) as client,
    ):
        # Refused, all or nothing: one bad event withholds the whole batch.
        before = end_offsets(settings, "inference", "feedback")
        bad = _inferences(0, 10)
        bad[3]["latency_ms"] = "slow"
        del bad[7]["model_id"]
        reply = client.post("/v1/inferences", json={"events": bad})
        assert reply.status_code == 422
        messages = [error["msg"] for error in reply.json()["detail"]]
        assert messages[0].startswith("events[3].latency_ms: ")
        assert messages[1].startswith("events[7].model_id: ")
        assert [e["type"] for e in reply.json()["detail"]] == ["wrong_type", "missing_field"]
        reply = client.post("/v1/feedback", json=[{"request_id": "r1", "model_id": "m1"}])
        assert reply.status_code == 422 and reply.json()["detail"][0]["msg"].startswith(
            "events[0]: "
        )
        assert end_offsets(settings, "inference", "feedback") == before

        # Accepted: 10,000 inferences and 2,000 feedback, from 4 concurrent clients.
        def post(path: str, batch: list[dict[str, Any]]) -> int:
            answer = client.post(path, json=batch if len(batch) % 2 else {"events": batch})
            assert answer.status_code == 202, answer.text
            ids = [e.get("request_id") for e in batch] if "inferences" in path else None
            assert answer.json()["ids"] == ids or len(answer.json()["ids"]) == len(batch)
            accepted: int = answer.json()["accepted"]
            return accepted

        jobs = [("/v1/inferences", _inferences(i, BATCH)) for i in range(0, INFERENCES, BATCH)]
        jobs += [
            (
                "/v1/feedback",
                [
                    {"request_id": f"r{i}", "model_id": MODELS[i % 5], "score": (i % 10) / 10}
                    for i in range(j, j + BATCH)
                ],
            )
            for j in range(0, FEEDBACK, BATCH)
        ]
        with ThreadPoolExecutor(4) as pool:
            accepted = sum(pool.map(lambda job: post(*job), jobs))
        assert accepted == INFERENCES + FEEDBACK
        # One event alone, gzip on the wire, is accepted too.
        one = client.post(
            "/v1/inferences",
            content=gzip.compress(json.dumps(_inferences(INFERENCES, 1)[0]).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert one.status_code == 202, one.text
        sent = accepted + 1
        counted = metrics_of(api.app).ingest_accepted
        assert (
            sum(
                counted.labels(kind=kind, route="json")._value.get()
                for kind in ("inference", "feedback")
            )
            == sent
        )

    total = {settings.topic("inference"): sent - FEEDBACK, settings.topic("feedback"): FEEDBACK}
    deadline = time.monotonic() + 150
    stats: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        stats = _worker_ingest(worker_port)
        if stats is not None and stats["valid"] >= sum(total.values()):
            break
        time.sleep(0.5)
    assert stats is not None, worker_log.read_text()[-3000:]
    assert stats["valid_by_topic"] == total, worker_log.read_text()[-3000:]
    assert (stats["invalid"], stats["deadletter_sent"]) == (0, 0)
    assert (stats["gaps"], stats["out_of_order"], stats["duplicates"]) == (0, 0, 0)


def test_oversized_malformed_and_unauthorised_requests_are_refused_before_kafka(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    settings = topic_settings(kafka_settings, unique_name, max_batch_events=10, max_body_bytes=2048)
    before = end_offsets(settings, "inference", "feedback")
    with (
        running_api(settings, tmp_path, free_port()) as api,
        httpx.Client(base_url=api.url, headers=api.headers, timeout=30) as client,
    ):
        _, reader = create_token(api.app.state.engine, "reader", [Scope.READ])
        one = _inferences(0, 1)[0]
        assert httpx.post(f"{api.url}/v1/inferences", json=one).status_code == 401
        assert (
            client.post(
                "/v1/inferences", json=one, headers={"Authorization": f"Bearer {reader}"}
            ).status_code
            == 403
        )

        many = client.post("/v1/inferences", json=_inferences(0, 11))
        assert many.status_code == 413 and "api.max_batch_events" in many.json()["detail"]
        padded = {**one, "prompt": "x" * 3000}
        assert client.post("/v1/inferences", json=padded).status_code == 413  # Content-Length
        body = json.dumps(padded).encode()
        chunked = client.post(
            "/v1/inferences",
            content=(body[i : i + 500] for i in range(0, len(body), 500)),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 413 and "api.max_body_bytes" in chunked.json()["detail"]
        bomb = client.post(
            "/v1/inferences",
            content=gzip.compress(body),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert bomb.status_code == 413
        for content, kind in ((b"{not json", "bad_json"), (b'{"events": 3}', "not_an_object")):
            reply = client.post("/v1/feedback", content=content)
            assert reply.status_code == 422 and reply.json()["detail"][0]["type"] == kind

        refused = metrics_of(api.app).ingest_refused
        assert refused.labels(kind="inference", reason="too_many_events")._value.get() == 11
    assert end_offsets(settings, "inference", "feedback") == before


def test_a_broker_that_does_not_answer_gets_503_naming_the_timeout(
    settings: Settings, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    down = settings.model_copy(
        update={"kafka": kafka, "api": settings.api.model_copy(update={"ingest_timeout_s": 1.0})}
    )
    with running_api(down, tmp_path, free_port()) as api:
        reply = httpx.post(
            f"{api.url}/v1/inferences", json=_inferences(0, 2), headers=api.headers, timeout=30
        )
    assert reply.status_code == 503
    assert "2 of 2 events were not acknowledged" in reply.json()["detail"]
    assert "api.ingest_timeout_s" in reply.json()["detail"]
