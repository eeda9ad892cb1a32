"""Erasure by data subject: afterwards no row or file genmon wrote holds the subject's
prompt, response or correction, another subject's data is all still there, and the
versions trained on the subject are listed (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from incident_support import T0, FakeClock, settings_with, webhook
from privacy_support import files_holding, places_holding
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.detectors import DetectorKind, DetectorResult
from genmon.incidents.manager import IncidentManager
from genmon.privacy.erasure import erase_subject
from genmon.privacy.export import export_subject
from genmon.privacy.matching import ERASED, subject_hash
from genmon.retrain.artifacts import ArtifactStore
from genmon.retrain.dataset import build_dataset, load_examples, read_dataset, write_dataset
from genmon.retrain.registry import create_version
from genmon.schemas import Finding
from genmon.schemas.events import FeedbackEvent, InferenceEvent, RetrainStatus
from genmon.schemas.governance import ErasureAudit
from genmon.schemas.retrain import RegisteredModel
from genmon.schemas.tables import (
    LabelledExample,
    LabelledExampleCreate,
    ModelVersion,
    RetrainJob,
)
from genmon.settings import Settings
from genmon.streams.detection.error_evidence import ErrorAnalyzer
from genmon.streams.detection.findings import build_evidence

ALICE, BOB = "subject-alice-7f3a", "subject-bob-91c2"
#: Distinctive texts of each subject: (prompt, response, correction) per request.
TEXTS = {
    ALICE: [
        (
            "alice-prompt-one: where is my parcel QX-4471",
            "alice-response-one: lost",
            "alice-fix-one: in Lyon",
        ),
        ("alice-prompt-two: renew my passport", "alice-response-two: no", "alice-fix-two: form B7"),
    ],
    BOB: [
        (
            "bob-prompt-one: reset my router RT-88",
            "bob-response-one: cannot",
            "bob-fix-one: hold reset",
        ),
        ("bob-prompt-two: split the bill for six", "bob-response-two: 7", "bob-fix-two: 1/6 each"),
    ],
}


def _strings(subject: str) -> list[str]:
    return [text for triple in TEXTS[subject] for text in triple]


def _request_id(subject: str, index: int) -> str:
    return f"req-{subject}-{index:04d}"


def _settings(tmp_path: Path) -> Settings:
    base = settings_with(webhook("ops", "http://127.0.0.1:9/hook"))
    return base.model_copy(
        update={
            "retrain": base.retrain.model_copy(
                update={"artifacts_uri": str(tmp_path / "artifacts")}
            ),
            "embedding": base.embedding.model_copy(update={"enabled": False}),
            "retention": base.retention.model_copy(update={"batch_size": 2}),
        }
    )


def _labelled_examples(engine: Engine) -> None:
    """Each request joined with its feedback, as the pipeline stores them."""
    with Session(engine) as session:
        for minute, (subject, index) in enumerate([(ALICE, 0), (BOB, 0), (ALICE, 1), (BOB, 1)]):
            prompt, response, correction = TEXTS[subject][index]
            inference = InferenceEvent(
                request_id=_request_id(subject, index),
                model_id="chat",
                model_version="v1",
                prompt=prompt,
                response=response,
                latency_ms=50.0,
                subject_id=subject,
            )
            feedback = FeedbackEvent(
                request_id=inference.request_id,
                model_id="chat",
                thumbs="down",
                correction=correction,
            )
            row = LabelledExample.model_validate(
                LabelledExampleCreate.from_events(inference, feedback)
            )
            row.created_at = T0 + timedelta(minutes=minute)
            session.add(row)
        session.commit()


def _incident(engine: Engine, settings: Settings) -> None:
    """A refusal finding whose evidence clusters one example of each subject, through the
    detection runner's error analysis and the incident manager (which queues the page)."""
    examples = [
        {
            "request_id": _request_id(subject, 0),
            "prompt": TEXTS[subject][0][0],
            "response": TEXTS[subject][0][1],
            "segment": "*",
            "note": "",
            "subject_id": subject,
        }
        for subject in (ALICE, BOB)
    ]
    result = DetectorResult("threshold", DetectorKind.QUALITY, 0.9, 0.5, True, 10)
    result, analysis = ErrorAnalyzer(settings).explain(result, "refusal", examples)
    evidence = build_evidence(result, 10, analysis, {})
    finding = Finding(
        model_id="chat",
        model_version="v1",
        detector="threshold",
        kind="quality",
        signal="refusal_rate",
        window_start=T0,
        window_end=T0 + timedelta(minutes=1),
        score=0.9,
        threshold=0.5,
        detected=True,
        evidence=evidence,
        severity="error",
        title="refusals",
    )
    IncidentManager(engine, settings, clock=FakeClock(T0)).process(finding)


def _job(engine: Engine, store: ArtifactStore, job_id: str, subjects: set[str]) -> str:
    """A promoted job whose dataset (built and stored as the job does) holds ``subjects``'
    examples, and whose verdict keeps gate samples of its prompts."""
    with Session(engine) as session:
        rows = [r for r in load_examples(session, "chat") if r.subject_id in subjects]
    built = build_dataset(
        rows, trigger={"job_id": job_id}, eval_fraction=0.5, near_duplicate_cosine=None
    )
    uri = write_dataset(built, store, f"jobs/{job_id}/epoch-1/dataset")
    # an earlier attempt that stored its dataset and lost its lease before recording it
    write_dataset(built, store, f"jobs/{job_id}/epoch-0/dataset")
    samples = [{"prompt": e.prompt, "serving": "?", "candidate": "ok"} for e in built.eval]
    with Session(engine) as session:
        session.add(
            RetrainJob(
                job_id=job_id,
                model_id="chat",
                base_version="v1",
                status=RetrainStatus.PROMOTED,
                dataset_uri=uri,
                dataset_hash=built.content_hash,
                verdict={"decision": "pass", "metrics": {"refusal_rate": {"samples": samples}}},
                finished_at=T0 + timedelta(hours=1),
            )
        )
        session.commit()
    return uri


def _registry(engine: Engine, artifacts: Path) -> None:
    with Session(engine) as session:
        session.add(
            RegisteredModel(
                model_id="chat", base_uri="/base", base_fingerprint="f0", serving_version="v1"
            )
        )
        session.add(
            ModelVersion(model_id="chat", version="v1", artifact_uri="/base", base_uri="/base")
        )
        session.commit()
    adapter = str(artifacts / "jobs/job-ab/epoch-1/adapter")
    create_version(engine, "chat", "v2", adapter, "v1", job_id="job-ab")
    create_version(engine, "chat", "v3", adapter + "-tuned", "v2")  # tuned from v2 by hand
    create_version(
        engine, "chat", "v4", str(artifacts / "jobs/job-b/epoch-1/adapter"), "v1", job_id="job-b"
    )


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> tuple[Engine, Settings, ArtifactStore]:
    settings = _settings(tmp_path)
    store = ArtifactStore(settings.retrain.artifacts_uri)
    _labelled_examples(engine)
    _incident(engine, settings)
    _job(engine, store, "job-ab", {ALICE, BOB})
    _job(engine, store, "job-b", {BOB})
    _registry(engine, Path(store.root))
    return engine, settings, store


def test_erasure_leaves_no_trace_of_the_subject_and_all_of_the_others(
    world: tuple[Engine, Settings, ArtifactStore],
) -> None:
    engine, settings, store = world
    root = Path(store.root)
    # The pieces really stored the subject's text where the search will look.
    assert "labelled_example.prompt" in places_holding(engine, TEXTS[ALICE][0][0])
    for text in _strings(ALICE):
        assert files_holding(root, text), text
    assert {"incident.evidence", "notification.payload", "retrain_job.verdict"} <= places_holding(
        engine, TEXTS[ALICE][0][0]
    ) | places_holding(engine, TEXTS[ALICE][1][0])

    report = erase_subject(engine, settings, ALICE, requested_by="dpo", store=store)

    for text in [*_strings(ALICE), ALICE, _request_id(ALICE, 0), _request_id(ALICE, 1)]:
        assert places_holding(engine, text) == set(), text
        assert files_holding(root, text) == set(), text
    for text in _strings(BOB):
        assert files_holding(root, text), text
    assert "labelled_example.prompt" in places_holding(engine, TEXTS[BOB][0][0])
    assert "incident.evidence" in places_holding(engine, TEXTS[BOB][0][0])
    assert "notification.payload" in places_holding(engine, TEXTS[BOB][0][0])
    assert places_holding(engine, ERASED) >= {"incident.evidence", "notification.payload"}

    assert report.found
    assert report.counts["labelled_example"] == 2
    assert report.counts["datasets"] == 2  # the recorded one and the unrecorded attempt's
    assert report.counts["dataset_examples"] == 4
    assert report.counts["incident.evidence"] >= 1 and report.counts["notification.payload"] >= 1
    assert [(v["version"], v["via"]) for v in report.model_versions] == [
        ("v2", "dataset"),
        ("v3", "parent v2"),
    ]
    # The rewritten dataset is still whole: its manifest matches, and says what went.
    job_uri = store.uri("jobs/job-ab/epoch-1/dataset")
    dataset = read_dataset(job_uri, store)
    assert dataset.manifest["erased"]["count"] == 2
    assert {e.request_id for e in [*dataset.train, *dataset.eval]} == {
        _request_id(BOB, 0),
        _request_id(BOB, 1),
    }
    with Session(engine) as session:
        job = session.get(RetrainJob, "job-ab")
        assert (
            job is not None and job.metrics["dataset_erased"]["count"] == 4
        )  # both attempts' datasets
        audits = list(session.exec(select(ErasureAudit)))
    assert [(a.action, a.subject_hash, a.requested_by) for a in audits] == [
        ("erase", subject_hash(ALICE), "dpo")
    ]
    assert audits[0].finished_at is not None and audits[0].counts == report.counts
    assert [v["version"] for v in audits[0].model_versions] == ["v2", "v3"]

    again = erase_subject(engine, settings, ALICE, requested_by="dpo", store=store)
    assert not again.found and again.counts == {} and again.model_versions == []


def test_export_returns_what_is_held_and_only_the_subjects(
    world: tuple[Engine, Settings, ArtifactStore],
) -> None:
    engine, settings, store = world
    held = export_subject(engine, settings, ALICE, requested_by="dpo", store=store)
    text = json.dumps(held)
    assert sorted(e["prompt"] for e in held["labelled_examples"]) == sorted(
        triple[0] for triple in TEXTS[ALICE]
    )
    places = {(p["table"], p["column"]) for p in held["elsewhere"]}
    assert {
        ("incident", "evidence"),
        ("notification", "payload"),
        ("retrain_job", "verdict"),
    } <= places
    assert {d["job_id"] for d in held["datasets"]} == {"job-ab"}
    assert [v["version"] for v in held["model_versions"]] == ["v2", "v3"]
    assert held["opt_out"]["opted_out"] is False
    for bob_text in _strings(BOB):
        assert bob_text not in text
    with Session(engine) as session:
        audit = session.exec(select(ErasureAudit)).one()
        assert audit.action == "export" and audit.counts["labelled_example"] == 2
        assert places_holding(engine, TEXTS[ALICE][0][0])  # an export changes nothing
