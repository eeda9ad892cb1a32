"""Embedding drift state: changelog records under Kafka's limit, no lost updates."""

from __future__ import annotations

import asyncio
import json
import zlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from genmon.detectors import load_state
from genmon.settings import Settings
from genmon.streams.detection.embedding_series import (
    STATE_MAX_BYTES,
    embedding_index_key,
    embedding_key,
    embedding_series_model,
)
from genmon.streams.detection.runner import DetectorRunner

DIM = 384  # all-MiniLM-L6-v2
T0 = 1_700_000_000


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # MiniLM embeddings are unit


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


def test_every_phase_of_a_default_series_stays_under_the_record_bound() -> None:
    runner = DetectorRunner(Settings())
    rng = np.random.default_rng(0)
    sizes = []
    state = None
    # 255 rows: the basis phase at its largest (rows kept as float16 until 256).
    state, _ = runner.on_embeddings(state, "m", "v1", "prompt", at(10), unit_rows(rng, 255))
    sizes.append(len(json.dumps(state)))
    # The basis, then a reference of 20 windows (240 looks of 5 s), then tests.
    for w in range(2, 260):
        state, _ = runner.on_embeddings(state, "m", "v1", "prompt", at(5 * w), unit_rows(rng, 6))
        sizes.append(len(json.dumps(state)))
    [entry] = state["series"].values()
    assert load_state(entry["det"]).update(unit_rows(rng, 60)).p_value is not None  # testing
    assert max(sizes) < STATE_MAX_BYTES, max(sizes)
    assert sizes[-1] < 100_000, sizes[-1]
    assert STATE_MAX_BYTES < 1_000_000  # Kafka's default message.max.bytes is 1,048,588


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

    def delete(self, partition: int, key: str) -> None:
        self.data.pop(key, None)
        self.writes.append(key)

    def all_keys(self) -> list[str]:
        return list(self.data)


def test_concurrent_updates_of_one_model_never_overwrite_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two samples of one series and a closed window of its model, all at once, each
    publishing slowly: every update must be in the state afterwards."""
    from genmon.streams.app import create_app
    from genmon.streams.pipeline import Pipeline

    settings = Settings(detectors={"min_window_requests": 1})
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
    series = pipeline.embedding_store.data[embedding_key("m", "v1", "prompt")]
    [entry] = series["series"].values()
    assert load_state(entry["det"]).state_dict()["state"]["n_seen"] == 24  # both samples
    assert series["last_end"]["embedding"] == (T0 + 20) * 1000
    model_state = pipeline.detector_store.data["m"]
    assert model_state["last_end"]["tumbling"] == (T0 + 10) * 1000


# -- bounded series -------------------------------------------------------------------------
def embedding_pipeline(monkeypatch: pytest.MonkeyPatch, **detectors: Any) -> Any:
    from genmon.streams.app import create_app
    from genmon.streams.pipeline import Pipeline

    settings = Settings(detectors=detectors)
    pipeline = Pipeline(create_app(settings, installers=()), settings)
    pipeline.embedding_store = MemoryStore()

    async def no_broker(findings: list) -> None:
        pass

    monkeypatch.setattr(pipeline, "_publish", no_broker)
    return pipeline


def stored_series(pipeline: Any, model: str = "m") -> set[tuple[str, str]]:
    """(version, field) of the model's series records in the table."""
    return {
        tuple(json.loads(key)[1:])
        for key in pipeline.embedding_store.data
        if embedding_series_model(key) == model
    }


def indexed_series(pipeline: Any, model: str = "m") -> set[tuple[str, str]]:
    index = pipeline.embedding_store.data[embedding_index_key(model)]
    return {tuple(json.loads(key)[1:]) for key in index["series"]}


def submit_all(pipeline: Any, samples: list[tuple[str, str, int]]) -> None:
    """Submit ``(version, field, end second)`` samples of model ``m``, 10 rows each (the
    same rows for the same sample)."""

    async def run() -> None:
        for version, field, end_s in samples:
            seed = zlib.crc32(f"{version}/{field}/{end_s}".encode())
            rows = np.random.default_rng(seed).normal(size=(10, 4))
            await pipeline.submit_embeddings("m", version, field, at(end_s), rows)

    asyncio.run(run())


def churn(minutes: range) -> list[tuple[str, str, int]]:
    """Per minute a sample of the steady version; every other minute a one-off canary."""
    samples = []
    for w in minutes:
        samples.append(("stable", "prompt", 60 * w))
        if w % 2 == 0:
            samples.append((f"canary-{w}", "prompt", 60 * w))
    return samples


def test_churning_versions_expire_after_the_ttl_and_the_steady_series_keeps_its_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = embedding_pipeline(monkeypatch, series_ttl_s=300)
    for w in range(1, 21):
        submit_all(pipeline, churn(range(w, w + 1)))
        # Canaries sampled within the last 300 s of event time, and the steady series.
        canaries = {(f"canary-{i}", "prompt") for i in range(max(w - 5, 1), w + 1) if i % 2 == 0}
        assert stored_series(pipeline) == {("stable", "prompt")} | canaries
        assert indexed_series(pipeline) == stored_series(pipeline)
    # Sampled every minute, the steady series was never restarted.
    stable = pipeline.embedding_store.data[embedding_key("m", "stable", "prompt")]
    [entry] = stable["series"].values()
    assert entry["det"]["state"]["n_seen"] == 10 * 20
    evicted = pipeline.runner.series_evicted
    assert evicted["ttl"] == len(range(2, 15, 2)) and evicted["cap"] == 0  # canary-2 .. -14
    registry = pipeline.app.genmon.metrics.registry
    metric = "genmon_detector_series_evicted_total"
    assert registry.get_sample_value(metric, {"reason": "ttl"}) == evicted["ttl"]


def test_a_series_back_after_the_ttl_starts_a_new_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = embedding_pipeline(monkeypatch, series_ttl_s=300)
    key = embedding_key("m", "v1", "prompt")
    submit_all(pipeline, [("v1", "prompt", end) for end in (60, 120, 180)])
    [entry] = pipeline.embedding_store.data[key]["series"].values()
    assert entry["det"]["state"]["n_seen"] == 30
    submit_all(pipeline, [("v1", "prompt", 181 + 300)])
    [entry] = pipeline.embedding_store.data[key]["series"].values()
    assert entry["det"]["state"]["n_seen"] == 10  # a new detector: a new basis and reference
    assert pipeline.runner.series_evicted["ttl"] == 1


def test_the_cap_keeps_the_most_recently_sampled_and_a_replay_or_restart_evicts_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = [("stable", "prompt", 60), ("stable", "response", 60)]
    for w in range(2, 10):
        samples += [("stable", "prompt", 60 * w), (f"v{w}", "prompt", 60 * w)]
        samples += [(f"v{w}", "response", 60 * w)] if w % 3 == 0 else []
    pipeline = embedding_pipeline(monkeypatch, max_embedding_series_per_model=4)
    submit_all(pipeline, samples)
    # stable/prompt, sampled every minute, and the three series sampled last.
    assert stored_series(pipeline) == {
        ("stable", "prompt"),
        ("v8", "prompt"),
        ("v9", "prompt"),
        ("v9", "response"),
    }
    assert indexed_series(pipeline) == stored_series(pipeline)
    assert pipeline.runner.series_evicted["cap"] == 2 + 8 + 3 - 4
    # A replay of the same samples, and a restart half-way from the table, end the same.
    replayed = embedding_pipeline(monkeypatch, max_embedding_series_per_model=4)
    submit_all(replayed, samples)
    assert replayed.embedding_store.data == pipeline.embedding_store.data
    first = embedding_pipeline(monkeypatch, max_embedding_series_per_model=4)
    submit_all(first, samples[:9])
    restarted = embedding_pipeline(monkeypatch, max_embedding_series_per_model=4)
    restarted.embedding_store.data = first.embedding_store.data
    submit_all(restarted, samples[9:])
    assert restarted.embedding_store.data == pipeline.embedding_store.data
