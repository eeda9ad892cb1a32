"""A leader that dies between a tick's claim and its effect: the tick still happens, once.

The claim (the ``schedule_fire`` row) and the effect are separate transactions, so a
crash between them leaves the row ``claimed``; the next leader, or the same one at its
next lease poll, re-runs the tick, and every effect's own key keeps it to one job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import scheduler_support as support
from incident_support import migrated_engine, postgres_schema_url
from sqlalchemy.engine import Engine

from genmon.scheduler import fires, service
from genmon.scheduler.effects import schedule_key
from genmon.scheduler.service import Scheduler

T0 = support.T0  # 09:00:30: the 09:00 tick is due
NINE = T0.replace(second=0)


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine
        engine.dispose()


def _until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_tick_left_claimed_by_a_dead_leader_is_completed_once(
    pg_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support.register(pg_engine, "bot")
    policy_file = support.write_policy(
        tmp_path / "p.yaml", [{"cron": "0 * * * *", "name": "hourly"}]
    )
    settings = support.settings_for("unused", policy_file, lease_s=1.0)
    policy = support.policy_of(policy_file)
    real_effect = service.run_effect
    hung, released = threading.Event(), threading.Event()
    calls: list[str] = []

    def dies_first(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the first leader "dies" after its claim, before the effect
            hung.set()
            released.wait(60)
            raise RuntimeError("killed")
        return real_effect(*args, **kwargs)

    monkeypatch.setattr(service, "run_effect", dies_first)
    first = Scheduler(settings, pg_engine, policy, clock=lambda: T0, holder="first")
    second = Scheduler(settings, pg_engine, policy, clock=lambda: T0, holder="second")
    try:
        first.poll_once()  # leads; its first tick claims 09:00 and hangs in the effect
        assert hung.wait(30), "the first leader never fired"
        [row] = support.fire_rows(pg_engine)
        assert (row.holder, row.result) == ("first", {"status": fires.CLAIMED})
        assert support.jobs(pg_engine, "bot") == []

        # The first leader polls no more: once its lease lapses the second takes over,
        # and its first tick re-runs the stranded 09:00.
        _until(lambda: (s := second.poll_once()) is not None and s.leader, "the takeover")
        _until(lambda: "outcome" in support.fire_rows(pg_engine)[0].result, "the re-run")
        released.set()  # the first leader's hung effect ends in its "death"
        [row] = support.fire_rows(pg_engine)
        assert (row.holder, row.epoch, row.result["outcome"]) == ("second", 2, "enqueued")
        [job] = support.jobs(pg_engine, "bot")
        assert job.trigger_key == schedule_key("bot", "hourly", NINE)

        # A tick the leader itself left claimed (its effect raised, or recording it failed)
        # is re-run at its own next lease poll.
        eight = NINE - timedelta(hours=1)
        assert fires.claim(pg_engine, "retrain:bot:hourly", eight, "second", 2) is not None
        second.poll_once()
        _until(
            lambda: all("outcome" in r.result for r in support.fire_rows(pg_engine)),
            "the own re-run",
        )
        rows = support.fire_rows(pg_engine)
        assert [r.result["outcome"] for r in rows] == ["enqueued", "enqueued"]
        assert len(support.jobs(pg_engine, "bot")) == 2
        assert len(calls) == 3  # each tick's effect ran once more, no tick twice
    finally:
        released.set()
        first.stop()
        second.stop()
