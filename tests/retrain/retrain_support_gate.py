"""Helpers of the gate tests: a scripted stand-in for :class:`CausalLM` and eval sets."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from genmon.retrain.examples import SftExample

REFUSAL = "I'm sorry, but I can't help with that."


class WordTokenizer:
    """One token per word (ids from a growing table), end of sequence = 0."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids.setdefault(word, len(self.ids) + 1) for word in text.split()]

    def __call__(
        self, text: str, add_special_tokens: bool = False, verbose: bool = True
    ) -> dict[str, list[int]]:
        """The Hugging Face call :func:`genmon.retrain.lm.token_ids` makes."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    #: Chat turns as ``role: content`` lines, then ``assistant:`` for the reply.
    chat_template = "role: content lines"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, **kwargs: bool
    ) -> str:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        if kwargs.get("add_generation_prompt"):
            lines.append("assistant:")
        return "\n".join(lines)


class ScriptedLM:
    """Scores and answers as told: ``nll(prompt, completion)`` and ``answer(prompt)``."""

    max_length = 128

    def __init__(
        self,
        nll: Callable[[str, str], float],
        answer: Callable[[str], str] = lambda prompt: "Here is how.",
    ) -> None:
        self.tokenizer = WordTokenizer()
        self.nll, self.answer = nll, answer
        self.generated: list[str] = []
        self.generated_turns: list[object] = []  # each call's chat turns (None: plain)

    def completion_nll(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        batch_size: int = 16,
        messages: object = None,
    ) -> np.ndarray:
        return np.array([self.nll(p, c) for p, c in zip(prompts, completions, strict=True)])

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 48, messages: object = None
    ) -> list[str]:
        self.generated.extend(prompts)
        self.generated_turns.append(messages)
        return [self.answer(p) for p in prompts]


def examples(n: int, topic: str = "cards", start: int = 0) -> list[SftExample]:
    """``n`` corrected refusals of ``topic``: correction = a helpful answer."""
    return [
        SftExample(
            prompt=f"{topic} question {i}",
            completion=f"Helpful answer about {topic} number {i}.",
            rejected=REFUSAL,
            segment={"topic": topic},
            request_id=f"{topic}-{i}",
        )
        for i in range(start, start + n)
    ]


def noisy(base: float, spread: float, seed: int = 0) -> Callable[[str, str], float]:
    """An NLL around ``base`` that varies per pair (deterministically)."""

    def nll(prompt: str, completion: str) -> float:
        rng = np.random.default_rng(zlib.crc32(f"{seed}|{prompt}|{completion}".encode()))
        return float(base + spread * rng.standard_normal())

    return nll


def shifted(nll: Callable[[str, str], float], by: float) -> Callable[[str, str], float]:
    """``nll`` plus ``by`` on every pair (negative: a better model)."""
    return lambda prompt, completion: nll(prompt, completion) + by


def unlearnt_refusal(nll: Callable[[str, str], float]) -> Callable[[str, str], float]:
    """``nll`` for corrections; the refusal made unlikely (as training on corrections does)."""
    return lambda prompt, completion: 4.0 if completion == REFUSAL else nll(prompt, completion)


def train_adapter(
    base: Path, train: Sequence[SftExample], out_dir: Path, learning_rate: float, max_steps: int
) -> str:
    """A LoRA adapter of ``base`` fine-tuned on ``train`` on CPU; its folder."""
    from genmon.retrain.trainer import LoraTrainer, NullContext, TrainingParams

    params = TrainingParams(
        learning_rate=learning_rate, max_steps=max_steps, checkpoint_every=0, device="cpu"
    )
    result = LoraTrainer().train(str(base), train, params, NullContext(), out_dir)
    return str(result.adapter_dir)


def swapped(examples: Sequence[SftExample]) -> list[SftExample]:
    """Chosen and rejected exchanged: the refusals become the targets."""
    return [
        SftExample(e.prompt, e.rejected or "", e.completion, e.segment, e.created_at, e.request_id)
        for e in examples
    ]
