"""Exact windows under broker faults, as a user would see them.

A private broker, a real ``genmon worker`` with default settings apart from short windows,
and services logging through the SDK at a steady rate while the broker is frozen
(SIGSTOP: connections stay open, nothing answers) or stopped and started. The probe then
waits until every window has closed and returns what each side counted; the invariant
is ``windowed + late + future == sent <= validated``, and a window record sent again
after a restart is identical to the first one.

``tests/faults/test_broker_faults.py`` runs short probes; ``make faults`` the full-length
ones (tests/faults/run.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from broker_support import freeze, thaw
from worker_support import Harness

from genmon import Monitor
from genmon.infra.kafka import KafkaBroker

MODELS = ("chat", "search", "code")


@dataclass
class WindowProbe:
    """What one probe counted."""

    fault: str
    outage_s: float
    sent: int
    validated: int
    windowed: int
    late: int
    future: int
    unaccounted: int
    #: Events that arrived after a later event of their producer and model.
    out_of_order: int
    window_records: int
    resent_identical: int
    resent_different: int

    @property
    def exact(self) -> bool:
        return (
            self.windowed + self.late + self.future == self.sent <= self.validated
            and self.unaccounted == 0
            and self.resent_different == 0
        )

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact}


def run_probe(
    broker: KafkaBroker,
    harness: Callable[..., Harness],
    fault: str,
    *,
    rate: float = 100.0,
    before_s: float = 5.0,
    outage_s: float = 12.0,
    after_s: float = 5.0,
    timeout_s: float = 180.0,
) -> WindowProbe:
    """Log ``rate`` inferences/s for ``before_s``, through a ``fault`` of ``outage_s``
    (``freeze`` or ``stop``), then ``after_s`` more; count."""
    h = harness(
        GENMON_WINDOWS__IDLE_TIMEOUT_S="5",  # the default: only the windows are short
        GENMON_WORKER__SESSION_TIMEOUT_S="10",
        GENMON_WORKER__HEARTBEAT_INTERVAL_S="1",
    )
    worker = h.worker().start()
    worker.wait_ready()
    monitor = Monitor(settings=h.settings, buffer_max_events=1_000_000, linger_ms=5)
    sent = 0
    stop = threading.Event()

    def log_steadily() -> None:
        nonlocal sent
        start, n = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while n < due:
                model = MODELS[n % len(MODELS)]
                assert monitor.log_inference(model_id=model, latency_ms=20.0, prompt=f"q{n}")
                n += 1
            time.sleep(0.01)
        sent = n

    sender = threading.Thread(target=log_steadily, name="probe-sender")
    sender.start()
    try:
        time.sleep(before_s)
        _fault(fault, broker, outage_s)
        time.sleep(after_s)
    finally:
        stop.set()
        sender.join()
    assert monitor.flush(timeout=120), monitor.stats
    monitor.close(timeout=10)
    probe = _settle(h, worker, sent, timeout_s)
    probe.fault, probe.outage_s = fault, outage_s
    return probe


def _fault(fault: str, broker: KafkaBroker, outage_s: float) -> None:
    if fault == "freeze":
        freeze(broker)
        time.sleep(outage_s)
        thaw(broker)
    elif fault == "stop":
        broker.down()
        time.sleep(outage_s)
        broker.up()
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _metric(stats: dict[str, Any], name: str, topic: str = "") -> int:
    value = stats.get(name, 0)
    if isinstance(value, dict):
        return int(sum(v for k, v in value.items() if k.endswith(topic)))
    return int(value)


def _settle(h: Harness, worker: Any, sent: int, timeout_s: float) -> WindowProbe:
    """Read window records and the worker's counters until every sent event is in a
    closed tumbling window or counted late or future (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        h.poll()
        probe = _count(sent, worker.stats(), h.windows)
        if probe.windowed + probe.late + probe.future >= sent or time.monotonic() > deadline:
            return probe


def _count(sent: int, stats: dict[str, Any], records: list[dict[str, Any]]) -> WindowProbe:
    by_key: dict[tuple[str, str, int], dict[str, Any]] = {}
    identical = different = 0
    for record in records:
        key = (record["model_id"], record["kind"], record["start_ms"])
        body = {k: v for k, v in record.items() if k != "closed_at"}
        if key in by_key:
            identical += by_key[key] == body
            different += by_key[key] != body
        else:
            by_key[key] = body
    windowed = sum(
        series["requests"]
        for (_, kind, _), record in by_key.items()
        if kind == "tumbling"
        for series in record["series"]
        if series["segment"] == "*"
    )
    # Consumption is at least once: after a rebalance the worker validates some events
    # again (the pipeline skips them by offset), so this may exceed what was sent.
    validated = _metric(stats, "genmon_ingest_valid_total", ".inference")
    return WindowProbe(
        fault="",
        outage_s=0.0,
        sent=sent,
        validated=validated,
        windowed=windowed,
        late=_metric(stats, "genmon_pipeline_late_events_total", "inference"),
        future=_metric(stats, "genmon_pipeline_future_events_total"),
        unaccounted=_metric(stats, "genmon_pipeline_unaccounted_events"),
        out_of_order=_metric(stats, "genmon_ingest_out_of_order_total", ".inference"),
        window_records=len(by_key),
        resent_identical=identical,
        resent_different=different,
    )
