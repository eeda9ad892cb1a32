"""The embedding stage on the real broker: a prompt-domain switch becomes a drift finding.

A `genmon worker` subprocess samples every prompt (rate 1.0), writes each 5 s slot's
sub-sample (``embedding.flush_interval_s``) to ``<prefix>.embed-requests``, encodes it with
the bundled model and feeds the embedding drift detector, one look per sub-sample. The
test writes its own prompts: windows of cooking questions (the basis and the reference),
then a window of questions about cars and engines, 100 prompts in each half of every
window. Event times are set in the past on a 10 s grid so the slots are known exactly; the
last one ends when the model goes idle. The drift is found on the first half-window of
car prompts, not when their window closes. The same flow runs with the encoder in its
own `genmon worker --role embed` process.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer

from genmon.db import upgrade
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import Finding, InferenceEvent
from genmon.settings import Settings
from genmon.streams.embedding.stage import BacklogProbe

pytestmark = pytest.mark.kafka

GENMON = str(Path(sys.executable).parent / "genmon")
WINDOW_S = 10
FLUSH_S = 5  # embedding.flush_interval_s's default: two sub-samples per window
PER_WINDOW = 200
PER_SLOT = PER_WINDOW // 2
#: Windows of cooking prompts: 1.5 fix the drift test's principal components (300 rows),
#: 5 make its reference (10 looks, 1000 rows); the car prompts come in the window after.
COOKING_WINDOWS = 7
WINDOWS_SENT = COOKING_WINDOWS + 1
SUB_SAMPLES = WINDOWS_SENT * WINDOW_S // FLUSH_S
MODEL = "assistant"
OPENERS = ("", "Quick question: ")


def cooking_prompts() -> list[str]:
    dishes = [
        "lasagne",
        "banana bread",
        "risotto",
        "roast chicken",
        "pancakes",
        "falafel",
        "sourdough",
        "apple pie",
        "ramen",
        "chili con carne",
        "paella",
        "brownies",
    ]
    asks = [
        "How long should I bake the {} and at what temperature?",
        "What can I use instead of eggs in my {}?",
        "Why did my {} come out dry, and how do I keep it moist next time?",
        "Give me a simple {} recipe for four people.",
        "Which spices go best with {}?",
        "Can I freeze leftover {} and how do I reheat it?",
        "How do I stop my {} from sticking to the pan?",
        "Is it fine to prepare the {} the night before the dinner party?",
        "What wine would you serve with {}?",
        "How much salt goes into a {} for six?",
    ]
    return [o + a.format(d) for o, a, d in itertools.product(OPENERS, asks, dishes)]


def car_prompts() -> list[str]:
    parts = [
        "alternator",
        "brake pads",
        "timing belt",
        "spark plugs",
        "radiator",
        "clutch",
        "fuel pump",
        "starter motor",
        "catalytic converter",
        "gearbox",
        "shock absorbers",
        "battery",
    ]
    asks = [
        "My car makes a grinding noise; could the {} be worn out?",
        "How often should the {} be replaced on a diesel hatchback?",
        "What does it cost to fix the {} at a garage?",
        "The check engine light is on; how do I test the {} myself?",
        "Can I drive with a failing {} or will it damage the engine?",
        "Which tools do I need to change the {} at home?",
        "What are the warning signs of a bad {} in winter?",
        "Is the {} covered by the manufacturer's warranty after 60,000 miles?",
        "Why does my engine overheat after I replaced the {}?",
        "How long does it take a mechanic to swap the {}?",
    ]
    return [o + a.format(p) for o, a, p in itertools.product(OPENERS, asks, parts)]


class Worker:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = int(env["GENMON_WORKER__WEB_PORT"])
        self.log = log
        with log.open("ab") as handle:
            self.proc = subprocess.Popen(
                [GENMON, "worker", "--loglevel", "info", *args],
                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            if "[^Worker]: Ready" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout} s:\n{self.tail()}")

    def metrics(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/stats"
        with urllib.request.urlopen(url, timeout=5) as reply:
            found: dict[str, Any] = json.loads(reply.read())["metrics"]
            return found

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def start_worker(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> Iterator[Callable[..., Worker]]:
    settings = Settings(
        kafka={
            "bootstrap_servers": kafka_settings.kafka.bootstrap_servers,
            "topic_prefix": unique_name,
        }
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    db_url = f"sqlite:///{tmp_path / 'genmon.sqlite'}"
    upgrade(db_url)
    base_env = {
        **os.environ,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
        "GENMON_WORKER__APP_ID": unique_name,
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_DATABASE__URL": db_url,
        "GENMON_NOTIFY__RUN_IN_WORKER": "false",
        "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
        "GENMON_WINDOWS__TUMBLING_S": str(WINDOW_S),
        "GENMON_WINDOWS__ALLOWED_LATENESS_S": "1",
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
        "GENMON_WINDOWS__CLOSE_INTERVAL_S": "0.5",
        "GENMON_WINDOWS__EXPIRES_S": "600",
        "GENMON_EMBEDDING__FIELDS": '["prompt"]',
        "GENMON_EMBEDDING__SAMPLE_RATE": "1.0",
        "GENMON_EMBEDDING__BATCH_WITHIN_S": "0.2",
        "GENMON_EMBEDDING__BACKLOG_CHECK_INTERVAL_S": "1",
        "GENMON_DETECTORS__DRIFT_REFERENCE_WINDOWS": "5",
        # The worker's own cache: a warm cache spares each test the int8 export.
        "GENMON_EMBEDDING__CACHE_DIR": str(Settings().embedding.cache_dir.resolve()),
    }
    workers: list[Worker] = []

    def start(*args: str, **env: str) -> Worker:
        full = {**base_env, "GENMON_WORKER__WEB_PORT": str(free_port()), **env}
        workers.append(Worker(full, tmp_path / f"worker-{len(workers)}.log", *args))
        return workers[-1]

    start.settings = settings  # type: ignore[attr-defined]
    yield start
    for worker in workers:
        worker.stop()


def send_domain_switch(settings: Settings) -> datetime:
    """Cooking prompts for seven windows, car prompts in the next; return the last's end.

    Each half of a window gets 100 prompts 0.5-2.5 s after its start, so every sub-sample
    holds exactly 100 (none completes near a slot's boundary)."""
    now = int(time.time()) - 30 - WINDOWS_SENT * WINDOW_S
    first = datetime.fromtimestamp(now - now % WINDOW_S, UTC)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=5)
    cooking, cars = itertools.cycle(cooking_prompts()), car_prompts()
    assert len(cars) >= PER_WINDOW
    for window in range(WINDOWS_SENT):
        prompts = cars if window == COOKING_WINDOWS else cooking
        for i, prompt in zip(range(PER_WINDOW), prompts, strict=False):
            offset = FLUSH_S * (i // PER_SLOT) + 0.5 + (i % PER_SLOT) * 0.02
            at = first + timedelta(seconds=window * WINDOW_S + offset)
            event = InferenceEvent(
                model_id=MODEL, model_version="v1", prompt=prompt, response="ok",
                latency_ms=100.0, started_at=at,
            )  # fmt: skip
            producer.send(
                settings.topic("inference"),
                key=MODEL.encode(),
                value=event.model_dump_json().encode(),
            )
    producer.flush()
    producer.close()
    return first + timedelta(seconds=WINDOWS_SENT * WINDOW_S)


def wait_for_drift(settings: Settings, workers: list[Worker], timeout: float) -> Finding:
    consumer = KafkaConsumer(
        settings.topic("findings"),
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in workers:
                assert worker.proc.poll() is None, worker.tail()
            for message in consumer:
                finding = Finding.model_validate_json(message.value)
                if finding.signal == "embedding_prompt" and finding.detected:
                    return finding
    finally:
        consumer.close()
    logs = "\n".join(worker.tail() for worker in workers)
    raise AssertionError(f"no embedding drift finding in {timeout} s\n{logs}")


def wait_for_metrics(
    worker: Worker, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = worker.metrics()
        if condition(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def test_a_prompt_domain_switch_is_found_by_the_worker(start_worker) -> None:
    settings = start_worker.settings
    worker = start_worker()
    worker.wait_ready()
    switch_end = send_domain_switch(settings)
    finding = wait_for_drift(settings, [worker], timeout=150)
    assert (finding.model_id, finding.model_version, finding.kind) == (MODEL, "v1", "drift")
    # The first sub-sample of car prompts, half a window before their window closes.
    assert finding.window_end == switch_end - timedelta(seconds=FLUSH_S)
    assert finding.evidence["window_n"] == PER_SLOT
    # The backlog counts what the encoder has not committed; commits lag a few seconds.
    metrics = wait_for_metrics(worker, lambda m: m["genmon_embedding_backlog"] == 0, 30)
    assert metrics["genmon_embedding_backlog_errors_total"] == 0
    assert metrics["genmon_embedding_texts_queued_total"] == WINDOWS_SENT * PER_WINDOW
    assert metrics["genmon_embedding_encoded_total"] == WINDOWS_SENT * PER_WINDOW
    assert metrics["genmon_embedding_samples_submitted_total"] == {"complete=true": SUB_SAMPLES}
    assert metrics["genmon_embedding_sample_rate"] == 1
    assert metrics["genmon_embedding_sentences_per_second"] > 0
    assert list(metrics["genmon_embedding_encoder_info"]) == ["backend=onnx,device=cpu"]


def test_the_encoder_can_run_in_its_own_worker_process(start_worker) -> None:
    settings = start_worker.settings
    main = start_worker(GENMON_EMBEDDING__RUN_ENCODER="false")
    encoder = start_worker("--role", "embed", GENMON_EMBEDDING__RUN_ENCODER="false")
    main.wait_ready()
    encoder.wait_ready()
    send_domain_switch(settings)
    finding = wait_for_drift(settings, [main, encoder], timeout=150)
    assert finding.model_id == MODEL
    sampler_side = wait_for_metrics(main, lambda m: m["genmon_embedding_backlog"] == 0, 30)
    assert sampler_side["genmon_embedding_backlog_errors_total"] == 0
    assert sampler_side["genmon_embedding_texts_queued_total"] == WINDOWS_SENT * PER_WINDOW
    assert sampler_side["genmon_embedding_encoded_total"] == 0
    encoder_side = encoder.metrics()
    assert encoder_side["genmon_embedding_encoded_total"] == WINDOWS_SENT * PER_WINDOW
    assert encoder_side["genmon_embedding_samples_submitted_total"] == {
        "complete=true": SUB_SAMPLES
    }


def test_backlog_probe_counts_messages_beyond_the_groups_commits(
    kafka_settings: Settings, unique_name: str
) -> None:
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.structs import OffsetAndMetadata

    bootstrap = kafka_settings.kafka.bootstrap_servers
    topic, group = f"{unique_name}.embed-requests", f"{unique_name}-encoder"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(30):
        producer.send(topic, value=b"x", partition=i % 2)
    producer.flush()
    producer.close()
    probe = BacklogProbe(bootstrap, topic, group)
    try:
        assert probe.read() == 30  # nothing committed: all of it waits
        committer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(10, "", -1)})
        committer.close()
        assert probe.read() == 20
    finally:
        probe.close()
