"""Shared by the anomaly detectors: input checks, numeric helpers, the z-score result
(:class:`ZScoreDetector`) and the streams of their contract examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from genmon.detectors._base import Detector, DetectorKind, DetectorResult, Evidence
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


def watched_side(z: np.ndarray, direction: str) -> np.ndarray:
    """Standardised values signed so that larger means further out on the watched side(s)."""
    return {"both": np.abs(z), "up": z, "down": -z}[direction]


def alarm_values(
    count: int, first_index: int = -1, first_up: bool = False
) -> tuple[tuple[str, float], ...]:
    """Evidence of a batch's alarms: the first one's index and side (+1 up, -1 down), and how
    many; without alarms the index is -1 and the side 0."""
    return (
        ("alarm_index", float(first_index) if count else -1.0),
        ("n_alarms", float(count)),
        ("direction", (1.0 if first_up else -1.0) if count else 0.0),
    )


def poisson_z(
    counts: np.ndarray, means: np.ndarray, variances: np.ndarray, ready: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z, spread, relative change)`` of counts against their baselines (z is 0 where not
    ``ready``).

    The spread is the baseline's standard deviation but never below ``sqrt(mean)``: arrivals
    are at least Poisson-noisy, so a flat history must not make a one-request wobble look
    like 1000 sigmas. Means below one count as one.
    """
    spread = np.sqrt(np.maximum(variances, np.maximum(means, 1.0)))
    z = np.where(ready, (counts - means) / spread, 0.0)
    relative = np.abs(counts - means) / np.maximum(means, 1.0)
    return z, spread, relative


def first_crossing(
    up: np.ndarray | None,
    down: np.ndarray | None,
    threshold: float,
    eligible: np.ndarray | None = None,
) -> tuple[int, float, bool]:
    """The first position where a watched path (None: not watched) passes ``threshold``.

    Returns its index (-1: none; only ``eligible`` positions count), the peak of the watched
    paths up to and including it (the whole paths when none), and whether the upward path
    is the one that crossed there.
    """
    paths = [path for path in (up, down) if path is not None]
    crossed = np.any([path > threshold for path in paths], axis=0)
    if eligible is not None:
        crossed &= eligible
    hit = int(np.argmax(crossed)) if crossed.any() else -1
    stop = hit + 1 if hit >= 0 else crossed.size
    peak = max(float(path[:stop].max()) for path in paths)
    return hit, peak, bool(hit >= 0 and up is not None and up[hit] > threshold)


class ZScoreDetector(Detector):
    """Base of the detectors that standardise each value and alarm past ``threshold``."""

    kind = DetectorKind.ANOMALY
    threshold: float
    direction: str
    _n_seen: int

    def _z_report(
        self,
        z: np.ndarray,
        alarms: np.ndarray,
        values: tuple[tuple[str, float], ...],
        test: str,
        offset: int = 0,
        notes: tuple[str, ...] = (),
    ) -> DetectorResult:
        """The result of a batch: ``values`` first, then :func:`alarm_values` (the first alarm
        index counted from ``offset``); the score is the largest z on the watched side."""
        hits = np.flatnonzero(alarms)
        if hits.size:
            first_up = bool(z[hits[0]] > 0)
            values += alarm_values(hits.size, offset + int(hits[0]), first_up)
        else:
            values += alarm_values(0)
        return self._result(
            score=float(watched_side(z, self.direction).max()) if z.size else 0.0,
            threshold=self.threshold,
            detected=bool(hits.size),
            n_seen=self._n_seen,
            evidence=Evidence(test=test, values=values, notes=notes),
        )


def lindley(start: float, increments: np.ndarray) -> np.ndarray:
    """``s_t = max(0, s_{t-1} + increments_t)`` from ``s_0 = start >= 0``, without a Python loop.

    Unrolling the recursion gives ``s_t = w_t - min(0, min_{u<=t} w_u)`` with
    ``w = start + cumsum(increments)`` (Lindley 1952), which numpy evaluates in one pass.
    """
    walk = start + np.cumsum(increments)
    return walk - np.minimum(np.minimum.accumulate(walk), 0.0)


Stream = Callable[[np.random.Generator, int], np.ndarray]


def normal_streams(constant: float | None, shift: float) -> tuple[Stream, Stream]:
    """Contract-example streams: unit normal noise around 0 (exactly ``constant`` when given),
    and the same noise ``shift`` higher."""
    level = 0.0 if constant is None else float(constant)

    def stream(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, level) if constant is not None else rng.normal(level, 1.0, n)

    def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.normal(level + shift, 1.0, n)

    return stream, shifted


def count_streams(constant: float | None) -> tuple[Stream, Stream]:
    """Contract-example streams of counts per bucket: Poisson(100) (exactly ``|constant|``
    when given), and a spike to over three times that."""
    level = 100.0 if constant is None else abs(float(constant))

    def stream(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, level) if constant is not None else rng.poisson(level, n) * 1.0

    def spiked(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.poisson(3 * level + 50, n) * 1.0

    return stream, spiked


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
