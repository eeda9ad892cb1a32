"""Failover after SIGKILL: the time until a killed worker's partitions are consumed again.

    .venv/bin/python bench/failover/run.py                 # the recorded run (~7 min)
    .venv/bin/python bench/failover/run.py --trials 3 --setups chosen chosen-restart

Needs the local broker (`genmon infra up`). Each setup runs its own consumer group of two
real ``genmon worker`` processes with steady traffic (``--rate`` events/s over the
inference topic's partitions); one worker is SIGKILLed, and the time is measured from the
signal until every partition it owned has a committed offset past the one it had at the
kill (its lag falls again; see ``bench/failover/probe.py``). Setups, all in the same run:

- ``before``: the defaults before issue 14 (session timeout 60 s, heartbeat 3 s), the
  killed worker not restarted;
- ``static-restart`` / ``static-alone``: the same timeouts with static membership
  (``group.instance.id``), the killed worker restarted at once / not restarted;
- ``chosen`` / ``chosen-restart``: genmon's current defaults
  (``worker.session_timeout_s``, ``worker.heartbeat_interval_s``), not restarted /
  restarted at once;
- ``S:H`` (e.g. ``10:1``): dynamic membership with session timeout S and heartbeat H s,
  not restarted (a candidate).

Setups that wait out a session timeout over 30 s run ``--slow-trials`` kills (default
1), the others ``--trials`` (default 5). Prints one table: median, min and max per setup.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from worker_support import Harness  # noqa: E402

from bench.failover.probe import Setup, Trial, run_trials  # noqa: E402
from genmon.settings import Settings, WorkerSettings  # noqa: E402

#: The defaults before issue 14.
BEFORE = Setup(session_timeout_s=60.0, heartbeat_interval_s=3.0)


def setups(names: list[str]) -> list[tuple[str, Setup]]:
    """The named setups, in the order given."""
    chosen = WorkerSettings()
    session, heartbeat = chosen.session_timeout_s, chosen.heartbeat_interval_s
    known = {
        "before": BEFORE,
        "static-restart": Setup(60.0, 3.0, static=True, restart=True),
        "static-alone": Setup(60.0, 3.0, static=True),
        "chosen": Setup(session, heartbeat),
        "chosen-restart": Setup(session, heartbeat, restart=True),
    }
    picked = []
    for name in names:
        if name in known:
            picked.append((name, known[name]))
        else:
            given_session, _, given_heartbeat = name.partition(":")
            try:
                picked.append((name, Setup(float(given_session), float(given_heartbeat))))
            except ValueError:
                raise SystemExit(
                    f"unknown setup {name!r}: give one of {', '.join(known)} or SESSION:HEARTBEAT"
                ) from None
    return picked


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(name: str, setup: Setup, trials: int, rate: float) -> list[Trial]:
    """Run one setup in a consumer group, home and database of its own."""
    kafka = Settings()
    with tempfile.TemporaryDirectory(prefix="genmon-failover-") as tmp:
        group = f"failover-{name.replace(':', '-').replace('.', '_')}-{uuid.uuid4().hex[:8]}"
        harness = Harness(kafka, group, Path(tmp), free_port)
        try:
            return run_trials(harness, setup, trials, rate, on_trial=lambda t: report(name, t))
        finally:
            harness.close()


def report(name: str, trial: Trial) -> None:
    print(
        f"{name}: partitions {list(trial.partitions)} left the group after {trial.left_s} s,"
        f" consumed again after {trial.consumed_again_s} s",
        file=sys.stderr,
        flush=True,
    )


def row(name: str, setup: Setup, trials: list[Trial]) -> list[str]:
    consumed = [t.consumed_again_s for t in trials if t.consumed_again_s is not None]
    left = [t.left_s for t in trials if t.left_s is not None]
    missing = len(trials) - len(consumed)

    def s(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s" if values else "-"

    return [
        name,
        setup.membership,
        f"{setup.session_timeout_s:g} s / {setup.heartbeat_interval_s:g} s",
        setup.killed_worker,
        str(len(trials)),
        s(left),
        s(consumed) + (f" ({missing} not within the timeout)" if missing else ""),
        f"{min(consumed):.1f}-{max(consumed):.1f} s" if consumed else "-",
    ]


def table(rows: list[list[str]]) -> str:
    header = [
        "setup",
        "membership",
        "session / heartbeat",
        "killed worker",
        "kills",
        "left the group (median)",
        "consumed again (median)",
        "min-max",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setups",
        nargs="+",
        default=["before", "static-restart", "static-alone", "chosen", "chosen-restart"],
    )
    parser.add_argument("--trials", type=int, default=5, help="kills per fast setup")
    parser.add_argument("--slow-trials", type=int, default=1, help="kills per setup over 30 s")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s, all partitions")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a run is stuck
    rows = []
    for name, setup in setups(args.setups):
        # A kill waits out a long session unless a static member comes back at once.
        slow = setup.session_timeout_s > 30 and not (setup.static and setup.restart)
        trials = args.slow_trials if slow else args.trials
        started = time.monotonic()
        results = measure(name, setup, trials, args.rate)
        print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append(row(name, setup, results))
    load = os.getloadavg()
    print(table(rows))
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
