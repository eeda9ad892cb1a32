"""The model registry on the real databases, its announcements on the real broker and to
a signed webhook, and the ``genmon models`` commands (:mod:`genmon.retrain.registry`,
:mod:`genmon.retrain.announce`, :mod:`genmon.cli.models`)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from incident_support import migrated_engine, sqlite_url, webhook
from retrain_support_registry import fake_base, read_models_topic, with_prefix
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli.models import models
from genmon.db import session_scope
from genmon.incidents.receiver import WebhookReceiver
from genmon.incidents.signing import verify_signature
from genmon.retrain.announce import MODEL_EVENT_SCHEMA, WEBHOOK_ENVELOPE, ModelAnnouncer
from genmon.retrain.lm import ModelLoadError, fingerprint_weights
from genmon.retrain.registry import (
    ModelNotRegisteredError,
    RegistryError,
    VersionNotFoundError,
    aliases,
    create_version,
    get_model,
    get_version,
    move_alias,
    next_version_name,
    promote,
    register_model,
    rollback,
    versions,
)
from genmon.schemas.events import ModelAlias, ModelEvent, RetrainStatus
from genmon.schemas.retrain import RetrainJobAudit
from genmon.schemas.tables import ModelVersionStatus, RetrainJob
from genmon.settings import Settings

SECRET = "whsec-models-secret"


def statuses(engine: Engine, model_id: str) -> dict[str, ModelVersionStatus]:
    return {row.version: row.status for row in versions(engine, model_id)}


def registered(engine: Engine, tmp_path: Path, model_id: str = "chat") -> str:
    base = str(fake_base(tmp_path / "base"))
    register_model(engine, model_id, base, "v1", "alice")
    return base


def add_job(engine: Engine, job_id: str, status: RetrainStatus = RetrainStatus.EVALUATING) -> None:
    with session_scope(engine) as session:
        session.add(RetrainJob(job_id=job_id, model_id="chat", base_version="v1", status=status))


def candidate(engine: Engine, job_id: str | None = None) -> str:
    """A new candidate version of ``chat`` tuned from v1."""
    return create_version(engine, "chat", None, "/adapters/next", "v1", job_id=job_id).version


# --- registering ----------------------------------------------------------------------


def test_register_fingerprints_the_base_and_makes_the_serving_version_champion(
    engine: Engine, tmp_path: Path
) -> None:
    base = str(fake_base(tmp_path / "base"))
    announced: list[ModelEvent] = []
    model = register_model(engine, "chat", base, "v1", "alice", announce=announced.extend)
    assert model.base_fingerprint == fingerprint_weights(base)
    assert get_model(engine, "chat").serving_version == "v1"
    assert aliases(engine, "chat") == {"champion": "v1"}
    (row,) = versions(engine, "chat")
    assert (row.status, row.artifact_uri, row.base_uri) == (ModelVersionStatus.ACTIVE, base, base)
    assert row.base_fingerprint == model.base_fingerprint and row.promoted_at is not None
    (event,) = announced
    assert (event.alias, event.version, event.previous_version, event.action) == (
        ModelAlias.CHAMPION,
        "v1",
        None,
        "registered",
    )
    assert event.artifact_uri is None and event.base_uri == base  # the base alone, no adapter

    # The same weights again: nothing changes, nothing to announce.
    again: list[ModelEvent] = []
    register_model(engine, "chat", base, "v1", "alice", announce=again.extend)
    assert again == [] and len(versions(engine, "chat")) == 1


def test_re_registering_on_other_weights_needs_force_and_a_new_serving_version(
    engine: Engine, tmp_path: Path
) -> None:
    registered(engine, tmp_path)
    other = str(fake_base(tmp_path / "other", seed=1))
    with pytest.raises(RegistryError, match=r"differ.*--force"):
        register_model(engine, "chat", other, "v1", "alice")
    assert get_model(engine, "chat").base_fingerprint != fingerprint_weights(other)
    with pytest.raises(RegistryError, match="--serving-version v2"):
        register_model(engine, "chat", other, "v1", "alice", force=True)
    model = register_model(engine, "chat", other, "v2", "alice", force=True)
    assert model.base_fingerprint == fingerprint_weights(other)
    assert aliases(engine, "chat") == {"champion": "v2", "previous": "v1"}
    assert statuses(engine, "chat") == {
        "v1": ModelVersionStatus.RETIRED,
        "v2": ModelVersionStatus.ACTIVE,
    }


def test_a_missing_base_or_model_says_what_to_do(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        register_model(engine, "chat", str(tmp_path / "nowhere"), "v1")
    with pytest.raises(ModelNotRegisteredError, match="genmon models register chat"):
        move_alias(engine, "chat", "challenger", "v1")
    with pytest.raises(ModelNotRegisteredError):
        create_version(engine, "chat", None, "/a", "v1")


# --- versions and lineage ---------------------------------------------------------------


def test_versions_keep_their_lineage_and_are_named_in_sequence(
    engine: Engine, tmp_path: Path
) -> None:
    base = registered(engine, tmp_path)
    assert next_version_name(engine, "chat") == "v2"
    add_job(engine, "job-1")
    row = create_version(
        engine,
        "chat",
        None,
        "file:///artifacts/chat/job-1/adapter",
        "v1",
        job_id="job-1",
        dataset_hash="sha-data",
        incident_ids=["inc-7"],
        metrics={"loss_delta": -0.4, "decision": "pass"},
    )
    stored = get_version(engine, "chat", "v2")
    assert row.version == "v2" and stored.status is ModelVersionStatus.CANDIDATE
    assert (stored.parent_version, stored.job_id, stored.dataset_hash) == (
        "v1",
        "job-1",
        "sha-data",
    )
    assert stored.incident_ids == ["inc-7"] and stored.eval_metrics["loss_delta"] == -0.4
    assert stored.base_uri == base and stored.base_fingerprint == fingerprint_weights(base)
    assert stored.artifact_uri == "file:///artifacts/chat/job-1/adapter"
    # A retried job gets its version back instead of a second one.
    again = create_version(engine, "chat", None, "/elsewhere", "v1", job_id="job-1")
    assert again.version == "v2" and next_version_name(engine, "chat") == "v3"
    with pytest.raises(RegistryError, match=r"already has a version 'v2'.*next free: v3"):
        create_version(engine, "chat", "v2", "/a", "v1")
    with pytest.raises(VersionNotFoundError, match="genmon models show chat"):
        create_version(engine, "chat", None, "/a", "v9")


# --- aliases ------------------------------------------------------------------------------


def test_promotion_moves_champion_previous_and_challenger_in_one_step(
    engine: Engine, tmp_path: Path
) -> None:
    registered(engine, tmp_path)
    v2 = candidate(engine)
    (event,) = move_alias(engine, "chat", "challenger", v2, "gate", "passed the gate")
    assert (event.alias, event.version, event.artifact_uri) == (
        ModelAlias.CHALLENGER,
        "v2",
        "/adapters/next",
    )
    assert statuses(engine, "chat")["v2"] is ModelVersionStatus.CANDIDATE
    with pytest.raises(RegistryError, match="champion already"):
        move_alias(engine, "chat", "challenger", "v1")

    events = promote(engine, "chat", actor="alice", reason="looks good")
    assert [(e.alias.value, e.previous_version, e.version) for e in events] == [
        ("champion", "v1", "v2"),
        ("previous", None, "v1"),
        ("challenger", "v2", None),
    ]
    assert {e.action for e in events} == {"promoted"} and events[0].actor == "alice"
    assert aliases(engine, "chat") == {"champion": "v2", "previous": "v1"}
    assert statuses(engine, "chat") == {
        "v1": ModelVersionStatus.RETIRED,
        "v2": ModelVersionStatus.ACTIVE,
    }
    assert get_model(engine, "chat").serving_version == "v2"
    assert promote(engine, "chat", "v2") == []  # already champion: nothing moves
    with pytest.raises(RegistryError, match="no challenger"):
        promote(engine, "chat")
    with pytest.raises(RegistryError, match="cannot be unset"):
        move_alias(engine, "chat", "champion", None)


def test_rollback_restores_the_previous_version_and_marks_the_bad_one(
    engine: Engine, tmp_path: Path
) -> None:
    registered(engine, tmp_path)
    add_job(engine, "job-2", RetrainStatus.PROMOTED)
    v2 = candidate(engine, job_id="job-2")
    promote(engine, "chat", v2)
    events = rollback(engine, "chat", "bob", "refuses everything")
    assert [(e.alias.value, e.previous_version, e.version, e.action) for e in events] == [
        ("champion", "v2", "v1", "rolled_back"),
        ("previous", "v1", None, "rolled_back"),
    ]
    assert events[0].artifact_uri is None  # v1 is the base alone
    assert aliases(engine, "chat") == {"champion": "v1"}
    assert statuses(engine, "chat") == {
        "v1": ModelVersionStatus.ACTIVE,
        "v2": ModelVersionStatus.ROLLED_BACK,
    }
    with Session(engine) as session:
        job = session.get(RetrainJob, "job-2")
        assert job is not None and job.status is RetrainStatus.ROLLED_BACK
        (audit,) = session.exec(select(RetrainJobAudit).where(RetrainJobAudit.job_id == "job-2"))
    assert (audit.from_status, audit.to_status, audit.actor) == ("promoted", "rolled_back", "bob")
    with pytest.raises(RegistryError, match="no previous version"):
        rollback(engine, "chat")


def test_concurrent_promotions_run_one_after_another_and_leave_one_champion(
    engine: Engine, tmp_path: Path
) -> None:
    registered(engine, tmp_path)
    names = [candidate(engine) for _ in range(6)]
    barrier = threading.Barrier(len(names))
    moves: list[ModelEvent] = []
    errors: list[BaseException] = []

    def promote_one(version: str) -> None:
        barrier.wait()
        try:
            moves.extend(e for e in promote(engine, "chat", version) if e.alias.value == "champion")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote_one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    # Serialized: each move saw the one before it, so the moves form one chain from v1.
    after = {e.previous_version: e.version for e in moves}
    assert len(after) == len(names)
    chain, at = [], "v1"
    while at in after:
        at = after[at]
        chain.append(at)
    assert sorted(chain) == sorted(names)
    active = [v for v, s in statuses(engine, "chat").items() if s is ModelVersionStatus.ACTIVE]
    assert active == [chain[-1]] == [aliases(engine, "chat")["champion"]]
    assert aliases(engine, "chat")["previous"] == chain[-2]


# --- announcing -------------------------------------------------------------------------


def test_moves_are_published_keyed_by_model_and_posted_signed(
    kafka_settings: Settings, unique_name: str, tmp_path: Path
) -> None:
    engine = migrated_engine(sqlite_url(tmp_path))
    settings = with_prefix(kafka_settings, unique_name)
    events = [*_register_and_promote(engine, tmp_path)]
    with (
        WebhookReceiver(secret=SECRET) as signed,
        WebhookReceiver(secret="another-secret") as wrong,
    ):
        notify = settings.notify.model_copy(
            update={
                "destinations": [
                    webhook("models-hook", signed.url, secret=SECRET),
                    webhook("wrong-key", wrong.url + "?token=SEKRET", secret=SECRET),
                    webhook("slack", "http://127.0.0.1:9/x").model_copy(update={"type": "slack"}),
                ]
            }
        )
        with ModelAnnouncer(
            settings.model_copy(update={"notify": notify}), backoff_s=0.01
        ) as announcer:
            assert [d.name for d in announcer.destinations] == ["models-hook", "wrong-key"]
            report = announcer.announce(events)
            # At least once: an announcement sent again is the same delivery id.
            announcer.announce(events[0])
    engine.dispose()

    assert report.published == len(events) and report.delivered["models-hook"] == len(events)
    (failure,) = report.failures[:1]
    assert "wrong-key" in failure and "HTTP 401" in failure and "SEKRET" not in failure
    assert wrong.rejected == len(events) + 1 and wrong.unique == {}  # 401: not retried

    assert list(signed.unique) == [e.event_id for e in events] and signed.duplicates == 1
    for event in events:
        received = signed.unique[event.event_id]
        assert verify_signature(SECRET, received.headers, received.body)
        body = received.json
        assert body["schema"] == MODEL_EVENT_SCHEMA and body["event"] == f"model.{event.action}"
        own = {k: v for k, v in body.items() if k not in WEBHOOK_ENVELOPE}
        assert ModelEvent.model_validate(own) == event

    published = read_models_topic(settings, expected=len(events) + 1)
    assert {key for key, _ in published} == {b"chat"}
    assert [e for _, e in published] == [*events, events[0]]


def _register_and_promote(engine: Engine, tmp_path: Path) -> list[ModelEvent]:
    found: list[ModelEvent] = []
    register_model(engine, "chat", str(fake_base(tmp_path / "base")), "v1", announce=found.extend)
    return found + promote(engine, "chat", candidate(engine), "gate", "passed")


def test_the_announcer_reads_webhooks_from_the_destinations_file(tmp_path: Path) -> None:
    path = tmp_path / "destinations.yaml"
    path.write_text(
        yaml.safe_dump(
            {"destinations": [{"name": "filed", "url": "http://127.0.0.1:9/hook", "secret": "s"}]}
        )
    )
    settings = Settings.model_validate({"notify": {"destinations_file": str(path)}})
    assert [d.name for d in ModelAnnouncer(settings).destinations] == ["filed"]


# --- the commands -----------------------------------------------------------------------


def test_models_commands_register_show_promote_and_roll_back(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    migrated_engine(url).dispose()
    base = str(fake_base(tmp_path / "base"))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(models, [*args, "--url", url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("register", "chat", "--base", base, "--serving-version", "v1", "--no-announce")
    assert "chat registered" in out and "champion: - -> v1 (registered)" in out
    engine = migrated_engine(url)
    add_job(engine, "job-3")
    create_version(engine, "chat", None, "/adapters/v2", "v1", job_id="job-3", dataset_hash="d1")
    engine.dispose()

    (listed,) = json.loads(run("list", "--json"))
    assert listed["aliases"] == {"champion": "v1"} and listed["versions"] == 2
    moved = json.loads(run("promote", "chat", "v2", "--no-announce", "--json", "--actor", "al"))
    assert [(e["alias"], e["version"], e["actor"]) for e in moved] == [
        ("champion", "v2", "al"),
        ("previous", "v1", "al"),
    ]
    shown = json.loads(run("show", "chat", "--json"))
    assert shown["aliases"] == {"champion": "v2", "previous": "v1"}
    assert [(v["version"], v["status"], v["job_id"]) for v in shown["versions"]] == [
        ("v1", "retired", None),
        ("v2", "active", "job-3"),
    ]
    assert "v2" in run("show", "chat") and "chat" in run("list")
    assert "champion: v2 -> v1 (rolled_back)" in run("rollback", "chat", "--no-announce")
    missing = runner.invoke(models, ["show", "nope", "--url", url])
    assert isinstance(missing.exception, ModelNotRegisteredError)
