"""The baseline: a plain transformers + PEFT training loop, one per strategy.

What a practitioner writes by hand around ``AutoModelForCausalLM`` and ``get_peft_model``:
AdamW on the LoRA weights, a constant learning rate, gradient clipping at 1.0, no
checkpoints, no progress reports. Each strategy computes the loss genmon's trainer of that
name computes:

- ``sft``: the mean over the batch of each row's mean NLL of its completion tokens (the
  prompt masked to -100);
- ``kto``: TRL's KTO loss (``loss_type="kto"``): ``1 - sigmoid(beta * (logratio - kl))``
  for desirable rows, ``1 - sigmoid(beta * (kl - logratio))`` for undesirable ones,
  weighted by ``desirable_weight`` / ``undesirable_weight``, averaged; ``logratio`` is the
  summed completion log-probability under the policy minus under the reference, and
  ``kl`` TRL's batch estimate: the same log-ratio on mismatched pairs (prompt ``i`` with
  completion ``i - 1`` of the batch), averaged, detached, clamped at 0. Four forward
  passes per step, as TRL runs them: policy (with gradient), policy on the KL pairs, and
  the reference on both (no gradient);
- ``dpo``: the sigmoid DPO loss ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
  on summed completion log-probabilities; chosen and rejected go through the policy in
  one batch (with gradient) and through the reference in one (no gradient).

The reference is the base itself: the adapter disabled (``model.disable_adapter()``), as
TRL does for a PEFT model without ``ref_model``. This module needs only torch,
transformers and peft, so the standalone GPU script (``bench/retrain/gpu.py``) can use it
on a machine without genmon installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("sft", "kto", "dpo")


@dataclass(frozen=True)
class Encoded:
    """One training example as token ids: the prompt, the completion (end of sequence
    included), and for DPO the rejected completion, for KTO the label."""

    prompt: list[int]
    completion: list[int]
    rejected: list[int] | None = None
    desirable: bool | None = None


@dataclass(frozen=True)
class LoopConfig:
    """The hyperparameters both sides share (genmon's side gets them as TrainingParams)."""

    steps: int = 20
    batch_size: int = 8
    max_length: int = 128
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: list[str] | str = "all-linear"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    seed: int = 0


@dataclass
class Measurement:
    """What one run saw: a timestamp after every step (``perf_counter``), the non-pad
    tokens of the rows trained on (with gradient) and the examples of every step."""

    step_ends: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None

    def rates(self) -> dict[str, float]:
        """examples/s and tokens/s over steps 2..n: the first step (allocations, lazy
        initialisation, kernel selection) is the warm-up and not counted."""
        if len(self.step_ends) < 2:
            raise ValueError("at least 2 steps are needed: the first is the warm-up")
        elapsed = self.step_ends[-1] - self.step_ends[0]
        return {
            "measured_steps": len(self.step_ends) - 1,
            "seconds": elapsed,
            "examples_per_s": sum(self.examples[1:]) / elapsed,
            "tokens_per_s": sum(self.tokens[1:]) / elapsed,
        }


def pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str) -> tuple[Any, ...]:
    """``(input_ids, labels, attention_mask)``, padded on the right, labels -100 there."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), labels.to(device), mask.to(device)


def row(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Ids and labels of prompt + completion; too long, the prompt loses its start."""
    completion = completion[: max(1, max_length - 1)]
    prompt = prompt[-max(1, max_length - len(completion)) :]
    return prompt + completion, [-100] * len(prompt) + completion


def completion_logps(logits: Any, labels: Any) -> Any:
    """Summed log-probability of each row's labelled tokens (logits predict the next one)."""
    import torch

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_logps = -torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none"
    )
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def load_peft_model(
    base: Path | Any, config: LoopConfig, device: str, dtype: Any | None = None
) -> Any:
    """The base (a folder, or a model already built) with fresh LoRA weights, training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, str | Path):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    else:
        model = base
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    peft_model = get_peft_model(model, lora)
    peft_model.to(device)
    peft_model.train()
    return peft_model


def sequential_batches(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of ``step`` (1-based) when no sampler is given: the data in order, cycled."""
    start = (step - 1) * per_step
    return [(start + i) % n for i in range(per_step)]


class PlainLoop:
    """One strategy's plain loop over ``examples``; :meth:`run` trains and measures."""

    def __init__(
        self,
        model: Any,
        examples: Sequence[Encoded],
        config: LoopConfig,
        pad_id: int,
        device: str,
        batches: Callable[[int, int, int, int], list[int]] = sequential_batches,
    ) -> None:
        import torch

        self.model = model
        self.examples = list(examples)
        self.config = config
        self.pad_id = pad_id
        self.device = device
        self.batches = batches
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)

    def run(self, strategy: str) -> Measurement:
        import torch

        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")
        step_fn = {"sft": self._sft, "kto": self._kto, "dpo": self._dpo}[strategy]
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = Measurement()
        for step in range(1, self.config.steps + 1):
            idx = self.batches(len(self.examples), step, self.config.batch_size, self.config.seed)
            batch = [self.examples[i] for i in idx]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss, tokens = step_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            out.losses.append(float(loss.detach()))
            if cuda:
                torch.cuda.synchronize()
            out.step_ends.append(time.perf_counter())
            out.tokens.append(tokens)
            out.examples.append(len(batch))
        if cuda:
            out.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        return out

    def _rows(self, pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[Any, Any, Any]:
        return pad([row(p, c, self.config.max_length) for p, c in pairs], self.pad_id, self.device)

    def _logps(self, pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[Any, int]:
        input_ids, labels, mask = self._rows(pairs)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return completion_logps(logits, labels)[0], int(mask.sum())

    def _reference_logps(self, pairs: Sequence[tuple[list[int], list[int]]]) -> Any:
        import torch

        with torch.no_grad(), self.model.disable_adapter():
            return self._logps(pairs)[0]

    def _sft(self, batch: Sequence[Encoded]) -> tuple[Any, int]:
        input_ids, labels, mask = self._rows([(e.prompt, e.completion) for e in batch])
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        total, count = completion_logps(logits, labels)
        return (-total / count.clamp(min=1)).mean(), int(mask.sum())

    def _kto(self, batch: Sequence[Encoded]) -> tuple[Any, int]:
        import torch

        beta = self.config.beta
        pairs = [(e.prompt, e.completion) for e in batch]
        mismatched = [(e.prompt, batch[i - 1].completion) for i, e in enumerate(batch)]
        with torch.no_grad():
            kl_policy = self._logps(mismatched)[0]
        policy, tokens = self._logps(pairs)
        reference = self._reference_logps(pairs)
        kl_reference = self._reference_logps(mismatched)
        kl = (kl_policy - kl_reference).mean().detach().clamp(min=0)
        logratio = policy - reference
        good = torch.tensor([bool(e.desirable) for e in batch], device=logratio.device)
        losses = torch.where(
            good,
            self.config.desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl))),
            self.config.undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio))),
        )
        return losses.mean(), tokens

    def _dpo(self, batch: Sequence[Encoded]) -> tuple[Any, int]:
        import torch

        pairs = [(e.prompt, e.completion) for e in batch]
        pairs += [(e.prompt, e.rejected or []) for e in batch]
        policy, tokens = self._logps(pairs)
        reference = self._reference_logps(pairs)
        n = len(batch)
        margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
        return -torch.nn.functional.logsigmoid(self.config.beta * margin).mean(), tokens
