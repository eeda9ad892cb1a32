"""Helpers for the policy, trigger and agent tests (not a test module): registered models,
incidents and labelled examples written straight into the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from genmon.retrain.policy import RetrainPolicy, parse_policy
from genmon.schemas.events import FindingKind, Severity, new_id, utcnow
from genmon.schemas.incidents import Incident
from genmon.schemas.retrain import RegisteredModel, RetrainDecision
from genmon.schemas.tables import LabelledExample, RetrainJob

REFUSED_ANSWER = "I'm sorry, but I can't help with that."
REFUSALS: dict[str, Any] = {
    "name": "refusals",
    "match": {"signal": "refusal_rate", "severity": "warning"},
}


def policy(*, incidents: list[dict[str, Any]] | None = None, **guards: Any) -> RetrainPolicy:
    """A policy retraining on refusal incidents, with these guards (no cool-down, no
    minimum examples and no approval unless given)."""
    data = {
        "triggers": {"incidents": [REFUSALS] if incidents is None else incidents},
        "guards": {"cooldown_s": 0, "min_examples_per_class": 0, **guards},
    }
    return parse_policy(yaml.safe_dump(data), "test-policy.yaml")


def register(engine: Engine, model_id: str, version: str = "v1") -> None:
    """What ``genmon models register`` leaves behind, without weights to fingerprint."""
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


def incident(
    engine: Engine,
    model_id: str,
    *,
    signal: str = "refusal_rate",
    kind: FindingKind = FindingKind.QUALITY,
    severity: Severity = Severity.WARNING,
    detector: str = "rate_cusum",
    segment: str | None = None,
    finding_count: int = 1,
) -> str:
    """An open incident; returns its id."""
    row = Incident(
        id=new_id(),
        fingerprint=new_id(),
        model_id=model_id,
        detector=detector,
        kind=kind,
        signal=signal,
        segment=segment,
        severity=severity,
        title=f"{signal} up for {model_id}",
        finding_count=finding_count,
    )
    with Session(engine) as session:
        session.add(row)
        session.commit()
        return row.id


def set_findings(engine: Engine, incident_id: str, count: int) -> None:
    with Session(engine) as session:
        row = session.get(Incident, incident_id)
        assert row is not None
        row.finding_count = count
        session.add(row)
        session.commit()


def examples(
    engine: Engine,
    model_id: str,
    count: int,
    *,
    label: str | None = None,
    correction: str | None = "Here is how to do that.",
    at: datetime | None = None,
) -> None:
    """``count`` labelled examples (with a correction unless ``correction=None``)."""
    with Session(engine) as session:
        for _ in range(count):
            session.add(
                LabelledExample(
                    request_id=new_id(),
                    model_id=model_id,
                    model_version="v1",
                    prompt="How do I order a card?",
                    response=REFUSED_ANSWER,
                    correction=correction,
                    label=label,
                    created_at=at or utcnow(),
                )
            )
        session.commit()


def jobs(engine: Engine, model_id: str | None = None) -> list[RetrainJob]:
    with Session(engine) as session:
        query = select(RetrainJob)
        if model_id is not None:
            query = query.where(RetrainJob.model_id == model_id)
        return list(session.exec(query).all())


def decisions(engine: Engine, model_id: str) -> list[RetrainDecision]:
    with Session(engine) as session:
        query = select(RetrainDecision).where(RetrainDecision.model_id == model_id)
        return list(session.exec(query.order_by(RetrainDecision.id)).all())


def count_jobs(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(RetrainJob)).one())
