"""Shared helpers of the retrain tests: where the tiny model is built, the support traffic,
and the few measurements (accuracy, refusal rate) the tests of several helpers make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genmon.detectors.quality.refusal import is_refusal
from genmon.retrain.examples import SftExample
from genmon.retrain.lm import CausalLM
from genmon.retrain.tiny_lm import SupportPair

REPO = Path(__file__).resolve().parents[2]
#: The shared datasets beside the repository (BANKING77 lives there).
DATA_DIR = REPO.parent / "shared" / "datasets"
#: Where the session's tiny model is cached; reruns reuse it (the build hash decides).
TINY_LM_DIR = REPO / ".build" / "tiny-lm"


@dataclass(frozen=True)
class SupportData:
    """Held-out support traffic: ``healthy`` questions and ``refused`` (the class the tiny
    model refuses), each with its correct answer (for ``refused``: the correction)."""

    healthy: list[SupportPair]
    refused: list[SupportPair]


def corrections(pairs: Sequence[SupportPair], rejected: str | None = None) -> list[SftExample]:
    """Feedback as the dataset builder makes it: prompt -> correct answer (rejected = served)."""
    return [
        SftExample(
            prompt=p.prompt,
            completion=p.answer,
            rejected=rejected,
            segment={"topic": p.topic},
            label=p.intent,
        )
        for p in pairs
    ]


def refusal_rate(lm: CausalLM, prompts: Sequence[str]) -> float:
    """Share of greedy answers that genmon's refusal detector flags."""
    answers = lm.generate(list(prompts), batch_size=64)
    return sum(is_refusal(a) for a in answers) / len(answers)


def accuracy(lm: CausalLM, pairs: Sequence[SupportPair], expected: str | None = None) -> float:
    """Share of greedy answers equal to each pair's answer (or to ``expected`` for all)."""
    answers = lm.generate([p.prompt for p in pairs], batch_size=64)
    return sum(a == (expected or p.answer) for a, p in zip(answers, pairs, strict=True)) / len(
        pairs
    )
