"""Training throughput on one GPU: a ~0.5B model, bf16, LoRA; genmon's trainers and a plain loop.

    python bench/retrain/gpu.py --out DIR               # on the GPU: at most 5 min on an H100
    python bench/retrain/gpu.py --cpu-smoke --out DIR   # CI: a tiny Qwen2 on CPU, 3 steps

The model is Qwen2.5-0.5B's architecture (its published config.json, written out in
:func:`model_config`; Qwen2ForCausalLM, 494M parameters, tied embeddings, vocabulary
151,936) with random weights: nothing is downloaded, and throughput does not depend on
what the weights are. The tokenizer is a byte-level one built here (one token per byte,
no merges) and the texts are random lowercase letters, so every row has exactly the
length asked for: prompt and completion framed by genmon's one template, 512 tokens in
all (64 in the smoke run). LoRA r=16, alpha=32 on every linear layer of the blocks (PEFT's
``all-linear``: q, k, v, o, gate, up, down; not the LM head).

For each strategy (SFT, KTO, DPO) genmon's trainer (when genmon, and for KTO/DPO TRL,
import here) and the plain transformers + PEFT loop of ``bench/retrain/plain.py`` train
``--steps`` steps on the same data with the same hyperparameters; rates and model FLOPs
utilisation count steps 2..n (the first is the warm-up). Peak memory is
``torch.cuda.max_memory_allocated()`` over the run (reset before it; ``null`` on CPU).

Model FLOPs utilisation (MFU) = model FLOPs of the measured steps / their wall time / the
device's peak dense bf16 FLOP/s (:data:`PEAK_BF16`; ``null`` on an unknown device or CPU).
Model FLOPs, for a row of t tokens, with

    N = weights of the base's matrix multiplies (every linear layer of the blocks and the
        LM head d x V, counted once although tied to the embedding; the embedding lookup
        is a gather: 0 FLOPs; norms, biases, softmax and rotary embeddings left out),
    P = LoRA parameters (r x (d_in + d_out) per adapted layer),
    L = layers, a = query width (heads x head dim = 896),

    forward, adapter on           F(t)  = 2(N + P) t + 4 L a t^2
    forward, reference (adapter off)  R(t)  = 2 N t + 4 L a t^2
    forward + backward, trained   T(t)  = (4 N + 6 P) t + 12 L a t^2

4N: the forward (2N) and a backward through the frozen base that computes activation
gradients only (2N; no weight gradients). 6P: LoRA's forward, activation and weight
gradients. Attention: QK^T and AV are 2 t^2 a FLOPs each per layer forward (the causal
mask not halved, as in PaLM's MFU); their backward (gradients of Q, K, V and the
probabilities) is twice the forward. Per step, the passes each strategy runs (TRL's, and
the plain loop's, which copies them):

    SFT  sum over the B rows of T(t)
    DPO  sum over the 2B rows (chosen and rejected) of T(t) + R(t)          (reference)
    KTO  sum over the B rows of T(t) + R(t), and over the B mismatched KL rows of
         F(t) (policy, no gradient) + R(t) (reference)

MFU credits model FLOPs only, not work done twice: on the smoke model torch's FLOP counter
agrees with this count within 1 % for the plain loop (autograd skips the first layer's
input gradients, which nothing needs; tests/retrain/test_retrain_bench_gpu_script.py),
and sees 5-7 % more matmul work in genmon's KTO and DPO, whose TRL 1.16 trainers compute
the log-probabilities with a fused LM head that redoes part of it.

Tokens/s counts the non-pad tokens of the rows trained with a gradient (DPO: chosen and
rejected; KTO: not the KL rows).

Needs torch, transformers, peft, tokenizers; for genmon's side genmon itself (installed,
e.g. ``pip install -e .`` of this repository) and for its KTO/DPO trl 1.16 (and datasets).
A side that cannot run is recorded with its error and the script goes on; a side that
would start past ``--budget-s`` seconds is skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.retrain.plain import (  # noqa: E402
    STRATEGIES,
    Encoded,
    LoopConfig,
    Measurement,
    PlainLoop,
    load_peft_model,
)

#: genmon's prompt framing (``genmon.retrain.lm.PROMPT_TEMPLATE``; a test keeps them equal).
PROMPT_TEMPLATE = "Customer: {prompt}\nAgent:"
EOS = "<|endoftext|>"
#: Peak dense bf16 tensor FLOP/s by device name (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class Shape:
    """The run's sizes: rows of ``prompt_chars + completion_chars + 19`` tokens."""

    steps: int
    batch_size: int
    max_length: int
    prompt_chars: int
    completion_chars: int
    examples: int


GPU_SHAPE = Shape(
    steps=30, batch_size=8, max_length=512, prompt_chars=173, completion_chars=320, examples=64
)
SMOKE_SHAPE = Shape(
    steps=3, batch_size=4, max_length=64, prompt_chars=21, completion_chars=24, examples=8
)


def model_config(tiny: bool) -> Any:
    """Qwen2.5-0.5B's config.json (``tiny``: the same family, a few thousand times smaller)."""
    from transformers import Qwen2Config

    if tiny:
        sizes: dict[str, Any] = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "max_window_layers": 2,
        }
    else:
        sizes = {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_window_layers": 24,
        }
    return Qwen2Config(
        **sizes,
        architectures=["Qwen2ForCausalLM"],
        attention_dropout=0.0,
        # Published: 151643 (Qwen's <|endoftext|>); here the byte tokenizer's end of text.
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        hidden_act="silu",
        initializer_range=0.02,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=32768,
        tie_word_embeddings=True,
        use_cache=False,
        use_sliding_window=False,
    )


def byte_tokenizer(max_length: int) -> Any:
    """One token per byte (no merges) plus the end-of-text token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS: 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=max_length,
    )


def build_base(folder: Path, tiny: bool, dtype: Any, max_length: int) -> tuple[Any, Any]:
    """Random weights of the architecture saved in ``folder`` with the byte tokenizer;
    returns (config, tokenizer)."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = model_config(tiny)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    tokenizer = byte_tokenizer(max_length)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    del model
    gc.collect()
    return config, tokenizer


def synthetic_texts(shape: Shape, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(prompt, completion, rejected)`` of random letters, exactly as long as asked."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    return [
        (text(shape.prompt_chars), text(shape.completion_chars), text(shape.completion_chars))
        for _ in range(shape.examples)
    ]


def encoded_examples(
    strategy: str, tokenizer: Any, texts: list[tuple[str, str, str]]
) -> list[Encoded]:
    """The plain loop's rows: genmon's framing, completion ended by the end-of-text token."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = int(tokenizer.eos_token_id)
    out = []
    for i, (prompt, completion, rejected) in enumerate(texts):
        out.append(
            Encoded(
                prompt=ids(PROMPT_TEMPLATE.format(prompt=prompt)),
                completion=[*ids(" " + completion), eos],
                rejected=[*ids(" " + rejected), eos] if strategy == "dpo" else None,
                desirable=(i % 2 == 0) if strategy == "kto" else None,
            )
        )
    return out


def genmon_examples(strategy: str, texts: list[tuple[str, str, str]]) -> list[Any]:
    """The same data as genmon's SftExamples."""
    from genmon.retrain.examples import SftExample

    return [
        SftExample(
            prompt=prompt,
            completion=completion,
            rejected=rejected if strategy == "dpo" else None,
            desirable=(i % 2 == 0) if strategy == "kto" else None,
        )
        for i, (prompt, completion, rejected) in enumerate(texts)
    ]


# --- FLOPs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """The sizes the FLOP count needs (see the module docstring for the formula)."""

    n_base: int
    n_lora: int
    layers: int
    query_width: int

    def forward(self, t: int, adapter: bool = True) -> float:
        return 2 * (self.n_base + (self.n_lora if adapter else 0)) * t + 4 * self.layers * (
            self.query_width * t * t
        )

    def trained(self, t: int) -> float:
        return (4 * self.n_base + 6 * self.n_lora) * t + 12 * self.layers * self.query_width * t * t

    def step(self, strategy: str, lengths: list[int]) -> float:
        """FLOPs of one step over rows of ``lengths`` (DPO: chosen then rejected rows)."""
        trained = sum(self.trained(t) for t in lengths)
        reference = sum(self.forward(t, adapter=False) for t in lengths)
        if strategy == "sft":
            return trained
        if strategy == "dpo":
            return trained + reference
        kl = sum(self.forward(t) + self.forward(t, adapter=False) for t in lengths)
        return trained + reference + kl


def flop_model(config: Any, lora_r: int) -> FlopModel:
    """N and P counted on the architecture built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n_base = sum(m.weight.numel() for _, m in linears)
    n_lora = sum(
        lora_r * (m.in_features + m.out_features) for name, m in linears if name != "lm_head"
    )
    head_dim = config.hidden_size // config.num_attention_heads
    return FlopModel(
        n_base=n_base,
        n_lora=n_lora,
        layers=config.num_hidden_layers,
        query_width=config.num_attention_heads * head_dim,
    )


def peak_flops(device_name: str | None) -> float | None:
    if device_name is None:
        return None
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


# --- the runs ------------------------------------------------------------------------------


def _plain(
    strategy: str,
    base: Path,
    rows: list[Encoded],
    config: LoopConfig,
    device: str,
    dtype: Any,
    pad_id: int,
) -> Measurement:
    model = load_peft_model(base, config, device, dtype)
    try:
        return PlainLoop(model, rows, config, pad_id, device).run(strategy)
    finally:
        del model


def _genmon(
    strategy: str, base: Path, texts: list[tuple[str, str, str]], config: LoopConfig, device: str
) -> Measurement:
    from bench.retrain.run import run_genmon

    return run_genmon(strategy, base, genmon_examples(strategy, texts), config, device)


def measure(
    side: str,
    strategy: str,
    run: Any,
    flops: FlopModel,
    lengths: list[int],
    device: str,
    peak: float | None,
) -> dict[str, Any]:
    """One side's run as a result row; an error is recorded, not raised."""
    import torch

    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"strategy": strategy, "side": side, "error": None}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        m = run()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        gc.collect()
    rates = m.rates()
    per_step = flops.step(strategy, lengths)
    achieved = per_step * rates["measured_steps"] / rates["seconds"]
    out.update(rates)
    out["tokens_per_step"] = sum(m.tokens[1:]) / rates["measured_steps"]
    out["final_loss"] = m.losses[-1]
    out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    out["model_flops_per_step"] = per_step
    out["achieved_tflops"] = achieved / 1e12
    out["mfu"] = achieved / peak if peak else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    smoke = args.cpu_smoke
    shape = SMOKE_SHAPE if smoke else GPU_SHAPE
    shape = replace(
        shape,
        steps=args.steps or shape.steps,
        batch_size=args.batch_size or shape.batch_size,
    )
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --cpu-smoke for the CPU dry run")
    dtype = torch.float32 if smoke else torch.bfloat16
    device_name = None if smoke else torch.cuda.get_device_name()
    peak = peak_flops(device_name)
    config = LoopConfig(
        steps=shape.steps,
        batch_size=shape.batch_size,
        max_length=shape.max_length,
        learning_rate=1e-4,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
    )
    work = Path(tempfile.mkdtemp(prefix="genmon-bench-gpu-"))
    rows: list[dict[str, Any]] = []
    try:
        base = work / "base"
        arch, tokenizer = build_base(base, smoke, dtype, shape.max_length)
        flops = flop_model(arch, args.lora_r)
        texts = synthetic_texts(shape)
        pad_id = int(tokenizer.pad_token_id)
        for strategy in args.strategies:
            encoded = encoded_examples(strategy, tokenizer, texts)
            length = len(encoded[0].prompt) + len(encoded[0].completion)
            lengths = [length] * shape.batch_size * (2 if strategy == "dpo" else 1)
            sides = {
                "genmon": partial(_genmon, strategy, base, texts, config, device),
                "plain": partial(_plain, strategy, base, encoded, config, device, dtype, pad_id),
            }
            for side, fn in sides.items():
                if time.perf_counter() - began > args.budget_s:
                    rows.append(
                        {
                            "strategy": strategy,
                            "side": side,
                            "error": f"skipped: past the {args.budget_s:.0f} s budget",
                        }
                    )
                    continue
                rows.append(measure(side, strategy, fn, flops, lengths, device, peak))
                print(
                    f"[{time.perf_counter() - began:5.0f} s] {strategy} {side} done",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "rows": rows,
        "device": device_name or f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "peak_bf16_flops": peak,
        "model": {
            "architecture": "Qwen2ForCausalLM",
            "config": "tiny (CPU smoke)" if smoke else "Qwen2.5-0.5B",
            "dtype": str(dtype).removeprefix("torch."),
            "weights": "random",
            **asdict(flops),
        },
        "shape": {**asdict(shape), "row_tokens": shape.prompt_chars + shape.completion_chars + 19},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": "all-linear"},
        "mfu_formula": MFU_FORMULA,
        "versions": _versions(torch, transformers),
        "wall_s": time.perf_counter() - began,
        "date": time.strftime("%Y-%m-%d"),
    }


MFU_FORMULA = {
    "mfu": "model FLOPs of steps 2..n / their wall seconds / peak dense bf16 FLOP/s",
    "trained_row": "(4 N + 6 P) t + 12 L a t^2",
    "forward_adapter_on": "2 (N + P) t + 4 L a t^2",
    "forward_reference": "2 N t + 4 L a t^2",
    "sft_step": "sum over B rows of trained_row",
    "dpo_step": "sum over 2B rows (chosen, rejected) of trained_row + forward_reference",
    "kto_step": "sum over B rows of trained_row + forward_reference, "
    "and over B KL rows of forward_adapter_on + forward_reference",
    "symbols": "N = base matmul weights (blocks' linear layers + LM head once), P = LoRA "
    "parameters, L = layers, a = heads x head dim, t = tokens of the row, B = batch",
}


def _versions(torch: Any, transformers: Any) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("peft", "trl", "genmon"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def render(results: dict[str, Any]) -> str:
    """One row per strategy and side (BENCHMARKS.md's manner)."""
    lines = [
        "| strategy | side | examples/s | tokens/s | peak GPU memory (GiB) | model TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["error"]:
            lines.append(f"| {r['strategy']} | {r['side']} | - | - | - | - | {r['error'][:80]} |")
            continue
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb'] / 1024:.1f}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(
            f"| {r['strategy']} | {r['side']} | {r['examples_per_s']:,.1f} |"
            f" {r['tokens_per_s']:,.0f} | {memory} | {r['achieved_tflops']:.3g} | {mfu} |"
        )
    m, s = results["model"], results["shape"]
    lines += [
        "",
        f"{m['architecture']} ({m['config']}, {m['dtype']}, random weights; N = {m['n_base']:,}"
        f" matmul weights, P = {m['n_lora']:,} LoRA), rows of {s['row_tokens']} tokens, batch"
        f" {s['batch_size']}, {s['steps'] - 1} measured steps (+1 warm-up), LoRA r="
        f"{results['lora']['r']}; {results['device']}; {results['wall_s']:.0f} s wall,"
        f" {results['date']}.",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results.json and table.md go here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny Qwen2 on CPU, a few steps")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, help="steps per run (default 30; smoke 3)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 8; smoke 4)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=240.0, help="start no run after this")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps is not None and args.steps < 2:
        print("--steps must be >= 2: the first step is the warm-up", file=sys.stderr)
        return 2
    results = run(args)
    table = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
