"""Persistence: migrations, engines, sessions and the stored tables, on SQLite and PostgreSQL."""

from __future__ import annotations

import doctest
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import select

from genmon import db
from genmon.cli import main
from genmon.exceptions import DatabaseError
from genmon.schemas import FeedbackEvent, InferenceEvent, RetrainRequest, RetrainStatus
from genmon.schemas.tables import (
    LabelledExample,
    LabelledExampleCreate,
    LabelledExamplePublic,
    ModelVersion,
    ModelVersionCreate,
    ModelVersionStatus,
    RetrainJob,
    RetrainJobCreate,
    RetrainJobPublic,
)
from genmon.settings import get_settings

OWN_TABLES = {"retrain_job", "model_version", "labelled_example"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'genmon.sqlite'}"


@pytest.fixture
def scratch_postgres_url(postgres_url: str) -> Iterator[str]:
    """A schema of its own on the test database, so downgrades touch nobody else's tables.

    The connection's ``search_path`` points at it, so migrations, the version table and
    the inspector all work inside it as if it were a fresh database.
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        url = sa.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("scratch_postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    yield engine
    engine.dispose()


def table_names(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


# --- migrations -------------------------------------------------------------------------


def test_upgrade_creates_every_table_and_records_the_head(db_url: str) -> None:
    assert db.current(db_url) is None
    db.upgrade(db_url)
    assert db.current(db_url) == db.head_revision()
    assert OWN_TABLES | {"alembic_version"} <= table_names(db_url)


def test_round_trip_head_base_head_leaves_an_empty_schema(db_url: str) -> None:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    with db.session_scope(engine) as session:
        session.add(RetrainJob(model_id="chat", base_version="v1"))
    engine.dispose()

    db.downgrade(db_url, "base")
    assert db.current(db_url) is None
    assert table_names(db_url) == {"alembic_version"}

    db.upgrade(db_url)
    assert db.current(db_url) == db.head_revision()
    engine = db.make_engine(db_url)
    with db.session_scope(engine) as session:
        assert session.exec(select(RetrainJob)).all() == []
    engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(db_url: str) -> None:
    script = ScriptDirectory.from_config(db.alembic_config())
    revisions = list(reversed(list(script.walk_revisions())))
    assert revisions[0].revision == "0001_foundation"
    for revision in revisions:
        db.upgrade(db_url, revision.revision)
        assert db.current(db_url) == revision.revision
        before = table_names(db_url)
        db.downgrade(db_url, revision.down_revision or "base")  # type: ignore[arg-type]
        db.upgrade(db_url, revision.revision)
        assert table_names(db_url) == before
    assert db.current(db_url) == db.head_revision()


def test_concurrent_upgrades_take_turns(db_url: str) -> None:
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            db.upgrade(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert db.current(db_url) == db.head_revision()


def test_a_sqlite_upgrade_waits_for_another_migrator_longer_than_the_busy_timeout(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes migrating one SQLite file take turns, however long the first takes
    (the suite once failed under load with "database is locked" from the second)."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 50)  # far shorter than the hold
    holder = db.make_engine(sqlite_url)
    errors: list[BaseException] = []
    with holder.connect() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # another migrator holds the lock

        def upgrade() -> None:
            try:
                db.upgrade(sqlite_url)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=upgrade)
        thread.start()
        thread.join(timeout=1.0)  # the fault lasts 1 s: 20 times the busy timeout
        assert thread.is_alive() and errors == []  # still waiting its turn, not failed
        connection.rollback()
    thread.join(timeout=60)
    holder.dispose()
    assert errors == [] and db.current(sqlite_url) == db.head_revision()


def test_models_and_migrations_do_not_drift(db_url: str) -> None:
    db.upgrade(db_url)
    assert db.schema_differences(db_url) == []


def test_drift_check_sees_a_database_that_differs(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE labelled_example ADD COLUMN stray INTEGER")
        connection.exec_driver_sql("DROP INDEX ix_labelled_example_subject_id")
    engine.dispose()
    kinds = {
        (diff[0], getattr(diff[-1], "name", None)) for diff in db.schema_differences(sqlite_url)
    }
    assert ("remove_column", "stray") in kinds
    assert ("add_index", "ix_labelled_example_subject_id") in kinds


def test_upgrade_to_an_unknown_revision_says_what_to_do(sqlite_url: str) -> None:
    with pytest.raises(DatabaseError, match="genmon db current"):
        db.upgrade(sqlite_url, "9999_nope")


def test_unreachable_postgres_raises_database_error_without_the_password() -> None:
    url = "postgresql+psycopg://genmon:s3cret@127.0.0.1:1/genmon?connect_timeout=2"
    with pytest.raises(DatabaseError, match="running and reachable") as caught:
        db.upgrade(url)
    assert "s3cret" not in str(caught.value)


def test_bad_url_raises_database_error_naming_the_setting() -> None:
    with pytest.raises(DatabaseError, match="GENMON_DATABASE__URL"):
        db.make_engine("definitely not a url")


def test_default_url_comes_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "from-env" / "g.sqlite"
    monkeypatch.setenv("GENMON_DATABASE__URL", f"sqlite:///{path}")
    get_settings.cache_clear()
    try:
        db.upgrade()
        assert db.current() == db.head_revision()
    finally:
        get_settings.cache_clear()
    assert path.exists()


def test_docstring_example_runs() -> None:
    result = doctest.testmod(db)
    assert result.attempted > 0
    assert result.failed == 0


# --- engines and sessions ---------------------------------------------------------------


def test_sqlite_engine_creates_its_folder_and_sets_wal_and_foreign_keys(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    assert Path(sqlite_url.removeprefix("sqlite:///")).exists()


def test_session_scope_commits_on_success_and_rolls_back_on_error(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(RetrainJob(job_id="kept", model_id="chat", base_version="v1"))
    with pytest.raises(RuntimeError), db.session_scope(engine) as session:
        session.add(RetrainJob(job_id="dropped", model_id="chat", base_version="v1"))
        session.flush()
        raise RuntimeError("boom")
    with db.session_scope(engine) as session:
        assert [job.job_id for job in session.exec(select(RetrainJob))] == ["kept"]


def test_session_on_an_unmigrated_database_says_to_upgrade(db_url: str) -> None:
    engine = db.make_engine(db_url)
    try:
        with (
            pytest.raises(DatabaseError, match="genmon db upgrade"),
            db.session_scope(engine) as session,
        ):
            session.exec(select(RetrainJob)).all()
    finally:
        engine.dispose()


# --- tables -----------------------------------------------------------------------------


def test_retrain_job_from_request_round_trips(engine: sa.Engine) -> None:
    request = RetrainRequest(
        model_id="chat", base_version="v3", reason="drift", incident_id="inc-1", min_examples=50
    )
    job = RetrainJob.model_validate(RetrainJobCreate.from_request(request, lr=1e-4))
    with db.session_scope(engine) as session:
        session.add(job)
    with db.session_scope(engine) as session:
        stored = session.get(RetrainJob, request.job_id)
        assert stored is not None
        public = RetrainJobPublic.model_validate(stored)
        raw_status = session.connection().exec_driver_sql("SELECT status FROM retrain_job").scalar()
    assert public.status is RetrainStatus.QUEUED
    assert raw_status == "queued"  # stored by value, readable by other tools
    assert public.params == {"min_examples": 50, "examples_since": None, "lr": 1e-4}
    assert public.incident_id == "inc-1"
    assert public.created_at.tzinfo is not None
    assert public.created_at.utcoffset() == timedelta(0)


def test_timestamps_come_back_as_the_same_instant_in_utc(engine: sa.Engine) -> None:
    started = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5)))
    with db.session_scope(engine) as session:
        session.add(RetrainJob(job_id="j", model_id="m", base_version="v", started_at=started))
    with db.session_scope(engine) as session:
        stored = session.get(RetrainJob, "j")
        assert stored is not None and stored.started_at is not None
    assert stored.started_at == started
    assert stored.started_at.tzinfo == UTC


def test_naive_timestamps_are_refused(engine: sa.Engine) -> None:
    with pytest.raises(StatementError, match="timezone-aware"), db.session_scope(engine) as session:
        session.add(
            RetrainJob(model_id="m", base_version="v", started_at=datetime(2026, 1, 1, 0, 0))
        )


def _version(model_id: str, version: str, status: ModelVersionStatus) -> ModelVersion:
    create = ModelVersionCreate(
        model_id=model_id, version=version, artifact_uri=f"file:///models/{model_id}/{version}"
    )
    return ModelVersion.model_validate(create, update={"status": status})


def test_model_version_is_unique_per_model(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(_version("chat", "v1", ModelVersionStatus.RETIRED))
        session.add(_version("search", "v1", ModelVersionStatus.RETIRED))
    with pytest.raises(IntegrityError), db.session_scope(engine) as session:
        session.add(_version("chat", "v1", ModelVersionStatus.CANDIDATE))


def test_at_most_one_active_version_per_model(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(_version("chat", "v1", ModelVersionStatus.ACTIVE))
        session.add(_version("chat", "v0", ModelVersionStatus.RETIRED))
        session.add(_version("chat", "v-1", ModelVersionStatus.RETIRED))
        session.add(_version("search", "v1", ModelVersionStatus.ACTIVE))
    with pytest.raises(IntegrityError), db.session_scope(engine) as session:
        session.add(_version("chat", "v2", ModelVersionStatus.ACTIVE))
    with db.session_scope(engine) as session:
        statuses = session.exec(
            select(ModelVersion.version, ModelVersion.status).where(ModelVersion.model_id == "chat")
        ).all()
    assert sorted(statuses) == [
        ("v-1", ModelVersionStatus.RETIRED),
        ("v0", ModelVersionStatus.RETIRED),
        ("v1", ModelVersionStatus.ACTIVE),
    ]


def test_model_version_must_name_an_existing_job(engine: sa.Engine) -> None:
    version = _version("chat", "v9", ModelVersionStatus.CANDIDATE)
    version.job_id = "no-such-job"
    with pytest.raises(IntegrityError), db.session_scope(engine) as session:
        session.add(version)


def test_deleting_a_job_keeps_its_versions(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(RetrainJob(job_id="j1", model_id="chat", base_version="v1"))
        session.flush()
        version = _version("chat", "v2", ModelVersionStatus.CANDIDATE)
        version.job_id = "j1"
        session.add(version)
    with db.session_scope(engine) as session:
        session.connection().exec_driver_sql("DELETE FROM retrain_job WHERE job_id = 'j1'")
    with db.session_scope(engine) as session:
        stored = session.exec(select(ModelVersion)).one()
    assert (stored.version, stored.job_id) == ("v2", None)


def _example(
    request_id: str, model_id: str = "chat", subject: str | None = None
) -> LabelledExample:
    inference = InferenceEvent(
        request_id=request_id,
        model_id=model_id,
        model_version="v1",
        prompt="capital of France?",
        response="Lyon",
        latency_ms=90.0,
        segment={"locale": "fr"},
        subject_id=subject,
    )
    feedback = FeedbackEvent(
        request_id=request_id, model_id=model_id, thumbs="down", correction="Paris"
    )
    return LabelledExample.model_validate(LabelledExampleCreate.from_events(inference, feedback))


def test_labelled_example_is_unique_per_model_and_request(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(_example("r1"))
        session.add(_example("r1", model_id="other"))
    with pytest.raises(IntegrityError), db.session_scope(engine) as session:
        session.add(_example("r1"))
    with db.session_scope(engine) as session:
        stored = LabelledExamplePublic.model_validate(
            session.exec(select(LabelledExample).where(LabelledExample.model_id == "chat")).one()
        )
    assert (stored.prompt, stored.response, stored.correction) == (
        "capital of France?",
        "Lyon",
        "Paris",
    )
    assert (stored.score, stored.segment) == (0.0, {"locale": "fr"})


def test_erasure_by_subject_removes_only_that_subjects_rows(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        session.add(_example("r1", subject="alice"))
        session.add(_example("r2", subject="bob"))
        session.add(_example("r3", subject="alice"))
    with db.session_scope(engine) as session:
        session.execute(sa.delete(LabelledExample).where(LabelledExample.subject_id == "alice"))
    with db.session_scope(engine) as session:
        left = session.exec(select(LabelledExample.request_id)).all()
    assert left == ["r2"]


def test_joining_feedback_of_another_request_is_refused() -> None:
    inference = InferenceEvent(request_id="r1", model_id="chat", latency_ms=1.0)
    feedback = FeedbackEvent(request_id="r2", model_id="chat", score=1.0)
    with pytest.raises(ValueError, match="does not belong"):
        LabelledExampleCreate.from_events(inference, feedback)


# --- command line -----------------------------------------------------------------------


def test_cli_upgrades_reports_and_downgrades(sqlite_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["db", "current", "--url", sqlite_url])
    assert result.exit_code == 1
    assert "at base (empty)" in result.output

    result = runner.invoke(main, ["db", "upgrade", "--url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"at {db.head_revision()}")
    assert runner.invoke(main, ["db", "current", "--url", sqlite_url]).exit_code == 0

    result = runner.invoke(main, ["db", "downgrade", "--url", sqlite_url, "--revision", "base"])
    assert result.exit_code == 0, result.output
    assert table_names(sqlite_url) == {"alembic_version"}


def test_cli_turns_database_errors_into_a_message() -> None:
    url = "postgresql+psycopg://genmon:s3cret@127.0.0.1:1/genmon?connect_timeout=2"
    result = CliRunner().invoke(main, ["db", "upgrade", "--url", url])
    assert result.exit_code == 1
    assert "running and reachable" in result.output
    assert "s3cret" not in result.output
    assert "Traceback" not in result.output
