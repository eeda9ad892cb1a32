"""``genmon data``: erase (with confirmation), export, opt-out/opt-in and retention, on
SQLite; opt-outs are what the dataset builder reads."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from incident_support import migrated_engine, sqlite_url
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli import main
from genmon.privacy.optout import opted_out
from genmon.schemas.tables import LabelledExample

SUBJECT = "subject-carol-0042"
PROMPT = "carol-prompt: the lock code is 7711, change it"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Engine]]:
    from genmon.settings import get_settings

    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    with Session(engine) as session:
        session.add(
            LabelledExample(
                request_id="req-carol-1",
                model_id="chat",
                model_version="v1",
                prompt=PROMPT,
                response="carol-response",
                subject_id=SUBJECT,
            )
        )
        session.commit()
    monkeypatch.setenv("GENMON_RETRAIN__ARTIFACTS_URI", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    try:
        yield url, engine
    finally:
        get_settings.cache_clear()
        engine.dispose()


def _run(*args: str, stdin: str | None = None) -> str:
    result = CliRunner().invoke(main, ["data", *args], input=stdin)
    assert result.exit_code == 0, result.output
    return result.output


def test_opt_out_and_in(db: tuple[str, Engine]) -> None:
    url, engine = db
    assert "opted out of training" in _run(
        "opt-out", "--subject", SUBJECT, "--note", "r-17", "--url", url
    )
    assert "already" in _run("opt-out", "--subject", SUBJECT, "--url", url)
    assert opted_out(engine) == [SUBJECT]
    assert "opted in again" in _run("opt-in", "--subject", SUBJECT, "--url", url)
    assert opted_out(engine) == []


def test_export_then_erase_then_nothing_left(db: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = db
    out = tmp_path / "export.json"
    _run("export", "--subject", SUBJECT, "--out", str(out), "--url", url)
    held = json.loads(out.read_text())
    assert [e["prompt"] for e in held["labelled_examples"]] == [PROMPT]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    refused = CliRunner().invoke(
        main, ["data", "erase", "--subject", SUBJECT, "--url", url], input="n\n"
    )
    assert refused.exit_code != 0
    with Session(engine) as session:
        assert len(session.exec(select(LabelledExample)).all()) == 1

    text = _run("erase", "--subject", SUBJECT, "--url", url, stdin="y\n")
    assert f"erased data subject {SUBJECT}" in text and "labelled_example" in text
    report = json.loads(_run("erase", "--subject", SUBJECT, "--yes", "--json", "--url", url))
    assert report["found"] is False and report["counts"] == {}
    assert PROMPT not in json.dumps(report)


def test_retention_dry_run_prints_each_kind(db: tuple[str, Engine]) -> None:
    url, _ = db
    report = json.loads(_run("retention", "--dry-run", "--json", "--url", url))
    assert report["dry_run"] is True
    assert set(report["kinds"]) >= {"labelled_examples", "incidents", "datasets", "windows"}
    assert "would remove" in _run("retention", "--dry-run", "--url", url)
