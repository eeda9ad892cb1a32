"""What a model has to train on, counted in the database for the retrain guards: usable
examples per class since its last promoted job, for the policy's training strategy.

The counts follow the dataset builder's rules (:mod:`genmon.retrain.dataset`,
:mod:`genmon.retrain.preference_data`) row by row, without its merging per request, its
per-subject cap or its near-duplicate split: a guard that passes may still give a job too
little to train on, and that job ends ``insufficient_evidence`` with the reason. Rows of
subjects who opted out never count.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from genmon.retrain.policy import ModelPolicy
from genmon.schemas.events import RetrainStatus
from genmon.schemas.governance import SubjectOptOut
from genmon.schemas.tables import LabelledExample, RetrainJob

UNLABELLED = "unlabelled"


def examples_since(session: Session, model_id: str) -> datetime | None:
    """When the model's last promoted job started: the examples before it are in the
    serving version already (the job's dataset, :mod:`genmon.retrain.job`, starts there)."""
    query = select(func.max(RetrainJob.started_at)).where(
        RetrainJob.model_id == model_id, RetrainJob.status == RetrainStatus.PROMOTED
    )
    return session.exec(query).one()


def _consenting(query: Any) -> Any:
    """``query`` less the rows of subjects who opted out (the dataset builder drops them)."""
    opted_out = select(SubjectOptOut.subject_id)
    subject = col(LabelledExample.subject_id)
    return query.where(sa.or_(subject.is_(None), subject.not_in(opted_out)))


def usable_counts(session: Session, model_id: str, since: datetime | None) -> dict[str, int]:
    """Usable examples by class (label, or ``unlabelled``): those with a correction that
    differs from the logged response, as :func:`genmon.retrain.dataset.merge_rows` keeps."""
    correction = func.trim(col(LabelledExample.correction))
    query = (
        select(LabelledExample.label, func.count())
        .where(
            LabelledExample.model_id == model_id,
            correction != "",
            correction != func.trim(col(LabelledExample.response)),
        )
        .group_by(col(LabelledExample.label))
    )
    if since is not None:
        query = query.where(col(LabelledExample.created_at) >= since)
    counts: dict[str, int] = {}
    for label, count in session.exec(_consenting(query)).all():
        counts[label or UNLABELLED] = counts.get(label or UNLABELLED, 0) + int(count)
    return counts


def kto_counts(
    session: Session, model_id: str, since: datetime | None, negative_below: float
) -> dict[str, int]:
    """KTO's classes as the dataset builder makes them
    (:mod:`genmon.retrain.preference_data`): ``unpaired`` thumbs or scores without a
    correction, each ``desirable`` or ``undesirable`` (neutral scores count in neither),
    plus a desirable one per usable correction and an undesirable one when it replaced a
    non-empty response."""
    from genmon.retrain.preference_data import DESIRABLE_AT

    correction = func.trim(sa.func.coalesce(col(LabelledExample.correction), ""))
    response = func.trim(col(LabelledExample.response))
    score = col(LabelledExample.score)
    query = select(
        func.count().filter(correction == "", score >= max(DESIRABLE_AT, negative_below)),
        func.count().filter(correction == "", score < negative_below),
        func.count().filter(correction != "", correction != response),
        func.count().filter(correction != "", correction != response, response != ""),
    ).where(LabelledExample.model_id == model_id)
    if since is not None:
        query = query.where(col(LabelledExample.created_at) >= since)
    counts = session.exec(_consenting(query)).one()
    up, down, corrections, served = (int(n or 0) for n in counts)
    return {"unpaired": up + down, "desirable": up + corrections, "undesirable": down + served}


def too_few(session: Session, policy: ModelPolicy) -> tuple[str, int] | None:
    """``(reason, usable examples)`` while the policy's strategy lacks examples: every
    class (label) of the corrections for ``sft`` and ``dpo``; desirable and undesirable for
    ``kto``; for ``auto``, either of them (``kto`` only with thumbs or scores), as
    :func:`genmon.retrain.preference_data.choose_strategy` picks."""
    from genmon.settings import get_settings

    least = policy.guards.min_examples_per_class
    strategy = policy.training.strategy
    since = examples_since(session, policy.model_id)
    counts = usable_counts(session, policy.model_id, since)
    short = {label: n for label, n in sorted(counts.items()) if n < least}
    if (counts and not short and strategy != "kto") or least == 0:
        return None
    usable = sum(counts.values())
    kto: dict[str, int] = {}
    if strategy in ("auto", "kto"):
        negative = get_settings().feedback.negative_score_below
        kto = kto_counts(session, policy.model_id, since, negative)
        enough = kto["desirable"] >= least and kto["undesirable"] >= least
        if enough and (strategy == "kto" or kto["unpaired"]):
            return None
        usable += kto["unpaired"]
    after = f" since the last promoted job ({since.isoformat()})" if since else ""
    have = ", ".join(f"{label} {n}" for label, n in short.items()) or "none"
    guard = f"guards.min_examples_per_class is {least} ({policy.source})"
    if not kto:
        return (
            f"too few examples: usable examples (with a correction){after} by class: {have};"
            f" {guard}; send feedback with corrections, or lower the minimum",
            usable,
        )
    classes = f"desirable {kto['desirable']}, undesirable {kto['undesirable']}"
    if strategy == "kto":
        return (
            f"too few examples: kto examples{after} by class: {classes} (thumbs, scores and"
            f" both sides of each correction); {guard}; send thumbs or scores, or lower the"
            " minimum",
            usable,
        )
    return (
        f"too few examples: usable examples (with a correction){after} by class: {have};"
        f" {guard}; thumbs and scores without a correction: {kto['unpaired']} (kto: {classes});"
        " send feedback with corrections or thumbs, or lower the minimum",
        usable,
    )
