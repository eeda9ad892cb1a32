"""BatchingConsumer on the real broker: what a batch handler sees and what gets committed.

A worker subprocess runs only a recording batch handler on the inference topic. Partition
0 is written by two transactional producers whose transactions overlap and commit one
after the other, so each round of one batch of records ends with two commit markers: holes
of two offsets inside a fetch and, in the usual case of one fetch, exactly between two
batches (Faust's commit steps over a hole of one offset after a commit, not of two).
Partition 1 holds one record that makes its batch's handler raise.

Two tests without a broker check the consumer's bookkeeping directly: a rebalance's wait
for pending work waits for a batch in flight, and the bulk acknowledgement leaves Faust's
commit logic what ``Consumer.ack`` per message would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from faust.types import TP
from kafka import KafkaAdminClient, KafkaProducer

from genmon.infra.kafka import KafkaBroker
from genmon.settings import Settings
from genmon.streams.app import create_app
from genmon.streams.faust_consumer import BatchingConsumer

#: A worker whose only reader of the inference topic records each batch to HANDLED_PATH.
RECORDING_WORKER = """
import os, faust
from genmon.streams.app import create_app

def install(app):
    topic = app.genmon.topics["inference"]
    out = open(os.environ["HANDLED_PATH"], "a")

    @app.agent(topic, name="test.subscribe")
    async def subscribe(stream):
        async for _ in stream:
            pass

    async def handle(records):
        out.write(f"batch {len(records)}\\n")
        out.writelines(f"{r.partition} {r.offset} {r.value.decode()}\\n" for r in records)
        out.flush()
        if any(r.value == b"boom" for r in records):
            raise RuntimeError("boom")

    app.genmon.batch_handlers[topic.get_topic_name()] = handle

faust.Worker(create_app(installers=[install]), loglevel="warning").execute_from_commandline()
"""

BATCH_SIZE = 16
TIMEOUT_S = 120.0


def _handled(path: Path) -> tuple[list[tuple[int, int]], list[int]]:
    """(partition, offset) of every handled record in order, and the batch sizes."""
    records, sizes = [], []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        first, second, *_ = line.split()
        if first == "batch":
            sizes.append(int(second))
        else:
            records.append((int(first), int(second)))
    return records, sizes


def _wait(predicate: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.kafka
def test_batches_are_committed_up_to_the_last_handled_record_across_markers_and_errors(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    kafka = kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name, "partitions": 2})
    settings = kafka_settings.model_copy(update={"kafka": kafka})
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    topic, bootstrap = settings.topic("inference"), settings.kafka.bootstrap_servers

    producers = [
        KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{unique_name}-{i}")
        for i in range(2)
    ]
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for producer in producers:
        producer.init_transactions()
    for run in range(4):
        for producer in producers:
            producer.begin_transaction()
        for i in range(BATCH_SIZE):
            producer = producers[i * 2 // BATCH_SIZE]
            sent = producer.send(topic, f"t{run}-{i}".encode(), partition=0)
            offsets[0].append(sent.get(30).offset)
        for producer in producers:
            producer.commit_transaction()
    for producer in producers:
        producer.close()
    plain = KafkaProducer(bootstrap_servers=bootstrap)
    values = [b"boom" if i == 40 else f"p{i}".encode() for i in range(6 * BATCH_SIZE)]
    offsets[1] = [plain.send(topic, value, partition=1).get(30).offset for value in values]
    holes = [b - a - 1 for a, b in zip(offsets[0], offsets[0][1:], strict=False) if b - a > 1]
    assert holes == [2, 2, 2]

    handled_path, log = tmp_path / "handled.txt", tmp_path / "worker.log"
    env = {
        **os.environ,
        "HANDLED_PATH": str(handled_path),
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
        "GENMON_KAFKA__PARTITIONS": "2",
        "GENMON_WORKER__APP_ID": unique_name,
        "GENMON_WORKER__BATCH_SIZE": str(BATCH_SIZE),
        "GENMON_WORKER__WEB_PORT": str(free_port()),
    }
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)

    def committed() -> dict[int, int]:
        found = admin.list_group_offsets(unique_name)[unique_name]
        return {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topic}

    def run_worker() -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            return subprocess.Popen(
                [sys.executable, "-c", RECORDING_WORKER],
                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def stop(worker: subprocess.Popen[bytes]) -> None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)

    total = len(offsets[0]) + len(offsets[1])
    worker = run_worker()
    try:
        _wait(lambda: len(_handled(handled_path)[0]) >= total, "the records", log)
        # The periodic commit (not the one at shutdown) reaches the last record + 1, past
        # the markers inside partition 0 and past the batch whose handler raised.
        want = {0: offsets[0][-1] + 1, 1: offsets[1][-1] + 1}
        _wait(lambda: committed() == want, f"commits {want}", log)
    finally:
        stop(worker)
    records, sizes = _handled(handled_path)
    assert Counter(records) == Counter((p, o) for p in offsets for o in offsets[p])
    assert max(sizes) == BATCH_SIZE and sum(sizes) == total
    assert "handler of a" in log.read_text() and "RuntimeError: boom" in log.read_text()

    # A new worker of the group resumes from those commits: only new records, none twice.
    more = [plain.send(topic, f"q{i}".encode(), partition=1).get(30).offset for i in range(10)]
    worker = run_worker()
    try:
        _wait(lambda: len(_handled(handled_path)[0]) >= total + 10, "the new records", log)
        _wait(lambda: committed()[1] == more[-1] + 1, "the commit of the new records", log)
        # A last record on each partition: a partition is read in order, so a redelivery
        # of anything older would be handled before its sentinel (no sleep needed).
        sentinels = [(p, plain.send(topic, b"end", partition=p).get(30).offset) for p in (0, 1)]
        _wait(lambda: set(sentinels) <= set(_handled(handled_path)[0]), "the sentinels", log)
    finally:
        stop(worker)
        admin.close()
        plain.close()
    again = _handled(handled_path)[0][total:]
    assert sorted(again) == sorted([(1, offset) for offset in more] + sentinels)


def _consumer() -> BatchingConsumer:
    """The consumer of a worker app, not started: no broker is contacted."""
    consumer = create_app(Settings(), installers=()).consumer
    assert isinstance(consumer, BatchingConsumer)
    return consumer


def test_a_rebalance_waits_for_the_batch_in_flight() -> None:
    async def scenario() -> None:
        consumer = _consumer()
        started, release = asyncio.Event(), asyncio.Event()

        async def handler(records: object) -> None:
            started.set()
            await release.wait()
            raise RuntimeError("a failing batch is done all the same")

        spans = [(TP("t", 0), 0, 9)]
        batch = asyncio.create_task(consumer._handle_batch("t", handler, [], spans, False, 0))
        await started.wait()
        waiter = asyncio.create_task(consumer.wait_empty())  # what a revocation awaits
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done and len(consumer.unacked) == 1
        release.set()
        assert await batch is True
        await asyncio.wait_for(waiter, 10)
        assert not consumer.unacked
        assert consumer._read_offset[TP("t", 0)] == 9

    asyncio.run(scenario())


def test_a_batch_suspended_by_a_rebalance_is_neither_handled_nor_acknowledged() -> None:
    async def scenario() -> None:
        consumer = _consumer()
        handled: list[object] = []

        async def handler(records: object) -> None:
            handled.append(records)

        consumer.stop_flow()
        spans = [(TP("t", 0), 0, 9)]
        assert await consumer._handle_batch("t", handler, [], spans, True, 0) is False
        assert handled == [] and not consumer._acked and not consumer.unacked

    asyncio.run(scenario())


def test_bulk_acknowledgement_leaves_faust_the_offsets_to_commit() -> None:
    consumer = _consumer()
    first, second = TP("t", 0), TP("t", 1)
    consumer._committed_offset[first] = 5  # offsets below were committed before
    consumer._acked_index[first].update({6, 7})  # acknowledged already (a redelivery)
    consumer._acked[first].extend([6, 7])
    consumer._ack_spans([(first, 3, 9), (second, 0, 4), (second, 5, 5)])
    assert sorted(consumer._acked[first]) == [5, 6, 7, 8, 9]  # each once, none below 5
    assert consumer._acked[second] == [0, 1, 2, 3, 4, 5]
    assert consumer._n_acked == 3 + 6
    assert consumer._new_offset(first) == 10 and consumer._new_offset(second) == 6


def test_records_of_a_partition_paused_since_the_fetch_are_read_again() -> None:
    # Faust's active set is live: recovery's end can pause a partition between a fetch
    # and its handling. The records are set aside and the partition sought back to the
    # first of them, or a worker without a committed offset would never read them.
    async def scenario() -> None:
        consumer = _consumer()
        paused, revoked = TP("t", 0), TP("t", 1)
        sought: list[tuple[TP, int]] = []

        async def seek(tp: TP, offset: int) -> None:
            sought.append((tp, offset))

        consumer.assignment = lambda: {paused}  # type: ignore[method-assign]
        consumer._seek = seek  # type: ignore[method-assign]
        await consumer._read_again({paused: 40, revoked: 7})
        assert sought == [(paused, 40)]  # not a partition this worker no longer owns
        assert consumer._read_offset[paused] == 39  # so the loop reads offset 40 again

    asyncio.run(scenario())
