"""The buffered window state: state held in memory between flushes, live panes, crash replay.

The worker flushes before each offset commit, so a crash loses the writes since the last
flush and Kafka redelivers the events since the last commit; these tests replay that with
a dict store and compare against uninterrupted runs.
"""

from __future__ import annotations

import asyncio
import copy
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from faust.types import TP
from pipeline_support import WINDOWS

from genmon.schemas.events import FeedbackEvent, InferenceEvent, InferenceStatus
from genmon.settings import Settings
from genmon.streams.app import create_app
from genmon.streams.ingest import InferenceBatch
from genmon.streams.partitioning import partition_for
from genmon.streams.pipeline import install_pipeline
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.stats import WindowStats
from genmon.streams.windows.store import SEP, BufferedStore, DictStore, mark_key

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0.timestamp() + 3600
MODELS = {0: ("chat", "code"), 1: ("search",)}

Step = tuple[Any, ...]


def settings() -> Settings:
    return Settings(
        windows=WINDOWS,
        # Short enough for entries to expire and be evicted within the script.
        feedback={"join_ttl_s": 30, "join_max_entries": 40, "join_max_text_chars": 40},
        detectors={"exemplars_per_window": 3},
    )


def make_core(store: DictStore, *, buffered: bool) -> WindowState:
    return WindowState(settings(), store, clock=lambda: NOW, buffered=buffered)


def model_of(partition: int, k: int) -> str:
    models = MODELS[partition]
    return models[k % len(models)]


def script(seed: int = 7, batches: int = 48) -> list[Step]:
    """Inference and feedback batches of two partitions, ticks, flushes and one redelivery."""
    rng = random.Random(seed)
    clock = {0: 0.0, 1: 0.0}
    made = {0: 0, 1: 0}
    offsets: dict[tuple[int, str], int] = {}
    steps: list[Step] = []

    def offset(p: int, topic: str) -> int:
        offsets[p, topic] = offsets.get((p, topic), -1) + 1
        return offsets[p, topic]

    for n in range(batches):
        p = rng.choice((0, 0, 1))
        batch = []
        for _ in range(rng.randint(4, 20)):
            clock[p] += rng.uniform(0.05, 0.8)
            k = made[p]
            made[p] += 1
            error = rng.random() < 0.15
            event = InferenceEvent(
                request_id=f"{p}-{k}",
                model_id=model_of(p, k),
                model_version=rng.choice(("v1", "v2")),
                latency_ms=rng.uniform(5, 900),
                time_to_first_token_ms=rng.uniform(1, 50) if rng.random() < 0.5 else None,
                prompt=f"question {k}",
                response="" if rng.random() < 0.1 else f"answer {k}",
                status=InferenceStatus.ERROR if error else InferenceStatus.OK,
                error_code="E42" if error else None,
                segment={"tier": rng.choice(("free", "pro")), "locale": rng.choice("ab")},
                # Slightly out of order, now and then late.
                started_at=T0 + timedelta(seconds=max(clock[p] - rng.uniform(0, 4), 0)),
            )
            batch.append((offset(p, "inference"), event))
        steps.append(("inf", p, batch))
        if rng.random() < 0.7:
            feedback = []
            for _ in range(rng.randint(1, 8)):
                # Mostly for requests seen, some for requests still to come (they wait).
                k = max(made[p] - rng.randint(-5, 30), 0)
                feedback.append(
                    (
                        offset(p, "feedback"),
                        FeedbackEvent(
                            feedback_id=f"f{p}-{n}-{len(feedback)}",
                            request_id=f"{p}-{k}",
                            model_id=model_of(p, k),
                            score=rng.choice((0.0, 0.2, 0.8, 1.0)),
                            created_at=T0 + timedelta(seconds=clock[p]),
                        ),
                    )
                )
            steps.append(("fb", p, feedback))
        if n == 20:
            steps.append(("inf", p, batch))  # Kafka redelivers a batch
        if n % 3 == 2:
            steps.append(("tick", 0))
            steps.append(("tick", 1))
        if n % 5 == 4:
            steps.append(("flush",))
    steps.append(("tick", 0))
    steps.append(("tick", 1))
    steps.append(("flush",))
    return steps


def run(core: WindowState, steps: list[Step], log: dict[str, list[Any]]) -> None:
    for step in steps:
        if step[0] == "inf":
            log["examples"] += core.on_inferences(step[1], step[2]).examples
        elif step[0] == "fb":
            log["examples"] += core.on_feedback(step[1], step[2]).examples
        elif step[0] == "tick":
            log["windows"] += [
                {k: v for k, v in window.items() if k != "closed_at"}
                for window in core.tick(step[1]).windows
            ]
        else:
            core.flush()


def new_log() -> dict[str, list[Any]]:
    return {"examples": [], "windows": []}


def by_window(
    windows: list[dict[str, Any]], *, first_wins: bool = False
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Windows by identity; unless ``first_wins``, a window emitted twice (after a crash)
    must be the same record."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for window in windows:
        key = (window["partition"], window["model_id"], window["kind"], window["end_ms"])
        assert seen.setdefault(key, window) == window or first_wins, key
    return seen


def logical(data: dict[str, Any]) -> dict[str, Any]:
    """Store contents with join segment records numbered by rank: a restarted core numbers
    records on from the highest stored one, not from the last it had used and deleted."""
    out = {key: value for key, value in data.items() if key.split(SEP)[1] != "S"}
    for p in {key.split(SEP)[0] for key in data}:
        records = sorted(k for k in data if k.startswith(f"{p}{SEP}S{SEP}"))
        out[f"{p} segments"] = [data[k] for k in records]
    return out


def test_buffered_and_write_through_cores_leave_the_same_store_and_outputs() -> None:
    steps = script()
    direct, held = DictStore(), DictStore()
    direct_log, held_log = new_log(), new_log()
    run(make_core(direct, buffered=False), steps, direct_log)
    buffered = make_core(held, buffered=True)
    run(buffered, steps, held_log)
    assert held_log == direct_log
    assert held.data == direct.data
    assert len(held_log["windows"]) > 20 and len(held_log["examples"]) > 20
    assert buffered.counters.join_evicted > 0 and buffered.counters.redelivered_skipped > 0
    # One write per changed key per flush instead of one per batch.
    assert held.writes < 0.7 * direct.writes
    # Live panes are exactly the stored ones: closed panes left memory with the store.
    live = buffered.store._live  # type: ignore[attr-defined]
    assert set(live) == {k for k in held.data if k.split(SEP)[1] == "P"}
    assert all(isinstance(stats, WindowStats) for stats in live.values())


def test_a_crash_loses_unflushed_writes_and_replay_from_the_last_commit_restores_all() -> None:
    steps = script()
    flushes = [i for i, step in enumerate(steps) if step[0] == "flush"]
    expected_store, expected = DictStore(), new_log()
    run(make_core(expected_store, buffered=True), steps, expected)

    for crash_at in (flushes[3] + 4, flushes[6] + 1, len(steps) - 3):
        store, log = DictStore(), new_log()
        first = make_core(store, buffered=True)
        run(first, steps[:crash_at], log)
        # The crash: whatever the first core held is gone; the store is as last flushed.
        last_flush = max(i for i in flushes if i < crash_at)
        restarted = make_core(store, buffered=True)
        restarted.restore([0, 1])
        # Redelivery from the committed offsets, which may lag the flushed marks: a flush
        # interval that is already in the store is skipped event by event, then the rest
        # replays (ticks only from the flush on, as the timer runs after the restart).
        previous = max(i for i in flushes if i < last_flush)
        again = [s for s in steps[previous:last_flush] if s[0] in ("inf", "fb")]
        run(restarted, again, log)
        assert restarted.counters.redelivered_skipped == sum(len(s[2]) for s in again)
        run(restarted, steps[last_flush:], log)

        assert logical(store.data) == logical(expected_store.data), crash_at
        assert by_window(log["windows"]) == by_window(expected["windows"])
        rows = {(row["model_id"], row["request_id"]) for row in log["examples"]}
        assert rows == {(row["model_id"], row["request_id"]) for row in expected["examples"]}


class Crash(Exception):
    pass


class CrashingStore(DictStore):
    """Applies ``budget`` more writes, then the process dies (the write raises)."""

    budget: int | None = None

    def put(self, partition: int, key: str, value: Any) -> None:
        self._spend()
        super().put(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        self._spend()
        super().delete(partition, key)

    def _spend(self) -> None:
        if self.budget is not None:
            if self.budget == 0:
                raise Crash
            self.budget -= 1


def test_a_crash_part_way_through_a_flush_replays_to_the_same_state() -> None:
    steps = script()
    flushes = [i for i, step in enumerate(steps) if step[0] == "flush"]
    expected_store, expected = DictStore(), new_log()
    run(make_core(expected_store, buffered=True), steps, expected)
    committed, crashing = flushes[4], flushes[5]
    probe = DictStore()
    probe_core = make_core(probe, buffered=True)
    run(probe_core, steps[:crashing], new_log())
    before = probe.writes
    probe_core.flush()
    flush_writes = probe.writes - before
    assert flush_writes > 10

    for budget in (1, flush_writes // 2, flush_writes - 1):
        store, log = CrashingStore(), new_log()
        first = make_core(store, buffered=True)
        run(first, steps[:crashing], log)
        store.budget = budget
        try:
            first.flush()
        except Crash:
            pass
        else:
            raise AssertionError("the flush should have died part-way")
        store.budget = None
        # Some records of the dying flush are in the store, over the old mark; the
        # offsets committed are the previous flush's.
        restarted = make_core(store, buffered=True)
        restarted.restore([0, 1])
        run(restarted, steps[committed:], log)

        assert logical(store.data) == logical(expected_store.data), budget
        # A window closed again after the restart may lack panes the dying flush deleted:
        # consumers keep the first record of a window (see the module docstring).
        assert by_window(log["windows"], first_wins=True) == by_window(expected["windows"])
        rows = {(row["model_id"], row["request_id"]) for row in log["examples"]}
        assert rows == {(row["model_id"], row["request_id"]) for row in expected["examples"]}


class RecordingStore(DictStore):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int, str]] = []

    def put(self, partition: int, key: str, value: Any) -> None:
        self.log.append(("put", partition, key))
        super().put(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        self.log.append(("delete", partition, key))
        super().delete(partition, key)


def test_a_flush_writes_puts_then_deletes_then_the_mark_of_each_partition() -> None:
    inner = RecordingStore()
    store = BufferedStore(inner, mark_key)
    inner.data["0\x1fS\x1fold"] = {"e": {}}
    store.put(0, "0\x1fM", {"off": {"inference": 1}})
    store.delete(0, "0\x1fS\x1fold")
    store.put(0, "0\x1fS\x1fnew", {"e": {"k": 1}})
    store.put(1, "1\x1fM", {"off": {}})
    store.put(1, "1\x1fS\x1fgone", {"e": {}})
    store.delete(1, "1\x1fS\x1fgone")  # written and deleted between flushes: never written
    store.put(0, "0\x1fM", {"off": {"inference": 2}})
    # Reads see the held writes.
    assert store.get("0\x1fS\x1fold") is None and store.get("0\x1fM") == {"off": {"inference": 2}}
    assert sorted(store.all_keys()) == ["0\x1fM", "0\x1fS\x1fnew", "1\x1fM"]
    assert inner.log == []
    store.flush()
    assert inner.log == [
        ("put", 0, "0\x1fS\x1fnew"),
        ("delete", 0, "0\x1fS\x1fold"),
        ("put", 0, "0\x1fM"),
        ("put", 1, "1\x1fM"),
    ]
    assert inner.data["0\x1fM"] == {"off": {"inference": 2}}
    store.flush()
    assert len(inner.log) == 4  # nothing held any more


def test_forget_drops_a_revoked_partitions_unflushed_writes_and_live_panes() -> None:
    steps = [s for s in script(batches=12) if s[0] != "flush"]
    store = DictStore()
    core = make_core(store, buffered=True)
    run(core, steps[:6], new_log())
    core.flush()
    flushed = copy.deepcopy(store.data)
    run(core, steps[6:], new_log())
    core.forget([1])
    live = core.store._live  # type: ignore[attr-defined]
    assert live and not any(key.startswith(f"1{SEP}") for key in live)
    core.flush()

    def of(data: dict[str, Any], p: int) -> dict[str, Any]:
        return {k: v for k, v in data.items() if k.startswith(f"{p}{SEP}")}

    assert of(store.data, 1) == of(flushed, 1)  # as last flushed: the rest was dropped
    assert of(store.data, 0) != of(flushed, 0)


def acknowledged_sends(table: Any) -> list[asyncio.Future[None]]:
    """Replace ``table.send_changelog`` (no broker here) by one whose futures the test
    resolves, as the broker's acknowledgements would; returns them as they are made."""
    sends: list[asyncio.Future[None]] = []

    def send_changelog(partition: int, key: str, value: Any, **kwargs: Any) -> Any:
        sends.append(asyncio.get_running_loop().create_future())
        return sends[-1]

    table.send_changelog = send_changelog
    return sends


def test_the_workers_consumer_flushes_the_pipeline_before_committing() -> None:
    app = create_app(Settings(), installers=())
    pipeline = install_pipeline(app)
    sends = acknowledged_sends(pipeline.state_table)
    event = InferenceEvent(
        request_id="r1", model_id="m", latency_ms=5.0, started_at=datetime.now(UTC)
    )
    revoked = {TP(pipeline.inference_topic, 1)}

    async def scenario() -> None:
        partition = partition_for("m", pipeline.partitions)
        await pipeline.on_inference_batch(InferenceBatch(None, [event], [(partition, 0)]))
        pipeline.core.on_inferences(1, [(0, event)])
        assert pipeline.state_table.data == {}  # held until a commit
        # Nothing is acknowledged here, so Faust commits no offsets, but the hooks run.
        await pipeline.on_revoked(revoked)
        commit = asyncio.ensure_future(app.consumer.force_commit())
        await asyncio.sleep(0.2)
        # Written, but no commit before the broker has acknowledged every write: Faust's
        # own producer flush gives up on its buffer after 0.1 s without a send.
        assert sends and not commit.done()
        for sent in sends:
            sent.set_result(None)
        await commit

    asyncio.run(scenario())
    partitions = {key.split(SEP)[0] for key in pipeline.state_table.data}
    # The revoked partition's writes were dropped, the other's written, mark included.
    assert str(partition_for("m", pipeline.partitions)) in partitions and "1" not in partitions
