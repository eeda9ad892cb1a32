"""The embedding stage without Kafka: reservoirs, sampler slots, rate control, reassembly."""

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
SLOT = 5.0  # embedding.flush_interval_s's default: two slots per window
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


def test_one_bounded_reservoir_per_model_version_field_and_slot() -> None:
    # reservoir_per_window=30 over two 5 s slots of a 10 s window: 15 texts per slot.
    sampler = Sampler(make_settings(reservoir_per_window=30), random.Random(0))
    assert sampler.capacity == 15
    events = [event(T0 + i / 100, prompt=f"p{i}", response=f"r{i}") for i in range(500)]
    events += [event(T0 + 1, model_version="v2", prompt="v2 prompt", response="")]
    events += [event(T0 + SLOT + 1, prompt=f"next{i}", response="") for i in range(10)]
    sampler.offer(events, now=T0 + 5)
    requests = sampler.due(now=T0 + 100)
    groups = Counter((r.model_version, r.field, r.window_end.timestamp()) for r in requests)
    assert groups == {
        ("v1", "prompt", T0 + SLOT): 15,
        ("v1", "response", T0 + SLOT): 15,
        ("v2", "prompt", T0 + SLOT): 1,
        ("v1", "prompt", T0 + 2 * SLOT): 10,
    }
    assert sampler.dropped["reservoir"] == 2 * (500 - 15)
    assert sampler.queued == len(requests) and sampler.open_reservoirs == 0
    first = [r for r in requests if r.field == "prompt" and r.model_version == "v1"][:15]
    assert sorted(r.index for r in first) == list(range(15))
    assert {r.count for r in first} == {15} and len({r.sample_id for r in first}) == 1
    assert {r.window_start.timestamp() for r in first} == {T0}
    assert all(r.text.startswith("p") for r in first)
    # Oldest slot first, and within a slot by version, then field.
    ends = [(r.window_end.timestamp(), r.model_version, r.field) for r in requests]
    assert ends == sorted(ends)


def test_only_the_configured_non_empty_fields_are_sampled_and_long_texts_are_cut() -> None:
    sampler = Sampler(make_settings(fields=["prompt"], max_text_chars=5), random.Random(0))
    sampler.offer([event(T0, prompt="abcdefghij"), event(T0, prompt="")], now=T0)
    [request] = sampler.due(now=T0 + 100)
    assert (request.field, request.text) == ("prompt", "abcde")


def test_a_slot_ends_when_event_time_passes_it_without_waiting_for_lateness() -> None:
    sampler = Sampler(make_settings(fields=["prompt"]), random.Random(0))
    sampler.offer([event(T0 + 1, prompt="a")], now=T0 + 1)
    assert sampler.due(now=T0 + 1) == []
    sampler.offer([event(T0 + 4.9, prompt="b")], now=T0 + 4.9)
    assert sampler.due(now=T0 + 4.9) == []  # its slot [T0, T0 + 5) is still open
    sampler.offer([event(T0 + SLOT, prompt="c")], now=T0 + 5)  # watermark at the slot's end
    ended = sampler.due(now=T0 + 5)
    assert [r.text for r in ended] == ["a", "b"]
    assert {r.window_end.timestamp() for r in ended} == {T0 + SLOT}
    assert sampler.open_models() == {"m"}  # "c" waits in the next slot
    # A late text joins the open slot rather than being dropped: only seconds move.
    sampler.offer([event(T0 + 2, prompt="late")], now=T0 + 6)
    sampler.offer([event(T0 + 2 * SLOT + 0.5, prompt="d")], now=T0 + 10.5)
    ended = sampler.due(now=T0 + 10.5)
    assert [r.text for r in ended] == ["c", "late"]
    assert {r.window_end.timestamp() for r in ended} == {T0 + 2 * SLOT}
    assert sum(sampler.dropped.values()) == 0


def test_an_idle_model_ends_its_slot_by_the_wall_clock_and_a_straggler_starts_a_later_one() -> None:
    sampler = Sampler(make_settings(fields=["prompt"]), random.Random(0))
    sampler.offer([event(T0 + 1)], now=T0 + 1)
    assert sampler.due(now=T0 + 5.9) == []  # idle only 4.9 s
    [first] = sampler.due(now=T0 + 6)  # idle 5 s, and the clock passed the slot's end
    assert first.window_end.timestamp() == T0 + SLOT
    # An event of the ended slot arrives after the idle close: it goes into a later slot,
    # so the series never gets two sub-samples with one end (the second would be skipped).
    sampler.offer([event(T0 + 3)], now=T0 + 7)
    [second] = sampler.due(now=T0 + 20)
    assert second.window_end.timestamp() > first.window_end.timestamp()


def test_sub_samples_end_every_flush_interval_under_steady_traffic() -> None:
    sampler = Sampler(make_settings(fields=["prompt"], flush_interval_s=2.0), random.Random(0))
    ends: list[float] = []
    for i in range(200):  # 20 s of traffic at 10 texts/s, the timer every 0.1 s
        at = T0 + i / 10
        sampler.offer([event(at, prompt=f"t{i}")], now=at)
        ends += sorted({r.window_end.timestamp() - T0 for r in sampler.due(now=at)})
    assert ends == [2.0 * k for k in range(1, 10)]  # the last slot is still open
    assert sampler.queued == 180


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
    start, end = datetime.fromtimestamp(T0, UTC), datetime.fromtimestamp(T0 + SLOT, UTC)
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
    assert done.texts == tuple(f"a text {i}" for i in range(4))  # row i is text i
    assert done.complete and (done.model_id, done.field) == ("m", "prompt")
    assert done.end == datetime.fromtimestamp(T0 + SLOT, UTC)
    assert assembler.add(reqs[:2], vectors[:2], now=2) == []  # redelivered after a restart
    assert assembler.add(reqs, vectors, now=3) == []  # the whole sub-sample again
    assert assembler.pending == 0 and assembler.expired(now=1000) == []


def test_a_redelivered_sub_sample_is_skipped_even_after_it_went_out_partial() -> None:
    assembler = SampleAssembler(timeout_s=30)
    reqs = requests_for("r", 3)
    vectors = np.eye(3, dtype=np.float32)
    assembler.add(reqs[:2], vectors[:2], now=0)
    [partial] = assembler.expired(now=30)
    assert partial.texts == ("r text 0", "r text 1") and not partial.complete
    assert assembler.add(reqs, vectors, now=31) == []  # its producer re-sent all of it
    assert assembler.pending == 0


def test_the_assembler_remembers_a_bounded_number_of_sub_samples() -> None:
    from genmon.streams.embedding.sampling import SUBMITTED_MEMORY

    assembler = SampleAssembler(timeout_s=30)
    vector = np.ones((1, 2), dtype=np.float32)
    for i in range(SUBMITTED_MEMORY + 5):
        assert len(assembler.add(requests_for(f"s{i}", 1), vector, now=i)) == 1
    assert assembler.add(requests_for(f"s{SUBMITTED_MEMORY + 4}", 1), vector, now=0) == []
    assert len(assembler.add(requests_for("s0", 1), vector, now=0)) == 1  # long forgotten


def test_assembler_gives_up_waiting_after_the_timeout() -> None:
    assembler = SampleAssembler(timeout_s=30)
    reqs = requests_for("b", 5)
    assembler.add(reqs[:3], np.ones((3, 2), dtype=np.float32), now=100)
    assert assembler.expired(now=129) == []
    [partial] = assembler.expired(now=130)
    assert not partial.complete and partial.embeddings.shape == (3, 2)


def test_encoder_stage_encodes_reassembles_and_submits_each_sub_sample_with_its_texts() -> None:
    from genmon.streams.embedding.encoder import TextEncoder

    settings = make_settings(backend="torch")
    registry = CollectorRegistry()
    metrics = EmbeddingMetrics(registry)
    submitted: list[tuple] = []

    async def submit(
        model: str, version: str, field: str, end: datetime, array: np.ndarray, texts: tuple
    ) -> None:
        submitted.append((model, version, field, end, array, texts))
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
    assert submitted[0][5] == ("c text 0", "c text 1", "c text 2")
    assert submitted[0][3] == datetime.fromtimestamp(T0 + SLOT, UTC)
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
