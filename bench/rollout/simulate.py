"""Seeded window records of a rollout: a champion and a challenger on the same traffic.

The records are what the worker publishes on ``<prefix>.windows`` for closed tumbling
windows (``streams/windows/closing.py`` ``window_record``, ``stats.py`` ``summary()``):
per window, one series per ``(model_version, segment)`` with ``requests``, ``errors``,
``answered``, ``refusal`` and ``feedback`` counts, and the raw latency sketch on each
version's ``"*"`` series. Nothing is drawn per request: every count of a window is one
Poisson or binomial draw (numpy, all windows at once), so a replay of an hour of traffic
costs milliseconds.

Traffic: ``rps`` requests per second, a share ``share`` served by the challenger, one
attribute ``region`` with a segment ``region=eu`` of ``segment_share`` of the traffic and
``region=us`` for the rest. Errors and refusals have the same rates for both versions;
negative feedback is ``base_rate`` everywhere except the challenger on ``region=eu``
(``challenger_rate_in_segment``). A share ``feedback_rate`` of answered requests is scored,
``feedback_delay_s`` after the inference: the worker counts feedback at join time, so it
lands in the window of ``inference time + delay``, for the inference's version and
segment (with inference times uniform in their window, a delay that is not a multiple of
the window splits between two windows). Feedback joining after ``duration_s`` is lost.
Latencies: a lognormal (median 400 ms) on a grid of values 5 % apart, drawn as bucket
counts of :class:`~genmon.detectors.sketch.QuantileSketch` (``challenger_latency_factor``
scales the challenger's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from genmon.detectors.sketch import QuantileSketch

SEGMENTS = ("region=eu", "region=us")
_GRID = 400.0 * 1.05 ** np.arange(-40, 41)


@functools.lru_cache(maxsize=8)
def _latency_grid(factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Values, their sketch keys and probabilities (lognormal, sigma 0.5), and accuracy."""
    values = _GRID * factor
    sketch = QuantileSketch()
    keys = []
    for v in values:  # 81 values once per factor: the key of each grid value
        one = QuantileSketch()
        one.add_many([float(v)])
        keys.append(next(iter(one.bins)))
    if len(set(keys)) != len(keys):
        raise ValueError("latency grid values must fall in distinct sketch buckets")
    logs = np.log(_GRID / 400.0)  # the same shape, on values scaled by factor
    weights = np.exp(-0.5 * (logs / 0.5) ** 2)
    return values, np.array(keys), weights / weights.sum(), sketch.relative_accuracy


def _sketch_state(counts: np.ndarray, factor: float) -> dict[str, Any]:
    values, keys, _, accuracy = _latency_grid(factor)
    present = np.flatnonzero(counts)
    return {
        "alpha": accuracy,
        "bins": [[int(keys[i]), int(counts[i])] for i in present],
        "zeros": 0,
        "count": int(counts.sum()),
        "sum": float((counts * values).sum()),
        "min": float(values[present[0]]) if present.size else None,
        "max": float(values[present[-1]]) if present.size else None,
    }


def iter_windows(
    seed: int,
    *,
    rps: float,
    share: float,
    segment_share: float,
    base_rate: float,
    challenger_rate_in_segment: float,
    feedback_rate: float,
    feedback_delay_s: float,
    window_s: float,
    duration_s: float,
    champion: str = "v1",
    challenger: str = "v2",
    error_rate: float = 0.01,
    refusal_rate: float = 0.02,
    challenger_latency_factor: float = 1.0,
    start_ms: int = 1_800_000_000_000,
) -> Iterator[dict[str, Any]]:
    """The window records of :func:`simulate_windows`, built one at a time (the counts are
    drawn up front), so a replay that has decided can stop early."""
    rng = np.random.default_rng(seed)
    n_windows = max(1, math.ceil(duration_s / window_s))
    version_share = np.array([1.0 - share, share])
    segment = np.array([segment_share, 1.0 - segment_share])
    mean = rps * window_s * version_share[:, None] * segment[None, :]
    requests = rng.poisson(mean, size=(n_windows, 2, 2))
    errors = rng.binomial(requests, error_rate)
    answered = requests - errors
    refusal = rng.binomial(answered, refusal_rate)
    negative_rate = np.full((2, 2), base_rate)
    negative_rate[1, 0] = challenger_rate_in_segment
    scored = rng.binomial(answered, feedback_rate)
    negative = rng.binomial(scored, negative_rate)
    positive = scored - negative
    fb_negative, fb_positive = _delay(rng, negative, positive, feedback_delay_s / window_s)
    totals = requests.sum(axis=2)
    factors = (1.0, challenger_latency_factor)
    probs = [_latency_grid(f)[2] for f in factors]
    latency = [
        np.stack([rng.multinomial(int(n), probs[v]) for n in totals[:, v]]) for v in range(2)
    ]
    versions = (champion, challenger)
    window_ms = round(window_s * 1000)
    for w in range(n_windows):
        series = []
        for v, version in enumerate(versions):
            cells = [(s, requests[w, v, s], errors[w, v, s], refusal[w, v, s]) for s in range(2)]
            star = _series(
                version,
                "*",
                int(totals[w, v]),
                int(errors[w, v].sum()),
                int(refusal[w, v].sum()),
                int(fb_positive[w, v].sum()),
                int(fb_negative[w, v].sum()),
            )
            if totals[w, v] > 0:
                star["sketches"] = {"latency_ms": _sketch_state(latency[v][w], factors[v])}
            series.append(star)
            for s, n, e, r in cells:
                series.append(
                    _series(
                        version,
                        SEGMENTS[s],
                        int(n),
                        int(e),
                        int(r),
                        int(fb_positive[w, v, s]),
                        int(fb_negative[w, v, s]),
                    )
                )
        yield {
            "model_id": "sim",
            "kind": "tumbling",
            "start_ms": start_ms + w * window_ms,
            "end_ms": start_ms + (w + 1) * window_ms,
            "partition": 0,
            "series": [s for s in series if s["requests"] or s["feedback"]["n"]],
        }


def simulate_windows(
    seed: int,
    *,
    rps: float,
    share: float,
    segment_share: float,
    base_rate: float,
    challenger_rate_in_segment: float,
    feedback_rate: float,
    feedback_delay_s: float,
    window_s: float,
    duration_s: float,
    champion: str = "v1",
    challenger: str = "v2",
    **more: Any,
) -> list[dict[str, Any]]:
    """Window records of a seeded rollout, oldest first; ``more``: the optional keywords
    of :func:`iter_windows` (``error_rate``, ``refusal_rate``,
    ``challenger_latency_factor``, ``start_ms``)."""
    return list(
        iter_windows(
            seed,
            rps=rps,
            share=share,
            segment_share=segment_share,
            base_rate=base_rate,
            challenger_rate_in_segment=challenger_rate_in_segment,
            feedback_rate=feedback_rate,
            feedback_delay_s=feedback_delay_s,
            window_s=window_s,
            duration_s=duration_s,
            champion=champion,
            challenger=challenger,
            **more,
        )
    )


def _delay(
    rng: np.random.Generator, negative: np.ndarray, positive: np.ndarray, windows: float
) -> tuple[np.ndarray, np.ndarray]:
    """Move feedback ``windows`` windows later (split between two windows when not whole):
    an inference at a uniform time in its window joins ``windows * window_s`` later."""
    whole = math.floor(windows)
    frac = windows - whole
    out = []
    for counts in (negative, positive):
        late = rng.binomial(counts, frac) if frac > 0 else np.zeros_like(counts)
        moved = np.zeros_like(counts)
        for shift, part in ((whole, counts - late), (whole + 1, late)):
            if shift < counts.shape[0]:
                moved[shift:] += part[: counts.shape[0] - shift]
        out.append(moved)
    return out[0], out[1]


def _series(
    version: str, segment: str, requests: int, errors: int, refusal: int, pos: int, neg: int
) -> dict[str, Any]:
    scored = pos + neg
    answered = requests - errors
    return {
        "model_version": version,
        "segment": segment,
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "answered": answered,
        "refusal": refusal,
        "refusal_rate": refusal / answered if answered else None,
        "feedback": {
            "n": scored,
            "positive": pos,
            "negative": neg,
            "negative_rate": neg / scored if scored else None,
        },
    }
