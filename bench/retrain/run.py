"""Training throughput: genmon's SFT, KTO and DPO trainers against a plain loop, on CPU.

    .venv/bin/python -m bench.retrain            # the recorded run (~1.5 min; 3 when busy)
    .venv/bin/python -m bench.retrain --steps 3 --repeats 1 --out .build/bench/retrain
    .venv/bin/python -m bench.retrain --json

The base is the tiny support-desk model (``genmon.retrain.tiny_lm.build_tiny_lm``, cached
under ``.build/tiny-lm``; the first run builds it in about a minute). The data are the
BANKING77 test questions of the tiny model's topics: SFT on the corrections of the
refused topic, KTO on thumbs (the helpful answers of the other topics up, the refusals of
the refused topic down, as many of each), DPO on the corrections as chosen and the
refusal as rejected.

Each strategy runs through genmon's trainer (``train()`` with a context that timestamps
every progress report) and through the plain transformers + PEFT loop of
:mod:`bench.retrain.plain` with the same data, the same batches (genmon's
``batch_indices``), the same LoRA (r, alpha, all linear layers), batch size, maximum
length and number of steps, in the same process, alternating which goes first. Rates are
taken from the end of step 1 to the end of the last step: model loading, tokenization and
the first step (the warm-up) are not counted, and neither is saving the adapter.
Examples are rows (KTO), pairs (DPO) or prompt/completion pairs (SFT); tokens are the
non-pad tokens of the rows trained with a gradient (DPO: chosen and rejected), counted
from the batches by the plain loop and from the trainer's own progress reports for genmon
(``tokens_per_s / examples_per_s * examples per step``). Each cell is the fastest of
``--repeats`` runs (as ``timeit`` reports: on a shared machine other work only slows a run
down, so the fastest is the least disturbed); ``--json`` has every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.retrain.plain import (
    STRATEGIES,
    Encoded,
    LoopConfig,
    Measurement,
    PlainLoop,
    load_peft_model,
)

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT.parent / "shared" / "datasets"
TINY_LM_DIR = ROOT / ".build" / "tiny-lm"


class MissingTrainer(RuntimeError):
    """genmon's trainer of a strategy is not importable here."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.retrain", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="steps per run, the first a warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="runs per side and strategy")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="holds banking77/")
    p.add_argument("--out", type=Path, help="also write results.json and table.md here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def training_examples(strategy: str, data_dir: Path) -> list[Any]:
    """The SftExamples each strategy trains on (see the module docstring)."""
    from genmon.retrain.examples import SftExample
    from genmon.retrain.tiny_lm import REFUSAL, support_pairs

    healthy, refused = support_pairs(data_dir, refuse_class="cards", split="test")
    if strategy == "sft":
        return [SftExample(p.prompt, p.answer, segment={"topic": p.topic}) for p in refused]
    if strategy == "dpo":
        return [SftExample(p.prompt, p.answer, rejected=REFUSAL) for p in refused]
    up = [SftExample(p.prompt, p.answer, desirable=True) for p in healthy[: len(refused)]]
    down = [SftExample(p.prompt, REFUSAL, desirable=False) for p in refused]
    return [e for pair in zip(up, down, strict=True) for e in pair]


def encode(tokenizer: Any, examples: Sequence[Any], max_length: int) -> list[Encoded]:
    """The examples as genmon's trainers tokenize them (``encode_example``), split into
    prompt and completion for the plain loop."""
    from genmon.retrain.lm import encode_example

    def split(prompt: str, completion: str) -> tuple[list[int], list[int]]:
        ids, labels = encode_example(tokenizer, prompt, completion, max_length)
        cut = labels.count(-100)
        return ids[:cut], ids[cut:]

    out = []
    for e in examples:
        prompt, completion = split(e.prompt, e.completion)
        rejected = split(e.prompt, e.rejected)[1] if e.rejected is not None else None
        out.append(Encoded(prompt, completion, rejected, e.desirable))
    return out


def genmon_trainer(strategy: str) -> Any:
    """genmon's trainer of ``strategy``; KTO and DPO are imported only when asked for."""
    from genmon.retrain.trainer import LoraTrainer

    if strategy == "sft":
        return LoraTrainer()
    try:
        from genmon.retrain import preference
    except ImportError as exc:
        raise MissingTrainer(
            f"genmon's {strategy} trainer is not importable ({exc}): it lives in "
            "genmon.retrain.preference; run `python -m bench.retrain --strategies sft` meanwhile"
        ) from exc
    return {"kto": preference.KtoTrainer, "dpo": preference.DpoTrainer}[strategy]()


class TimingContext:
    """A TrainContext that timestamps every progress report; nothing to resume. On CUDA it
    waits for the step's kernels first, as the plain loop does."""

    def __init__(self, examples_per_step: int, device: str = "cpu") -> None:
        self.examples_per_step = examples_per_step
        self.cuda = device.startswith("cuda")
        self.measurement = Measurement()

    def progress(
        self,
        step: int,
        total: int,
        loss: float,
        examples_per_s: float,
        tokens_per_s: float,
        gpu_memory_mb: float | None,
    ) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        m = self.measurement
        m.step_ends.append(time.perf_counter())
        m.tokens.append(round(tokens_per_s / examples_per_s * self.examples_per_step))
        m.examples.append(self.examples_per_step)
        m.losses.append(loss)
        if gpu_memory_mb is not None:
            m.peak_memory_mb = max(m.peak_memory_mb or 0.0, gpu_memory_mb)

    def checkpoint(self, step: int, local_dir: Path) -> None:
        return None

    def resume(self) -> tuple[int, Path] | None:
        return None


def run_genmon(
    strategy: str, base: Path, examples: Sequence[Any], config: LoopConfig, device: str = "cpu"
) -> Measurement:
    """One run of genmon's trainer; the adapter lands in a temporary folder, then goes."""
    from genmon.retrain.trainer import TrainingParams

    params = TrainingParams(
        learning_rate=config.learning_rate,
        max_steps=config.steps,
        batch_size=config.batch_size,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        max_length=config.max_length,
        checkpoint_every=0,
        seed=config.seed,
        device=device,
        beta=config.beta,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
    )
    ctx = TimingContext(config.batch_size, device)
    with tempfile.TemporaryDirectory(prefix="genmon-bench-retrain-") as out:
        genmon_trainer(strategy).train(str(base), examples, params, ctx, Path(out))
    return ctx.measurement


def run_plain(strategy: str, base: Path, encoded: Sequence[Encoded], config: LoopConfig) -> Any:
    """One run of the plain loop on the same batches genmon's trainer draws."""
    from transformers import AutoTokenizer

    from genmon.retrain.trainer import batch_indices

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = load_peft_model(base, config, "cpu")
    loop = PlainLoop(model, encoded, config, int(tokenizer.pad_token_id), "cpu", batch_indices)
    return loop.run(strategy)


def _best_rates(runs: list[Measurement]) -> dict[str, Any]:
    rates = [r.rates() for r in runs]
    best = max(rates, key=lambda r: r["examples_per_s"])
    return {
        "examples_per_s": best["examples_per_s"],
        "tokens_per_s": best["tokens_per_s"],
        "measured_steps": best["measured_steps"],
        "tokens_per_step": statistics.mean(t for r in runs for t in r.tokens[1:]),
        "runs": [{**rate, "final_loss": r.losses[-1]} for rate, r in zip(rates, runs, strict=True)],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from genmon.retrain.lm import quiet_transformers
    from genmon.retrain.tiny_lm import build_tiny_lm

    torch.set_num_threads(args.threads)
    quiet_transformers()
    began = time.perf_counter()
    base = build_tiny_lm(TINY_LM_DIR, data_dir=args.data_dir, refuse_class="cards", seed=0)
    config = LoopConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    for strategy in args.strategies:
        genmon_trainer(strategy)  # a missing trainer fails here, before any run
    rows = []
    for strategy in args.strategies:
        examples = training_examples(strategy, args.data_dir)
        encoded = encode(tokenizer, examples, config.max_length)
        sides: dict[str, list[Measurement]] = {"genmon": [], "plain": []}
        for repeat in range(args.repeats):
            order = ("genmon", "plain") if repeat % 2 == 0 else ("plain", "genmon")
            for side in order:
                if side == "genmon":
                    sides[side].append(run_genmon(strategy, base, examples, config))
                else:
                    sides[side].append(run_plain(strategy, base, encoded, config))
            print(
                f"[{time.perf_counter() - began:5.0f} s] {strategy} run {repeat + 1} done",
                file=sys.stderr,
                flush=True,
            )
        genmon, plain = _best_rates(sides["genmon"]), _best_rates(sides["plain"])
        rows.append(
            {
                "strategy": strategy,
                "examples": len(examples),
                "genmon": genmon,
                "plain": plain,
                "ratio": genmon["examples_per_s"] / plain["examples_per_s"],
                "device": "cpu",
            }
        )
    return {
        "rows": rows,
        "config": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "max_length": config.max_length,
            "lora_r": config.lora_r,
            "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules,
            "learning_rate": config.learning_rate,
            "beta": config.beta,
            "repeats": args.repeats,
            "threads": args.threads,
            "base": "tiny support-desk LM (GPT-2 style, 2 layers, width 128, vocab 1024)",
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": __import__("peft").__version__,
        },
        "wall_s": time.perf_counter() - began,
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
    }


def render(results: dict[str, Any]) -> str:
    """The Markdown table (BENCHMARKS.md's manner) and one line on the run."""
    lines = [
        "| strategy | genmon examples/s | plain examples/s | genmon / plain |"
        " genmon tokens/s | plain tokens/s | steps | device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        g, p = r["genmon"], r["plain"]
        lines.append(
            f"| {r['strategy']} | {g['examples_per_s']:,.1f} | {p['examples_per_s']:,.1f} |"
            f" **{r['ratio']:.2f}** | {g['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} |"
            f" {g['measured_steps']} (+1 warm-up) x {len(g['runs'])} | {r['device']} |"
        )
    c = results["config"]
    lines += [
        "",
        f"Batch {c['batch_size']}, max length {c['max_length']}, LoRA r={c['lora_r']}"
        f" alpha={c['lora_alpha']} on all linear layers, beta {c['beta']} (KTO, DPO);"
        f" {c['threads']} torch thread(s); the fastest of {c['repeats']} runs per cell."
        f" Run: {results['wall_s']:.0f} s wall on {results['machine']}, {results['date']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 2:
        print("--steps must be >= 2: the first step is the warm-up", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except MissingTrainer as exc:
        print(exc, file=sys.stderr)
        return 2
    table = render(results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "table.md").write_text(table + "\n")
    print(json.dumps(results, indent=1) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
