"""The acceptance: scheduler processes on PostgreSQL, on a clock the test moves.

Two processes: each tick's job is enqueued once; SIGKILL the leader and the standby takes
over within the lease; with every process gone over a tick, the next start fires the
missed tick once, and a start after that does not fire it again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

import scheduler_support as support
from incident_support import migrated_engine, postgres_schema_url
from sqlalchemy.engine import Engine

from genmon.scheduler.effects import schedule_key
from genmon.scheduler.lease import LeaseState, current_lease

ENTRY = Path(support.__file__)
T0 = support.T0  # 09:00:30: the 09:00 tick is within the grace when the first leader starts
HOUR = timedelta(hours=1)
#: Generous: a process starts in seconds, but in tens of them on a loaded machine.
TIMEOUT_S = 120.0


class Processes:
    """Scheduler processes by holder name, each logging to its own file."""

    def __init__(self, url: str, policy: Path, clock: Path, logs: Path) -> None:
        self.url, self.policy, self.clock, self.logs = url, policy, clock, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, holder: str) -> None:
        log = (self.logs / f"{holder}.log").open("wb")
        self.running[holder] = subprocess.Popen(
            [sys.executable, str(ENTRY), self.url, str(self.policy), str(self.clock), holder],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self, holder: str) -> str:
        return (self.logs / f"{holder}.log").read_text(errors="replace")

    def kill(self, holder: str, sig: signal.Signals = signal.SIGKILL) -> None:
        process = self.running.pop(holder)
        process.send_signal(sig)
        process.wait(timeout=TIMEOUT_S)

    def stop_all(self) -> None:
        for holder in list(self.running):
            self.kill(holder)

    def tails(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )


@contextmanager
def processes(url: str, tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    policy = support.write_policy(
        tmp_path / "policy.yaml", [{"cron": "0 * * * *", "name": "hourly"}]
    )
    group = Processes(url, policy, tmp_path / "clock.txt", logs)
    try:
        yield group
    finally:
        group.stop_all()


def wait_for(condition: Callable[[], object], what: str, group: Processes) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{group.tails()}")
        time.sleep(0.1)


def keys(engine: Engine) -> list[str | None]:
    return [job.trigger_key for job in support.jobs(engine, "bot")]


def recorded(engine: Engine) -> int:
    """Ticks whose effect is recorded on their row (a kill before that leaves "claimed")."""
    return sum("outcome" in row.result for row in support.fire_rows(engine))


def key(tick: object) -> str:
    return schedule_key("bot", "hourly", tick)  # type: ignore[arg-type]


def test_one_scheduler_across_processes_fires_each_tick_once(
    postgres_url: str, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(postgres_schema_url(postgres_url))
        engine = migrated_engine(url)
        stack.callback(engine.dispose)
        support.register(engine, "bot")
        group = stack.enter_context(processes(url, tmp_path))
        clock = support.FileClock(group.clock)
        clock.set(T0)
        nine = T0.replace(minute=0, second=0)
        for holder in ("a", "b"):
            group.start(holder)

        # The first leader fires the 09:00 tick (within the grace) once; the standby waits.
        wait_for(lambda: recorded(engine) == 1, "the 09:00 job", group)
        assert keys(engine) == [key(nine)]
        leader = current_lease(engine)
        assert leader.holder in {"a", "b"} and leader.epoch == 1
        standby = ({"a", "b"} - {leader.holder}).pop()
        clock.set(nine + HOUR + timedelta(seconds=5))
        wait_for(lambda: recorded(engine) == 2, "the 10:00 job", group)
        assert sorted(keys(engine)) == sorted([key(nine), key(nine + HOUR)])
        assert "leads" not in group.log(standby)  # it never started APScheduler

        # SIGKILL the leader: the standby takes over once the lease lapses.
        killed_at = time.monotonic()
        group.kill(str(leader.holder))
        wait_for(lambda: current_lease(engine).holder == standby, "the takeover", group)
        took_s = time.monotonic() - killed_at
        taken: LeaseState = current_lease(engine)
        assert taken.epoch == 2
        # Within the lease, plus a standby poll (lease_s / 3) and slack for a loaded machine:
        # a standby that waited for anything but the lapse would take far longer.
        assert took_s < support.LEASE_S + 20.0, took_s
        clock.set(nine + 2 * HOUR + timedelta(seconds=5))
        wait_for(lambda: recorded(engine) == 3, "the 11:00 job", group)

        # Every process gone over the 12:00 tick: a restart fires it, once.
        group.kill(standby)
        clock.set(nine + 3 * HOUR + timedelta(minutes=10))
        for holder in ("c", "d"):
            group.start(holder)
        wait_for(lambda: recorded(engine) == 4, "the missed 12:00 job", group)
        group.stop_all()
        group.start("e")
        wait_for(lambda: "was fired already" in group.log("e"), "e's first look", group)
        assert sorted(keys(engine)) == sorted(key(nine + n * HOUR) for n in range(4))
        fires = support.fire_rows(engine)
        assert [row.fire_time for row in fires] == [nine + n * HOUR for n in range(4)]
        assert all(row.result["outcome"] == "enqueued" for row in fires)
