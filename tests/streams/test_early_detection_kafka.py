"""Early detection inside `genmon worker` on the real broker: an error burst is paged from
its open 60 s window within seconds, before the window closes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from worker_support import Harness

from genmon.schemas.events import InferenceEvent, InferenceStatus
from genmon.settings import Settings

pytestmark = pytest.mark.kafka

WINDOW_S = 60


@pytest.fixture
def harness(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> Iterator[Harness]:
    made = Harness(
        kafka_settings,
        unique_name,
        tmp_path,
        free_port,
        GENMON_WINDOWS__TUMBLING_S=str(WINDOW_S),
        GENMON_WINDOWS__HOPPING_SIZE_S=str(2 * WINDOW_S),
        GENMON_WINDOWS__HOPPING_STEP_S=str(WINDOW_S),
        GENMON_WINDOWS__EXPIRES_S="3600",
        GENMON_DETECTORS__MIN_WINDOW_REQUESTS="10",
        GENMON_DETECTORS__BASELINE_WARMUP_WINDOWS="3",
        GENMON_DETECTORS__EARLY_INTERVAL_S="0.5",
    )
    yield made
    made.close()


def inference(i: int, at: datetime, failed: bool) -> InferenceEvent:
    return InferenceEvent(
        request_id=f"r{i}",
        model_id="chat",
        model_version="v1",
        latency_ms=100.0,
        response="" if failed else "fine",
        status=InferenceStatus.ERROR if failed else InferenceStatus.OK,
        started_at=at,
    )


def test_an_error_burst_is_paged_from_its_open_window_within_seconds(harness: Harness) -> None:
    worker = harness.worker().start()
    worker.wait_ready()
    # Six healthy minutes in the past (1 failure in 150): the model's baselines.
    now = time.time()
    start = datetime.fromtimestamp(math.floor(now / WINDOW_S) * WINDOW_S - 8 * WINDOW_S, UTC)
    for i in range(6 * 150):
        harness.send(inference(i, start + timedelta(seconds=i * 0.4), failed=i % 150 == 0))
    harness.wait_for(
        lambda: sum(w["kind"] == "tumbling" for w in harness.windows) >= 5,
        60,
        "the healthy windows to close",
    )
    # The burst, stamped early in a window that ends over a minute from now (stamps up to
    # windows.max_future_skew_s ahead are accepted): no clock can close it in this test.
    burst_window = (math.floor(time.time() / WINDOW_S) + 2) * WINDOW_S
    at = datetime.fromtimestamp(burst_window + 5, UTC)
    sent = time.monotonic()
    for i in range(40):
        harness.send(inference(10_000 + i, at + timedelta(seconds=i * 0.1), failed=i % 5 != 0))

    def paged() -> bool:
        return any(f.signal == "error_rate" and f.detected for f in harness.findings)

    harness.wait_for(paged, 30, "an error_rate finding")
    waited = time.monotonic() - sent
    finding = next(f for f in harness.findings if f.signal == "error_rate" and f.detected)
    assert finding.window_end == datetime.fromtimestamp(burst_window + WINDOW_S, UTC)
    assert finding.evidence["early_requests"] <= 40
    assert finding.title.startswith("Error rate ") and "chat v1" in finding.title
    closed = {w["end_ms"] for w in harness.windows if w["kind"] == "tumbling"}
    assert (burst_window + WINDOW_S) * 1000 not in closed, "the window had closed: not early"
    assert waited < 15, f"paged {waited:.1f} s after the burst was sent"
    assert worker.stats()["genmon_early_findings_total"] >= 1
