"""The standalone GPU training benchmark (bench/retrain/gpu.py) runs on CPU so it cannot rot.

Its CPU smoke mode trains a tiny Qwen2 a few steps through genmon's trainers and the plain
loop and must write tokens/s, peak memory (null on CPU) and the MFU fields; its FLOP
count must agree with torch's own counter on the passes the plain loop runs; its model
must be Qwen2.5-0.5B's published architecture.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.retrain import gpu
from bench.retrain.plain import LoopConfig, PlainLoop, load_peft_model
from genmon.retrain.lm import PROMPT_TEMPLATE

REPO = Path(__file__).resolve().parents[2]


def test_the_script_starts_alone() -> None:
    """``python bench/retrain/gpu.py`` from the repository root finds its package."""
    done = subprocess.run(
        [sys.executable, "bench/retrain/gpu.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--cpu-smoke" in done.stdout


def test_cpu_smoke_writes_rates_memory_and_mfu(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "gpu"
    assert gpu.main(["--cpu-smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["strategy"], r["side"]) for r in rows] == [
        (s, side) for s in ("sft", "kto", "dpo") for side in ("genmon", "plain")
    ]
    for r in rows:
        assert r["error"] is None, r
        assert r["tokens_per_s"] > 0 and r["examples_per_s"] > 0
        assert r["measured_steps"] == 2  # 3 steps, the first the warm-up
        assert r["peak_memory_mb"] is None and r["mfu"] is None  # CPU: no GPU, no peak
        assert r["model_flops_per_step"] > 0 and r["achieved_tflops"] > 0
    # Both sides train rows of the same length: the same tokens per step, counted alike.
    for strategy in ("sft", "kto", "dpo"):
        per_side = {r["side"]: r["tokens_per_step"] for r in rows if r["strategy"] == strategy}
        rows_per_step = 4 * (2 if strategy == "dpo" else 1)
        assert per_side == {
            "genmon": rows_per_step * 64,
            "plain": rows_per_step * 64,
        }, strategy
    formula = results["mfu_formula"]
    assert {"mfu", "trained_row", "forward_reference", "kto_step", "dpo_step"} <= set(formula)
    assert "(4 N + 6 P) t" in formula["trained_row"]
    assert results["model"]["architecture"] == "Qwen2ForCausalLM"
    table = (out / "table.md").read_text()
    assert "| strategy | side | examples/s | tokens/s | peak GPU memory (GiB)" in table
    assert "| dpo | plain |" in table and "MFU" in table


@pytest.mark.parametrize("strategy", ["sft", "kto", "dpo"])
def test_flop_count_agrees_with_torchs_counter(strategy: str) -> None:
    """The formula counts the passes the plain loop runs: within 2 % of torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    shape = gpu.SMOKE_SHAPE
    with tempfile.TemporaryDirectory() as folder:
        arch, tokenizer = gpu.build_base(Path(folder), True, torch.float32, shape.max_length)
        rows = gpu.encoded_examples(strategy, tokenizer, gpu.synthetic_texts(shape))
        config = LoopConfig(steps=1, batch_size=4, max_length=shape.max_length, lora_r=16)
        loop = PlainLoop(load_peft_model(folder, config, "cpu"), rows, config, 0, "cpu")
        with FlopCounterMode(display=False) as counter:
            loop.run(strategy)
    length = len(rows[0].prompt) + len(rows[0].completion)
    lengths = [length] * 4 * (2 if strategy == "dpo" else 1)
    counted = gpu.flop_model(arch, 16).step(strategy, lengths)
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_the_model_is_qwen25_05b() -> None:
    """Built on the meta device: the published 494,032,768 parameters, 24 layers, tied."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = gpu.model_config(tiny=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    flops = gpu.flop_model(config, 16)
    assert flops.layers == 24 and flops.query_width == 896
    # The blocks' linear layers plus the tied head (151,936 x 896), counted once.
    assert flops.n_base == 357_826_560 + 151_936 * 896


def test_peak_flops_by_device_name() -> None:
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989.4e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("NVIDIA GeForce RTX 4090") is None
    assert gpu.peak_flops(None) is None


def test_prompts_are_framed_as_genmon_frames_them() -> None:
    assert gpu.PROMPT_TEMPLATE == PROMPT_TEMPLATE
