"""The signal catalog: what each signal gives a detector, which detectors fit it, and how a
detector is calibrated from its share of the false-alarm budget. Pure data and arithmetic.

A **signal** is something the worker measures for a model: from each closed tumbling
window (counts, rates, latency sketches, token summaries, language counts, per segment
and per version) or from each window's sample of texts and their embeddings (the
embedding stage; only while ``embedding.enabled``). It offers its values in one or more
**input** forms (:class:`Input`); a detector takes the first of its forms (:data:`FITS`)
that the signal offers. ``genmon.streams.detection.signal_inputs`` reads them from a
window record or a sample.

A detector inside the budget (share > 0) has the parameters that set its false-alarm rate
computed from its share (:class:`Calibration`): with ``ARL`` the windows between false
alarms its share allows and ``series`` the series of the signal judged at once,

- a test per window (``alpha``): ``alpha = 1 / (ARL x series)``;
- a z-score test per window (``z``): ``threshold = z(alpha / 2)`` (``z(alpha)`` one-sided);
- a sequential test on standardised values (``sequential``, CUSUM and Page-Hinkley): the
  decision interval whose in-control run length (Siegmund's approximation, two-sided: each
  side twice) is ``ARL x series`` windows;
- the binomial rate CUSUM (``rate_cusum``): ``threshold = log(2 x ARL x series)`` and
  ``window_alpha = 1 / (2 x ARL x series)``, as :meth:`Budget.rate_test` says.

Detectors whose threshold is a distance or an expected run time per text (``threshold``,
``psi_drift``, ``wasserstein_drift``, ``mmd_drift`` whose permutations cannot reach a
weekly alpha, ``online_mmd``, ``online_lsdd`` whose bootstrap would need ~2 x ARL
trajectories) have no calibration: they run only outside the budget (share 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from scipy import stats


class Input(StrEnum):
    """The forms a signal's values take (what a detector's ``update()`` gets)."""

    VALUE = "value"  # one number per window: a rate, a quantile, a mean
    COUNT = "count"  # requests per window
    RATE = "rate"  # events of total per window (0/1 flags for the rate tests)
    EXCEEDANCE = "exceedance"  # requests above the baseline's latency quantile (rate_cusum)
    SAMPLES = "samples"  # the window's per-request values (from its quantile sketch)
    CATEGORIES = "categories"  # one label per request (the language mix)
    SEGMENTS = "segments"  # events of total per segment of a version (bias)
    VERSIONS = "versions"  # events of total per model version (A/B)
    VERSION_SAMPLES = "version_samples"  # per-request values per model version (A/B)
    EMBEDDINGS = "embeddings"  # the sampled texts' embeddings (n x d)
    TEXTS = "texts"  # the sampled texts
    SIMILARITIES = "similarities"  # prompt-answer similarity per request: no signal has it
    CONFUSION = "confusion"  # labelled outcomes per segment: no signal has it


WINDOW, SAMPLE = "window", "sample"


@dataclass(frozen=True)
class SignalSpec:
    """One signal of the catalog."""

    name: str
    inputs: tuple[Input, ...]
    source: str  # WINDOW or SAMPLE
    label: str  # how titles name it
    what: str
    unit: str = ""  # "rate", "ms", "count", "" (a plain number)


_RATE_INPUTS = (Input.RATE, Input.VALUE, Input.SEGMENTS, Input.VERSIONS)
_LATENCY_INPUTS = (Input.EXCEEDANCE, Input.SAMPLES, Input.VALUE, Input.VERSION_SAMPLES)

SIGNALS: dict[str, SignalSpec] = {
    spec.name: spec
    for spec in (
        SignalSpec(
            "requests",
            (Input.COUNT, Input.VALUE),
            WINDOW,
            "Requests",
            "requests per window",
            "count",
        ),
        SignalSpec(
            "error_rate",
            _RATE_INPUTS,
            WINDOW,
            "Error rate",
            "failed requests (error, timeout) of requests",
            "rate",
        ),
        SignalSpec(
            "refusal_rate",
            _RATE_INPUTS,
            WINDOW,
            "Refusal rate",
            "refusals of answered requests",
            "rate",
        ),
        SignalSpec(
            "empty_rate",
            _RATE_INPUTS,
            WINDOW,
            "Empty answers",
            "empty answers of answered requests",
            "rate",
        ),
        SignalSpec(
            "truncated_rate",
            _RATE_INPUTS,
            WINDOW,
            "Truncated answers",
            "answers cut off (status truncated or finish_reason length) of requests",
            "rate",
        ),
        SignalSpec(
            "negative_feedback",
            _RATE_INPUTS,
            WINDOW,
            "Negative feedback",
            "negative of scored feedback",
            "rate",
        ),
        SignalSpec(
            "ttft",
            _LATENCY_INPUTS,
            WINDOW,
            "TTFT",
            "time to first token per request (value: the window's detectors.latency_quantile)",
            "ms",
        ),
        SignalSpec(
            "tpot",
            _LATENCY_INPUTS,
            WINDOW,
            "Time per output token",
            "time per output token per request (value: the quantile)",
            "ms",
        ),
        SignalSpec(
            "latency",
            _LATENCY_INPUTS,
            WINDOW,
            "Latency",
            "end-to-end latency per request (value: the quantile)",
            "ms",
        ),
        SignalSpec(
            "prompt_tokens",
            (Input.VALUE,),
            WINDOW,
            "Prompt tokens",
            "mean prompt tokens per request",
        ),
        SignalSpec(
            "completion_tokens",
            (Input.VALUE,),
            WINDOW,
            "Completion tokens",
            "mean completion tokens per request",
        ),
        SignalSpec(
            "response_chars",
            (Input.VALUE,),
            WINDOW,
            "Answer length",
            "mean answer characters per request",
        ),
        SignalSpec(
            "language_mix",
            (Input.CATEGORIES,),
            WINDOW,
            "Language mix",
            "answers' language labels (windows.quality_signals)",
        ),
        SignalSpec(
            "embedding_prompt",
            (Input.EMBEDDINGS,),
            SAMPLE,
            "Prompt embeddings",
            "sampled prompts' embeddings",
        ),
        SignalSpec(
            "embedding_response",
            (Input.EMBEDDINGS,),
            SAMPLE,
            "Answer embeddings",
            "sampled answers' embeddings",
        ),
        SignalSpec("prompt_text", (Input.TEXTS,), SAMPLE, "Prompts", "sampled prompt texts"),
        SignalSpec("response_text", (Input.TEXTS,), SAMPLE, "Answers", "sampled answer texts"),
    )
}

#: (signal, detector) pairs the runner's own path judges against the model's baselines.
BUILTIN_RATE_SIGNALS = frozenset(
    {"ttft", "tpot", "latency", "error_rate", "refusal_rate", "empty_rate", "negative_feedback"}
)
BUILTIN_EMBEDDING_SIGNALS = frozenset({"embedding_prompt", "embedding_response"})
RATE_CUSUM, EMBEDDING_SHIFT = "rate_cusum", "embedding_shift"


def is_builtin(signal: str, detector: str) -> bool:
    """Whether the runner's own code judges this pair (the binomial CUSUM against the
    model's baselines, the embedding shift test), rather than a configured detector."""
    if detector == RATE_CUSUM:
        return Input.RATE in SIGNALS[signal].inputs or signal in BUILTIN_RATE_SIGNALS
    return detector == EMBEDDING_SHIFT and signal in BUILTIN_EMBEDDING_SIGNALS


# -- calibration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """How a detector's false-alarm parameter follows from its share (module docstring)."""

    rule: str  # "alpha", "z", "sequential" or "rate_cusum"
    param: str
    allowance: str = ""  # "sequential": the parameter holding k (in sigmas)

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters the budget sets (a user inside the budget may not)."""
        return ("threshold", "window_alpha") if self.rule == "rate_cusum" else (self.param,)

    def values(self, arl_series: float, params: dict[str, Any]) -> dict[str, float]:
        """The calibrated parameters for a series that must keep ``arl_series`` windows
        between false alarms (the share's ARL times the series judged at once)."""
        arl_series = max(arl_series, 2.0)
        alpha = 1.0 / arl_series
        direction = str(params.get("direction", "both"))
        if self.rule == "alpha":
            return {self.param: alpha}
        if self.rule == "z":
            return {self.param: z_threshold(alpha, direction)}
        if self.rule == "sequential":
            k = float(params[self.allowance])
            return {self.param: cusum_interval(arl_series, k, direction == "both")}
        return {"threshold": math.log(2.0 * arl_series), "window_alpha": alpha / 2.0}


def z_threshold(alpha: float, direction: str = "both") -> float:
    """The z a standard normal value passes with probability ``alpha`` (split over both
    sides when ``direction`` is "both")."""
    return float(stats.norm.isf(alpha / 2.0 if direction == "both" else alpha))


def cusum_arl(h: float, k: float) -> float:
    """In-control average run length of a one-sided CUSUM with allowance ``k`` and decision
    interval ``h`` on standard normal steps (Siegmund 1985's approximation)."""
    b = h + 1.166
    if k < 1e-6:
        return b * b
    x = 2.0 * k * b
    return (math.expm1(x) - x) / (2.0 * k * k)


def cusum_interval(arl: float, k: float, two_sided: bool = True) -> float:
    """The decision interval ``h`` whose in-control run length is ``arl`` (each side of a
    two-sided scheme ``2 x arl``: their alarm rates add)."""
    target = 2.0 * arl if two_sided else arl
    low, high = 0.0, 1.0
    while cusum_arl(high, k) < target:
        high *= 2.0
    for _ in range(60):
        mid = (low + high) / 2.0
        low, high = (mid, high) if cusum_arl(mid, k) < target else (low, mid)
    return high


ALPHA = Calibration("alpha", "alpha")
Z = Calibration("z", "threshold")


@dataclass(frozen=True)
class Fit:
    """Which inputs a detector takes (preferred first), how the budget calibrates it, and
    whether it learns a ``reference`` sample from the stream first."""

    accepts: tuple[Input, ...]
    calibration: Calibration | None = None
    reference: bool = False
    #: Constructor arguments an input implies (psi on categories is categorical, ...).
    implied: dict[Input, dict[str, Any]] = field(default_factory=dict)


_NUMBERS = (Input.SAMPLES, Input.VALUE)
FITS: dict[str, Fit] = {
    "threshold": Fit((Input.VALUE,)),
    "cusum": Fit((Input.VALUE,), Calibration("sequential", "h", "k")),
    "ewma_zscore": Fit((Input.VALUE,), Z),
    "page_hinkley": Fit((Input.VALUE,), Calibration("sequential", "threshold", "delta")),
    "robust_zscore": Fit((Input.VALUE,), Z),
    "throughput": Fit((Input.COUNT,), Z),
    "seasonal_throughput": Fit((Input.COUNT,), Z),
    "rate_cusum": Fit((Input.RATE, Input.EXCEEDANCE), Calibration("rate_cusum", "threshold")),
    "ks_drift": Fit(_NUMBERS, ALPHA, reference=True),
    "cvm_drift": Fit(_NUMBERS, ALPHA, reference=True),
    "wasserstein_drift": Fit(_NUMBERS, reference=True),
    "psi_drift": Fit(
        (Input.CATEGORIES, *_NUMBERS),
        reference=True,
        implied={Input.CATEGORIES: {"categorical": True}},
    ),
    "chi_square_drift": Fit((Input.CATEGORIES,), ALPHA, reference=True),
    "mmd_drift": Fit((Input.EMBEDDINGS,), reference=True),
    "embedding_ks_drift": Fit((Input.EMBEDDINGS,), ALPHA, reference=True),
    "online_mmd": Fit((Input.EMBEDDINGS,), reference=True),
    "online_lsdd": Fit((Input.EMBEDDINGS,), reference=True),
    "embedding_shift": Fit((Input.EMBEDDINGS,), ALPHA),
    "embedding_outlier": Fit((Input.EMBEDDINGS,), ALPHA, reference=True),
    "refusal_rate": Fit((Input.RATE, Input.TEXTS), ALPHA),
    "empty_truncated_rate": Fit((Input.RATE, Input.TEXTS), ALPHA),
    "injection_rate": Fit((Input.TEXTS,), ALPHA),
    "language_shift": Fit(
        (Input.CATEGORIES, Input.TEXTS),
        ALPHA,
        implied={Input.CATEGORIES: {"labels": True}, Input.TEXTS: {"labels": False}},
    ),
    "length_shift": Fit((Input.TEXTS, Input.VALUE), ALPHA),
    "relevance": Fit((Input.SIMILARITIES,), ALPHA),
    "segment_rate_bias": Fit((Input.SEGMENTS,), ALPHA),
    "equal_opportunity": Fit((Input.CONFUSION,), ALPHA),
    "ab_rate": Fit((Input.VERSIONS,), ALPHA),
    "ab_latency": Fit((Input.VERSION_SAMPLES,), ALPHA),
}

#: Why a detector fits no signal yet (what a plan that asks for it is told).
UNFED = {
    "relevance": "needs each sampled answer's embedding next to its own prompt's; the "
    "embedding stage samples prompts and answers independently",
    "equal_opportunity": "needs labelled outcomes (predicted and actual) per segment; windows "
    "count feedback, not a confusion matrix",
}

#: The reference a detector learns first, in the signal's observations (values, labels,
#: rows), unless the entry's ``reference_size`` says otherwise.
REFERENCE_SIZE = {
    Input.VALUE: 30,
    Input.SAMPLES: 1000,
    Input.CATEGORIES: 1000,
    Input.EMBEDDINGS: 256,
}
#: Sampled embeddings are projected to this many dimensions (fixed random orthonormal
#: directions) for the configured detectors, so a reference fits a state record.
EMBEDDING_DIMS = 32


def fitting_input(detector: str, signal: str) -> Input | None:
    """The input ``detector`` takes from ``signal``, or None when none fits."""
    fit, spec = FITS.get(detector), SIGNALS.get(signal)
    if fit is None or spec is None:
        return None
    return next((form for form in fit.accepts if form in spec.inputs), None)


def signals_for(detector: str) -> list[str]:
    """The signals ``detector`` can run on."""
    return [name for name in SIGNALS if fitting_input(detector, name) is not None]


def min_reference(detector: str, params: dict[str, Any]) -> int:
    """The fewest reference observations ``detector`` accepts with ``params``."""
    window = int(params.get("window_size", 64))
    if detector == "online_mmd":
        return 3 * window
    if detector == "online_lsdd":
        centers = params.get("n_centers")
        return (2 * window if centers is None else int(centers)) + 3 * window
    if detector == "embedding_outlier":
        return int(params.get("k", 5)) + 1
    return 2


def reference_size(detector: str, form: Input, params: dict[str, Any]) -> int:
    """The default reference of ``detector`` on an input ``form``."""
    return max(REFERENCE_SIZE.get(form, 2), min_reference(detector, params))


def catalog_markdown() -> str:
    """The README's table of signals: where each comes from, what it gives, what fits it."""
    lines = [
        "| signal | from | gives | what | detectors that fit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in SIGNALS.values():
        fits = ", ".join(f"`{name}`" for name in FITS if fitting_input(name, spec.name))
        forms = ", ".join(spec.inputs)
        lines.append(f"| `{spec.name}` | {spec.source} | {forms} | {spec.what} | {fits} |")
    return "\n".join(lines)
