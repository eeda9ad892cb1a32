"""Failover: a SIGKILLed worker's partitions are consumed again within 15 s (issue 14).

Two real ``genmon worker`` processes with genmon's default session timeout and heartbeat
(the harness's own shorter ones are overridden), steady traffic on every partition; one
worker is killed and not restarted. Before the fix its partitions sat idle for the 60 s
session timeout. The measurement is the one ``bench/failover/run.py`` records in
BENCHMARKS.md: from the signal until every partition the killed worker owned has a
committed offset past the one it had at the kill, i.e. its lag falls again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from worker_support import Harness

from bench.failover.probe import FailoverProbe, Setup
from genmon.settings import Settings, WorkerSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: The issue's bound: a killed worker's partitions are consumed again within this.
FAILOVER_TARGET_S = 15.0


def test_a_killed_workers_partitions_are_consumed_again_by_the_survivor_within_15_s(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    defaults = WorkerSettings()
    setup = Setup(defaults.session_timeout_s, defaults.heartbeat_interval_s)
    harness = Harness(kafka_settings, unique_name, tmp_path, free_port)
    probe = FailoverProbe(harness, setup)
    try:
        probe.start()
        probe.wait_steady()
        # Watched well past the bound, so that a failure says how long it really took.
        trial = probe.kill("a", timeout=FAILOVER_TARGET_S + 45)
        _, members = probe.members()
    finally:
        probe.close()
        harness.close()

    assert trial.partitions, "the killed worker owned no partition: nothing was measured"
    assert trial.consumed_again_s is not None, (
        f"partitions {trial.partitions} of the killed worker were not consumed again within"
        f" {FAILOVER_TARGET_S + 45:g} s (left the group after {trial.left_s} s)"
    )
    assert trial.consumed_again_s <= FAILOVER_TARGET_S, trial
    # Consumed again by the survivor, which now owns every partition.
    assert [m.client_id for m in members] == ["genmon-failover-b"], members
    assert members[0].partitions == frozenset(range(harness.settings.kafka.partitions)), members
