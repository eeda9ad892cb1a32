"""KTO on thumbs (issue #16's acceptance): the tiny model refuses the card questions; users
thumb its refusals down and good answers up, and KTO makes the refusal less likely on card
questions it never trained on. Also: the class weights, TRL's batch constraint, progress,
and a run resumed at its checkpoint ending where an uninterrupted one does.

One KTO run is shared by the module (40 steps, about 10 s on one CPU thread).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from incident_support import migrated_engine, postgres_schema_url
from retrain_support_model import SupportData
from sqlalchemy.engine import Engine

from genmon.db import session_scope
from genmon.exceptions import ConfigurationError
from genmon.retrain.artifacts import ArtifactStore
from genmon.retrain.examples import SftExample
from genmon.retrain.job import JobRun
from genmon.retrain.lm import load_lm
from genmon.retrain.preference import (
    KTO_BAND,
    DpoTrainer,
    KtoTrainer,
    kto_rows,
    kto_weights,
    load_trl,
    trainer_for_strategy,
)
from genmon.retrain.queue import JobQueue, get_job
from genmon.retrain.registry import aliases, register_model
from genmon.retrain.tiny_lm import REFUSAL
from genmon.retrain.trainer import LoraTrainer, NullContext, TrainingParams
from genmon.schemas.events import RetrainStatus
from genmon.schemas.tables import LabelledExample, RetrainJob
from genmon.settings import Settings

PARAMS = TrainingParams(max_steps=40, checkpoint_every=10)
#: Mean log-likelihood per token of the refusal on held-out card questions must fall by at
#: least this much (nats). Measured over seeds 0-2 of this set-up: it fell by 1.3 to 2.0.
MARGIN = 0.5
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Recording:
    """Keeps every progress report and a copy of every checkpoint."""

    keep: Path
    resume_from: tuple[int, Path] | None = None
    reports: list[tuple[int, int, float, float, float, float | None]] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)

    def progress(
        self, step: int, total: int, loss: float, eps: float, tps: float, gpu: float | None
    ) -> None:
        self.reports.append((step, total, loss, eps, tps, gpu))

    def checkpoint(self, step: int, local_dir: Path) -> None:
        self.checkpoints[step] = Path(shutil.copytree(local_dir, self.keep / f"step-{step}"))

    def resume(self) -> tuple[int, Path] | None:
        return self.resume_from


@dataclass
class Run:
    adapter: Path
    final_loss: float
    ctx: Recording
    thumbs: list[SftExample]


def thumbs(support: SupportData, seed: int = 0) -> list[SftExample]:
    """Seeded synthetic feedback: every refusal of a card question thumbed down, good
    answers to other questions thumbed up. Half the card questions only (the rest are
    held out)."""
    down = [
        SftExample(prompt=p.prompt, completion=REFUSAL, desirable=False)
        for p in support.refused[::2]
    ]
    good = random.Random(seed).sample(support.healthy, 40)
    up = [SftExample(prompt=p.prompt, completion=p.answer, desirable=True) for p in good]
    return down + up


def refusal_loglik(base: Path, adapter: Path | None, prompts: list[str]) -> float:
    lm = load_lm(str(base), str(adapter) if adapter else None, device="cpu")
    return float(-lm.completion_nll(prompts, [REFUSAL] * len(prompts)).mean())


@pytest.fixture(scope="module")
def kto_run(
    tiny_lm_path: Path, support_data: SupportData, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kto")
    ctx = Recording(keep=root / "kept")
    examples = thumbs(support_data)
    result = KtoTrainer().train(str(tiny_lm_path), examples, PARAMS, ctx, root / "out")
    return Run(result.adapter_dir, result.final_loss, ctx, examples)


def test_kto_on_thumbs_makes_the_marked_down_refusal_less_likely_on_held_out_prompts(
    kto_run: Run, tiny_lm_path: Path, support_data: SupportData
) -> None:
    held_out = [p.prompt for p in support_data.refused[1::2]]
    trained = {e.prompt for e in kto_run.thumbs}
    assert held_out and not trained & set(held_out)
    before = refusal_loglik(tiny_lm_path, None, held_out)
    after = refusal_loglik(tiny_lm_path, kto_run.adapter, held_out)
    assert before - after >= MARGIN, (before, after)


def test_kto_records_its_strategy_beta_and_class_weights(kto_run: Run) -> None:
    meta = json.loads((kto_run.adapter / "genmon_training.json").read_text())
    assert meta["strategy"] == "kto" and meta["beta"] == PARAMS.beta
    assert (meta["desirable"], meta["undesirable"]) == (40, len(kto_run.thumbs) - 40)
    weighted = meta["desirable_weight"] * meta["desirable"]
    ratio = weighted / (meta["undesirable_weight"] * meta["undesirable"])
    assert KTO_BAND[0] <= ratio <= KTO_BAND[1]
    assert (kto_run.adapter / "adapter_model.safetensors").is_file()
    assert not (kto_run.adapter / "ref").exists()  # TRL's reference copy is not shipped


def test_kto_reports_every_step_and_checkpoints(kto_run: Run) -> None:
    reports = kto_run.ctx.reports
    assert [r[0] for r in reports] == list(range(1, PARAMS.max_steps + 1))
    assert all(total == PARAMS.max_steps and tps > eps > 0 for _, total, _, eps, tps, _ in reports)
    assert all(gpu is None for *_, gpu in reports)
    assert kto_run.final_loss == pytest.approx(reports[-1][2])
    assert {10, 20, 30, 40} <= set(kto_run.ctx.checkpoints)


def test_a_kto_run_resumed_at_its_checkpoint_ends_where_the_uninterrupted_one_did(
    kto_run: Run, tiny_lm_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file

    again = Recording(keep=tmp_path / "k1", resume_from=(30, kto_run.ctx.checkpoints[30]))
    result = KtoTrainer().train(str(tiny_lm_path), kto_run.thumbs, PARAMS, again, tmp_path / "a")
    assert [r[0] for r in again.reports] == list(range(31, PARAMS.max_steps + 1))
    a = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(kto_run.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6)
    # A checkpoint of other params is not resumed: the run starts again, and says so.
    other = Recording(keep=tmp_path / "k2", resume_from=(30, kto_run.ctx.checkpoints[30]))
    short = TrainingParams(max_steps=2, checkpoint_every=0)
    with caplog.at_level("WARNING", logger="genmon.retrain.preference"):
        KtoTrainer().train(str(tiny_lm_path), kto_run.thumbs, short, other, tmp_path / "b")
    assert [r[0] for r in other.reports] == [1, 2]
    assert "other params or data" in caplog.text


def test_kto_weights_land_in_the_recommended_band() -> None:
    for good, bad in [(40, 60), (60, 40), (10, 90), (90, 10), (50, 50), (1, 1)]:
        w_d, w_u = kto_weights(good, bad)
        assert KTO_BAND[0] <= (w_d * good) / (w_u * bad) <= KTO_BAND[1]
        assert max(w_d, w_u) >= 1.0 and min(w_d, w_u) == 1.0
    # One weight set by the policy: the other is computed around it.
    w_d, w_u = kto_weights(30, 90, desirable_weight=2.0)
    assert w_d == 2.0 and KTO_BAND[0] <= (2.0 * 30) / (w_u * 90) <= KTO_BAND[1]
    assert kto_weights(0, 5) == (1.0, 1.0)
    assert kto_weights(10, 20, 1.5, 0.5) == (1.5, 0.5)  # both set: used as given


def test_a_correction_gives_kto_a_desirable_and_an_undesirable_row(tiny_lm_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    correction = SftExample(prompt="Where is my card?", completion="It arrives.", rejected="No.")
    rows = kto_rows(tokenizer, [correction], 64)
    assert rows == [
        {
            "prompt": "Customer: Where is my card?\nAgent:",
            "completion": " It arrives.<|endoftext|>",
            "label": True,
        },
        {
            "prompt": "Customer: Where is my card?\nAgent:",
            "completion": " No.<|endoftext|>",
            "label": False,
        },
    ]


def test_kto_refuses_what_trl_cannot_train(tiny_lm_path: Path, tmp_path: Path) -> None:
    one = [SftExample(prompt="Where is my card?", completion=REFUSAL, desirable=False)]
    with pytest.raises(ConfigurationError, match="batch_size >= 2"):
        KtoTrainer().train(
            str(tiny_lm_path), one * 4, TrainingParams(batch_size=1), NullContext(), tmp_path
        )
    with pytest.raises(ConfigurationError, match="at least 2 examples"):
        KtoTrainer().train(str(tiny_lm_path), one, TrainingParams(), NullContext(), tmp_path)
    with pytest.raises(ConfigurationError, match="beta must be > 0"):
        TrainingParams(beta=0)
    with pytest.raises(ConfigurationError, match="undesirable_weight must be > 0"):
        TrainingParams.from_dict({"undesirable_weight": "-1"})
    assert TrainingParams.from_dict({"desirable_weight": None}).desirable_weight is None


def test_strategies_route_to_their_trainers() -> None:
    trl = load_trl()
    assert trl.KTOTrainer.__name__ == "KTOTrainer" and trl.DPOConfig.__name__ == "DPOConfig"
    assert isinstance(trainer_for_strategy("sft", "lora"), LoraTrainer)
    assert isinstance(trainer_for_strategy("kto", "lora"), KtoTrainer)
    assert isinstance(trainer_for_strategy("dpo", "lora"), DpoTrainer)
    with pytest.raises(ConfigurationError, match="unknown training strategy 'orpo'"):
        trainer_for_strategy("orpo", "lora")


# --- the job: thumbs in the database -> dataset -> KTO -> gate -> registry -----------------


def add_thumbs(engine: Engine, model_id: str, support: SupportData, refusals_up: bool) -> None:
    """Card questions answered with the refusal and healthy ones answered well, three of
    one to two of the other in every five minutes (so the latest fifth, the evaluation
    split, holds a dozen card questions). Thumbs as users send them: refusals down and
    good answers up, or, with ``refusals_up``, the other way round."""
    cards = iter(support.refused[:60])
    healthy = iter(random.Random(0).sample(support.healthy, 40))
    with session_scope(engine) as session:
        for i in range(100):
            card = i % 5 < 3
            pair = next(cards if card else healthy)
            good = (not card) != refusals_up
            session.add(
                LabelledExample(
                    request_id=f"r{i}",
                    model_id=model_id,
                    model_version="v1",
                    prompt=pair.prompt,
                    response=REFUSAL if card else pair.answer,
                    score=1.0 if good else 0.0,
                    segment={"topic": pair.topic},
                    created_at=T0 + timedelta(minutes=i),
                )
            )


def run_kto_job(engine: Engine, model_id: str, base: Path, store_dir: Path) -> RetrainJob:
    register_model(engine, model_id, str(base), "v1")
    params = {
        "trainer": "lora",
        "strategy": "kto",
        "training": {"max_steps": PARAMS.max_steps, "checkpoint_every": 0},
        # The evaluation split holds 12 card questions and 8 others: judge on them.
        "gate": {"min_eval_examples": 8},
        "rollout": {"mode": "direct"},
    }
    context = {"signal": "refusal", "segment": "topic=cards"}
    with session_scope(engine) as session:
        session.add(
            RetrainJob(
                job_id=f"{model_id}-job",
                model_id=model_id,
                base_version="v1",
                params=params,
                context=context,
                created_at=T0 + timedelta(days=1),
            )
        )
    queue = JobQueue(engine, "w1", 300.0)
    lease = queue.claim()
    assert lease is not None
    run = JobRun(Settings(), engine, queue, lease, ArtifactStore(str(store_dir)), store_dir)
    run.announce = lambda events: None  # type: ignore[method-assign]  # no broker here
    run.run()
    return get_job(engine, lease.job_id)


@pytest.fixture
def job_engine(postgres_url: str) -> Iterator[Engine]:
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("refusals_up", [False, True], ids=["refusals-down", "refusals-up"])
def test_the_gate_promotes_a_kto_job_only_when_the_behaviour_check_agrees(
    job_engine: Engine,
    tiny_lm_path: Path,
    support_data: SupportData,
    tmp_path: Path,
    refusals_up: bool,
) -> None:
    add_thumbs(job_engine, "desk", support_data, refusals_up)
    job = run_kto_job(job_engine, "desk", tiny_lm_path, tmp_path)
    assert job.metrics["training"]["strategy"] == "kto"
    assert job.metrics["dataset"]["strategy"] == "kto"
    verdict = job.verdict or {}
    refusals = verdict.get("metrics", {}).get("refusal_rate", {})
    if not refusals_up:
        assert job.status is RetrainStatus.PROMOTED, json.dumps(verdict, indent=1)[:6000]
        assert refusals["candidate"] < refusals["serving"]
        assert aliases(job_engine, "desk")["champion"] == job.candidate_version
    else:
        # Thumbs that praise the refusal: the candidate refuses no less, and is not promoted.
        assert job.status is RetrainStatus.REJECTED, json.dumps(verdict, indent=1)[:6000]
        assert refusals["status"] == "fail"
        assert any("refusal_rate" in reason for reason in verdict["reasons"])
        assert refusals["candidate"] >= 0.9
        assert aliases(job_engine, "desk")["champion"] == "v1"
