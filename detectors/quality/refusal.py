"""Refusal rate: the share of responses that decline the request, against a reference share."""

from __future__ import annotations

from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, register
from genmon.detectors.exceptions import InputError
from genmon.detectors.quality._rate import RateDetector, bool_flag
from genmon.detectors.quality.refusal_phrases import RefusalPhrases


def is_refusal(text: str) -> bool:
    """True when ``text`` opens like a refusal under genmon's phrase list.

    The list and the rule are :class:`~genmon.detectors.quality.refusal_phrases.RefusalPhrases`
    (``refusal_phrases.yaml``); the windowed aggregates count refusals with the same list.

    >>> is_refusal("I'm sorry, but I can't help with that.")
    True
    >>> is_refusal("Sure! To kill a Python process, run `kill <pid>`.")
    False
    """
    return RefusalPhrases.default().is_refusal(text)


@register
class RefusalRateDetector(RateDetector):
    """Alarms when the share of refusals in a window rises above the reference share.

    Items are response texts (judged by :func:`is_refusal`) or ready-made flags (bool or
    0/1) from a better classifier. A jump in refusals after a model or prompt change is an
    over-refusal regression; pass ``alternative="less"`` to watch for a model that stopped
    refusing. See :class:`~genmon.detectors.quality._rate.RateDetector` for the test.

    >>> d = RefusalRateDetector(baseline_rate=0.05, alpha=0.01)
    >>> d.update(["Sure, here it is."] * 19 + ["I'm sorry, I can't do that."]).detected
    False
    >>> r = d.update(["I cannot help with that request."] * 8 + ["Here you go."] * 12)
    >>> r.detected, r.score
    (True, 0.225)

    References: P. Röttger et al., "XSTest: A Test Suite for Identifying Exaggerated Safety
    Behaviours in Large Language Models", NAACL 2024; A. Zou et al., "Universal and
    Transferable Adversarial Attacks on Aligned Language Models", arXiv:2307.15043 (2023).
    """

    name = "refusal_rate"

    def _flags(self, items: list[Any]) -> tuple[np.ndarray, tuple[tuple[str, float], ...]]:
        flags = np.empty(len(items), dtype=bool)
        for i, item in enumerate(items):
            given = bool_flag(item, "RefusalRateDetector")
            if given is None:
                if not isinstance(item, str):
                    raise InputError(
                        "RefusalRateDetector.update() takes response texts or 0/1 flags; "
                        f"got {type(item).__name__}"
                    )
                given = is_refusal(item)
            flags[i] = given
        return flags, ()

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> list[bool]:
            if constant is not None:
                return [bool(constant)] * n
            return (rng.random(n) < 0.05).tolist()

        def shifted(rng: np.random.Generator, n: int) -> list[bool]:
            return (rng.random(n) < 0.6).tolist()

        baseline = 0.05 if constant is None else float(bool(constant))
        invalid = ({"min_difference": 2.0}, {"reference_size": 0}, {"alternative": "up"})
        return ContractExample(cls(baseline_rate=baseline), stream, shifted, 0, invalid)
