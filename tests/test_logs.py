"""Repeated connection errors become one line per interval with a count (genmon.logs)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from genmon import logs
from genmon.logs import RepeatFilter
from genmon.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RepeatFilter:
    return RepeatFilter(30.0, clock=clock, background=False)


@pytest.fixture
def sink(limiter: RepeatFilter) -> Iterator[Collect]:
    handler = Collect()
    handler.addFilter(limiter)
    yield handler


LoggerOf = Callable[[str], logging.Logger]


@pytest.fixture
def logger_of(sink: Collect) -> Iterator[LoggerOf]:
    """Loggers under the given names that write only to ``sink`` (not the test's root)."""
    made: list[logging.Logger] = []

    def make(name: str) -> logging.Logger:
        logger = logging.getLogger(name)
        logger.addHandler(sink)
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        made.append(logger)
        return logger

    yield make
    for logger in made:
        logger.removeHandler(sink)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def _outage(logger: logging.Logger, clock: FakeClock, seconds: int, per_second: int) -> None:
    """What an unreachable broker looks like to a client: the same error, again and again."""
    for _ in range(seconds):
        for _ in range(per_second):
            logger.error("Unable connect to node with id %s: %s", 1, "Connect call failed")
        clock.now += 1


def test_the_first_passes_and_repeats_become_one_counted_line(
    limiter: RepeatFilter, sink: Collect, clock: FakeClock, logger_of: LoggerOf
) -> None:
    client = logger_of("aiokafka.test-logs")
    _outage(client, clock, seconds=29, per_second=100)  # 2,900 errors within one interval
    assert sink.lines == ["Unable connect to node with id 1: Connect call failed"]

    clock.now += 1  # the interval ends
    assert limiter.flush() == 1
    assert sink.lines[1] == (
        "Unable connect to node with id 1: Connect call failed "
        "[repeated 2899 times in the last 30 s]"
    )
    assert sink.records[1].levelno == logging.ERROR
    assert sink.records[1].name == "aiokafka.test-logs"


def test_a_two_minute_outage_writes_a_handful_of_lines_not_thousands(
    limiter: RepeatFilter, sink: Collect, clock: FakeClock, logger_of: LoggerOf
) -> None:
    client = logger_of("aiokafka.test-logs")
    _outage(client, clock, seconds=120, per_second=100)
    limiter.flush(everything=True)

    # Per 30 s interval: the first error and the count of its repeats.
    assert len(sink.lines) == 8
    counted = sum(int(line.split("[repeated ")[1].split()[0]) for line in sink.lines[1::2])
    assert counted + 4 == 12_000 == limiter.suppressed + 4


def test_after_the_interval_the_summary_comes_before_the_next_error(
    sink: Collect, clock: FakeClock, logger_of: LoggerOf
) -> None:
    client = logger_of("kafka.net.manager")
    client.error("Connection failed: %s", "refused")
    client.error("Connection failed: %s", "refused")
    clock.now += 31
    client.error("Connection failed: %s", "refused")

    assert sink.lines == [
        "Connection failed: refused",
        "Connection failed: refused [repeated 1 time in the last 30 s]",
        "Connection failed: refused",
    ]


def test_a_different_error_shows_at_once_and_changing_numbers_do_not_count(
    sink: Collect, logger_of: LoggerOf
) -> None:
    client = logger_of("aiokafka.test-logs")
    client.error("Unable connect to node with id %s", 1)
    client.error("Unable connect to node with id %s", 2)  # same template: a repeat
    client.warning("Heartbeat failed for group %s", "g")  # another kind
    client.warning("Unable connect to node with id 3")  # preformatted, digits ignored...
    client.warning("Unable connect to node with id 4")  # ...so this repeats the one above

    assert sink.lines == [
        "Unable connect to node with id 1",
        "Heartbeat failed for group g",
        "Unable connect to node with id 3",
    ]


def test_other_records_pass_untouched(sink: Collect, logger_of: LoggerOf) -> None:
    client = logger_of("aiokafka.test-logs")
    own = logger_of("genmon.streams.test-logs")
    unrelated = logger_of("somebody.else")
    for _ in range(3):
        client.info("Discovered coordinator %s", 1)  # below WARNING
        own.warning("series restart: %s", "state too large")  # not a connection error
        unrelated.error("Unable connect to node with id %s", 1)  # not a logger we limit
    assert len(sink.lines) == 9


def test_own_reconnect_warnings_are_limited(sink: Collect, logger_of: LoggerOf) -> None:
    own = logger_of("genmon.incidents.test-logs")
    for _ in range(5):
        own.warning("outbox unavailable, retrying: %s", "server closed the connection")
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        for _ in range(5):
            own.exception("following %s failed", "model-a")

    assert sink.lines == [
        "outbox unavailable, retrying: server closed the connection",
        "following model-a failed",
    ]
    assert sink.records[1].exc_info is not None  # the first keeps its traceback


def test_two_handlers_with_the_filter_count_each_record_once(
    limiter: RepeatFilter, sink: Collect, clock: FakeClock, logger_of: LoggerOf
) -> None:
    client = logger_of("aiokafka.test-logs")
    second = Collect()
    second.addFilter(limiter)
    client.addHandler(second)
    try:
        _outage(client, clock, seconds=1, per_second=10)
        clock.now += 30
        limiter.flush()
    finally:
        client.removeHandler(second)
    for handler in (sink, second):
        assert handler.lines[-1].endswith("[repeated 9 times in the last 30 s]")
        assert len(handler.lines) == 2


def test_memory_is_bounded_and_no_count_is_lost(clock: FakeClock, logger_of: LoggerOf) -> None:
    limiter = RepeatFilter(30.0, max_kinds=3, clock=clock, background=False)
    sink = Collect()
    sink.addFilter(limiter)
    client = logger_of("aiokafka.test-logs")
    client.addHandler(sink)
    try:
        for kind in "abcdefghij":
            client.error(f"error {kind} from the broker")
            client.error(f"error {kind} from the broker")
            assert len(limiter._kinds) <= 3
        limiter.flush(everything=True)
    finally:
        client.removeHandler(sink)
    summaries = [line for line in sink.lines if "[repeated 1 time in" in line]
    assert len(summaries) == 10  # evicted kinds were reported, not forgotten


def test_the_count_is_written_when_the_interval_ends_without_another_error(
    logger_of: LoggerOf,
) -> None:
    limiter = RepeatFilter(0.2)  # real clock, background timer
    sink = Collect()
    sink.addFilter(limiter)
    client = logger_of("aiokafka.test-logs")
    client.addHandler(sink)
    try:
        for _ in range(5):
            client.error("Unable to update metadata from %s", "node 1")
        deadline = time.monotonic() + 10
        while len(sink.lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.removeHandler(sink)
    assert sink.lines[1].startswith("Unable to update metadata from node 1 [repeated 4 times")


def test_kafka_python_against_a_closed_port_is_limited(limiter: RepeatFilter) -> None:
    """The real client's own messages are recognised (no broker needed: nothing listens)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unfiltered, filtered = Collect(), Collect()
    filtered.addFilter(limiter)
    kafka_logger = logging.getLogger("kafka")
    kafka_logger.setLevel(logging.WARNING)
    for handler in (unfiltered, filtered):
        kafka_logger.addHandler(handler)
    producer = None
    try:
        producer = KafkaProducer(
            bootstrap_servers=f"127.0.0.1:{port}", api_version=(3, 0), max_block_ms=3000
        )
        with pytest.raises(KafkaTimeoutError):
            producer.send("genmon.test-logs", b"event").get(timeout=3)
    finally:
        if producer is not None:
            producer.close(timeout=1)
        for handler in (unfiltered, filtered):
            kafka_logger.removeHandler(handler)
        kafka_logger.setLevel(logging.NOTSET)

    complaints = [r for r in unfiltered.records if r.levelno >= logging.WARNING]
    kinds = {(r.name, logs.template(r)) for r in complaints}
    assert len(complaints) > len(kinds)  # the client repeated itself...
    passed = [r for r in filtered.records if r.levelno >= logging.WARNING]
    assert len(passed) == len(kinds)  # ...and each complaint passed once


def test_install_filters_the_root_handlers_once_and_follows_a_faust_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "_installed", None)
    monkeypatch.setattr(logs.atexit, "register", lambda *args, **kwargs: None)
    first = Collect()
    monkeypatch.setattr(logging.root, "handlers", [first])
    settings = Settings(worker={"log_repeat_interval_s": 7})

    installed = logs.install(settings)
    assert logs.install(settings) is installed
    assert first.filters == [installed] and installed.interval_s == 7

    class Worker:  # faust.Worker replaces the root handlers when it starts
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            logger.handlers = [replaced]

    replaced = Collect()
    worker = Worker()
    logs.install_on_worker(worker, settings)
    worker.on_setup_root_logger(logging.root, logging.INFO)
    assert replaced.filters == [installed]


def test_install_keeps_http_clients_from_printing_urls_with_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No handler of this process is filtered: other tests' log captures stay as they are.
    monkeypatch.setattr(logs, "_installed", None)
    monkeypatch.setattr(logs, "_handlers", list)
    httpx_logger = logging.getLogger("httpx")
    monkeypatch.setattr(httpx_logger, "level", logging.NOTSET)
    logs.install(Settings())
    assert not httpx_logger.isEnabledFor(logging.INFO)
    assert httpx_logger.isEnabledFor(logging.WARNING)
