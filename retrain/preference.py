"""Preference training from feedback: KTO on thumbs and scores, DPO on corrections.

Most feedback is a thumbs up or down with no correction. KTO learns from exactly that
(an *unpaired* set of prompt, completion, desirable-or-not); a correction gives DPO a
pair (chosen = the correction, rejected = the response served). Both run on TRL's
trainers with LoRA, from the same start as the SFT loop (:func:`genmon.retrain.trainer.
peft_model`: the same base resolving, ``init_adapter``, seed), and write the same adapter
folder with ``genmon_training.json`` (strategy, beta, class weights).

Texts reach TRL already framed: a prompt and its completion are encoded exactly as the
SFT loop encodes them (the one prompt template, or the base's chat template when the
example carries ``messages``; the same truncation) and decoded back, so the three
strategies train the model on the same text.

Progress, checkpoints and resume go through a ``TrainerCallback``: each step reports to
``ctx.progress``; each checkpoint TRL saves (adapter, optimizer, scheduler, RNG) is
stamped with what it belongs to and handed to ``ctx.checkpoint``; a run resumes from
``ctx.resume()``'s folder when the stamp matches (TRL's ``resume_from_checkpoint``),
else it starts again, as the SFT loop does.

TRL has moved its trainers' import paths between releases; :func:`load_trl` is the one
place that imports it, and the retrain extra pins the minor release (:data:`TRL_PINNED`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.lm import pick_device, quiet_transformers
from genmon.retrain.preference_data import STRATEGIES
from genmon.retrain.trainer import (
    WARMUP_FRACTION,
    TrainContext,
    Trainer,
    TrainingParams,
    TrainResult,
    encode_sft,
    gpu_mb,
    load_trainer,
    peft_model,
    write_training_meta,
)

log = logging.getLogger(__name__)

#: The TRL releases genmon is tested with (the ``retrain`` extra's pin).
TRL_PINNED = "trl>=1.16,<1.17"
#: The weighted desirable : undesirable ratio genmon aims for, inside the KTO paper's
#: recommended 1:1 to 4:3 band (TRL warns outside it).
KTO_TARGET_RATIO = 7 / 6
KTO_BAND = (1.0, 4 / 3)
#: KTO estimates its KL term from the other completions of a batch: one alone is none.
KTO_MIN_BATCH = 2
KTO_RECOMMENDED_BATCH = 4
STAMP = "genmon_checkpoint.json"


@dataclass(frozen=True)
class Trl:
    """TRL's trainers and their configs, wherever this release keeps them."""

    KTOTrainer: Any
    KTOConfig: Any
    DPOTrainer: Any
    DPOConfig: Any


def load_trl() -> Trl:
    """TRL's KTO and DPO trainers: from ``trl``, else ``trl.experimental.kto`` (where KTO
    lived for a while); without TRL, an error that says what to install."""
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError as exc:
        raise _missing_trl(exc) from exc
    try:
        from trl import KTOConfig, KTOTrainer
    except ImportError:
        try:
            from trl.experimental.kto import KTOConfig, KTOTrainer
        except ImportError as exc:
            raise _missing_trl(exc) from exc
    return Trl(KTOTrainer, KTOConfig, DPOTrainer, DPOConfig)


def _missing_trl(exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"training strategies kto and dpo need TRL ({TRL_PINNED}), which did not import "
        f"({exc}): pip install 'genmon[retrain]'"
    )


def trainer_for_strategy(strategy: str, trainer_name: str) -> Trainer:
    """The trainer of ``strategy``: ``sft`` is the policy's ``training.trainer`` (``lora``,
    or a plugged-in one); ``kto`` and ``dpo`` are genmon's TRL trainers whatever it names,
    since a plugged-in trainer takes SFT examples and would learn the thumbs-down ones."""
    if strategy == "sft":
        return load_trainer(trainer_name)
    if strategy == "kto":
        return KtoTrainer()
    if strategy == "dpo":
        return DpoTrainer()
    raise ConfigurationError(
        f"unknown training strategy {strategy!r}; pick one of {list(STRATEGIES)}"
    )


# --- the data ---------------------------------------------------------------------------


def framed(
    tokenizer: Any, example: SftExample, completion: str, max_length: int
) -> tuple[str, str]:
    """``(prompt, completion)`` texts as the SFT loop would train them: framed, truncated,
    the completion ending with the token that ends the turn."""
    example = SftExample(prompt=example.prompt, completion=completion, messages=example.messages)
    ids, labels = encode_sft(tokenizer, example, max_length)
    cut = next(i for i, label in enumerate(labels) if label != -100)
    text = partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return str(text(ids[:cut])), str(text(ids[cut:]))


def kto_rows(
    tokenizer: Any, examples: Sequence[SftExample], max_length: int
) -> list[dict[str, Any]]:
    """KTO's unpaired rows ``{prompt, completion, label}``. A thumb or score is one row;
    a correction is two: the correction desirable, the response it replaced undesirable."""
    rows = []
    for e in examples:
        if e.desirable is not None:
            labelled = [(e.completion, e.desirable)]
        else:
            labelled = [(e.completion, True)] + ([(e.rejected, False)] if e.rejected else [])
        for completion, label in labelled:
            prompt, text = framed(tokenizer, e, completion, max_length)
            rows.append({"prompt": prompt, "completion": text, "label": bool(label)})
    return rows


def dpo_rows(
    tokenizer: Any, examples: Sequence[SftExample], max_length: int
) -> list[dict[str, Any]]:
    """DPO's pairs ``{prompt, chosen, rejected}``: the corrections that have the response
    they replaced (thumbs carry no pair and are left out). Cut to ``max_length``, the two
    share the prompt cut for the longer completion, so both fit."""
    rows = []
    for e in examples:
        if e.rejected is None or e.desirable is not None:
            continue
        prompt, chosen = framed(tokenizer, e, e.completion, max_length)
        other, rejected = framed(tokenizer, e, e.rejected, max_length)
        prompt = min(prompt, other, key=len)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def kto_weights(
    desirable: int,
    undesirable: int,
    desirable_weight: float | None = None,
    undesirable_weight: float | None = None,
) -> tuple[float, float]:
    """KTO's class weights: those given, the others computed so that
    ``desirable_weight * desirable : undesirable_weight * undesirable`` is
    :data:`KTO_TARGET_RATIO`. Computed, the larger class keeps weight 1 and the smaller
    is weighted up. One class alone trains with weights 1."""
    if desirable == 0 or undesirable == 0:
        return desirable_weight or 1.0, undesirable_weight or 1.0
    if desirable_weight is not None and undesirable_weight is not None:
        ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
        if not KTO_BAND[0] <= ratio <= KTO_BAND[1]:
            log.warning(
                "KTO class weights give a weighted desirable:undesirable ratio of %.2f, "
                "outside the recommended 1 to 1.33; leave them unset to have them computed",
                ratio,
            )
        return desirable_weight, undesirable_weight
    if desirable_weight is not None:
        return desirable_weight, desirable_weight * desirable / (KTO_TARGET_RATIO * undesirable)
    if undesirable_weight is not None:
        return KTO_TARGET_RATIO * undesirable_weight * undesirable / desirable, undesirable_weight
    if desirable >= KTO_TARGET_RATIO * undesirable:
        return 1.0, desirable / (KTO_TARGET_RATIO * undesirable)
    return KTO_TARGET_RATIO * undesirable / desirable, 1.0


def _shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Rows in an order drawn from the seed: KTO reads them in order (its KL term pairs
    each completion with a neighbour's prompt), and a dataset sorted by class would give
    batches of one class."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order


# --- the trainers -----------------------------------------------------------------------


class PreferenceTrainer:
    """What KTO and DPO share: the model, TRL's config, progress, checkpoints, the adapter."""

    strategy = ""

    def train(
        self,
        base_uri: str,
        examples: Sequence[SftExample],
        params: TrainingParams,
        ctx: TrainContext,
        out_dir: Path,
    ) -> TrainResult:
        from datasets import Dataset
        from transformers import PrinterCallback, ProgressCallback

        trl = load_trl()
        quiet_transformers()
        _quiet_datasets()
        device = pick_device(params.device)
        model, tokenizer = peft_model(base_uri, params, device)
        rows, settings = self.rows(tokenizer, examples, params)
        stamp = {
            "strategy": self.strategy,
            "params": {k: v for k, v in params.to_dict().items() if k not in _MACHINE},
            "data": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
        }
        out_dir = Path(out_dir)
        config = self.config(trl, _common_args(params, device, out_dir), params, settings)
        callback = _callback(ctx, params, stamp, device)
        trainer = self.trainer(trl, model, config, Dataset.from_list(rows), tokenizer, callback)
        for printer in (PrinterCallback, ProgressCallback):  # worker logs, not stdout
            trainer.remove_callback(printer)
        trainer.train(resume_from_checkpoint=_resume_from(ctx, stamp, trainer.model))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        loss = float(losses[-1]) if losses else math.nan
        adapter_dir = out_dir / "adapter"
        trainer.model.save_pretrained(
            str(adapter_dir), selected_adapters=["default"], safe_serialization=True
        )
        write_training_meta(
            adapter_dir, base_uri, params, len(rows), loss, strategy=self.strategy, **settings
        )
        return TrainResult(adapter_dir=adapter_dir, steps=params.max_steps, final_loss=loss)

    def rows(
        self, tokenizer: Any, examples: Sequence[SftExample], params: TrainingParams
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        raise NotImplementedError

    def config(
        self, trl: Trl, common: dict[str, Any], params: TrainingParams, settings: dict[str, Any]
    ) -> Any:
        raise NotImplementedError

    def trainer(
        self, trl: Trl, model: Any, config: Any, dataset: Any, tokenizer: Any, callback: Any
    ) -> Any:
        raise NotImplementedError


class KtoTrainer(PreferenceTrainer):
    """KTO (Ethayarajh et al., 2024) on thumbs and scores, with LoRA.

    TRL's constraints hold: a per-device batch of at least 2 (its KL estimate needs other
    completions; 4 or more recommended) and class weights in the recommended band,
    computed from the class counts unless the policy sets them (:func:`kto_weights`).

    The learning rate is the policy's ``learning_rate``: TRL's 5e-7 to 5e-6 is for full
    fine-tunes; LoRA moves far fewer weights and wants about ten times more on a real base
    (5e-6 to 5e-5), and the tiny test model the default 1e-3 (measured in
    tests/retrain/test_retrain_kto.py).
    """

    strategy = "kto"

    def rows(
        self, tokenizer: Any, examples: Sequence[SftExample], params: TrainingParams
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if params.batch_size < KTO_MIN_BATCH:
            raise ConfigurationError(
                f"KTO needs batch_size >= {KTO_MIN_BATCH} (its KL estimate pairs each prompt "
                f"with another example's completion); {KTO_RECOMMENDED_BATCH} or more is "
                "recommended: set training.params.batch_size"
            )
        if params.batch_size < KTO_RECOMMENDED_BATCH:
            log.warning(
                "KTO with batch_size %d: %d or more is recommended",
                params.batch_size,
                KTO_RECOMMENDED_BATCH,
            )
        rows = kto_rows(tokenizer, examples, params.max_length)
        if len(rows) < KTO_MIN_BATCH:
            raise ConfigurationError(
                f"KTO needs at least {KTO_MIN_BATCH} examples, got {len(rows)}: "
                "collect more thumbs or scores first"
            )
        good = sum(r["label"] for r in rows)
        weights = kto_weights(
            good, len(rows) - good, params.desirable_weight, params.undesirable_weight
        )
        settings = {
            "beta": params.beta,
            "desirable": good,
            "undesirable": len(rows) - good,
            "desirable_weight": weights[0],
            "undesirable_weight": weights[1],
        }
        return _shuffled(rows, params.seed), settings

    def config(
        self, trl: Trl, common: dict[str, Any], params: TrainingParams, settings: dict[str, Any]
    ) -> Any:
        return trl.KTOConfig(
            **common,
            beta=params.beta,
            desirable_weight=settings["desirable_weight"],
            undesirable_weight=settings["undesirable_weight"],
        )

    def trainer(
        self, trl: Trl, model: Any, config: Any, dataset: Any, tokenizer: Any, callback: Any
    ) -> Any:
        return trl.KTOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )


class DpoTrainer(PreferenceTrainer):
    """DPO (Rafailov et al., 2023) on corrections, with LoRA: chosen = the correction,
    rejected = the response it replaced. Examples without a rejected response (and
    thumbs) are left out; none left is an error. Learning rate as for :class:`KtoTrainer`."""

    strategy = "dpo"

    def rows(
        self, tokenizer: Any, examples: Sequence[SftExample], params: TrainingParams
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows = dpo_rows(tokenizer, examples, params.max_length)
        if not rows:
            raise ConfigurationError(
                "DPO needs corrections of a logged response (chosen/rejected pairs) and the "
                "dataset has none: use strategy sft or kto, or send corrections"
            )
        return rows, {"beta": params.beta, "pairs": len(rows)}

    def config(
        self, trl: Trl, common: dict[str, Any], params: TrainingParams, settings: dict[str, Any]
    ) -> Any:
        return trl.DPOConfig(**common, beta=params.beta)

    def trainer(
        self, trl: Trl, model: Any, config: Any, dataset: Any, tokenizer: Any, callback: Any
    ) -> Any:
        return trl.DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )


# --- TRL's run: arguments, progress, checkpoints ------------------------------------------

#: Params that do not change what a run computes (a checkpoint resumes across them).
_MACHINE = ("checkpoint_every", "device")


def _common_args(params: TrainingParams, device: str, out_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by KTO and DPO: the SFT loop's schedule (linear warm-up
    over the first 10 % of the steps, then linear decay), clipping and batch; fp32 on CPU,
    bf16 on CUDA; no reporting, no hub, no progress bars."""
    cuda = device.startswith("cuda")
    return {
        "output_dir": str(out_dir / "checkpoints"),
        "max_steps": params.max_steps,
        "per_device_train_batch_size": params.batch_size,
        "gradient_accumulation_steps": params.grad_accum,
        "learning_rate": params.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, math.ceil(params.max_steps * WARMUP_FRACTION)),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": params.max_length,
        "seed": params.seed,
        "data_seed": params.seed,
        "use_cpu": not cuda,
        "bf16": cuda,
        "gradient_checkpointing": False,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps" if params.checkpoint_every else "no",
        "save_steps": params.checkpoint_every or 1,
        "save_total_limit": 1,
        "report_to": "none",
        "push_to_hub": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }


def _quiet_datasets() -> None:
    """No progress bars for TRL's tokenizing ``map`` calls (worker logs)."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def _resume_from(ctx: TrainContext, stamp: dict[str, Any], model: Any) -> str | None:
    """The folder of the checkpoint ``ctx`` offers when it belongs to this run, else
    ``None`` (train from step 1, with a warning, as the SFT loop does).

    The trained adapter is restored here: TRL keeps a frozen ``ref`` copy of the starting
    adapter beside it, and transformers, finding adapters in subfolders of a checkpoint,
    loads only those (the ``ref`` copy), not the trained one at its root."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = ctx.resume()
    if found is None:
        return None
    step, folder = found
    try:
        theirs = json.loads((Path(folder) / STAMP).read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs != stamp:
        log.warning(
            "checkpoint at step %s was made with other params or data; training from step 1",
            step,
        )
        return None
    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights, adapter_name="default")
    return str(folder)


def _callback(ctx: TrainContext, params: TrainingParams, stamp: dict[str, Any], device: str) -> Any:
    """A TrainerCallback that reports each step to ``ctx`` and hands it each checkpoint."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self) -> None:
            self.began = time.perf_counter()
            self.elapsed = 1e-9
            self.tokens = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.elapsed = max(time.perf_counter() - self.began, 1e-9)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            seen = float(logs.get("num_tokens", self.tokens))
            tokens, self.tokens = seen - self.tokens, seen
            ctx.progress(
                state.global_step,
                state.max_steps,
                float(logs["loss"]),
                params.batch_size * params.grad_accum / self.elapsed,
                tokens / self.elapsed,
                gpu_mb(device),
            )

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / STAMP).write_text(json.dumps(stamp, indent=2))
            ctx.checkpoint(state.global_step, folder)

    return Reporter()
