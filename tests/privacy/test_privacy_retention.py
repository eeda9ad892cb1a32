"""Retention removes what is older than configured and nothing newer, per kind, at the
boundary (SQLite and PostgreSQL); ``dry_run`` counts the same and removes nothing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from incident_support import T0
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.privacy.retention import run_retention
from genmon.retrain.artifacts import ArtifactStore
from genmon.schemas.events import IncidentStatus, RetrainStatus
from genmon.schemas.incidents import (
    DeliveryAttempt,
    FindingSeen,
    Incident,
    IncidentTransition,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Transition,
)
from genmon.schemas.retrain import ModelAliasRow
from genmon.schemas.tables import LabelledExample, ModelVersion, ModelVersionStatus, RetrainJob
from genmon.settings import Settings

NOW = T0 + timedelta(days=400)
SECOND = timedelta(seconds=1)
DAYS = {"labelled": 10, "findings": 10, "notifications": 10, "incidents": 20, "files": 30}


def _settings(tmp_path: Path, kafka_days: float = 7) -> Settings:
    return Settings.model_validate(
        {
            "retrain": {"artifacts_uri": str(tmp_path / "artifacts")},
            "kafka": {"retention_ms": int(kafka_days * 86_400_000)},
            "incidents": {"reopen_cooldown_s": 3600},
            "retention": {
                "labelled_examples_days": DAYS["labelled"],
                "findings_days": DAYS["findings"],
                "notifications_days": DAYS["notifications"],
                "incidents_days": DAYS["incidents"],
                "datasets_days": DAYS["files"],
                "artifacts_days": DAYS["files"],
                "windows_days": 3,
                "batch_size": 2,
            },
        }
    )


def _edge(days: int) -> dict[str, object]:
    """Times around the cut-off of ``days``: one second older goes, the rest stays."""
    cut = NOW - timedelta(days=days)
    return {"old": cut - SECOND, "old2": cut - timedelta(days=5), "at": cut, "new": cut + SECOND}


def _incident(session: Session, name: str, status: IncidentStatus, resolved_at: object) -> str:
    session.add(
        Incident(
            id=name,
            fingerprint=name.ljust(32, "0"),
            model_id="chat",
            detector="adwin",
            kind="drift",
            signal="latency_ms",
            title=name,
            status=status,
            resolved_at=resolved_at,
            opened_at=T0,
        )
    )
    session.add(
        IncidentTransition(
            incident_id=name,
            transition=Transition.OPENED,
            to_status=IncidentStatus.OPEN,
            actor="genmon",
            at=T0,
        )
    )
    return name


def _notification(
    session: Session, incident_id: str, key: str, status: NotificationStatus, at: object
) -> None:
    row = Notification(
        incident_id=incident_id,
        destination="ops",
        event=NotificationEvent.TRIGGER,
        idempotency_key=key,
        status=status,
        created_at=at,
        delivered_at=at if status is NotificationStatus.DELIVERED else None,
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    session.add(DeliveryAttempt(notification_id=row.id, attempt=1, outcome="delivered", at=at))


def _rows(engine: Engine) -> None:
    with Session(engine) as session:
        for name, at in _edge(DAYS["labelled"]).items():
            session.add(
                LabelledExample(request_id=name, model_id="chat", model_version="v1", created_at=at)
            )
        for name, at in _edge(DAYS["findings"]).items():
            session.add(FindingSeen(dedup_key=name, fingerprint="f", seen_at=at))
        for name, at in _edge(DAYS["incidents"]).items():
            _incident(session, f"resolved-{name}", IncidentStatus.RESOLVED, at)
        _incident(session, "open-ancient", IncidentStatus.OPEN, None)
        waiting = _incident(
            session, "resolved-waiting", IncidentStatus.RESOLVED, NOW - timedelta(days=90)
        )
        _notification(
            session, waiting, "waiting", NotificationStatus.PENDING, NOW - timedelta(days=90)
        )
        # notifications of an incident resolved 15 days ago (kept itself)
        quiet = _incident(
            session, "resolved-15d", IncidentStatus.RESOLVED, NOW - timedelta(days=15)
        )
        for name, at in _edge(DAYS["notifications"]).items():
            _notification(session, quiet, f"n-{name}", NotificationStatus.DELIVERED, at)
        _notification(session, "open-ancient", "n-open", NotificationStatus.DELIVERED, T0)
        session.commit()


def _jobs(engine: Engine, store: ArtifactStore) -> None:
    """Jobs that ended around the files' cut-off, each with dataset, checkpoints, adapter."""
    edge = _edge(DAYS["files"])
    jobs = {
        "old": (RetrainStatus.ROLLED_BACK, edge["old"]),
        "old-champion": (RetrainStatus.PROMOTED, edge["old2"]),
        "new": (RetrainStatus.REJECTED, edge["new"]),
        "running": (RetrainStatus.RUNNING, None),
    }
    with Session(engine) as session:
        for job_id, (status, ended) in jobs.items():
            for folder in ("dataset/train.jsonl", "checkpoints/step-000001/w.bin", "adapter/a.bin"):
                store.put_text(f"jobs/{job_id}/epoch-1/{folder}", job_id)
            session.add(
                RetrainJob(
                    job_id=job_id,
                    model_id="chat",
                    base_version="v1",
                    status=status,
                    finished_at=ended,
                    updated_at=ended or T0,
                    dataset_uri=store.uri(f"jobs/{job_id}/epoch-1/dataset"),
                )
            )
        session.flush()
        for version, job_id, status in [
            ("v2", "old", ModelVersionStatus.ROLLED_BACK),
            ("v3", "old-champion", ModelVersionStatus.ACTIVE),
        ]:
            session.add(
                ModelVersion(
                    model_id="chat",
                    version=version,
                    job_id=job_id,
                    status=status,
                    artifact_uri=store.uri(f"jobs/{job_id}/epoch-1/adapter"),
                )
            )
        session.add(ModelAliasRow(model_id="chat", alias="champion", version="v3"))
        session.commit()


def _left(engine: Engine, store: ArtifactStore) -> dict[str, set[str]]:
    root = Path(store.root)
    with Session(engine) as session:
        return {
            "labelled": {r.request_id for r in session.exec(select(LabelledExample))},
            "findings": {r.dedup_key for r in session.exec(select(FindingSeen))},
            "incidents": {r.id for r in session.exec(select(Incident))},
            "transitions": {r.incident_id for r in session.exec(select(IncidentTransition))},
            "notifications": {r.idempotency_key for r in session.exec(select(Notification))},
            "attempts": {str(r.notification_id) for r in session.exec(select(DeliveryAttempt))},
            "files": {
                str(p.parent.relative_to(root / "jobs")) for p in root.rglob("*") if p.is_file()
            },
        }


def test_retention_removes_what_is_older_and_nothing_newer(engine: Engine, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store = ArtifactStore(settings.retrain.artifacts_uri)
    _rows(engine)
    _jobs(engine, store)
    before = _left(engine, store)

    dry = run_retention(engine, settings, now=NOW, store=store, dry_run=True)
    assert _left(engine, store) == before
    report = run_retention(engine, settings, now=NOW, store=store)
    left = _left(engine, store)

    counts = {kind: r.removed for kind, r in report.kinds.items()}
    assert counts == {kind: r.removed for kind, r in dry.kinds.items()}
    assert counts == {
        "labelled_examples": 2,
        "findings": 2,
        "notifications": 2,
        "incidents": 2,
        "datasets": 2,
        "artifacts": 3,  # old: checkpoints and adapter; old-champion: checkpoints only
        "signals": 0,  # test_privacy_signal_rollups.py has these three
        "signal_rollups": 0,
        "api_audit": 0,
        "windows": 0,
    }
    assert left["labelled"] == left["findings"] == {"at", "new"}
    assert left["incidents"] == {
        "resolved-at",
        "resolved-new",
        "open-ancient",
        "resolved-waiting",
        "resolved-15d",
    }
    assert left["transitions"] == left["incidents"]
    assert left["notifications"] == {"waiting", "n-at", "n-new", "n-open"}
    assert len(left["attempts"]) == 4
    assert left["files"] == {
        "old-champion/epoch-1/adapter",
        "new/epoch-1/dataset",
        "new/epoch-1/checkpoints/step-000001",
        "new/epoch-1/adapter",
        "running/epoch-1/dataset",
        "running/epoch-1/checkpoints/step-000001",
        "running/epoch-1/adapter",
    }
    with Session(engine) as session:
        old = session.get(RetrainJob, "old")
        assert old is not None and old.dataset_uri is None
        assert old.metrics["dataset_expired"]["uri"].endswith("jobs/old/epoch-1/dataset")
        assert sorted(old.metrics["artifacts_expired"]["folders"]) == ["adapter", "checkpoints"]
        v2 = session.exec(select(ModelVersion).where(ModelVersion.version == "v2")).one()
        v3 = session.exec(select(ModelVersion).where(ModelVersion.version == "v3")).one()
        assert "artifact_expired" in v2.eval_metrics and "artifact_expired" not in v3.eval_metrics
    assert report.warnings and "kafka.retention_ms" in report.warnings[0]

    again = run_retention(engine, settings, now=NOW, store=store)
    assert again.removed == 0 and _left(engine, store) == left


def test_unset_retention_keeps_everything(engine: Engine, tmp_path: Path) -> None:
    settings = _settings(tmp_path, kafka_days=1)
    forever = settings.retention.model_copy(
        update={f"{k}_days": None for k in ("labelled_examples", "findings", "incidents")}
    )
    settings = settings.model_copy(update={"retention": forever})
    store = ArtifactStore(settings.retrain.artifacts_uri)
    _rows(engine)
    report = run_retention(engine, settings, now=NOW, store=store)
    assert report.kinds["labelled_examples"].cutoff is None
    assert report.kinds["labelled_examples"].removed == report.kinds["incidents"].removed == 0
    assert len(_left(engine, store)["labelled"]) == 4
    assert report.warnings == []
