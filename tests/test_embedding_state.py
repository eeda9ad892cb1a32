"""Embedding drift state: changelog records under Kafka's limit, no lost updates."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from genmon.detectors import load_state
from genmon.detectors.drift._common import decode_array
from genmon.settings import Settings
from genmon.streams.runner import STATE_MAX_BYTES, DetectorRunner, embedding_key

DIM = 384  # all-MiniLM-L6-v2
T0 = 1_700_000_000


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # MiniLM embeddings are unit


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


@pytest.mark.parametrize("reference_size", [Settings().detectors.reference_size, 100_000])
def test_the_largest_default_series_state_stays_under_the_record_bound(
    reference_size: int,
) -> None:
    settings = Settings(detectors={"reference_size": reference_size})
    runner = DetectorRunner(settings)
    rng = np.random.default_rng(0)
    # One big sample (a raised reservoir_per_window) fills the reference to its cap; then a
    # stationary sample fills the detector's window.
    state, _ = runner.on_embeddings(None, "m", "v1", "prompt", at(10), unit_rows(rng, 2000))
    state, _ = runner.on_embeddings(state, "m", "v1", "prompt", at(20), unit_rows(rng, 100))
    [entry] = state["series"].values()
    detector: Any = load_state(entry["det"])
    assert len(detector.reference) == runner.reference_rows(DIM) == 733
    assert decode_array(entry["det"]["state"]["window"]).shape == (64, DIM)  # a full window
    size = len(json.dumps(state))
    assert size < STATE_MAX_BYTES, size
    assert STATE_MAX_BYTES < 1_000_000  # Kafka's default message.max.bytes is 1,048,588


def test_the_default_reservoir_becomes_the_reference_at_once() -> None:
    settings = Settings()
    runner = DetectorRunner(settings)
    rows = unit_rows(np.random.default_rng(1), settings.embedding.reservoir_per_window)
    state, _ = runner.on_embeddings(None, "m", "v1", "response", at(10), rows)
    [entry] = state["series"].values()
    assert len(load_state(entry["det"]).reference) == 512
    assert len(json.dumps(state)) < STATE_MAX_BYTES


def test_series_keys_cannot_collide_whatever_the_ids_hold() -> None:
    assert embedding_key("a\x1fb", "c", "prompt") != embedding_key("a", "b\x1fc", "prompt")
    assert json.loads(embedding_key("a", "v1", "prompt")) == ["a", "v1", "prompt"]


class MemoryStore:
    """The table store's interface over a dict (Faust tables need a running worker)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes: list[str] = []

    def get(self, key: str) -> Any | None:
        return self.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))
        self.writes.append(key)


def test_concurrent_updates_of_one_model_never_overwrite_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two samples of one series and a closed window of its model, all at once, each
    publishing slowly: every update must be in the state afterwards."""
    from genmon.streams.app import create_app
    from genmon.streams.pipeline import Pipeline

    settings = Settings(detectors={"drift_window": 8, "ert": 100, "min_window_requests": 1})
    app = create_app(settings, installers=())
    pipeline = Pipeline(app, settings)
    pipeline.detector_store = MemoryStore()
    pipeline.embedding_store = MemoryStore()

    async def slow_publish(findings: list) -> None:
        await asyncio.sleep(0.05)  # the broker's acknowledgement

    monkeypatch.setattr(pipeline, "_publish", slow_publish)
    rng = np.random.default_rng(2)
    window = {
        "model_id": "m",
        "kind": "tumbling",
        "start_ms": T0 * 1000,
        "end_ms": (T0 + 10) * 1000,
        "window_start": at(0).isoformat(),
        "window_end": at(10).isoformat(),
        "closed_at": at(12).isoformat(),
        "series": [
            {
                "model_version": "v1",
                "segment": "*",
                "requests": 5,
                "latency_ms": {"p99": 10.0},
                "error_rate": 0.0,
                "refusal_rate": 0.0,
                "empty_rate": 0.0,
                "feedback": {"negative": 0, "positive": 0},
            }
        ],
    }

    async def run() -> None:
        await asyncio.gather(
            pipeline.submit_embeddings("m", "v1", "prompt", at(10), rng.normal(size=(12, 4))),
            pipeline.submit_embeddings("m", "v1", "prompt", at(20), rng.normal(size=(12, 4))),
            pipeline.on_window(0, window),
        )

    asyncio.run(run())
    [series] = pipeline.embedding_store.data.values()
    [entry] = series["series"].values()
    assert len(load_state(entry["det"]).reference) == 24  # both samples (12 + 12 rows)
    assert series["last_end"]["embedding"] == (T0 + 20) * 1000
    model_state = pipeline.detector_store.data["m"]
    assert model_state["last_end"]["tumbling"] == (T0 + 10) * 1000
