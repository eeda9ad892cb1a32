"""The embedding stage without Kafka: reservoirs, sampler windows, rate control, reassembly."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy import stats

from genmon.exceptions import ConfigurationError
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings
from genmon.streams.embedding.sampling import (
    EmbedRequest,
    RateController,
    Reservoir,
    SampleAssembler,
    Sampler,
)
from genmon.streams.embedding.stage import EmbeddingMetrics, EncoderStage

WINDOW = 10.0
T0 = 1_700_000_000.0  # a multiple of WINDOW: window [T0, T0 + 10)


def make_settings(**embedding: object) -> Settings:
    return Settings(
        embedding={"sample_rate": 1.0, **embedding},
        windows={
            "tumbling_s": WINDOW,
            "allowed_lateness_s": 2.0,
            "idle_timeout_s": 5.0,
            "max_future_skew_s": 60.0,
            "expires_s": 100.0,
        },
    )


def event(at: float, prompt: str = "p", response: str = "r", **kw: object) -> InferenceEvent:
    fields: dict = {"model_id": "m", "model_version": "v1", "latency_ms": 1.0, **kw}
    return InferenceEvent(
        started_at=datetime.fromtimestamp(at, UTC), prompt=prompt, response=response, **fields
    )


# -- reservoir -----------------------------------------------------------------------------------
def test_reservoir_keeps_at_most_its_capacity() -> None:
    reservoir: Reservoir[int] = Reservoir(5, random.Random(1))
    for item in range(3):
        reservoir.offer(item)
    assert reservoir.items == [0, 1, 2]
    for item in range(3, 1000):
        reservoir.offer(item)
    assert len(reservoir.items) == 5 and reservoir.seen == 1000
    assert len(set(reservoir.items)) == 5


def test_reservoir_samples_every_position_uniformly() -> None:
    n, k, runs = 40, 8, 3000
    hits: Counter[int] = Counter()
    for seed in range(runs):
        reservoir: Reservoir[int] = Reservoir(k, random.Random(seed))
        for item in range(n):
            reservoir.offer(item)
        hits.update(reservoir.items)
    observed = [hits[i] for i in range(n)]
    # Each item is kept with probability k/n; early and late items alike.
    result = stats.chisquare(observed, [runs * k / n] * n)
    assert result.pvalue > 0.001, observed
    assert abs(sum(observed[:k]) - sum(observed[-k:])) < 0.1 * runs * k * k / n


def test_reservoir_refuses_no_capacity() -> None:
    with pytest.raises(ConfigurationError, match="capacity"):
        Reservoir(0, random.Random())


# -- sampler -------------------------------------------------------------------------------------
def test_sampler_keeps_each_text_with_the_sample_rate() -> None:
    sampler = Sampler(make_settings(reservoir_per_window=100_000), random.Random(3))
    sampler.rate = 0.25
    sampler.offer([event(T0 + i / 1000) for i in range(4000)], now=T0)
    requests = sampler.due(now=T0 + 100)
    kept, n = len(requests), 8000  # prompt and response of each event
    assert abs(kept - 0.25 * n) < 5 * np.sqrt(n * 0.25 * 0.75)
    assert sampler.dropped["rate"] == n - kept


def test_one_bounded_reservoir_per_model_version_field_and_window() -> None:
    sampler = Sampler(make_settings(reservoir_per_window=30), random.Random(0))
    events = [event(T0 + i / 100, prompt=f"p{i}", response=f"r{i}") for i in range(500)]
    events += [event(T0 + 1, model_version="v2", prompt="v2 prompt", response="")]
    events += [event(T0 + WINDOW + 1, prompt=f"next{i}", response="") for i in range(10)]
    sampler.offer(events, now=T0 + 5)
    requests = sampler.due(now=T0 + 100)
    groups = Counter((r.model_version, r.field, r.window_start.timestamp()) for r in requests)
    assert groups == {
        ("v1", "prompt", T0): 30,
        ("v1", "response", T0): 30,
        ("v2", "prompt", T0): 1,
        ("v1", "prompt", T0 + WINDOW): 10,
    }
    assert sampler.dropped["reservoir"] == 2 * (500 - 30)
    assert sampler.queued == len(requests) and sampler.open_reservoirs == 0
    first = [r for r in requests if r.field == "prompt" and r.model_version == "v1"][:30]
    assert sorted(r.index for r in first) == list(range(30))
    assert {r.count for r in first} == {30} and len({r.sample_id for r in first}) == 1
    assert {r.window_end.timestamp() for r in first} == {T0 + WINDOW}
    assert all(r.text.startswith("p") for r in first)


def test_only_the_configured_non_empty_fields_are_sampled_and_long_texts_are_cut() -> None:
    sampler = Sampler(make_settings(fields=["prompt"], max_text_chars=5), random.Random(0))
    sampler.offer([event(T0, prompt="abcdefghij"), event(T0, prompt="")], now=T0)
    [request] = sampler.due(now=T0 + 100)
    assert (request.field, request.text) == ("prompt", "abcde")


def test_windows_close_on_event_time_then_later_events_are_late() -> None:
    sampler = Sampler(make_settings(fields=["prompt"]), random.Random(0))
    sampler.offer([event(T0 + 1)], now=T0 + 1)
    assert sampler.due(now=T0 + 1) == []
    sampler.offer([event(T0 + WINDOW + 1.5)], now=T0 + 2)  # end + lateness (12) not reached
    assert sampler.due(now=T0 + 2) == []
    sampler.offer([event(T0 + WINDOW + 2)], now=T0 + 3)  # watermark 12 = end + lateness
    [closed] = sampler.due(now=T0 + 3)
    assert closed.window_end.timestamp() == T0 + WINDOW
    sampler.offer([event(T0 + 9)], now=T0 + 4)  # its window is gone
    assert sampler.dropped["late"] == 1


def test_an_idle_model_closes_its_windows_by_the_wall_clock() -> None:
    sampler = Sampler(make_settings(fields=["prompt"]), random.Random(0))
    sampler.offer([event(T0 + 1)], now=T0 + 1)
    assert sampler.due(now=T0 + 5.9) == []  # idle only 4.9 s
    assert len(sampler.due(now=T0 + 13)) == 1  # idle, and the clock passed end + lateness


def test_events_from_the_far_future_are_dropped() -> None:
    sampler = Sampler(make_settings(), random.Random(0))
    sampler.offer([event(T0 + 1000)], now=T0)
    assert sampler.dropped["future"] == 2 and sampler.open_reservoirs == 0


def test_request_round_trips_and_bad_bytes_are_refused() -> None:
    sampler = Sampler(make_settings(fields=["prompt"]), random.Random(0))
    sampler.offer([event(T0, prompt="Grüße, 世界")], now=T0)
    [request] = sampler.due(now=T0 + 100)
    assert EmbedRequest.from_bytes(request.to_bytes()) == request
    for bad in (b"", b"not json", b'{"model_id": "m"}', None):
        with pytest.raises(ValueError, match="not an embedding request"):
            EmbedRequest.from_bytes(bad)
    broken = request.to_bytes().replace(b'"index": 0', b'"index": 7')
    with pytest.raises(ValueError, match="outside a sample"):
        EmbedRequest.from_bytes(broken)


# -- rate control ----------------------------------------------------------------------------
def test_rate_halves_under_backlog_down_to_the_floor_then_climbs_back() -> None:
    control = RateController(max_rate=0.8, min_rate=0.05, max_backlog=1000, caught_up=64)
    rates = [control.observe(5000) for _ in range(6)]
    assert rates == [0.4, 0.2, 0.1, 0.05, 0.05, 0.05]
    assert control.observe(500) == 0.05  # between caught up and too long: hold
    climbing = [round(control.observe(10), 3) for _ in range(12)]
    assert climbing[:3] == [0.13, 0.21, 0.29]  # + max_rate / 10 per check
    assert climbing[-1] == 0.8 and max(climbing) == 0.8


def test_rate_controller_refuses_inverted_rates() -> None:
    with pytest.raises(ConfigurationError, match="min"):
        RateController(max_rate=0.1, min_rate=0.2, max_backlog=10, caught_up=1)


def test_settings_refuse_a_floor_above_the_sample_rate() -> None:
    with pytest.raises(ValueError, match="min_sample_rate"):
        Settings(embedding={"sample_rate": 0.01, "min_sample_rate": 0.1})


def test_simulated_slow_encoder_drives_the_rate_down_and_back_up() -> None:
    """Traffic of 1000 texts/tick against an encoder doing 100/tick, then a lull."""
    control = RateController(max_rate=1.0, min_rate=0.01, max_backlog=500, caught_up=100)
    backlog, capacity, history = 0.0, 100.0, []
    for tick in range(80):
        traffic = 1000.0 if tick < 40 else 20.0
        backlog = max(backlog + traffic * control.rate - capacity, 0.0)
        history.append((control.observe(int(backlog)), backlog))
    busy = history[10:40]
    assert max(b for _, b in busy) < 2000  # bounded, not growing with time
    assert sum(r for r, _ in busy) / len(busy) < 0.25  # about capacity / traffic = 0.1
    assert history[-1][0] == 1.0 and history[-1][1] == 0.0


# -- reassembly and the encoder stage ----------------------------------------------------------
def requests_for(sample: str, count: int, version: str = "v1") -> list[EmbedRequest]:
    start, end = datetime.fromtimestamp(T0, UTC), datetime.fromtimestamp(T0 + WINDOW, UTC)
    return [
        EmbedRequest(sample, "m", version, "prompt", start, end, i, count, f"{sample} text {i}")
        for i in range(count)
    ]


def test_assembler_completes_samples_in_index_order_and_skips_redeliveries() -> None:
    assembler = SampleAssembler(timeout_s=30)
    reqs = requests_for("a", 4)
    vectors = np.eye(4, dtype=np.float32)
    assert assembler.add([reqs[3], reqs[1]], vectors[[3, 1]], now=0) == []
    [done] = assembler.add([reqs[0], reqs[2]], vectors[[0, 2]], now=1)
    np.testing.assert_array_equal(done.embeddings, vectors)
    assert done.complete and (done.model_id, done.field) == ("m", "prompt")
    assert assembler.add(reqs[:2], vectors[:2], now=2) == []  # redelivered after a restart
    assert assembler.pending == 0


def test_assembler_gives_up_waiting_after_the_timeout() -> None:
    assembler = SampleAssembler(timeout_s=30)
    reqs = requests_for("b", 5)
    assembler.add(reqs[:3], np.ones((3, 2), dtype=np.float32), now=100)
    assert assembler.expired(now=129) == []
    [partial] = assembler.expired(now=130)
    assert not partial.complete and partial.embeddings.shape == (3, 2)


def test_encoder_stage_encodes_reassembles_and_submits_each_window_sample() -> None:
    from genmon.streams.embedding.encoder import TextEncoder

    settings = make_settings(backend="torch")
    registry = CollectorRegistry()
    metrics = EmbeddingMetrics(registry)
    submitted: list[tuple] = []

    async def submit(model: str, version: str, field: str, end: datetime, array: np.ndarray):
        submitted.append((model, version, field, end, array))
        if version == "broken":
            raise RuntimeError("detector exploded")
        if version == "small":
            raise ConfigurationError("reference needs at least 192 rows")

    stage = EncoderStage(
        settings, metrics, submit, encoder_factory=lambda: TextEncoder(backend="torch")
    )
    messages = [r.to_bytes() for r in requests_for("c", 3)]
    messages += [b"garbage", *(r.to_bytes() for r in requests_for("d", 2, version="broken"))]
    messages += [r.to_bytes() for r in requests_for("e", 1, version="small")]

    async def run() -> None:
        await stage.handle(messages[:2])
        assert submitted == []
        await stage.handle(messages[2:])

    asyncio.run(run())
    stage.close()
    assert [(s[1], s[4].shape) for s in submitted] == [
        ("v1", (3, 384)),
        ("broken", (2, 384)),
        ("small", (1, 384)),
    ]
    expected = TextEncoder(backend="torch").encode(["c text 0", "c text 1", "c text 2"])
    np.testing.assert_allclose(submitted[0][4], expected, atol=1e-5)
    value = registry.get_sample_value
    assert value("genmon_embedding_encoded_total") == 6
    assert value("genmon_embedding_bad_requests_total") == 1
    assert value("genmon_embedding_samples_submitted_total", {"complete": "true"}) == 1
    assert value("genmon_embedding_submit_errors_total") == 2
    assert (value("genmon_embedding_sentences_per_second") or 0) > 0
    assert value("genmon_embedding_encoder_info", {"backend": "torch", "device": "cpu"}) == 1


def test_the_embed_role_refuses_to_run_beside_in_worker_encoders() -> None:
    from genmon.streams.embedding.stage import run_embed_worker

    with pytest.raises(ConfigurationError, match="RUN_ENCODER=false"):
        run_embed_worker(Settings(embedding={"run_encoder": True}))
