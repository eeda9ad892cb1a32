"""A private Kafka broker a test may stop, freeze and start: its own home and ports, so
the shared broker of the other tests is never touched."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from genmon.infra.kafka import KafkaBroker
from genmon.settings import Settings


@contextmanager
def private_broker(
    kafka_settings: Settings, free_port: Callable[[], int], partitions: int = 2
) -> Iterator[KafkaBroker]:
    """A broker with its own home and ports, not started yet; stopped and removed after."""
    # Not tmp_path: concurrent pytest sessions prune each other's numbered basetemp folders.
    home = Path(tempfile.mkdtemp(prefix="genmon-private-broker-"))
    port, controller_port = free_port(), free_port()
    while controller_port == port:
        controller_port = free_port()
    settings = Settings.model_validate(
        {
            "home": home,
            "kafka": {
                "version": kafka_settings.kafka.version,
                "port": port,
                "controller_port": controller_port,
                "heap": "256m",
                "partitions": partitions,
            },
        }
    )
    broker = KafkaBroker(settings)
    # Share the jar cache of the main broker instead of resolving it again.
    broker.libs_dir.parent.mkdir(parents=True, exist_ok=True)
    broker.libs_dir.symlink_to(KafkaBroker(kafka_settings).ensure_jars(), target_is_directory=True)
    try:
        yield broker
    finally:
        thaw(broker)
        broker.down()
        shutil.rmtree(home, ignore_errors=True)


def freeze(broker: KafkaBroker) -> None:
    """SIGSTOP the broker: connections stay open and nothing answers (a stalled host)."""
    pid = broker.status().pid
    assert pid is not None, "the private broker is not running"
    os.kill(pid, signal.SIGSTOP)


def thaw(broker: KafkaBroker) -> None:
    pid = broker.status().pid
    if pid is not None:
        os.kill(pid, signal.SIGCONT)
