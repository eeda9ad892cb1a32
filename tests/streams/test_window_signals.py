"""Window signals kept for people: a real worker, the real broker and PostgreSQL.

Traffic in, ``window_signal`` rows out: the right counts per version and segment, and each
judged signal's score against its threshold; a redelivered record writes its rows again
unchanged; and a PostgreSQL outage while records are stored loses none of them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from incident_support import migrated_engine, postgres_schema_url
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from worker_support import Harness

from genmon.db import make_engine, upgrade
from genmon.infra.postgres import PostgresCluster
from genmon.schemas.events import InferenceEvent
from genmon.schemas.signals import WindowSignal
from genmon.settings import Settings
from genmon.streams.signals import SignalMetrics, SignalRecorder

pytestmark = pytest.mark.postgres

WINDOWS = 4  # 2 s tumbling windows: two of warm-up, then v1 fails half its requests


def grid_start(seconds_ago: float) -> datetime:
    t = int(time.time() - seconds_ago)
    return datetime.fromtimestamp(t - t % 2, UTC)


def traffic(t0: datetime, model: str = "m-sig", windows: int = WINDOWS) -> list[InferenceEvent]:
    """Per 2 s window: v1 40 requests (lang en 30, fr 10), v2 10 (en); from the third
    window on, every other v1 request fails."""
    events = []
    for w in range(windows):
        for i in range(50):
            version = "v1" if i < 40 else "v2"
            events.append(
                InferenceEvent(
                    request_id=f"w{w}-{i}",
                    model_id=model,
                    model_version=version,
                    latency_ms=100.0 + i,
                    started_at=t0 + timedelta(milliseconds=2000 * w + 30 * i + 10),
                    status="error" if w >= 2 and version == "v1" and i % 2 else "ok",
                    segment={"lang": "fr" if i < 10 else "en"},
                    response="Fine.",
                )
            )
    return events


def rows(
    engine: sa.Engine, model: str = "m-sig"
) -> dict[tuple[datetime, str, str], dict[str, Any]]:
    table = WindowSignal.__table__
    try:
        with engine.connect() as connection:
            query = sa.select(table).where(table.c.model_id == model)
            found = connection.execute(query).mappings().all()
    except sa.exc.ProgrammingError:  # the table renamed away
        return {}
    return {
        (row["window_start"].astimezone(UTC), row["model_version"], row["segment"]): dict(row)
        for row in found
    }


@pytest.fixture
def schema_url(postgres_url: str) -> Iterator[str]:
    with postgres_schema_url(postgres_url) as url:
        yield url


@pytest.mark.kafka
def test_a_worker_stores_each_judged_window_per_version_and_segment(
    kafka_settings: Settings,
    unique_name: str,
    tmp_path: Path,
    free_port: Callable[[], int],
    schema_url: str,
) -> None:
    engine = migrated_engine(schema_url)
    h = Harness(
        kafka_settings,
        unique_name,
        tmp_path,
        free_port,
        GENMON_DATABASE__URL=schema_url,
        GENMON_DETECTORS__BASELINE_WARMUP_WINDOWS="2",
        GENMON_WINDOWS__IDLE_TIMEOUT_S="8",
    )
    try:
        worker = h.worker().start()
        worker.wait_ready()
        t0 = grid_start(30)
        for event in traffic(t0):
            h.send(event)
        starts = [t0 + timedelta(seconds=2 * w) for w in range(WINDOWS)]
        h.wait_for(
            lambda: all((start, "v1", "*") in rows(engine) for start in starts),
            90,
            "a window_signal row for every window",
        )
        stored = rows(engine)
        for w, start in enumerate(starts):
            v1, v2 = stored[(start, "v1", "*")], stored[(start, "v2", "*")]
            assert (v1["requests"], v2["requests"]) == (40, 10)
            assert stored[(start, "v1", "lang=fr")]["requests"] == 10
            assert stored[(start, "v1", "lang=en")]["requests"] == 30
            assert stored[(start, "v2", "lang=en")]["requests"] == 10
            assert v1["errors"] == (20 if w >= 2 else 0)
            assert v1["error_rate"] == pytest.approx(0.5 if w >= 2 else 0.0)
            assert v1["resolution_s"] == 2
            assert v1["window_end"].astimezone(UTC) == start + timedelta(seconds=2)
            assert 100.0 <= v1["latency_p50_ms"] <= v1["latency_p99_ms"] <= 145.0
        # Judged against the baseline of the first two windows: scores with thresholds.
        for start in starts[2:]:
            judged = stored[(start, "v1", "*")]["scores"]["error_rate"]
            assert judged["detector"] == "rate_cusum"
            assert judged["threshold"] > 0 and judged["score"] >= judged["threshold"]
            assert judged["detected"] is True and judged["value"] == pytest.approx(0.5)
        assert "error_rate" not in stored[(starts[0], "v1", "*")]["scores"]  # warming up

        # Redelivery: the same records again write the same rows once.
        before = {key: {**row, "recorded_at": None} for key, row in rows(engine).items()}
        records = read_all(kafka_settings, h.settings.topic("signals"))
        assert len(records) >= WINDOWS
        resent = sum(len(json.loads(value)["series"]) for _, value in records)
        written = stored_total(worker) + resent
        for key, value in records:
            h.producer.send(h.settings.topic("signals"), key=key, value=value)
        h.wait_for(lambda: stored_total(worker) >= written, 30, "the redelivered records stored")
        after = {key: {**row, "recorded_at": None} for key, row in rows(engine).items()}
        assert after == before

        # The table gone (what the database answers while it is away or not migrated):
        # the recorder waits, the offset stays behind its records, detection goes on.
        signals = h.settings.topic("signals")
        stored_to = end_offsets(kafka_settings, signals)
        with engine.begin() as connection:
            connection.execute(sa.text("ALTER TABLE window_signal RENAME TO window_signal_away"))
        t1 = grid_start(4)
        for event in traffic(t1, model="m-later", windows=2):
            h.send(event)
        h.wait_for(
            lambda: transient(worker) >= 3 and h.window("m-later", "tumbling", ms(t1)) is not None,
            60,
            "windows of m-later while the recorder waits for the table",
        )
        assert end_offsets(kafka_settings, signals) != stored_to  # its records are there
        group = h.env["GENMON_WORKER__APP_ID"]
        for tp, offset in committed(kafka_settings, group, signals).items():
            assert offset <= stored_to[tp], (tp, offset, stored_to[tp])
        with engine.begin() as connection:
            connection.execute(sa.text("ALTER TABLE window_signal_away RENAME TO window_signal"))
        h.wait_for(
            lambda: all(
                (start, "v1", "*") in rows(engine, "m-later")
                for start in (t1, t1 + timedelta(seconds=2))
            ),
            60,
            "the waiting records stored",
        )
        assert rows(engine, "m-later")[(t1, "v2", "lang=en")]["requests"] == 10
    finally:
        h.close()
        engine.dispose()


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def stored_total(worker: Any) -> float:
    return float(worker.stats()["genmon_signals_rows_stored_total"])


def transient(worker: Any) -> float:
    errors = worker.stats().get("genmon_signals_store_errors_total", {})
    return float(errors.get("kind=transient", 0))


def end_offsets(kafka_settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.kafka.bootstrap_servers)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return dict(consumer.end_offsets(tps))
    finally:
        consumer.close()


def committed(kafka_settings: Settings, group: str, topic: str) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.kafka.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
    finally:
        admin.close()


def read_all(kafka_settings: Settings, topic: str) -> list[tuple[bytes, bytes]]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=2000,
    )
    try:
        return [(message.key, message.value) for message in consumer]
    finally:
        consumer.close()


# -- the recorder through a database outage -------------------------------------------------
@pytest.fixture
def private_cluster(settings: Settings, free_port: Callable[[], int]) -> Iterator[PostgresCluster]:
    """A running, migrated cluster of this test's own (stopping it harms no other test)."""
    home = Path(tempfile.mkdtemp(prefix="genmon-pg-signals-"))
    home.chmod(0o755)  # the `postgres` OS user must traverse it
    cluster = PostgresCluster(
        Settings(home=home, postgres=settings.postgres.model_copy(update={"port": free_port()}))
    )
    try:
        cluster.up()
        upgrade(cluster.url)
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home, ignore_errors=True)


def record(start: datetime, requests: int) -> bytes:
    return json.dumps(
        {
            "model_id": "m",
            "window_start": start.isoformat(),
            "window_end": (start + timedelta(seconds=60)).isoformat(),
            "start_ms": int(start.timestamp() * 1000),
            "end_ms": int(start.timestamp() * 1000) + 60_000,
            "resolution_s": 60,
            "series": [
                {"model_version": "v1", "segment": "*", "requests": requests, "scores": {}},
                {"model_version": "v1", "segment": "a=b", "requests": 1, "scores": {}},
            ],
        }
    ).encode()


def test_the_recorder_waits_out_a_database_outage_and_loses_nothing(
    private_cluster: PostgresCluster,
) -> None:
    registry = CollectorRegistry()
    recorder = SignalRecorder(
        private_cluster.url, SignalMetrics(registry), initial_s=0.05, max_s=0.5
    )
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def transient() -> float:
        return (
            registry.get_sample_value("genmon_signals_store_errors_total", {"kind": "transient"})
            or 0.0
        )

    async def scenario() -> None:
        assert await recorder.store([record(t0, 5), record(t0, 5)]) == 2  # deduplicated
        await asyncio.to_thread(private_cluster.down)
        storing = asyncio.ensure_future(
            recorder.store([record(t0 + timedelta(minutes=m), 10 + m) for m in range(1, 6)])
        )
        while transient() < 3:  # met the outage and retried, holding the poll
            assert not storing.done()
            await asyncio.sleep(0.05)
        await asyncio.to_thread(private_cluster.up)
        assert await asyncio.wait_for(storing, 60) == 10

    asyncio.run(scenario())
    engine = make_engine(private_cluster.url)
    try:
        stored = rows(engine, "m")
    finally:
        engine.dispose()
    assert len(stored) == 12
    assert {
        start: row["requests"] for (start, _, segment), row in stored.items() if segment == "*"
    } == {t0 + timedelta(minutes=m): (10 + m if m else 5) for m in range(6)}
