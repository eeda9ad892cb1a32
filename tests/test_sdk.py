"""The producer SDK: validation, buffering without a broker, and what lands in Kafka."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from kafka.errors import KafkaTimeoutError
from kafka_support import consume

from genmon import Monitor, chat
from genmon.exceptions import ConfigurationError, SchemaError
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.codec import HEADER_PRODUCER, HEADER_SEQ
from genmon.schemas.events import ChatMessage, FeedbackEvent, InferenceEvent
from genmon.settings import Settings, get_settings
from genmon.streams.ingest import SequenceCheck, SequenceTracker


@pytest.fixture
def offline(free_port: Callable[[], int]) -> Iterator[Callable[..., Monitor]]:
    """Monitors pointed at a port where no broker listens; closed at the end."""
    made: list[Monitor] = []

    def make(**options: object) -> Monitor:
        monitor = Monitor(f"127.0.0.1:{free_port()}", **options)  # type: ignore[arg-type]
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close(timeout=0)


def test_invalid_fields_raise_schema_error_with_a_reason(offline: Callable[..., Monitor]) -> None:
    monitor = offline()
    with pytest.raises(SchemaError) as missing:
        monitor.log_inference(prompt="hi", latency_ms=3)
    with pytest.raises(SchemaError) as wrong:
        monitor.log_inference(model_id="chat", latency_ms="fast")
    with pytest.raises(SchemaError) as empty:
        monitor.log_feedback(request_id="r1", model_id="chat")
    assert (missing.value.reason, wrong.value.reason, empty.value.reason) == (
        "missing_field", "wrong_type", "invalid_value",
    )  # fmt: skip
    assert "model_id" in str(missing.value)
    stats = monitor.stats
    assert (stats.invalid, stats.buffered, stats.dropped) == (3, 0, 0)


def test_count_mode_returns_false_instead_of_raising(offline: Callable[..., Monitor]) -> None:
    monitor = offline(on_invalid="count")
    assert monitor.log_inference(model_id="chat", latency_ms=-5) is False
    assert monitor.log_inference(model_id="chat", latency_ms=5) is True
    assert (monitor.stats.invalid, monitor.stats.buffered) == (1, 1)


def test_event_objects_and_mappings_are_accepted(offline: Callable[..., Monitor]) -> None:
    monitor = offline()
    event = InferenceEvent(model_id="chat", latency_ms=1)
    assert monitor.log_inference(event)
    assert monitor.log_inference({"model_id": "chat", "latency_ms": 2}, prompt="p")
    assert monitor.log_feedback(FeedbackEvent(request_id="r", model_id="chat", score=1))
    with pytest.raises(TypeError, match="not both"):
        monitor.log_inference(event, prompt="p")
    with pytest.raises(TypeError, match="FeedbackEvent"):
        monitor.log_feedback(event)
    assert monitor.stats.buffered == 3


def test_long_texts_are_cut_not_rejected(offline: Callable[..., Monitor]) -> None:
    monitor = offline()
    limit = get_settings().sdk.max_text_chars
    assert monitor.log_inference(model_id="chat", latency_ms=1, prompt="x" * (limit + 10))
    assert monitor.log_feedback(request_id="r", model_id="chat", comment="y" * (limit * 2))
    assert monitor.stats.truncated == 2
    assert monitor.stats.buffered == 2


def test_a_chat_gets_its_last_user_turn_as_the_prompt(offline: Callable[..., Monitor]) -> None:
    monitor = offline(settings=Settings(sdk={"max_text_chars": 20}))
    question = "And 3+3, tell me in full, please?"
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        ChatMessage(role="assistant", content="4"),
        ChatMessage(role="user", content=question),
        {"role": "tool", "content": "calculator: 6"},
    ]
    assert monitor.log_inference(model_id="chat", latency_ms=1, messages=turns, response="6")
    assert monitor.log_inference({"model_id": "chat", "latency_ms": 1, "messages": turns[:2]})
    assert monitor.log_inference(model_id="chat", latency_ms=1, messages=turns, prompt="given")
    assert monitor.log_inference(model_id="chat", latency_ms=1, messages=turns[:1])
    built = InferenceEvent(model_id="chat", latency_ms=1, messages=turns[:2])
    assert monitor.log_inference(built)  # an event object is sent as it was built
    events = [InferenceEvent.model_validate_json(record.value) for record in monitor._queue]
    assert [event.prompt for event in events] == [
        question[:20],  # the last user turn, cut as message texts are
        "What is 2+2?",
        "given",
        "",
        "",
    ]
    assert events[0].messages is not None
    assert [(m.role, m.content) for m in events[0].messages] == [
        ("system", "Be brief."),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", question[:20]),
        ("tool", "calculator: 6"),
    ]
    assert monitor.stats.truncated == 2  # once per event, however many texts were cut
    with pytest.raises(SchemaError, match=r"messages\.0\.role"):
        monitor.log_inference(model_id="chat", latency_ms=1, messages=[{"role": "bot"}])
    assert doctest.testmod(chat).failed == 0


def test_without_a_broker_events_are_buffered_to_the_limit_then_dropped(
    offline: Callable[..., Monitor],
) -> None:
    monitor = offline(buffer_max_events=100)
    accepted = [monitor.log_inference(model_id=f"m{i % 3}", latency_ms=i) for i in range(150)]
    assert accepted == [True] * 100 + [False] * 50
    stats = monitor.stats
    assert (stats.buffered, stats.dropped, stats.sent) == (100, 50, 0)
    assert monitor.flush(timeout=0.2) is False

    monitor.close(timeout=0.2)
    stats = monitor.stats
    assert (stats.buffered, stats.dropped, stats.sent) == (0, 150, 0)
    assert monitor.log_inference(model_id="m", latency_ms=1) is False
    assert monitor.stats.dropped == 151


def test_bad_configuration_is_refused_up_front() -> None:
    with pytest.raises(ConfigurationError, match="compression"):
        Monitor("127.0.0.1:1", compression="brotli")
    with pytest.raises(ConfigurationError, match="buffer_max_events"):
        Monitor("127.0.0.1:1", buffer_max_events=0)


@pytest.mark.kafka
def test_events_are_keyed_by_model_with_ordered_sequence_headers(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    models = ["chat", "summarize", "translate"]
    with Monitor(settings=settings) as monitor:
        for i in range(300):
            assert monitor.log_inference(
                model_id=models[i % 3], latency_ms=i, request_id=f"r{i}", prompt=f"p{i}"
            )
        for i in range(30):
            assert monitor.log_feedback(request_id=f"r{i}", model_id=models[i % 3], score=0.5)
        assert monitor.flush(timeout=60)
        assert monitor.stats.sent == 330

    topics = [settings.topic("inference"), settings.topic("feedback")]
    records = consume(settings, *topics, expected=330)
    assert len(records) == 330
    seqs: dict[tuple[str, bytes], list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        headers = dict(record.headers)
        assert headers[HEADER_PRODUCER] == monitor.producer_id.encode()
        model = InferenceEvent if record.topic == topics[0] else FeedbackEvent
        assert model.model_validate_json(record.value).model_id.encode() == record.key
        seqs[(record.topic, record.key)].append(int(headers[HEADER_SEQ]))
        partitions[record.key].add(record.partition)
    assert all(len(found) == 1 for found in partitions.values())
    for (topic, _), found in seqs.items():
        assert found == list(range(100 if topic == topics[0] else 10))


@pytest.mark.kafka
def test_a_monitor_left_open_delivers_at_interpreter_exit(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    script = (
        "from genmon import Monitor\n"
        "monitor = Monitor()\n"
        "for i in range(50):\n"
        "    monitor.log_inference(model_id='chat', latency_ms=i)\n"
    )
    env = {
        **os.environ,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
    }
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert len(consume(settings, settings.topic("inference"), expected=50)) == 50


@pytest.mark.kafka
def test_sequence_counters_are_bounded_and_an_evicted_model_restarts_without_false_alarms(
    kafka_settings: Settings, unique_name: str
) -> None:
    settings = kafka_settings.model_copy(
        update={
            "kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name}),
            "sdk": kafka_settings.sdk.model_copy(update={"sequence_max_models": 2}),
        }
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    # With room for two, "c" pushes out "b", which comes back and pushes out "a", ...
    order = ["a", "b", "a", "c", "b", "c", "a", "a", "d", "b", "b"]
    with Monitor(settings=settings) as monitor:
        for i, model in enumerate(order):
            assert monitor.log_inference(model_id=model, latency_ms=i, request_id=f"r{i}")
            assert len(monitor._seq) <= 2
        assert monitor.flush(timeout=60)

    records = consume(settings, settings.topic("inference"), expected=len(order))
    assert len(records) == len(order)
    tracker = SequenceTracker()
    checks = []
    producers: dict[bytes, set[bytes]] = defaultdict(set)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        headers = dict(record.headers)
        producers[record.key].add(headers[HEADER_PRODUCER])
        checks.append(
            tracker.observe(
                record.topic,
                record.partition,
                headers[HEADER_PRODUCER],
                record.key,
                int(headers[HEADER_SEQ]),
            )
        )
    assert checks == [SequenceCheck()] * len(order)
    # Each comeback after an eviction is a sequence of its own under a derived producer id.
    assert {key: len(ids) for key, ids in producers.items()} == {b"a": 2, b"b": 3, b"c": 1, b"d": 1}
    assert all(p.startswith(monitor.producer_id.encode()) for ps in producers.values() for p in ps)


def test_a_comeback_after_eviction_gets_an_id_no_earlier_run_of_the_model_used(
    offline: Callable[..., Monitor],
) -> None:
    monitor = offline(settings=Settings(sdk={"sequence_max_models": 3}))
    runs: dict[str, list[tuple[bytes, int]]] = defaultdict(list)
    for i in range(2000):
        model = f"m{(i * 7919) % 11}" if i % 5 else "hot"
        assert monitor.log_inference(model_id=model, latency_ms=1)
    for record in monitor._queue:
        headers = dict(record.headers)
        runs[record.key.decode()].append((headers[HEADER_PRODUCER], int(headers[HEADER_SEQ])))
    assert len(monitor._seq) == 3
    for sequence in runs.values():
        by_producer: dict[bytes, list[int]] = defaultdict(list)
        for producer, seq in sequence:
            by_producer[producer].append(seq)
        # Every (producer id, model) run counts 0, 1, 2, ... without a restart.
        assert all(seqs == list(range(len(seqs))) for seqs in by_producer.values())


class _HangingProducer:
    """A KafkaProducer whose connect (``hang="connect"``) or sends (``hang="send"``) do not
    return until ``release`` is set: a broker that is down or stalled, without timings."""

    release = threading.Event()
    hang = "connect"

    def __init__(self, **config: object) -> None:
        if self.hang == "connect":
            self.release.wait()

    def send(self, *args: object, **kwargs: object) -> object:
        self.release.wait()
        raise KafkaTimeoutError("released")

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.mark.parametrize("hang", ["connect", "send"])
def test_logging_never_waits_for_the_broker(
    hang: str, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    """Every call returns while the SDK's I/O thread is stuck in a connect or a send that
    never ends; past the buffer, events are counted as dropped instead."""
    import genmon.sdk

    hanging = type("Hanging", (_HangingProducer,), {"release": threading.Event(), "hang": hang})
    monkeypatch.setattr(genmon.sdk, "KafkaProducer", hanging)
    monitor = Monitor(f"127.0.0.1:{free_port()}", buffer_max_events=100)
    accepted: list[bool] = []

    def log_all() -> None:
        accepted.extend(monitor.log_inference(model_id="chat", latency_ms=i) for i in range(300))

    caller = threading.Thread(target=log_all)
    try:
        if hang == "send":  # let the I/O thread connect, then stall in its first send
            hanging.hang = "connect-done"
            monitor.log_inference(model_id="chat", latency_ms=0)
            hanging.hang = "send"
        caller.start()
        caller.join(timeout=120)  # a watchdog: a blocking call would never return
        assert not caller.is_alive(), "log_inference waited for the stuck I/O thread"
        stats = monitor.stats
    finally:
        hanging.release.set()
        caller.join()
        monitor.close(timeout=0)
    assert len(accepted) == 300 and accepted.count(False) == stats.dropped > 0
