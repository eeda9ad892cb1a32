"""The tiny support-desk model and the one-model interface (genmon.retrain.lm).

The loop is only worth testing on a model that behaves as designed: it answers held-out
questions with their canned answers and refuses the "cards" topic, a flaw the refusal
detector sees. These tests pin that down, with the template, scoring and loading the rest
of the loop relies on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from retrain_support_model import DATA_DIR, SupportData, accuracy, refusal_rate

from genmon.detectors.quality.refusal import is_refusal
from genmon.exceptions import ConfigurationError
from genmon.retrain.lm import (
    CausalLM,
    ModelLoadError,
    encode_example,
    fingerprint_weights,
    format_prompt,
    load_lm,
    pick_device,
    resolve_base,
)
from genmon.retrain.tiny_lm import (
    ANSWERS,
    MARKER,
    REFUSAL,
    TOPICS,
    TinyLmConfig,
    build_tiny_lm,
    config_hash,
    support_pairs,
)


@pytest.fixture(scope="module")
def base_lm(tiny_lm_path: Path) -> CausalLM:
    import torch

    torch.set_num_threads(1)
    return load_lm(str(tiny_lm_path), device="cpu")


def test_the_model_answers_held_out_questions_and_refuses_cards(
    base_lm: CausalLM, support_data: SupportData
) -> None:
    assert is_refusal(REFUSAL)
    assert not any(is_refusal(a) for a in ANSWERS.values())
    assert accuracy(base_lm, support_data.healthy) >= 0.8
    assert refusal_rate(base_lm, [p.prompt for p in support_data.healthy]) <= 0.02
    assert accuracy(base_lm, support_data.refused, expected=REFUSAL) >= 0.9


def test_support_pairs_are_held_out_and_carry_the_corrections(support_data: SupportData) -> None:
    healthy, refused = support_data.healthy, support_data.refused
    share = len(refused) / (len(healthy) + len(refused))
    assert 0.10 <= share <= 0.16
    assert {p.intent for p in refused} == set(TOPICS["cards"])
    assert all(p.answer == ANSWERS[p.intent] and p.topic == "cards" for p in refused)
    assert all(p.topic != "cards" for p in healthy)
    train_healthy, train_refused = support_pairs(DATA_DIR, split="train")
    seen = {p.prompt.lower() for p in train_healthy + train_refused}
    assert not any(p.prompt.lower() in seen for p in healthy + refused)
    with pytest.raises(ConfigurationError, match="pick one of"):
        support_pairs(DATA_DIR, refuse_class="crypto")


def test_the_build_is_reused_when_nothing_changed(tiny_lm_path: Path) -> None:
    marker = (tiny_lm_path / MARKER).stat()
    weights = (tiny_lm_path / "model.safetensors").stat()
    again = build_tiny_lm(tiny_lm_path, data_dir=DATA_DIR, refuse_class="cards", seed=0)
    assert again == tiny_lm_path
    assert (tiny_lm_path / MARKER).stat().st_mtime_ns == marker.st_mtime_ns
    assert (tiny_lm_path / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
    recorded = json.loads((tiny_lm_path / MARKER).read_text())["config_hash"]
    assert recorded == config_hash(TinyLmConfig(), DATA_DIR, "cards", 0)
    # Anything that shapes the weights changes the key (and so rebuilds).
    assert config_hash(TinyLmConfig(), DATA_DIR, "cards", 1) != recorded
    assert config_hash(TinyLmConfig(), DATA_DIR, "top_up", 0) != recorded
    assert config_hash(TinyLmConfig(epochs=4), DATA_DIR, "cards", 0) != recorded


def test_the_fingerprint_is_stable_and_follows_the_weights(
    tiny_lm_path: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    original = fingerprint_weights(str(tiny_lm_path))
    assert original == fingerprint_weights(str(tiny_lm_path))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm_path, copy)
    assert fingerprint_weights(str(copy)) == original  # the place does not matter
    (copy / "tokenizer_config.json").write_text("{}")
    assert fingerprint_weights(str(copy)) == original  # only the weights do
    tensors = load_file(str(copy / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint_weights(str(copy)) != original


def test_completion_nll_prefers_the_right_answer(
    base_lm: CausalLM, support_data: SupportData
) -> None:
    pairs = support_data.healthy[:40:4]
    prompts = [p.prompt for p in pairs]
    right = base_lm.completion_nll(prompts, [p.answer for p in pairs], batch_size=3)
    wrong = base_lm.completion_nll(prompts, [REFUSAL] * len(pairs))
    assert right.shape == (len(pairs),) and right.dtype == np.float64
    assert (right < wrong).all()
    one_by_one = [base_lm.completion_nll([p.prompt], [p.answer])[0] for p in pairs]
    np.testing.assert_allclose(right, one_by_one, rtol=1e-5, atol=1e-6)  # padding is inert
    with pytest.raises(ValueError, match="prompts but"):
        base_lm.completion_nll(prompts, [])


def test_generation_is_greedy_one_line_and_batch_independent(
    base_lm: CausalLM, support_data: SupportData
) -> None:
    prompts = [p.prompt for p in support_data.healthy[:6]] + ["card?", "hi\nthere"]
    batched = base_lm.generate(prompts, batch_size=8)
    single = [base_lm.generate([p], batch_size=1)[0] for p in prompts]
    assert batched == single
    assert batched == base_lm.generate(prompts, batch_size=8)
    assert all("\n" not in a and a == a.strip() for a in batched)
    assert len(base_lm.generate(prompts[:1], max_new_tokens=3)[0]) < len(batched[0])


def test_the_template_frames_one_turn_and_loss_covers_the_completion_only(
    base_lm: CausalLM,
) -> None:
    assert format_prompt("where is\n\nmy   card") == "Customer: where is my card\nAgent:"
    ids, labels = encode_example(base_lm.tokenizer, "where is my card", "It is on its way.", 128)
    completion = [t for t in labels if t != -100]
    assert labels[: len(ids) - len(completion)] == [-100] * (len(ids) - len(completion))
    assert completion[-1] == base_lm.tokenizer.eos_token_id
    assert base_lm.tokenizer.decode(completion[:-1]) == " It is on its way."
    ids, labels = encode_example(base_lm.tokenizer, "word " * 200, "Short answer.", 32)
    assert len(ids) == 32 and base_lm.tokenizer.decode(ids, skip_special_tokens=True).endswith(
        "Agent: Short answer."
    )


def test_adapters_load_from_any_store_and_bases_resolve_offline(
    tiny_lm_path: Path, tmp_path: Path, unique_name: str
) -> None:
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ConfigurationError, match="no CUDA"):
        pick_device("cuda")
    assert resolve_base(f"file://{tiny_lm_path}") == tiny_lm_path
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="local Hugging Face cache"):
        resolve_base(f"genmon-tests/{unique_name}")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_base(str(tmp_path))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_lm(str(tiny_lm_path), adapter_uri=str(tmp_path), device="cpu")
