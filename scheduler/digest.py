"""The daily digest: one message a day to one destination, through the incidents outbox.

Per model, over the last day: incidents opened and resolved, how retrain jobs ended, and
the signals with the most incidents opened. It is queued as one ``notification`` row of
event ``digest`` (idempotency key ``digest:<destination>:<fire time>``), so the
dispatcher delivers it with the retries, rate limits, pauses and signatures of every
page, and a second leader's copy is the same row.

Only ``webhook`` and ``slack`` destinations take a digest: PagerDuty and Alertmanager are
for pages (an alert nobody resolves would be opened every day), and are refused with a
configuration error.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.incidents.destinations import DIGEST_SCHEMA
from genmon.incidents.routing import load_notify_settings
from genmon.schemas.incidents import Incident, Notification, NotificationEvent
from genmon.schemas.tables import RetrainJob
from genmon.settings import DestinationSettings, Settings

#: Destination types that take a digest.
DIGEST_TYPES = ("webhook", "slack")
#: Signals listed per model.
TOP_SIGNALS = 3


def digest_destination(settings: Settings) -> DestinationSettings:
    """The destination ``scheduler.digest_destination`` names, checked to take a digest."""
    name = settings.scheduler.digest_destination
    if not name:
        raise ConfigurationError(
            "scheduler.digest_destination is not set; name a webhook or slack destination"
            " of notify (GENMON_SCHEDULER__DIGEST_DESTINATION)"
        )
    destinations = {d.name: d for d in load_notify_settings(settings.notify).destinations}
    found = destinations.get(name)
    if found is None:
        known = ", ".join(sorted(destinations)) or "none"
        raise ConfigurationError(
            f"scheduler.digest_destination {name!r} is no destination of notify (known:"
            f" {known}); add it to notify.destinations or notify.destinations_file"
        )
    if found.type not in DIGEST_TYPES:
        raise ConfigurationError(
            f"scheduler.digest_destination {name!r} is a {found.type} destination; a digest"
            f" goes to {' or '.join(DIGEST_TYPES)} destinations only ({found.type} is for"
            " pages): name another destination"
        )
    return found


def build_digest(engine: Engine, since: datetime, until: datetime) -> dict[str, Any]:
    """What happened in ``(since, until]``, by model."""
    models: dict[str, dict[str, Any]] = defaultdict(_empty_model)
    signals: dict[str, Counter[str]] = defaultdict(Counter)
    with Session(engine) as session:
        opened = session.exec(
            select(Incident.model_id, Incident.signal).where(
                col(Incident.opened_at) > since, col(Incident.opened_at) <= until
            )
        ).all()
        resolved = session.exec(
            select(Incident.model_id).where(
                col(Incident.resolved_at) > since, col(Incident.resolved_at) <= until
            )
        ).all()
        ended = session.exec(
            select(RetrainJob.model_id, RetrainJob.status).where(
                col(RetrainJob.finished_at) > since, col(RetrainJob.finished_at) <= until
            )
        ).all()
    for model_id, signal in opened:
        models[model_id]["incidents_opened"] += 1
        signals[model_id][signal] += 1
    for model_id in resolved:
        models[model_id]["incidents_resolved"] += 1
    for model_id, status in ended:
        outcomes = models[model_id]["retrain"]
        outcomes[status.value] = outcomes.get(status.value, 0) + 1
    for model_id, counts in signals.items():
        models[model_id]["top_signals"] = [
            {"signal": signal, "incidents": n}
            for signal, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[
                :TOP_SIGNALS
            ]
        ]
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "models": {model_id: models[model_id] for model_id in sorted(models)},
    }


def _empty_model() -> dict[str, Any]:
    return {"incidents_opened": 0, "incidents_resolved": 0, "retrain": {}, "top_signals": []}


def digest_text(digest: dict[str, Any]) -> str:
    """The digest as lines of text (Slack shows these)."""
    lines = [f"genmon digest {digest['since'][:16]} to {digest['until'][:16]} (UTC)"]
    if not digest["models"]:
        lines.append("no incidents opened or resolved and no retrain job ended")
    for model_id, model in digest["models"].items():
        retrain = ", ".join(f"{k} {v}" for k, v in sorted(model["retrain"].items())) or "none"
        top = ", ".join(f"{s['signal']} {s['incidents']}" for s in model["top_signals"])
        lines.append(
            f"{model_id}: incidents opened {model['incidents_opened']}, resolved"
            f" {model['incidents_resolved']}; retrain jobs ended: {retrain}"
            + (f"; top signals: {top}" if top else "")
        )
    return "\n".join(lines)


def send_digest(
    engine: Engine, settings: Settings, since: datetime, until: datetime
) -> dict[str, Any]:
    """Queue the digest of ``(since, until]`` for the digest destination, once per tick."""
    destination = digest_destination(settings)
    digest = build_digest(engine, since, until)
    key = f"digest:{destination.name}:{until.isoformat()}"
    text = digest_text(digest)
    row = Notification(
        incident_id=None,  # a digest concerns no one incident
        destination=destination.name,
        event=NotificationEvent.DIGEST,
        idempotency_key=key,
        payload={
            "schema": DIGEST_SCHEMA,
            "digest": digest,
            "text": text,
            "reason": text,
            "created_at": until.isoformat(),
            "labels": {"kind": "digest"},
        },
    )
    try:
        with session_scope(engine) as session:
            session.add(row)
    except IntegrityError:
        with Session(engine) as session:
            query = select(Notification.id).where(Notification.idempotency_key == key)
            if session.exec(query).first() is None:
                raise  # not the tick's twin
        return {"status": "done", "notification": key, "queued": False}
    return {"status": "done", "notification": key, "queued": True, "models": len(digest["models"])}


__all__ = [
    "DIGEST_SCHEMA",
    "DIGEST_TYPES",
    "build_digest",
    "digest_destination",
    "digest_text",
    "send_digest",
]
