"""Failover probe: how long a SIGKILLed worker's partitions wait before they are read again.

Two real ``genmon worker`` processes share one consumer group while a steady stream of
inference events goes to every partition of the inference topic. One worker is killed
with SIGKILL (no LeaveGroup, no last commit: the broker learns of it only when the
worker's session times out), and the probe watches, from the outside as an operator's lag
monitor would, the group's *committed* offsets: a partition of the killed worker is
**consumed again** once its committed offset passes the one it had at the kill, so its
lag (end offset - committed offset) falls again. The time includes everything an
operator waits for: the session timeout, the survivors' next heartbeat, the rebalance,
Faust's table recovery of the moved partitions and the next offset commit
(``worker.commit_interval_s``).

A :class:`Setup` picks the session timeout and heartbeat interval, static membership
(Kafka's ``group.instance.id``, set through Faust's ``CONSUMER_GROUP_INSTANCE_ID``
environment variable) or not, and whether the killed worker is started again at once.

Used by ``bench/failover/run.py`` (the table in BENCHMARKS.md) and by
``tests/faults/test_failover.py`` (the 15 s acceptance bound).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from genmon.kafka_config import client_config
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings

#: The two worker slots; a slot keeps its client id (and static instance id) across
#: restarts, so the probe can tell the group's members apart.
SLOTS = ("a", "b")

#: How often the probe reads the group's committed offsets and members.
POLL_S = 0.2

# kafka-python decodes every member's subscription when it describes a group and warns,
# with the whole group's repr, each time it meets Faust's (its own protocol version); the
# assignments, which the probe reads, decode fine.
logging.getLogger("kafka.admin._groups").setLevel(logging.ERROR)


class Worker(Protocol):
    """A ``genmon worker`` subprocess (``tests/worker_support.py:WorkerProcess``)."""

    env: dict[str, str]
    port: int

    def start(self) -> Any: ...

    def wait_ready(self, timeout: float = ...) -> None: ...

    def kill9(self) -> None: ...


class Group(Protocol):
    """Settings, producer and workers of one consumer group
    (``tests/worker_support.py:Harness``)."""

    name: str
    settings: Settings
    producer: KafkaProducer

    def worker(self) -> Worker: ...


@dataclass(frozen=True)
class Setup:
    """The consumer-group settings one probe runs the workers with."""

    session_timeout_s: float
    heartbeat_interval_s: float
    static: bool = False
    restart: bool = False

    @property
    def membership(self) -> str:
        return "static (group.instance.id)" if self.static else "dynamic"

    @property
    def killed_worker(self) -> str:
        return "restarted at once" if self.restart else "not restarted"

    def env(self) -> dict[str, str]:
        return {
            "GENMON_WORKER__SESSION_TIMEOUT_S": f"{self.session_timeout_s:g}",
            "GENMON_WORKER__HEARTBEAT_INTERVAL_S": f"{self.heartbeat_interval_s:g}",
        }


@dataclass(frozen=True)
class Trial:
    """One SIGKILL and what followed, in seconds after the signal."""

    setup: Setup
    partitions: tuple[int, ...]
    """The killed worker's partitions of the inference topic."""
    left_s: float | None
    """Until the group no longer listed the killed member (its session expired, or a
    restarted static member took its place); ``None``: still listed at the end."""
    consumed_again_s: float | None
    """Until every one of :attr:`partitions` had a committed offset past the one it had
    at the kill; ``None``: not within the probe's timeout."""


@dataclass(frozen=True)
class Member:
    """One member of the group as the broker describes it."""

    member_id: str
    client_id: str
    partitions: frozenset[int]


class Traffic:
    """A thread sending ``rate`` valid inference events per second, spread evenly over the
    inference topic's partitions (each partition gets its own model)."""

    def __init__(self, producer: KafkaProducer, topic: str, partitions: int, rate: float) -> None:
        self.producer, self.topic, self.partitions, self.rate = producer, topic, partitions, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failover-traffic", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.producer.flush()

    def _run(self) -> None:
        step = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            partition = self.sent % self.partitions
            event = InferenceEvent(
                model_id=f"failover-{partition}",
                latency_ms=100.0,
                started_at=datetime.now(UTC),
            )
            self.producer.send(
                self.topic,
                key=event.model_id.encode(),
                value=event.model_dump_json().encode(),
                partition=partition,
            )
            self.sent += 1
            next_at += step
            self._stop.wait(max(0.0, next_at - time.monotonic()))


class FailoverProbe:
    """Two workers of one group, steady traffic, and the kills (see the module docstring)."""

    def __init__(self, group: Group, setup: Setup, rate: float = 100.0) -> None:
        self.group, self.setup = group, setup
        self.topic = group.settings.topic("inference")
        self.n_partitions = group.settings.kafka.partitions
        self.admin = KafkaAdminClient(
            **client_config(group.settings.kafka, request_timeout_ms=5000)
        )
        self.traffic = Traffic(group.producer, self.topic, self.n_partitions, rate)
        self.workers: dict[str, Worker] = {}

    # -- the group, as the broker sees it ------------------------------------------------------
    def members(self) -> tuple[str, list[Member]]:
        """The group's state (``Stable``, ``PreparingRebalance``, ...) and its members."""
        described = self.admin.describe_groups([self.group.name])[self.group.name]
        members = [
            Member(m["member_id"], m["client_id"], frozenset(self._owned(m["member_assignment"])))
            for m in described.get("members") or ()
        ]
        return str(described.get("group_state")), members

    def _owned(self, assignment: Any) -> Iterable[int]:
        """The inference partitions in a decoded member assignment (dict or object)."""
        if not assignment:
            return ()
        if isinstance(assignment, dict):
            topics = assignment.get("assigned_partitions") or ()
            return [
                p for t in topics if t.get("topic") == self.topic for p in t.get("partitions", ())
            ]
        return [p for t, ps in assignment.assignment if t == self.topic for p in ps]

    def committed(self) -> dict[int, int]:
        """Partition -> the group's committed offset, for the inference topic."""
        offsets = self.admin.list_group_offsets(self.group.name).get(self.group.name, {})
        return {
            tp.partition: meta.offset
            for tp, meta in offsets.items()
            if tp.topic == self.topic and meta.offset is not None and meta.offset >= 0
        }

    # -- workers ---------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Start one worker per slot, wait until both are ready, then start the traffic."""
        for slot in SLOTS:
            self._spawn(slot)
        for worker in self.workers.values():
            worker.wait_ready(timeout)
        self.traffic.start()

    def _spawn(self, slot: str) -> Worker:
        worker = self.group.worker()
        worker.env.update(self.setup.env())
        if slot in self.workers:
            # A restart on the same host keeps the web port, and so the URL Faust's
            # assignor recorded for the member (a static member that comes back with
            # another URL fails Faust's check of its old assignment and never consumes).
            worker.port = self.workers[slot].port
            worker.env["GENMON_WORKER__WEB_PORT"] = str(worker.port)
        worker.env["BROKER_CLIENT_ID"] = f"genmon-failover-{slot}"
        if self.setup.static:
            worker.env["CONSUMER_GROUP_INSTANCE_ID"] = f"{self.group.name}-{slot}"
        self.workers[slot] = worker
        worker.start()
        return worker

    def wait_steady(self, timeout: float = 180.0) -> None:
        """Until the group is stable with both workers owning partitions and every
        partition's committed offset has moved since (consumption is under way)."""
        deadline = time.monotonic() + timeout
        since: dict[int, int] | None = None
        while time.monotonic() < deadline:
            state, members = self.members()
            owners = {m.client_id for m in members if m.partitions}
            if state != "Stable" or len(members) != len(SLOTS) or len(owners) != len(SLOTS):
                since = None
            elif since is None:
                since = self.committed()
            else:
                now = self.committed()
                if len(now) == self.n_partitions and all(now[p] > since.get(p, -1) for p in now):
                    return
            time.sleep(POLL_S)
        raise TimeoutError(
            f"the group {self.group.name} did not settle with {len(SLOTS)} consuming workers in"
            f" {timeout:g} s (last state {state}, members {members}); see the workers' logs"
        )

    def kill(self, slot: str, timeout: float) -> Trial:
        """SIGKILL the worker in ``slot`` (and start it again at once if the setup says so),
        then watch the group until its partitions are consumed again or ``timeout``."""
        client_id = f"genmon-failover-{slot}"
        _, members = self.members()
        victim = next(m for m in members if m.client_id == client_id)
        started = time.monotonic()
        self.workers[slot].kill9()
        if self.setup.restart:
            self._spawn(slot)
        base = self.committed()
        left_s = consumed_s = None
        while time.monotonic() - started < timeout:
            elapsed = time.monotonic() - started
            if left_s is None:
                _, members = self.members()
                if victim.member_id not in {m.member_id for m in members}:
                    left_s = elapsed
            if consumed_s is None:
                now = self.committed()
                if all(now.get(p, -1) > base.get(p, -1) for p in victim.partitions):
                    consumed_s = elapsed
            if left_s is not None and consumed_s is not None:
                break
            time.sleep(POLL_S)
        return Trial(self.setup, tuple(sorted(victim.partitions)), left_s, consumed_s)

    def replace(self, slot: str, timeout: float = 120.0) -> None:
        """Start a worker in the slot of a killed one (the group is two workers again)."""
        self._spawn(slot).wait_ready(timeout)

    def close(self) -> None:
        """Stop the traffic and the admin client (the group's owner stops the workers)."""
        if self.traffic.running:
            self.traffic.stop()
        self.admin.close()


def run_trials(
    group: Group,
    setup: Setup,
    trials: int,
    rate: float = 100.0,
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """``trials`` kills, alternating between the two slots; after each the group is brought
    back to two workers before the next. ``on_trial`` sees each trial as it ends."""
    probe = FailoverProbe(group, setup, rate)
    results: list[Trial] = []
    try:
        probe.start()
        for k in range(trials):
            probe.wait_steady()
            slot = SLOTS[k % len(SLOTS)]
            results.append(probe.kill(slot, timeout=setup.session_timeout_s + 60))
            if on_trial is not None:
                on_trial(results[-1])
            if not setup.restart and k + 1 < trials:
                probe.replace(slot)
    finally:
        probe.close()
    return results
