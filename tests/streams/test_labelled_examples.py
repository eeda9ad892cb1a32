"""The labelled-example sink: exact counts, rows isolated from a refused one, and rows kept
(in the retry topic, or in place) while the database fails.

On real databases (SQLite files; the shared PostgreSQL through ``database_url``). The
broker is a stand-in recording what is sent (the worker-level test in
test_labelled_examples_outage.py uses the real one). "The database is down" is an
unmigrated database (no table: transient, as in a worker started before `genmon db
upgrade`) or a PostgreSQL port nobody listens on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from incident_support import postgres_schema_url
from prometheus_client import CollectorRegistry

from genmon.db import make_engine, upgrade
from genmon.exceptions import DatabaseError
from genmon.schemas.events import DeadLetter
from genmon.settings import FeedbackSettings
from genmon.streams.labelled_examples import (
    REJECTED,
    RETRY_RECORD_BYTES,
    UNREADABLE,
    LabelledExampleSink,
    decode_rows,
    is_transient,
    retry_records,
)
from genmon.streams.pipeline_metrics import PipelineMetrics

FAST = FeedbackSettings(examples_retry_initial_s=0.05, examples_retry_max_s=0.2)


def rows(n: int, prefix: str = "r", model: str = "m") -> list[dict[str, Any]]:
    return [
        {
            "request_id": f"{prefix}{i}",
            "model_id": model,
            "model_version": "v1",
            "prompt": f"question {i}",
            "response": f"answer {i}",
            "correction": None,
            "score": 0.25,
            "label": None,
            "segment": {"tier": "pro"},
            "subject_id": None,
            # Chats and plain calls: the JSON column takes both (and the retry records).
            "messages": [{"role": "user", "content": f"question {i}"}] if i % 2 else None,
        }
        for i in range(n)
    ]


class FakeTopic:
    """Records what is sent, acknowledged at once; or fails every send while ``down``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[tuple[bytes | None, bytes]] = []
        self.down = False

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, *, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def messages(self) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(topic=self.name, partition=0, offset=i, key=key, value=value)
            for i, (key, value) in enumerate(self.sent)
        ]


class Sink:
    """A sink with its own registry, retry and dead-letter stand-ins."""

    def __init__(self, url: str, settings: FeedbackSettings = FAST, retry: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.retry_topic = FakeTopic("t.examples-retry")
        self.deadletter = FakeTopic("t.deadletter")
        self.sink = LabelledExampleSink(
            url,
            PipelineMetrics(self.registry),
            settings,
            retry_topic=self.retry_topic if retry else None,
            deadletter=self.deadletter,
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def written(self) -> float:
        return self.metric("genmon_join_examples_written_total")

    @property
    def failed(self) -> float:
        return self.metric("genmon_join_examples_failed_total")

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(value) for _, value in self.deadletter.sent]


def stored(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                connection.execute(
                    sa.text("select request_id from labelled_example order by id")
                ).scalars()
            )
    finally:
        engine.dispose()


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def unmigrated_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'later.sqlite'}"


# -- counting -------------------------------------------------------------------------------
def test_chat_messages_are_stored_with_their_example(database_url: str) -> None:
    from sqlmodel import Session, select

    from genmon.schemas.tables import LabelledExample

    upgrade(database_url)
    asyncio.run(Sink(database_url).sink.write(rows(2), "t.feedback", 0))
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            found = session.exec(select(LabelledExample).order_by(LabelledExample.request_id))
            stored_messages = [row.messages for row in found]
    finally:
        engine.dispose()
    assert stored_messages == [None, [{"role": "user", "content": "question 1"}]]


def test_the_written_metric_counts_new_rows_exactly(database_url: str) -> None:
    upgrade(database_url)
    s = Sink(database_url)

    async def scenario() -> None:
        await s.sink.write(rows(5), "t.feedback", 0)
        await s.sink.write(rows(7), "t.feedback", 0)  # five again, two new
        await s.sink.write(rows(7), "t.inference", 0)  # redelivered: nothing new

    asyncio.run(scenario())
    assert len(stored(database_url)) == 7
    assert s.written == 7  # psycopg's rowcount had it at 0
    assert s.retry_topic.sent == [] and s.failed == 0


# -- row isolation --------------------------------------------------------------------------
REFUSED_EVERYWHERE = {
    "null version": {"model_version": None},  # NOT NULL: IntegrityError
    "unencodable segment": {"segment": {"tier": object()}},  # fails before the database
}
REFUSED_BY_POSTGRES = {
    "NUL byte": {"prompt": "a\x00b"},  # DataError: text cannot hold NUL
    "id too long": {"request_id": "x" * 300},  # DataError: varchar(256)
}


@pytest.fixture
def postgres_database_url(postgres_url: str) -> Iterator[str]:
    """A schema of its own on the shared PostgreSQL (SQLite stores what it refuses)."""
    with postgres_schema_url(postgres_url) as url:
        yield url


@pytest.mark.parametrize("bad", sorted(REFUSED_EVERYWHERE))
def test_one_refused_row_does_not_drop_the_others(database_url: str, bad: str) -> None:
    _one_refused_row(database_url, bad)


@pytest.mark.postgres
@pytest.mark.parametrize("bad", sorted(REFUSED_BY_POSTGRES))
def test_one_row_postgresql_refuses_does_not_drop_the_others(
    postgres_database_url: str, bad: str
) -> None:
    _one_refused_row(postgres_database_url, bad)


def _one_refused_row(database_url: str, bad: str) -> None:
    upgrade(database_url)
    s = Sink(database_url)
    batch = rows(50)
    batch[37] = {**batch[37], **{**REFUSED_EVERYWHERE, **REFUSED_BY_POSTGRES}[bad]}

    asyncio.run(s.sink.write(batch, "t.feedback", 3))

    assert sorted(stored(database_url)) == sorted(
        r["request_id"] for r in batch if r is not batch[37]
    )
    assert s.written == 49 and s.failed == 1
    assert s.metric("genmon_join_example_errors_total", kind="transient") == 0
    [letter] = s.dead_letters()
    assert (letter.reason, letter.source_topic, letter.partition) == (REJECTED, "t.feedback", 3)
    payload = json.loads(base64.b64decode(letter.payload_b64))
    assert payload["request_id"] == batch[37]["request_id"] and letter.error
    assert s.deadletter.sent[0][0] == b"m"
    assert s.retry_topic.sent == []


def test_every_refused_row_is_isolated_and_the_rest_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    upgrade(url)
    s = Sink(url)
    batch = rows(200)
    bad = {3, 4, 99, 199}
    for i in bad:
        batch[i] = {**batch[i], "model_version": None}

    asyncio.run(s.sink.write(batch, "t.inference", 1))

    assert len(stored(url)) == 196 and s.written == 196 and s.failed == 4
    refused = {json.loads(base64.b64decode(d.payload_b64))["request_id"] for d in s.dead_letters()}
    assert refused == {f"r{i}" for i in bad}


# -- the database down ------------------------------------------------------------------------
def test_rows_wait_in_the_retry_topic_and_the_retry_stores_them_once(unmigrated_url: str) -> None:
    s = Sink(unmigrated_url)

    async def scenario() -> None:
        await s.sink.write(rows(30), "t.feedback", 0)
        await s.sink.write(rows(20, "q"), "t.inference", 0)  # in backoff: straight to the topic
        assert s.metric("genmon_join_example_errors_total", kind="transient") == 1
        assert s.metric("genmon_join_examples_deferred_total") == 50 and s.written == 0
        assert s.metric("genmon_join_examples_pending") == 0  # durable in the topic
        upgrade(unmigrated_url)  # the database is back
        for message in s.retry_topic.messages():
            await s.sink.retry(message, rebalancing=lambda: False)
        for message in s.retry_topic.messages():  # redelivered after a crash
            await s.sink.retry(message, rebalancing=lambda: False)

    asyncio.run(scenario())
    assert sorted(stored(unmigrated_url)) == sorted(
        [f"r{i}" for i in range(30)] + [f"q{i}" for i in range(20)]
    )
    assert s.written == 50 and s.failed == 0
    assert {key for key, _ in s.retry_topic.sent} == {b"m"}


def test_the_retry_waits_for_the_database_with_backoff(unmigrated_url: str) -> None:
    s = Sink(unmigrated_url)

    async def scenario() -> None:
        await s.sink.write(rows(10), "t.feedback", 0)
        [message] = s.retry_topic.messages()
        retry = asyncio.ensure_future(s.sink.retry(message, rebalancing=lambda: False))
        await until(lambda: s.metric("genmon_join_example_errors_total", kind="transient") >= 3)
        assert not retry.done() and s.metric("genmon_join_examples_pending") == 10
        upgrade(unmigrated_url)
        await asyncio.wait_for(retry, 10)

    asyncio.run(scenario())
    assert len(stored(unmigrated_url)) == 10 and s.written == 10
    assert s.metric("genmon_join_examples_pending") == 0


def test_a_rebalance_hands_waiting_rows_back_to_the_topic(unmigrated_url: str) -> None:
    s = Sink(unmigrated_url)
    rebalancing = False

    async def scenario() -> None:
        nonlocal rebalancing
        await s.sink.write(rows(10), "t.feedback", 0)
        [message] = s.retry_topic.messages()
        retry = asyncio.ensure_future(s.sink.retry(message, rebalancing=lambda: rebalancing))
        await until(lambda: s.metric("genmon_join_example_errors_total", kind="transient") >= 2)
        rebalancing = True
        await asyncio.wait_for(retry, 5)

    asyncio.run(scenario())
    assert len(s.retry_topic.sent) == 2  # the record and the rows handed back
    assert decode_rows(s.retry_topic.sent[1][1]) == rows(10)
    assert s.written == 0 and s.failed == 0


def test_without_a_retry_topic_the_write_waits_until_the_database_is_back(
    unmigrated_url: str,
) -> None:
    s = Sink(unmigrated_url, retry=False)

    async def scenario() -> None:
        write = asyncio.ensure_future(s.sink.write(rows(10), "t.feedback", 0))
        await until(lambda: s.metric("genmon_join_example_errors_total", kind="transient") >= 3)
        assert not write.done() and s.metric("genmon_join_examples_pending") == 10
        upgrade(unmigrated_url)
        await asyncio.wait_for(write, 10)

    asyncio.run(scenario())
    assert len(stored(unmigrated_url)) == 10 and s.written == 10


def test_while_the_broker_is_down_too_the_write_keeps_trying_both(unmigrated_url: str) -> None:
    s = Sink(unmigrated_url)
    s.retry_topic.down = True
    unencodable = {**rows(1, "bad")[0], "segment": {"tier": object()}}

    async def scenario() -> None:
        write = asyncio.ensure_future(s.sink.write([*rows(10), unencodable], "t.feedback", 0))
        await until(lambda: s.metric("genmon_join_example_errors_total", kind="transient") >= 2)
        assert not write.done()
        upgrade(unmigrated_url)  # the database comes back first
        await asyncio.wait_for(write, 10)

    asyncio.run(scenario())
    assert len(stored(unmigrated_url)) == 10 and s.written == 10
    assert s.retry_topic.sent == []
    assert s.failed == 1 and len(s.dead_letters()) == 1  # refused once, not per try


def test_a_hung_insert_goes_to_the_retry_topic_and_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    url = f"sqlite:///{path}"
    upgrade(url)
    s = Sink(url, FeedbackSettings(examples_write_timeout_s=0.2, examples_retry_initial_s=0.05))
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the insert waits for the busy timeout (seconds)

    async def scenario() -> None:
        await asyncio.wait_for(s.sink.write(rows(10), "t.feedback", 0), 5)
        assert s.metric("genmon_join_examples_deferred_total") == 10
        lock.execute("ROLLBACK")  # the hung insert gets through now
        await until(lambda: s.written == 10)
        for message in s.retry_topic.messages():  # nothing new left for the retry
            await s.sink.retry(message, rebalancing=lambda: False)

    try:
        asyncio.run(scenario())
    finally:
        lock.close()
    assert len(stored(url)) == 10 and s.written == 10


# -- records and errors -----------------------------------------------------------------------
def test_retry_records_are_bounded_and_round_trip() -> None:
    big = rows(40)
    for row in big:
        row["prompt"] = "é" * 20_000
    records, refused = retry_records([*big, {**big[0], "segment": {"x": object()}}])
    assert [index for index, _ in refused] == [40]
    assert all(len(value) <= RETRY_RECORD_BYTES + 50_000 for _, value, _ in records)
    assert len(records) > 1 and sum(count for _, _, count in records) == 40
    assert [row for _, value, _ in records for row in decode_rows(value)] == big


def test_a_record_without_rows_is_dead_lettered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    upgrade(url)
    s = Sink(url)
    message = SimpleNamespace(topic="t.examples-retry", partition=2, offset=9, key=None, value=b"{")

    asyncio.run(s.sink.retry(message, rebalancing=lambda: False))

    [letter] = s.dead_letters()
    assert (letter.reason, letter.partition, letter.offset) == (UNREADABLE, 2, 9)
    assert s.failed == 1


def test_transient_errors_are_the_databases_and_permanent_ones_the_rows() -> None:
    from sqlalchemy import exc

    refused = make_engine("postgresql+psycopg://genmon:genmon@127.0.0.1:1/genmon")
    with pytest.raises(exc.OperationalError) as down:
        refused.connect()
    assert is_transient(down.value)
    assert is_transient(DatabaseError("cannot open"))
    wrapped = DatabaseError("failed")
    wrapped.__cause__ = down.value
    assert is_transient(wrapped)
    assert is_transient(exc.OperationalError("insert", {}, sqlite3.OperationalError("locked")))
    assert not is_transient(exc.IntegrityError("insert", {}, Exception("not null")))
    assert not is_transient(exc.DataError("insert", {}, Exception("NUL")))
    assert not is_transient(exc.ProgrammingError("insert", {}, sqlite3.ProgrammingError("bind")))
    assert not is_transient(TypeError("Object of type object is not JSON serializable"))
