"""Model cards from a real registry (SQLite and PostgreSQL): a version recorded with its
job, dataset manifest, gate verdict, incident and rollout renders every section, the same
way twice; the job writes it next to the adapter; ``genmon models card`` prints it
(:mod:`genmon.retrain.card`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from retrain_support_gate import ScriptedLM, noisy
from retrain_support_registry import fake_base
from sqlalchemy.engine import Engine

from genmon.cli.models import models
from genmon.db import session_scope
from genmon.retrain.artifacts import ArtifactStore
from genmon.retrain.card import SECTIONS, card_facts, model_card, write_card
from genmon.retrain.examples import SftExample
from genmon.retrain.gate import GateConfig, Verdict, evaluate
from genmon.retrain.job import JobRun
from genmon.retrain.registry import create_version, register_model
from genmon.retrain.rollout import start_rollout
from genmon.schemas.events import FindingKind, RetrainStatus
from genmon.schemas.incidents import Incident
from genmon.schemas.tables import RetrainJob
from genmon.settings import Settings, get_settings

MANIFEST = {
    "format": "genmon-sft/2",
    "content_hash": "c0ffee",
    "strategy": "sft",
    "sizes": {"rows": 90, "train": 60, "eval": 30, "opted_out": 4, "capped": 2},
    "counts": {
        "train": {"label": {"wrong": 60}, "segment": {"region=eu": 25, "region=us": 35}},
        "eval": {"label": {"wrong": 30}, "segment": {"region=eu": 10, "region=us": 20}},
    },
    "time_range": {
        "first": "2025-01-01T00:00:00+00:00",
        "last": "2025-01-31T00:00:00+00:00",
        "eval_first": "2025-01-25T00:00:00+00:00",
    },
    "upweight": {"segment": {"region": "eu"}, "factor": 3.0},
    "redacted": True,
    "privacy": {"opted_out_subjects": 1},
}


def eval_set() -> list[SftExample]:
    return [
        SftExample(
            prompt=f"{region} question {i}",
            completion=f"Helpful answer {i}.",
            rejected="No.",
            segment={"region": region},
        )
        for region, n in (("us", 25), ("eu", 25), ("apac", 5))
        for i in range(n)
    ]


def verdict_of_a_good_candidate() -> Verdict:
    serving = ScriptedLM(noisy(2.0, 0.3))
    candidate = ScriptedLM(lambda p, c: noisy(2.0, 0.3)(p, c) - (0.5 if c != "No." else 0.0))
    verdict = evaluate(candidate, serving, eval_set(), GateConfig(), upweight={"region": "eu"})
    assert verdict.decision == "pass", verdict.reasons
    return verdict


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def recorded(engine: Engine, store: ArtifactStore, tmp_path: Path) -> Iterator[Verdict]:
    """``chat`` v2: an adapter made by job-7 for incident inc-1, with a rollout."""
    register_model(engine, "chat", str(fake_base(tmp_path / "base")), "v1", "alice")
    dataset = store.put_text("jobs/job-7/dataset/manifest.json", json.dumps(MANIFEST))
    verdict = verdict_of_a_good_candidate()
    with session_scope(engine) as session:
        session.add(
            Incident(
                id="inc-1",
                fingerprint="f" * 16,
                model_id="chat",
                detector="segment_gap",
                kind=FindingKind.BIAS,
                signal="negative_feedback",
                segment="region=eu",
                title="EU users thumb down card answers",
            )
        )
        session.add(
            RetrainJob(
                job_id="job-7",
                model_id="chat",
                base_version="v1",
                status=RetrainStatus.EVALUATING,
                trigger="incident",
                incident_id="inc-1",
                params={"trainer": "lora", "training": {"max_steps": 60, "learning_rate": 0.001}},
                metrics={"training": {"steps": 60, "final_loss": 1.2345}},
                dataset_uri=dataset.rsplit("/", 1)[0],
                dataset_hash="c0ffee",
            )
        )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    create_version(
        engine,
        "chat",
        None,
        str(adapter),
        "v1",
        job_id="job-7",
        dataset_hash="c0ffee",
        incident_ids=["inc-1", "inc-gone"],
        metrics=verdict.metrics,
    )
    start_rollout(engine, "chat", "v2", 0.1, actor="retrain-job:job-7", job_id="job-7")
    yield verdict


def sections(card: str) -> dict[str, str]:
    """Section title -> its text, in the card's order."""
    parts = re.split(r"^## (.+)$", card, flags=re.MULTILINE)
    return dict(zip(parts[1::2], (p.strip() for p in parts[2::2]), strict=True))


def test_the_card_renders_every_section_from_the_registry(
    engine: Engine, store: ArtifactStore, recorded: Verdict
) -> None:
    card = model_card(engine, store, "chat", "v2", verdict=recorded)
    assert card == model_card(engine, store, "chat", "v2", verdict=recorded)  # deterministic
    assert card.startswith("# Model card: chat v2\n")
    found = sections(card)
    assert tuple(found) == SECTIONS
    base = found["Base and adapter"]
    assert re.search(r"fingerprint `[0-9a-f]{64}`", base) and "parent version: v1" in base
    assert "adapter: `" in base and "(LoRA)" in base
    training = found["Training"]
    assert "job: `job-7` (trigger incident" in training
    assert "trainer: lora; strategy: sft; backend: local" in training
    assert "steps: 60; final loss: 1.2345" in training
    assert '`{"learning_rate": 0.001, "max_steps": 60}`' in training
    data = found["Data"]
    assert "content hash: `c0ffee`" in data and "strategy: sft" in data
    assert "2025-01-01T00:00:00+00:00 .. 2025-01-31T00:00:00+00:00" in data
    assert "opted_out 4" in data and "capped 2" in data
    assert '- up-weighted: `{"factor": 3.0, "segment": {"region": "eu"}}`' in data
    assert "| region=eu | 25 | 10 |" in data and "| wrong | 60 | 30 |" in data
    assert '- privacy: `{"opted_out_subjects": 1}`' in data
    evaluation = found["Evaluation"]
    assert re.search(
        r"^\| completion_loss \| 1\.9\d{3} \| 1\.4\d{3} \| -0\.5000 \| 95%: ", evaluation, re.M
    )
    assert re.search(r"^\| completion_loss on region=eu \| .* \| 98\.75%: ", evaluation, re.M)
    assert "not judged (too few items) for completion_loss: region=apac (5)" in evaluation
    assert "Per segment (4 tests, Bonferroni: each at 98.75%, tolerance 0.0200)" in evaluation
    assert "Up-weighted segment region=eu:" in evaluation
    verdict = found["Gate verdict"]
    assert verdict.startswith("Decision: **pass**")
    assert all(f"- {reason}" in verdict for reason in recorded.reasons)
    incidents = found["Incidents"]
    assert "`inc-1`: EU users thumb down card answers (bias, negative_feedback on region=eu" in (
        incidents
    )
    assert "`inc-gone` (not in the incident table)" in incidents
    rollouts = found["Rollouts and aliases"]
    assert "Aliases now: challenger." in rollouts
    assert re.search(r"\| challenger \| v1 \| v2 \| 10\.00% \| watching \|", rollouts)


def test_a_registered_base_version_has_a_short_card(
    engine: Engine, store: ArtifactStore, tmp_path: Path
) -> None:
    register_model(engine, "chat", str(fake_base(tmp_path / "base")), "v1", "alice")
    found = sections(model_card(engine, store, "chat", "v1"))
    assert tuple(found) == SECTIONS
    assert "adapter: none (this version is the base weights alone)" in found["Base and adapter"]
    assert found["Training"] == "Not trained by genmon: registered as it is."
    assert found["Gate verdict"] == "No verdict recorded."
    assert "No rollouts." in found["Rollouts and aliases"]


def test_the_job_writes_the_card_next_to_the_adapter(
    engine: Engine, store: ArtifactStore, recorded: Verdict, tmp_path: Path
) -> None:
    from genmon.retrain.registry import get_version

    row = get_version(engine, "chat", "v2")
    with session_scope(engine) as session:
        job = session.get(RetrainJob, "job-7")
    run = JobRun(Settings(), engine, None, None, store, tmp_path)  # type: ignore[arg-type]
    run.write_card(job, "v2", row.artifact_uri, recorded)
    written = (Path(row.artifact_uri) / "card.md").read_text()
    assert written == model_card(engine, store, "chat", "v2", verdict=recorded)
    uri = write_card(store, row.artifact_uri, "# card\n")
    assert uri.endswith("/card.md") and Path(uri).read_text() == "# card\n"


def test_models_card_prints_writes_and_dumps_the_card(
    engine: Engine,
    store: ArtifactStore,
    recorded: Verdict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    monkeypatch.setenv("GENMON_RETRAIN__ARTIFACTS_URI", store.root_uri)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(models, ["card", "chat", "v2", "--url", url], catch_exceptions=False)
        assert shown.exit_code == 0, shown.output
        assert shown.output == model_card(engine, store, "chat", "v2")
        out = tmp_path / "card.md"
        wrote = runner.invoke(models, ["card", "chat", "v2", "--url", url, "--out", str(out)])
        assert wrote.exit_code == 0 and out.read_text() == shown.output
        dumped = runner.invoke(models, ["card", "chat", "v2", "--url", url, "--json"])
        facts = json.loads(dumped.output)
        assert facts == json.loads(json.dumps(card_facts(engine, store, "chat", "v2")))
        assert facts["data"]["manifest"]["upweight"]["segment"] == {"region": "eu"}
    finally:
        get_settings.cache_clear()
