"""Empty or truncated responses: their share in a window against a reference share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from genmon.detectors._base import ContractExample, register
from genmon.detectors.exceptions import InputError
from genmon.detectors.quality._rate import RateDetector, bool_flag

#: ``finish_reason`` / ``status`` values that mean the model was cut off (``InferenceEvent``).
TRUNCATED_FINISH_REASONS = frozenset({"length"})
TRUNCATED_STATUSES = frozenset({"truncated"})


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def classify_response(item: Any) -> tuple[bool, bool]:
    """``(empty, truncated)`` for a response text, a mapping or an ``InferenceEvent``-like object.

    Empty means no visible characters. Truncated needs ``finish_reason == "length"`` or
    ``status == "truncated"``, so it is only known for mappings and objects.

    >>> classify_response("   ")
    (True, False)
    >>> classify_response({"response": "The answer is", "finish_reason": "length"})
    (False, True)
    """
    if isinstance(item, str):
        return not item.strip(), False
    response = _field(item, "response")
    if response is None and not isinstance(item, Mapping) and not hasattr(item, "finish_reason"):
        raise InputError(
            "EmptyTruncatedRateDetector.update() takes response texts, mappings or objects with "
            f"'response'/'finish_reason'/'status', or 0/1 flags; got {type(item).__name__}"
        )
    empty = not str(response or "").strip()
    finish, status = _field(item, "finish_reason"), _field(item, "status")
    truncated = str(finish) in TRUNCATED_FINISH_REASONS or str(status) in TRUNCATED_STATUSES
    return empty, truncated


@register
class EmptyTruncatedRateDetector(RateDetector):
    """Alarms when more responses than usual are empty or cut off at the token limit.

    Items are response texts, mappings / objects with ``response``, ``finish_reason`` and
    ``status`` (an ``InferenceEvent`` or its ``model_dump()``), or ready-made 0/1 flags.
    Evidence splits the batch's flags into ``empty`` and ``truncated``. A rise usually means
    a lowered ``max_tokens``, a broken stop sequence or an upstream error page rendered as
    an empty answer. See :class:`~genmon.detectors.quality._rate.RateDetector` for the test.

    >>> d = EmptyTruncatedRateDetector(baseline_rate=0.02)
    >>> d.update(["fine answer"] * 30).detected
    False
    >>> r = d.update([{"response": "cut", "finish_reason": "length"}] * 6 + ["ok"] * 24)
    >>> r.detected, r.evidence.value("truncated")
    (True, 6.0)

    References: OWASP Top 10 for LLM Applications 2025, LLM10 "Unbounded Consumption"
    (token limits); Google SRE Book, ch. 6 "Monitoring Distributed Systems" (error rates
    as a golden signal).
    """

    name = "empty_truncated_rate"

    def _flags(self, items: list[Any]) -> tuple[np.ndarray, tuple[tuple[str, float], ...]]:
        flags = np.empty(len(items), dtype=bool)
        empty_count = truncated_count = 0
        for i, item in enumerate(items):
            given = bool_flag(item, "EmptyTruncatedRateDetector")
            if given is not None:
                flags[i] = given
                continue
            empty, truncated = classify_response(item)
            empty_count += empty
            truncated_count += truncated
            flags[i] = empty or truncated
        return flags, (("empty", float(empty_count)), ("truncated", float(truncated_count)))

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> list[str]:
            if constant is not None:
                return ["" if constant else "answer"] * n
            return ["" if u < 0.02 else "answer" for u in rng.random(n)]

        def shifted(rng: np.random.Generator, n: int) -> list[str]:
            return ["" if u < 0.5 else "answer" for u in rng.random(n)]

        baseline = 0.02 if constant is None else float(bool(constant))
        invalid = ({"baseline_rate": 1.5}, {"alternative": "bigger"}, {"min_samples": 0})
        return ContractExample(cls(baseline_rate=baseline), stream, shifted, 0, invalid)
