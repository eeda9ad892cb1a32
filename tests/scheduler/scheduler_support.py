"""Helpers for the scheduler tests (not a test module), and the entry point of a scheduler
process on a clock the test controls:

    python tests/scheduler/scheduler_support.py DATABASE_URL POLICY_FILE CLOCK_FILE HOLDER

The clock is the ISO time written in CLOCK_FILE (read at every look), so the test moves
time for every process at once without waiting for minutes.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from genmon.retrain.policy import RetrainPolicy, load_policy
from genmon.schemas.governance import ScheduleFire
from genmon.schemas.retrain import RegisteredModel
from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings

T0 = datetime(2026, 3, 2, 9, 0, 30, tzinfo=UTC)
#: Lease of the test processes (database clock): short, so a takeover is quick.
LEASE_S = 1.5


class FileClock:
    """The time written in a file (shared by processes); :meth:`set` moves it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, moment: datetime) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(moment.isoformat())
        tmp.replace(self.path)  # atomic: a reader never sees half a time

    def __call__(self) -> datetime:
        return datetime.fromisoformat(self.path.read_text())


def write_policy(path: Path, schedules: list[dict[str, Any]], **guards: Any) -> Path:
    """A policy with these ``triggers.schedule`` entries, no cool-down, no minimum."""
    data = {
        "triggers": {"schedule": schedules},
        "guards": {"cooldown_s": 0, "min_examples_per_class": 0, **guards},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def settings_for(url: str, policy_file: Path, **scheduler: Any) -> Settings:
    """Settings with only retrain schedules unless ``scheduler`` adds others."""
    config = {
        "lease_s": LEASE_S,
        "tick_s": 0.1,
        "misfire_grace_s": 3600.0,
        "retention_cron": None,
        "digest_cron": None,
        **scheduler,
    }
    return Settings(
        database={"url": url}, retrain={"policy_file": str(policy_file)}, scheduler=config
    )


def register(engine: Engine, model_id: str, version: str = "v1") -> None:
    with Session(engine) as session:
        session.add(
            RegisteredModel(
                model_id=model_id,
                base_uri="/models/tiny",
                base_fingerprint="f" * 64,
                serving_version=version,
            )
        )
        session.commit()


def jobs(engine: Engine, model_id: str) -> list[RetrainJob]:
    with Session(engine) as session:
        query = select(RetrainJob).where(RetrainJob.model_id == model_id)
        return list(session.exec(query.order_by(col(RetrainJob.trigger_key))).all())


def fire_rows(engine: Engine) -> list[ScheduleFire]:
    with Session(engine) as session:
        query = select(ScheduleFire).order_by(col(ScheduleFire.fire_time))
        return list(session.exec(query).all())


def policy_of(path: Path) -> RetrainPolicy:
    return load_policy(path)


def main(argv: list[str]) -> None:
    """A scheduler process on a file clock (see the module docstring)."""
    from genmon.scheduler.service import run_scheduler

    url, policy_file, clock_file, holder = argv
    run_scheduler(
        settings_for(url, Path(policy_file)),
        clock=FileClock(Path(clock_file)),
        holder=holder,
        loglevel="info",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
