"""DPO on corrections: chosen = the correction, rejected = the refusal the tiny model served.
The model must come to prefer the correction over the refusal on card questions it never
trained on (the chosen-vs-rejected margin grows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from retrain_support_model import SupportData, corrections

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.lm import load_lm
from genmon.retrain.preference import DpoTrainer, dpo_rows
from genmon.retrain.tiny_lm import REFUSAL
from genmon.retrain.trainer import NullContext, TrainingParams

PARAMS = TrainingParams(max_steps=15, checkpoint_every=0)
#: Growth of the margin (NLL per token of the refusal minus that of the correction, nats)
#: on held-out card questions. Measured over seeds 0-1: -1.09 -> -0.61 (+0.48).
MARGIN_GROWTH = 0.2


def margin(base: Path, adapter: Path | None, support: SupportData) -> float:
    lm = load_lm(str(base), str(adapter) if adapter else None, device="cpu")
    held = support.refused[1::2]
    prompts = [p.prompt for p in held]
    rejected = lm.completion_nll(prompts, [REFUSAL] * len(prompts))
    chosen = lm.completion_nll(prompts, [p.answer for p in held])
    return float((rejected - chosen).mean())


def test_dpo_on_corrections_grows_the_chosen_over_rejected_margin(
    tiny_lm_path: Path, support_data: SupportData, tmp_path: Path
) -> None:
    import torch

    torch.set_num_threads(1)
    pairs = corrections(support_data.refused[::2], REFUSAL)
    thumb = SftExample(prompt="Hi", completion="Hello!", desirable=True)  # no pair: left out
    result = DpoTrainer().train(str(tiny_lm_path), [*pairs, thumb], PARAMS, NullContext(), tmp_path)
    before = margin(tiny_lm_path, None, support_data)
    after = margin(tiny_lm_path, result.adapter_dir, support_data)
    assert after - before >= MARGIN_GROWTH, (before, after)
    meta = json.loads((result.adapter_dir / "genmon_training.json").read_text())
    assert (meta["strategy"], meta["beta"], meta["pairs"]) == ("dpo", PARAMS.beta, len(pairs))


def test_dpo_pairs_come_from_corrections_only(tiny_lm_path: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    fix = SftExample(prompt="Where is my card?", completion="It arrives.", rejected=REFUSAL)
    assert dpo_rows(tokenizer, [fix, SftExample(prompt="x", completion="y")], 64) == [
        {
            "prompt": "Customer: Where is my card?\nAgent:",
            "chosen": " It arrives.<|endoftext|>",
            "rejected": f" {REFUSAL}<|endoftext|>",
        }
    ]
    thumbs = [SftExample(prompt="Hi", completion="Hello!", desirable=True)] * 4
    with pytest.raises(ConfigurationError, match="DPO needs corrections"):
        DpoTrainer().train(str(tiny_lm_path), thumbs, PARAMS, NullContext(), tmp_path)
