"""Input checks and small numeric helpers shared by the anomaly detectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from genmon.detectors.exceptions import InputError, InvalidParameterError

#: Which side of the baseline may alarm.
DIRECTIONS = ("both", "up", "down")

#: A scale below this fraction of the level is treated as rounding noise, so a constant
#: stream (sigma exactly 0) never divides by zero nor turns float error into alarms.
RELATIVE_SIGMA_FLOOR = 1e-9


def as_values(batch: Any, owner: str) -> np.ndarray:
    """A non-empty, finite, 1-D float array from ``batch`` (a scalar counts as one value)."""
    try:
        values = np.asarray(batch, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{owner}.update() needs numbers; got {type(batch).__name__}") from exc
    values = np.atleast_1d(values)
    if values.ndim != 1:
        raise InputError(f"{owner}.update() needs a 1-D batch of numbers; got shape {values.shape}")
    if values.size == 0:
        raise InputError(f"{owner}.update() needs at least one value")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{owner}.update() got NaN or infinite values; drop or impute them first")
    return values


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InvalidParameterError(f"direction={direction!r} is not one of {DIRECTIONS}")
    return direction


def sigma_floor(level: float) -> float:
    return RELATIVE_SIGMA_FLOOR * max(1.0, abs(level))


def take_warmup(buffer: list[float], values: np.ndarray, needed: int) -> np.ndarray:
    """Move values into the warm-up ``buffer`` until it holds ``needed``; return the rest."""
    missing = needed - len(buffer)
    if missing <= 0:
        return values
    buffer.extend(values[:missing].tolist())
    return values[missing:]


def beyond(z: np.ndarray, threshold: float, direction: str) -> np.ndarray:
    """Boolean mask of standardised values beyond ``threshold`` on the watched side(s)."""
    if direction == "up":
        return z > threshold
    if direction == "down":
        return z < -threshold
    return np.abs(z) > threshold


def lindley(start: float, increments: np.ndarray) -> np.ndarray:
    """``s_t = max(0, s_{t-1} + increments_t)`` from ``s_0 = start >= 0``, without a Python loop.

    Unrolling the recursion gives ``s_t = w_t - min(0, min_{u<=t} w_u)`` with
    ``w = start + cumsum(increments)`` (Lindley 1952), which numpy evaluates in one pass.
    """
    walk = start + np.cumsum(increments)
    return walk - np.minimum(np.minimum.accumulate(walk), 0.0)


def changes_after(
    before: Callable[[np.random.Generator, int], Any],
    after: Callable[[np.random.Generator, int], Any],
    warmup: int,
) -> Callable[[np.random.Generator, int], Any]:
    """A contract-example stream that follows ``before`` for ``warmup`` values, then ``after``.

    Detectors that learn their baseline from the stream cannot see a change in a stream that
    is shifted from its first value, so the change comes after the warm-up. The count runs
    across calls, so chunked and single calls see the same change point.
    """
    emitted = 0

    def stream(rng: np.random.Generator, n: int) -> Any:
        nonlocal emitted
        head = min(n, max(0, warmup - emitted))
        emitted += n
        if head == 0:
            return after(rng, n)
        if head == n:
            return before(rng, n)
        first, rest = before(rng, head), after(rng, n - head)
        if isinstance(first, list):
            return first + list(rest)
        return np.concatenate((first, rest))

    return stream
