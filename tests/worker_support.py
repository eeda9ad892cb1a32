"""Real `genmon worker` processes and what a test reads from them, for the worker tests
on the real broker (tests/streams) and the fault tests (tests/faults).

Every harness gets its own topic prefix, app id (consumer group), web port, home and
SQLite database, and small windows (2 s tumbling, 4 s / 2 s hopping, 1 s allowed
lateness) so windows close within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from genmon.db import upgrade
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.events import FeedbackEvent, Finding, InferenceEvent
from genmon.settings import Settings

GENMON = str(Path(sys.executable).parent / "genmon")


class WorkerProcess:
    """One `genmon worker` subprocess with its own log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = int(env["GENMON_WORKER__WEB_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [GENMON, "worker"],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            if "[^Worker]: Ready" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as reply:
            return json.loads(reply.read())["metrics"]

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Harness:
    """Settings, producer, output readers and workers of one test."""

    def __init__(
        self,
        kafka_settings: Settings,
        name: str,
        tmp: Path,
        free_port: Callable[[], int],
        **extra_env: str,
    ) -> None:
        self.name, self.tmp, self.free_port = name, tmp, free_port
        self.db_url = f"sqlite:///{tmp / 'genmon.sqlite'}"
        self.env = {
            **os.environ,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.kafka.bootstrap_servers,
            "GENMON_KAFKA__TOPIC_PREFIX": name,
            "GENMON_WORKER__APP_ID": name,
            "GENMON_HOME": str(tmp / "home"),
            "GENMON_DATABASE__URL": self.db_url,
            "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
            "GENMON_WINDOWS__TUMBLING_S": "2",
            "GENMON_WINDOWS__HOPPING_SIZE_S": "4",
            "GENMON_WINDOWS__HOPPING_STEP_S": "2",
            "GENMON_WINDOWS__ALLOWED_LATENESS_S": "1",
            "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
            "GENMON_WINDOWS__EXPIRES_S": "120",
            "GENMON_WINDOWS__CLOSE_INTERVAL_S": "0.5",
            "GENMON_DETECTORS__MIN_WINDOW_REQUESTS": "1",
            # The embedding stage has its own tests; here it would only load a model.
            "GENMON_EMBEDDING__ENABLED": "false",
            # A killed worker leaves the group in 6 s, not 60 s.
            "GENMON_WORKER__SESSION_TIMEOUT_S": "6",
            "GENMON_WORKER__HEARTBEAT_INTERVAL_S": "1",
            **extra_env,
        }
        self.settings = Settings(
            kafka={
                "bootstrap_servers": kafka_settings.kafka.bootstrap_servers,
                "topic_prefix": name,
            }
        )
        KafkaBroker(self.settings).ensure_topics(self.settings.kafka.bootstrap_servers)
        upgrade(self.db_url)
        self.producer = KafkaProducer(
            bootstrap_servers=kafka_settings.kafka.bootstrap_servers, linger_ms=5
        )
        self.workers: list[WorkerProcess] = []
        self._consumer = KafkaConsumer(
            self.settings.topic("windows"),
            self.settings.topic("findings"),
            bootstrap_servers=kafka_settings.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            consumer_timeout_ms=500,
            group_id=f"{name}-reader",
        )
        self.windows: list[dict[str, Any]] = []
        self.findings: list[Finding] = []

    def worker(self) -> WorkerProcess:
        env = {**self.env, "GENMON_WORKER__WEB_PORT": str(self.free_port())}
        worker = WorkerProcess(env, self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def send(self, event: InferenceEvent | FeedbackEvent) -> None:
        kind = "inference" if isinstance(event, InferenceEvent) else "feedback"
        self.producer.send(
            self.settings.topic(kind),
            key=event.model_id.encode(),
            value=event.model_dump_json().encode(),
        )

    def poll(self) -> None:
        for message in self._consumer:
            if message.topic.endswith(".windows"):
                self.windows.append(json.loads(message.value))
            else:
                self.findings.append(Finding.model_validate_json(message.value))

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        self.producer.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return
        logs = "\n".join(w.log.read_text()[-2000:] for w in self.workers)
        raise AssertionError(f"timed out waiting for {what}\n{self._state()}\n{logs}")

    def _state(self) -> str:
        """What a timed-out test saw: the windows read, and each live worker's counters."""
        seen = sorted((w["model_id"], w["kind"], w["start_ms"]) for w in self.windows)
        lines = [f"windows read: {seen}"]
        for n, worker in enumerate(self.workers):
            if worker.proc is not None and worker.proc.poll() is None:
                try:
                    metrics = worker.stats()
                except OSError as error:
                    lines.append(f"worker {n}: no stats ({error})")
                    continue
                counters = {k: v for k, v in metrics.items() if k.startswith("genmon_pipeline")}
                lines.append(f"worker {n}: {json.dumps(counters, sort_keys=True)}")
        return "\n".join(lines)

    def window(self, model: str, kind: str, start_ms: int) -> dict[str, Any] | None:
        return next(
            (
                w
                for w in self.windows
                if w["model_id"] == model and w["kind"] == kind and w["start_ms"] == start_ms
            ),
            None,
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.producer.close()
        self._consumer.close()
