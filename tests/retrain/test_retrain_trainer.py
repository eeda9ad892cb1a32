"""LoRA fine-tuning on feedback, its checkpoints and resume, the trainer registry, and the
artifact store the checkpoints and adapters travel through.

One fine-tune on corrections of the refused topic (default params) is shared by the module:
it must stop the refusals of held-out questions of that topic, report its progress, and
checkpoint so that an interrupted run resumed from its checkpoint ends on the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from retrain_support_model import SupportData, accuracy, corrections, refusal_rate

from genmon.exceptions import ConfigurationError
from genmon.retrain.artifacts import COMPLETE, ArtifactError, ArtifactStore
from genmon.retrain.examples import SftExample
from genmon.retrain.lm import load_lm
from genmon.retrain.tiny_lm import REFUSAL
from genmon.retrain.trainer import (
    LoraTrainer,
    NullContext,
    Trainer,
    TrainerNotFound,
    TrainingParams,
    TrainResult,
    batch_indices,
    load_trainer,
)


class Interrupted(Exception):
    """Stands for a worker killed mid-training."""


@dataclass
class RecordingContext:
    """Keeps every progress report and a copy of every checkpoint; can die at one step."""

    keep: Path
    stop_at: int | None = None
    resume_from: tuple[int, Path] | None = None
    reports: list[tuple[int, int, float, float, float, float | None]] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)

    def progress(
        self, step: int, total: int, loss: float, eps: float, tps: float, gpu: float | None
    ) -> None:
        self.reports.append((step, total, loss, eps, tps, gpu))
        if step == self.stop_at:
            raise Interrupted(step)

    def checkpoint(self, step: int, local_dir: Path) -> None:
        self.checkpoints[step] = Path(shutil.copytree(local_dir, self.keep / f"step-{step}"))

    def resume(self) -> tuple[int, Path] | None:
        return self.resume_from


@dataclass
class Run:
    result: TrainResult
    ctx: RecordingContext
    examples: list[SftExample]
    held_out: list[SftExample]


@pytest.fixture(scope="module")
def split(support_data: SupportData) -> tuple[list[SftExample], list[SftExample]]:
    """Corrections of the refused topic: half to train on, the other half held out."""
    refused = support_data.refused
    return corrections(refused[::2], REFUSAL), corrections(refused[1::2], REFUSAL)


@pytest.fixture(scope="module")
def fine_tuned(tiny_lm_path: Path, split, tmp_path_factory: pytest.TempPathFactory) -> Run:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fine-tuned")
    ctx = RecordingContext(keep=root / "kept")
    train, held = split
    result = LoraTrainer().train(str(tiny_lm_path), train, TrainingParams(), ctx, root / "out")
    return Run(result, ctx, train, held)


def held_out_loss(base: Path, adapter: Path, held: list[SftExample]) -> float:
    lm = load_lm(str(base), str(adapter), device="cpu")
    nll = lm.completion_nll([e.prompt for e in held], [e.completion for e in held])
    return float(nll.mean())


def test_fine_tuning_on_corrections_stops_the_refusals(
    fine_tuned: Run, tiny_lm_path: Path, support_data: SupportData
) -> None:
    held_prompts = [e.prompt for e in fine_tuned.held_out]
    base = load_lm(str(tiny_lm_path), device="cpu")
    tuned = load_lm(str(tiny_lm_path), str(fine_tuned.result.adapter_dir), device="cpu")
    assert refusal_rate(base, held_prompts) >= 0.9
    assert refusal_rate(tuned, held_prompts) <= 0.1
    completions = [e.completion for e in fine_tuned.held_out]
    assert tuned.completion_nll(held_prompts, completions).mean() < 0.5 * (
        base.completion_nll(held_prompts, completions).mean()
    )
    # The rest of the desk still works.
    assert accuracy(tuned, support_data.healthy[::3]) >= 0.8


def test_progress_and_checkpoints_are_reported_every_step(fine_tuned: Run) -> None:
    params = TrainingParams()
    reports = fine_tuned.ctx.reports
    assert [r[0] for r in reports] == list(range(1, params.max_steps + 1))
    assert all(
        total == params.max_steps and eps > 0 and tps > eps for _, total, _, eps, tps, _ in reports
    )
    assert all(gpu is None for *_, gpu in reports)  # CPU here
    assert reports[-1][2] < reports[0][2]
    assert fine_tuned.result.steps == params.max_steps
    assert fine_tuned.result.final_loss == pytest.approx(reports[-1][2])
    assert sorted(fine_tuned.ctx.checkpoints) == list(range(10, 61, 10))
    step_30 = fine_tuned.ctx.checkpoints[30]
    for name in (
        "adapter/adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ):
        assert (step_30 / name).is_file(), name
    adapter = fine_tuned.result.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "genmon_training.json").read_text())["strategy"] == "sft"
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))


def test_a_run_resumed_at_its_checkpoint_ends_where_an_uninterrupted_one_does(
    fine_tuned: Run, tiny_lm_path: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    params = TrainingParams()
    dying = RecordingContext(keep=tmp_path / "kept", stop_at=34)
    with pytest.raises(Interrupted):
        LoraTrainer().train(str(tiny_lm_path), fine_tuned.examples, params, dying, tmp_path / "a")
    assert max(dying.checkpoints) == 30
    again = RecordingContext(keep=tmp_path / "kept-b", resume_from=(30, dying.checkpoints[30]))
    result = LoraTrainer().train(
        str(tiny_lm_path), fine_tuned.examples, params, again, tmp_path / "b"
    )
    assert again.reports[0][0] == 31 and result.steps == params.max_steps
    resumed = held_out_loss(tiny_lm_path, result.adapter_dir, fine_tuned.held_out)
    straight = held_out_loss(tiny_lm_path, fine_tuned.result.adapter_dir, fine_tuned.held_out)
    assert abs(resumed - straight) < 1e-3
    a = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(fine_tuned.result.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # exact on CPU


def test_learning_rate_zero_leaves_the_base_unchanged(
    tiny_lm_path: Path, split, tmp_path: Path
) -> None:
    train, held = split
    params = TrainingParams(learning_rate=0.0, max_steps=3, checkpoint_every=0)
    result = LoraTrainer().train(str(tiny_lm_path), train, params, NullContext(), tmp_path)
    base = load_lm(str(tiny_lm_path), device="cpu")
    same = load_lm(str(tiny_lm_path), str(result.adapter_dir), device="cpu")
    prompts, completions = [e.prompt for e in held], [e.completion for e in held]
    np.testing.assert_array_equal(
        same.completion_nll(prompts, completions), base.completion_nll(prompts, completions)
    )
    assert same.generate(prompts[:8]) == base.generate(prompts[:8])


def test_an_adapter_loads_from_a_remote_store(
    fine_tuned: Run, tiny_lm_path: Path, unique_name: str
) -> None:
    store = ArtifactStore(f"memory://{unique_name}")
    uri = store.put_dir(fine_tuned.result.adapter_dir, "models/m/v2/adapter")
    assert uri.startswith("memory://")
    remote = load_lm(str(tiny_lm_path), uri, device="cpu")
    local = load_lm(str(tiny_lm_path), str(fine_tuned.result.adapter_dir), device="cpu")
    prompts = [e.prompt for e in fine_tuned.held_out[:6]]
    assert remote.generate(prompts) == local.generate(prompts)


def test_trainers_are_found_by_entry_point_or_import_path() -> None:
    assert isinstance(load_trainer("lora"), LoraTrainer)
    assert isinstance(load_trainer("genmon.retrain.trainer:LoraTrainer"), LoraTrainer)
    assert isinstance(load_trainer("lora"), Trainer)
    with pytest.raises(TrainerNotFound, match=r"genmon\.trainers.*known: .*lora"):
        load_trainer("no-such-trainer")
    with pytest.raises(TrainerNotFound, match="not importable"):
        load_trainer("genmon.retrain.trainer:NoSuchTrainer")
    with pytest.raises(TrainerNotFound, match="no train"):
        load_trainer("genmon.retrain.trainer:TrainingParams")


def test_training_params_name_what_is_wrong(tiny_lm_path: Path, tmp_path: Path) -> None:
    params = TrainingParams.from_dict({"learning_rate": 5e-4, "max_steps": 10})
    assert (params.learning_rate, params.max_steps, params.lora_r) == (5e-4, 10, 8)
    assert TrainingParams.from_dict(params.to_dict()) == params
    from_yaml = TrainingParams.from_dict({"learning_rate": "1e-3", "max_steps": 20.0})
    assert (from_yaml.learning_rate, from_yaml.max_steps) == (1e-3, 20)
    with pytest.raises(ConfigurationError, match=r"max_steps: 2\.5 is not int"):
        TrainingParams.from_dict({"max_steps": 2.5})
    with pytest.raises(ConfigurationError, match="lora_r: 'big' is not int"):
        TrainingParams.from_dict({"lora_r": "big"})
    with pytest.raises(ConfigurationError, match=r"\['learnig_rate'\]"):
        TrainingParams.from_dict({"learnig_rate": 1e-3})
    with pytest.raises(ConfigurationError, match="max_steps must be >= 1"):
        TrainingParams(max_steps=0)
    weighted = TrainingParams.from_dict(
        {"beta": "0.2", "desirable_weight": 2, "undesirable_weight": None}
    )
    assert (weighted.beta, weighted.desirable_weight, weighted.undesirable_weight) == (
        0.2,
        2.0,
        None,
    )
    assert TrainingParams.from_dict(weighted.to_dict()) == weighted
    with pytest.raises(
        ConfigurationError, match="desirable_weight: 'heavy' is not a number or null"
    ):
        TrainingParams.from_dict({"desirable_weight": "heavy"})
    with pytest.raises(ConfigurationError, match="dataset is empty"):
        LoraTrainer().train(str(tiny_lm_path), [], TrainingParams(), NullContext(), tmp_path)


def test_batches_depend_on_the_seed_and_step_only() -> None:
    steps = [batch_indices(10, s, 4, seed=7) for s in range(1, 6)]
    assert steps == [batch_indices(10, s, 4, seed=7) for s in range(1, 6)]
    stream = [i for b in steps for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream != [i for s in range(1, 6) for i in batch_indices(10, s, 4, seed=8)]


def test_the_artifact_store_hides_unfinished_uploads(tmp_path: Path, unique_name: str) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.json").write_text("{}")
    (source / "sub" / "b.bin").write_bytes(b"\x00\x01")
    for store in (ArtifactStore(str(tmp_path / "store")), ArtifactStore(f"memory://{unique_name}")):
        uri = store.put_dir(source, "jobs/j1/checkpoints/step-10")
        assert uri == store.uri("jobs/j1/checkpoints/step-10") and store.exists(uri)
        got = store.get_dir(uri, tmp_path / f"got-{store.local}")
        assert (got / "sub" / "b.bin").read_bytes() == b"\x00\x01" and not (got / COMPLETE).exists()
        assert store.put_dir(source, "jobs/j1/checkpoints/step-10") == uri  # rewrite in place
        text = store.put_text("jobs/j1/manifest.json", '{"n": 1}')
        assert store.get_text(text) == '{"n": 1}' and store.exists(text)
        assert not store.exists(store.uri("jobs/j1/nothing"))
        store.fs.rm(f"{store.root}/jobs/j1/checkpoints/step-10/{COMPLETE}")
        assert not store.exists(uri)
        with pytest.raises(ArtifactError, match="incomplete"):
            store.get_dir(uri, tmp_path / "never")
        with pytest.raises(ArtifactError, match="relative path"):
            store.uri("../escape")
    leftovers = [p.name for p in (tmp_path / "store" / "jobs" / "j1" / "checkpoints").iterdir()]
    assert leftovers == ["step-10"]  # staging folders are renamed away, never left behind


def test_a_checkpoint_resumes_only_the_run_it_belongs_to(
    fine_tuned: Run, tiny_lm_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    last = (60, fine_tuned.ctx.checkpoints[60])
    done = RecordingContext(keep=tmp_path / "k1", resume_from=last)
    result = LoraTrainer().train(
        str(tiny_lm_path), fine_tuned.examples, TrainingParams(), done, tmp_path / "a"
    )
    assert done.reports == [] and result.final_loss == fine_tuned.result.final_loss
    other = RecordingContext(keep=tmp_path / "k2", resume_from=last)
    params = TrainingParams(max_steps=2, checkpoint_every=0)
    with caplog.at_level("WARNING", logger="genmon.retrain.trainer"):
        LoraTrainer().train(str(tiny_lm_path), fine_tuned.examples, params, other, tmp_path / "b")
    assert [r[0] for r in other.reports] == [1, 2]
    assert "other params or data" in caplog.text


def test_training_from_the_serving_adapter_keeps_what_it_learned(
    fine_tuned: Run, tiny_lm_path: Path, tmp_path: Path
) -> None:
    # With learning rate 0 the new adapter is exactly the one it started from, not the base.
    params = TrainingParams(
        learning_rate=0.0,
        max_steps=2,
        checkpoint_every=0,
        init_adapter=str(fine_tuned.result.adapter_dir),
    )
    held = fine_tuned.held_out[:8]
    result = LoraTrainer().train(str(tiny_lm_path), held, params, NullContext(), tmp_path)
    continued = load_lm(str(tiny_lm_path), str(result.adapter_dir), device="cpu")
    started = load_lm(str(tiny_lm_path), str(fine_tuned.result.adapter_dir), device="cpu")
    base = load_lm(str(tiny_lm_path), device="cpu")
    prompts, completions = [e.prompt for e in held], [e.completion for e in held]
    ours = continued.completion_nll(prompts, completions)
    np.testing.assert_allclose(ours, started.completion_nll(prompts, completions), atol=1e-6)
    assert ours.mean() < base.completion_nll(prompts, completions).mean() - 0.1
