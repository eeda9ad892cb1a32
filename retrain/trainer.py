"""Fine-tuning a base model on feedback: the trainer contract and the LoRA trainer.

A job hands a :class:`Trainer` the base, the SFT examples, :class:`TrainingParams` and a
:class:`TrainContext` (progress and checkpoints go through it, so the job can fence them
on its lease and store them where another worker can resume). The result is a LoRA
adapter folder in safetensors: small, one per version, valid only on its base.

:class:`LoraTrainer` runs its own loop rather than ``transformers.Trainer`` because a
resume must land on the *same* weights as a run never interrupted (the acceptance test
compares held-out loss within 1e-3): the batch of step ``s`` is a pure function of the
seed and ``s``, the learning rate a pure function of ``s``, and a checkpoint holds the
adapter, the optimizer's moments and the RNG state, all restored before step ``s + 1``.

Users plug in their own trainer under the ``genmon.trainers`` entry point group (or name
``package.module:attr``); :func:`load_trainer` finds it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.exceptions import TrainerNotFound
from genmon.retrain.lm import (
    dtype_for,
    encode_chat,
    encode_example,
    fingerprint_weights,
    local_adapter,
    pad_right,
    per_example_nll,
    pick_device,
    quiet_transformers,
    resolve_base,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "genmon.trainers"
#: Share of the steps spent warming the learning rate up (then linear decay to 10 %).
WARMUP_FRACTION = 0.1
FINAL_LR_FACTOR = 0.1
#: Params that are a number or unset (``None``: genmon computes them).
OPTIONAL_FLOATS = ("desirable_weight", "undesirable_weight")


@dataclass
class TrainingParams:
    """Hyperparameters of a fine-tuning run (a policy's ``training.params``)."""

    learning_rate: float = 1e-3
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    max_length: int = 128
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "auto"
    init_adapter: str | None = None
    """Start from this adapter instead of fresh LoRA weights. genmon sets it to the serving
    version's adapter, so a new version keeps what the one it replaces learned (its
    dataset holds only the examples since that one's job)."""
    beta: float = 0.1
    """KTO and DPO: how far the tuned model may move from the one it starts from (higher:
    less). TRL's default."""
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    """KTO's class weights; ``None``: computed from the class counts so that
    (desirable_weight x desirable) : (undesirable_weight x undesirable) is 7:6, inside the
    1:1 to 4:3 band the KTO paper recommends (:func:`genmon.retrain.preference.kto_weights`)."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low}"
            for name, low in (
                ("learning_rate", 0),
                ("max_steps", 1),
                ("batch_size", 1),
                ("grad_accum", 1),
                ("lora_r", 1),
                ("max_length", 8),
                ("checkpoint_every", 0),
            )
            if getattr(self, name) < low
        ]
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout must be in [0, 1)")
        if not self.beta > 0:
            problems.append("beta must be > 0")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0 (or unset: computed from the data)")
        if problems:
            raise ConfigurationError("training params: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainingParams:
        """Params from a mapping; unknown keys are named in the error (typos train nothing)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"unknown training params {unknown}; known: {sorted(known)}")
        return cls(**{name: _coerce(name, value) for name, value in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any) -> Any:
    """A YAML value as its field's type: PyYAML reads ``1e-3`` as a string, and a policy
    should not fail on that."""
    default = next(f.default for f in fields(TrainingParams) if f.name == name)
    if name == "init_adapter" and (value is None or isinstance(value, str)):
        return value
    if name in OPTIONAL_FLOATS:
        if value is None:
            return None
        default = 1.0
    if name == "target_modules":
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        if isinstance(value, str):
            return [value]
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(default, float) and not math.isnan(number):
            return number
        if isinstance(default, int) and number.is_integer():
            return int(number)
    kinds = {"target_modules": "a list of module names", "init_adapter": "an adapter URI"}
    kinds |= dict.fromkeys(OPTIONAL_FLOATS, "a number or null")
    kind = kinds.get(name, type(default).__name__)
    raise ConfigurationError(f"training param {name}: {value!r} is not {kind}")


@dataclass
class TrainResult:
    """The adapter folder (safetensors), the steps run and the last step's loss."""

    adapter_dir: Path
    steps: int
    final_loss: float


@runtime_checkable
class TrainContext(Protocol):
    """What a trainer reports to, and resumes from: the job behind it."""

    def progress(
        self,
        step: int,
        total: int,
        loss: float,
        examples_per_s: float,
        tokens_per_s: float,
        gpu_memory_mb: float | None,
    ) -> None: ...

    def checkpoint(self, step: int, local_dir: Path) -> None: ...

    def resume(self) -> tuple[int, Path] | None: ...


@runtime_checkable
class Trainer(Protocol):
    """Fine-tunes ``base_uri`` on ``examples``; writes the adapter under ``out_dir``."""

    def train(
        self,
        base_uri: str,
        examples: Sequence[SftExample],
        params: TrainingParams,
        ctx: TrainContext,
        out_dir: Path,
    ) -> TrainResult: ...


class NullContext:
    """No progress, no checkpoints, nothing to resume: tests and local runs."""

    def progress(
        self,
        step: int,
        total: int,
        loss: float,
        examples_per_s: float,
        tokens_per_s: float,
        gpu_memory_mb: float | None,
    ) -> None:
        return None

    def checkpoint(self, step: int, local_dir: Path) -> None:
        return None

    def resume(self) -> tuple[int, Path] | None:
        return None


def lr_factor(step: int, max_steps: int) -> float:
    """Learning-rate multiplier of ``step`` (1-based): linear warm-up, linear decay to 10 %.

    A pure function of the step, so a resumed run uses the rates the first run would have."""
    warmup = max(1, math.ceil(max_steps * WARMUP_FRACTION))
    if step <= warmup:
        return step / warmup
    remaining = (max_steps - step) / max(1, max_steps - warmup)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * remaining


def batch_indices(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Example indices of ``step`` (1-based): a pure function of the seed and the step.

    The examples form an endless stream of epochs, each a permutation drawn from
    ``(seed, epoch)``; step ``s`` takes the ``s``-th slice of ``per_step`` of them."""
    import torch

    out: list[int] = []
    position = (step - 1) * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        take = min(per_step - len(out), n - offset)
        out.extend(order[offset : offset + take])
        position += take
    return out


def load_trainer(name: str) -> Trainer:
    """The trainer registered as ``name`` under ``genmon.trainers``, or ``pkg.module:attr``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TrainerNotFound(
                f"trainer {name!r} not importable ({exc}); give 'package.module:attr'"
            ) from exc
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise TrainerNotFound(
                f"no trainer {name!r} in entry point group {ENTRY_POINT_GROUP!r} (known: "
                f"{known}); register one in your package or name it as 'package.module:attr'"
            )
        obj = found[0].load()
    trainer = obj() if isinstance(obj, type) else obj
    if not callable(getattr(trainer, "train", None)):
        raise TrainerNotFound(f"trainer {name!r} has no train() method")
    return trainer


class LoraTrainer:
    """LoRA fine-tuning with transformers + PEFT in a deterministic, resumable loop."""

    def train(
        self,
        base_uri: str,
        examples: Sequence[SftExample],
        params: TrainingParams,
        ctx: TrainContext,
        out_dir: Path,
    ) -> TrainResult:
        import torch

        if not examples:
            raise ConfigurationError("no training examples: the dataset is empty")
        quiet_transformers()
        device = pick_device(params.device)
        model, tokenizer = peft_model(base_uri, params, device)
        encoded = [encode_sft(tokenizer, e, params.max_length) for e in examples]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
        out_dir = Path(out_dir)
        data_key = _data_key(encoded)
        start, loss = _resume(ctx, model, optimizer, params, data_key)
        for step in range(start + 1, params.max_steps + 1):
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = params.learning_rate * lr_factor(step, params.max_steps)
            loss, tokens = _step(model, optimizer, encoded, step, params, tokenizer, device)
            elapsed = max(time.perf_counter() - began, 1e-9)
            seen = params.batch_size * params.grad_accum
            ctx.progress(
                step, params.max_steps, loss, seen / elapsed, tokens / elapsed, gpu_mb(device)
            )
            if params.checkpoint_every and step % params.checkpoint_every == 0:
                folder = out_dir / "checkpoints" / f"step-{step:06d}"
                _save_checkpoint(folder, model, optimizer, step, params, data_key, loss)
                ctx.checkpoint(step, folder)
                _drop_older_checkpoints(folder)
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        write_training_meta(adapter_dir, base_uri, params, len(encoded), loss, strategy="sft")
        return TrainResult(adapter_dir=adapter_dir, steps=params.max_steps, final_loss=loss)


def encode_sft(tokenizer: Any, example: SftExample, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of an example: through the base's chat template when it
    carries ``messages`` (loss on the assistant's turn only), else the one prompt framing."""
    if example.messages:
        return encode_chat(tokenizer, example.messages, example.completion, max_length)
    return encode_example(tokenizer, example.prompt, example.completion, max_length)


def write_training_meta(
    adapter_dir: Path,
    base_uri: str,
    params: TrainingParams,
    examples: int,
    final_loss: float,
    **extra: Any,
) -> None:
    """``genmon_training.json`` beside the adapter: the base it is valid on (by weight
    fingerprint), how it was trained (strategy and its settings) and on how much."""
    meta = {
        "base_uri": base_uri,
        "base_fingerprint": fingerprint_weights(base_uri),
        "params": params.to_dict(),
        "examples": examples,
        "steps": params.max_steps,
        "final_loss": final_loss,
        **extra,
    }
    (adapter_dir / "genmon_training.json").write_text(json.dumps(meta, indent=2))


def peft_model(base_uri: str, params: TrainingParams, device: str) -> tuple[Any, Any]:
    """The base with fresh LoRA weights (drawn from the seed), or with ``init_adapter``'s,
    ready to train."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    base = resolve_base(base_uri)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype_for(device))
    torch.manual_seed(params.seed)
    if params.init_adapter is not None:
        adapter = local_adapter(params.init_adapter)
        tuned = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        tuned.to(device)
        tuned.train()
        return tuned, tokenizer
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=params.target_modules or "all-linear",
        task_type="CAUSAL_LM",
        # GPT-2-style models store projections as Conv1D (weights transposed).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    fresh = get_peft_model(model, config)
    fresh.to(device)
    fresh.train()
    return fresh, tokenizer


def _step(
    model: Any,
    optimizer: Any,
    encoded: list[tuple[list[int], list[int]]],
    step: int,
    params: TrainingParams,
    tokenizer: Any,
    device: str,
) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, tokens seen)."""
    import torch

    indices = batch_indices(len(encoded), step, params.batch_size * params.grad_accum, params.seed)
    total_loss, tokens = 0.0, 0
    for micro in range(params.grad_accum):
        rows = [
            encoded[i] for i in indices[micro * params.batch_size : (micro + 1) * params.batch_size]
        ]
        input_ids, labels, mask = pad_right(rows, int(tokenizer.pad_token_id), device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = per_example_nll(logits, labels).mean() / params.grad_accum
        loss.backward()
        total_loss += float(loss.detach())
        tokens += int(mask.sum())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, tokens


def gpu_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return float(torch.cuda.max_memory_allocated()) / 2**20


def _data_key(encoded: list[tuple[list[int], list[int]]]) -> str:
    """sha256 of the tokenized examples: a checkpoint resumes only the data it trained on."""
    return hashlib.sha256(json.dumps(encoded).encode()).hexdigest()


def _fingerprint(params: TrainingParams, data_key: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed by it."""
    keep = dict(params.to_dict())
    keep.pop("checkpoint_every")
    keep.pop("device")
    return {"params": keep, "data": data_key}


def _save_checkpoint(
    folder: Path,
    model: Any,
    optimizer: Any,
    step: int,
    params: TrainingParams,
    data_key: str,
    loss: float,
) -> None:
    """Adapter (PEFT, safetensors), optimizer moments (safetensors), RNG and step (JSON)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"state.{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {
        "step": step,
        "loss": loss,
        "param_groups": state["param_groups"],
        "scalars": scalars,
        **_fingerprint(params, data_key),
    }
    (folder / "trainer_state.json").write_text(json.dumps(meta, indent=2))


def _drop_older_checkpoints(latest: Path) -> None:
    """Local checkpoints are handed to ``ctx`` (which stores them); keep the latest only."""
    for folder in latest.parent.glob("step-*"):
        if folder != latest:
            shutil.rmtree(folder, ignore_errors=True)


def _resume(
    ctx: TrainContext, model: Any, optimizer: Any, params: TrainingParams, data_key: str
) -> tuple[int, float]:
    """Restore the last checkpoint ``ctx`` offers; return its step and loss (0: none)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = ctx.resume()
    if found is None:
        return 0, math.nan
    step, folder = found
    meta = json.loads((folder / "trainer_state.json").read_text())
    if {k: meta.get(k) for k in ("params", "data")} != _fingerprint(params, data_key):
        log.warning(
            "checkpoint at step %s was made with other params or data; training from step 1",
            step,
        )
        return 0, math.nan
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, adapter)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"]), float(meta["loss"])
