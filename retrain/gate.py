"""The gate: a candidate replaces the serving version only on evidence that it is better.

:func:`evaluate` scores the candidate and the serving model on the same held-out examples
(the dataset's evaluation split, which is later in time than anything trained on):

- ``completion_loss``: mean NLL per token of the desirable completion (the correction);
  lower is better;
- ``preference_accuracy``: share of preference pairs (correction vs the logged response)
  where the model gives the correction the higher *total* log-likelihood (the share by
  log-likelihood per token is kept beside it, ``per_token``: a total favours the shorter
  text, and a refusal is usually shorter than its correction);
- the **behaviour check**, when a :class:`BehaviourTarget` names the incident's signal: both
  models answer the evaluation prompts of the incident's segment and genmon's own judge
  of that signal counts the bad answers (``refusal_rate`` by
  :func:`~genmon.detectors.quality.refusal.is_refusal`). A refusal incident is fixed only
  when the candidate refuses significantly less.

Every comparison is paired (the same examples for both models) with a percentile
bootstrap confidence interval of the difference. A :class:`MetricThreshold` (MLflow's
``MetricThreshold`` semantics: direction, minimum absolute and relative improvement, an
optional absolute bound) passes only when the interval of the improvement excludes zero
in the good direction *and* the minimum changes hold: an identical candidate is rejected
as "no significant improvement". ``must_improve=False`` makes a guard instead: it fails
only when the candidate is significantly worse. Too little evidence (``min_eval_examples``,
``behaviour_min_prompts``) gives ``insufficient_evidence``, which never promotes.
:func:`check_servable` is the last check: the artifact loads and answers within a budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample

if TYPE_CHECKING:
    from genmon.retrain.lm import CausalLM

Decision = Literal["pass", "reject", "insufficient_evidence"]
#: Differences smaller than this (relative to the serving value, at least 1) are float
#: noise, not evidence: an adapter of zeros scores a hair apart from its base on some kernels.
NUMERICAL_TOLERANCE = 1e-6
#: The prompt :func:`check_servable` asks.
SERVABLE_PROBE = "Hello, can you help me?"
#: Generated answers kept in the verdict's metrics as examples, per model.
SAMPLES_KEPT = 3


def _judges() -> dict[str, Callable[[str], bool]]:
    """Signals the behaviour check can judge on generated text (lower rates are better)."""
    from genmon.detectors.quality.empty_truncated import classify_response
    from genmon.detectors.quality.refusal import is_refusal

    return {"refusal_rate": is_refusal, "empty_rate": lambda text: classify_response(text)[0]}


BEHAVIOUR_SIGNALS = ("refusal_rate", "empty_rate")
SCORED_METRICS = ("completion_loss", "preference_accuracy")


@dataclass(frozen=True)
class MetricThreshold:
    """When ``metric`` counts as good enough (MLflow ``MetricThreshold`` semantics).

    ``min_absolute_change``/``min_relative_change``: the candidate must beat the serving
    model by at least this much (relative to the serving value). ``threshold``: an
    absolute bound the candidate's value must meet. ``must_improve=False``: a guard that
    fails only when the candidate is significantly worse (the minimum changes are then not
    asked).
    """

    metric: str
    greater_is_better: bool
    min_absolute_change: float = 0.0
    min_relative_change: float = 0.0
    threshold: float | None = None
    must_improve: bool = True

    def __post_init__(self) -> None:
        if self.metric not in (*SCORED_METRICS, *BEHAVIOUR_SIGNALS):
            raise ConfigurationError(
                f"gate threshold on unknown metric {self.metric!r}; use one of "
                f"{', '.join((*SCORED_METRICS, *BEHAVIOUR_SIGNALS))}"
            )
        if self.min_absolute_change < 0 or self.min_relative_change < 0:
            raise ConfigurationError(
                f"gate threshold {self.metric}: minimum changes are improvements and must be "
                ">= 0 (the direction is greater_is_better)"
            )


def default_thresholds() -> list[MetricThreshold]:
    """The loss on corrections must improve; preference accuracy must not get worse."""
    return [
        MetricThreshold("completion_loss", greater_is_better=False),
        MetricThreshold("preference_accuracy", greater_is_better=True, must_improve=False),
    ]


@dataclass(frozen=True)
class GateConfig:
    """How much evidence the gate asks for. A targeted behaviour signal without a threshold
    of its own must improve (:meth:`threshold_for`)."""

    thresholds: list[MetricThreshold] = field(default_factory=default_thresholds)
    min_eval_examples: int = 20
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    behaviour_min_prompts: int = 10
    servable_budget_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ConfigurationError(f"gate confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap_samples < 100:
            raise ConfigurationError(
                f"gate bootstrap_samples must be >= 100, got {self.bootstrap_samples}"
            )
        if self.min_eval_examples < 1 or self.behaviour_min_prompts < 1:
            raise ConfigurationError(
                "gate min_eval_examples and behaviour_min_prompts must be >= 1"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        """From a policy's ``gate:`` section; thresholds as a list of mappings."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "thresholds" in values:
            values["thresholds"] = [_threshold(item) for item in values["thresholds"]]
        return cls(**values)

    def threshold_for(self, metric: str) -> MetricThreshold | None:
        for threshold in self.thresholds:
            if threshold.metric == metric:
                return threshold
        if metric in BEHAVIOUR_SIGNALS:
            return MetricThreshold(metric, greater_is_better=False)
        return None


def _threshold(item: MetricThreshold | Mapping[str, Any]) -> MetricThreshold:
    if isinstance(item, MetricThreshold):
        return item
    known = {f.name for f in fields(MetricThreshold)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown gate threshold field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return MetricThreshold(**item)


@dataclass(frozen=True)
class BehaviourTarget:
    """What the triggering incident was about: its signal and segment (empty: all)."""

    signal: str
    segment: dict[str, str] = field(default_factory=dict)


@dataclass
class Verdict:
    """The gate's answer with the reasons and the numbers behind it (stored on the job)."""

    decision: Decision
    reasons: list[str]
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision, "reasons": list(self.reasons), "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        return cls(data["decision"], list(data.get("reasons", [])), dict(data.get("metrics", {})))

    def with_servable(self, ok: bool, reason: str) -> Verdict:
        """This verdict after :func:`check_servable`: an artifact that cannot serve is
        rejected whatever it scored."""
        decision: Decision = self.decision if ok else "reject"
        metrics = {**self.metrics, "servable": {"ok": ok, "reason": reason}}
        return replace(self, decision=decision, reasons=[*self.reasons, reason], metrics=metrics)


# -- statistics -----------------------------------------------------------------------------
def paired_bootstrap(
    diffs: np.ndarray, samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences."""
    diffs = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _fmt(value: float) -> str:
    return "0.000" if abs(value) < 5e-4 else f"{value:.3f}"


@dataclass
class _Comparison:
    """One metric for both models on the same items, and the threshold's judgement."""

    metric: str
    candidate: float
    serving: float
    ci: tuple[float, float]  # of the change, candidate - serving
    n: int
    confidence: float
    status: str = "pass"  # pass | fail | insufficient
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        level = round(self.confidence * 100)
        return (
            f"{self.metric} {_fmt(self.serving)} -> {_fmt(self.candidate)} "
            f"({level}% CI of change {_fmt(self.ci[0])}..{_fmt(self.ci[1])})"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["change"] = self.candidate - self.serving
        out["ci"] = list(self.ci)
        del out["extra"]
        return {**_finite(out), **self.extra}


def compare(
    metric: str, candidate: np.ndarray, serving: np.ndarray, config: GateConfig
) -> _Comparison:
    """Paired comparison of per-item values (means, and the interval of the change)."""
    diffs = np.asarray(candidate, np.float64) - np.asarray(serving, np.float64)
    ci = paired_bootstrap(diffs, config.bootstrap_samples, config.confidence, config.seed)
    ours, theirs = float(np.mean(candidate)), float(np.mean(serving))
    return _Comparison(metric, ours, theirs, ci, len(diffs), config.confidence)


def judge(comparison: _Comparison, threshold: MetricThreshold) -> _Comparison:
    """Apply ``threshold``: set ``status`` and ``reason`` on ``comparison``."""
    sign = 1.0 if threshold.greater_is_better else -1.0
    improvement = sign * (comparison.candidate - comparison.serving)
    low, high = sorted((sign * comparison.ci[0], sign * comparison.ci[1]))
    tolerance = NUMERICAL_TOLERANCE * max(1.0, abs(comparison.serving))
    worse, better = high < -tolerance, low > tolerance
    text = comparison.describe()
    if worse:
        comparison.status, comparison.reason = "fail", f"significantly worse: {text}"
    elif not threshold.must_improve:
        comparison.reason = f"{'improved' if better else 'not significantly worse'}: {text}"
    elif not better:
        comparison.status, comparison.reason = "fail", f"no significant improvement: {text}"
    else:
        comparison.status, comparison.reason = _minimums(comparison, threshold, improvement, text)
    if comparison.status == "pass" and threshold.threshold is not None:
        bound = threshold.threshold
        if sign * (comparison.candidate - bound) < 0:
            side = "below" if threshold.greater_is_better else "above"
            comparison.status = "fail"
            comparison.reason = (
                f"{comparison.metric} {_fmt(comparison.candidate)} is {side} the threshold "
                f"{_fmt(bound)}: {text}"
            )
    return comparison


def _minimums(
    comparison: _Comparison, threshold: MetricThreshold, improvement: float, text: str
) -> tuple[str, str]:
    if improvement < threshold.min_absolute_change:
        return "fail", (
            f"improvement too small: {text}; it improves by {_fmt(improvement)}, "
            f"min_absolute_change asks for {_fmt(threshold.min_absolute_change)}"
        )
    base = abs(comparison.serving)
    relative = improvement / base if base > 0 else math.inf
    if relative < threshold.min_relative_change:
        return "fail", (
            f"improvement too small: {text}; it improves by {relative:.1%} of the serving "
            f"value, min_relative_change asks for {threshold.min_relative_change:.1%}"
        )
    return "pass", f"improved: {text}"


def _finite(data: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as ``None``: PostgreSQL's JSON has no NaN."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in data.items()}


# -- the metrics ----------------------------------------------------------------------------
def _token_counts(model: CausalLM, prompts: list[str], completions: list[str]) -> np.ndarray:
    """Completion tokens (end of sequence included) each NLL was averaged over, counted
    the way :meth:`CausalLM.completion_nll` frames them."""
    from genmon.retrain.lm import encode_example

    counts = []
    for prompt, completion in zip(prompts, completions, strict=True):
        _, labels = encode_example(model.tokenizer, prompt, completion, model.max_length)
        counts.append(sum(1 for label in labels if label >= 0))
    return np.array(counts, dtype=np.float64)


def _prefers(
    model: CausalLM, prompts: list[str], chosen: list[str], rejected: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, whether ``model`` prefers the correction: by total log-likelihood (the
    metric) and by log-likelihood per token (kept for reference: a total favours the
    shorter text, and a refusal is often shorter than its correction)."""
    nll_chosen = np.asarray(model.completion_nll(prompts, chosen), np.float64)
    nll_rejected = np.asarray(model.completion_nll(prompts, rejected), np.float64)
    total_chosen = nll_chosen * _token_counts(model, prompts, chosen)
    total_rejected = nll_rejected * _token_counts(model, prompts, rejected)
    return (
        (total_chosen < total_rejected).astype(np.float64),
        (nll_chosen < nll_rejected).astype(np.float64),
    )


def _preference(
    candidate: CausalLM, serving: CausalLM, pairs: list[SftExample], config: GateConfig
) -> _Comparison:
    prompts = [e.prompt for e in pairs]
    chosen = [e.completion for e in pairs]
    rejected = [e.rejected or "" for e in pairs]
    ours, ours_per_token = _prefers(candidate, prompts, chosen, rejected)
    theirs, theirs_per_token = _prefers(serving, prompts, chosen, rejected)
    comparison = compare("preference_accuracy", ours, theirs, config)
    comparison.extra["per_token"] = {
        "candidate": float(ours_per_token.mean()),
        "serving": float(theirs_per_token.mean()),
    }
    return comparison


def segment_prompts(eval_set: Sequence[SftExample], segment: Mapping[str, str]) -> list[str]:
    """Distinct evaluation prompts whose segment holds every item of ``segment``.

    A value ``*`` (a bias incident's segment names the attribute, ``topic=*``, and flags
    one of its values in the evidence) matches every value of that attribute."""
    chosen = (
        e.prompt
        for e in eval_set
        if all(e.segment.get(k) == v or (v == "*" and k in e.segment) for k, v in segment.items())
    )
    return list(dict.fromkeys(chosen))


def _behaviour(
    candidate: CausalLM, serving: CausalLM, prompts: list[str], signal: str, config: GateConfig
) -> _Comparison:
    bad = _judges()[signal]
    answers = {"candidate": candidate.generate(prompts), "serving": serving.generate(prompts)}
    flags = {name: np.array([bad(a) for a in out], np.float64) for name, out in answers.items()}
    comparison = compare(signal, flags["candidate"], flags["serving"], config)
    comparison.extra["samples"] = [
        {"prompt": p, "serving": s, "candidate": c}
        for p, s, c in list(zip(prompts, answers["serving"], answers["candidate"], strict=True))[
            :SAMPLES_KEPT
        ]
    ]
    return comparison


# -- the verdict ----------------------------------------------------------------------------
def evaluate(
    candidate: CausalLM,
    serving: CausalLM,
    eval_set: Sequence[SftExample],
    config: GateConfig | None = None,
    target: BehaviourTarget | None = None,
) -> Verdict:
    """Judge ``candidate`` against ``serving`` on ``eval_set``: pass, reject or
    insufficient_evidence, with one reason per check."""
    config = config or GateConfig()
    n = len(eval_set)
    metrics: dict[str, Any] = {"eval_examples": n, "confidence": config.confidence}
    if n < config.min_eval_examples:
        reason = (
            f"insufficient evidence: {n} evaluation examples, the gate needs at least "
            f"{config.min_eval_examples} (gate.min_eval_examples); gather more corrections"
        )
        return Verdict("insufficient_evidence", [reason], metrics)
    comparisons, notes = _comparisons(candidate, serving, list(eval_set), config, target)
    for comparison in comparisons:
        metrics[comparison.metric] = comparison.to_json()
    statuses = {c.status for c in comparisons}
    decision: Decision = "pass"
    if "fail" in statuses:
        decision = "reject"
    elif "insufficient" in statuses:
        decision = "insufficient_evidence"
    # The reasons behind the decision first, then the rest.
    first = {"reject": "fail", "insufficient_evidence": "insufficient", "pass": "pass"}[decision]
    ordered = sorted(comparisons, key=lambda c: c.status != first)
    return Verdict(decision, [c.reason for c in ordered] + notes, metrics)


def _comparisons(
    candidate: CausalLM,
    serving: CausalLM,
    eval_set: list[SftExample],
    config: GateConfig,
    target: BehaviourTarget | None,
) -> tuple[list[_Comparison], list[str]]:
    out: list[_Comparison] = []
    notes: list[str] = []
    loss = config.threshold_for("completion_loss")
    if loss is not None:
        prompts, chosen = [e.prompt for e in eval_set], [e.completion for e in eval_set]
        ours = candidate.completion_nll(prompts, chosen)
        theirs = serving.completion_nll(prompts, chosen)
        out.append(judge(compare("completion_loss", ours, theirs, config), loss))
    preference = config.threshold_for("preference_accuracy")
    pairs = [e for e in eval_set if e.rejected and e.rejected.strip() != e.completion.strip()]
    if preference is not None:
        if preference.must_improve and len(pairs) < config.min_eval_examples:
            need = config.min_eval_examples
            what = "preference pairs"
            out.append(_short("preference_accuracy", len(pairs), need, what, "min_eval_examples"))
        elif not pairs:
            notes.append("preference_accuracy not judged: the evaluation set has no pairs")
        else:
            out.append(judge(_preference(candidate, serving, pairs, config), preference))
    if target is not None:
        behaviour = _target_check(candidate, serving, eval_set, config, target)
        if isinstance(behaviour, str):
            notes.append(behaviour)
        else:
            out.append(behaviour)
    return out, notes


def _short(metric: str, have: int, need: int, what: str, setting: str) -> _Comparison:
    """A metric that could not be judged for lack of items."""
    nan = math.nan
    comparison = _Comparison(metric, nan, nan, (nan, nan), have, confidence=nan)
    comparison.status = "insufficient"
    comparison.reason = (
        f"insufficient evidence: {have} {what} for {metric}, the gate needs at least {need} "
        f"(gate.{setting})"
    )
    return comparison


def _target_check(
    candidate: CausalLM,
    serving: CausalLM,
    eval_set: list[SftExample],
    config: GateConfig,
    target: BehaviourTarget,
) -> _Comparison | str:
    if target.signal not in BEHAVIOUR_SIGNALS:
        return (
            f"behaviour check skipped: signal {target.signal} cannot be judged on generated "
            f"text (the gate judges {', '.join(BEHAVIOUR_SIGNALS)}); the verdict rests on the "
            "other metrics"
        )
    threshold = config.threshold_for(target.signal)
    assert threshold is not None  # behaviour signals always have one
    prompts = segment_prompts(eval_set, target.segment)
    where = ", ".join(f"{k}={v}" for k, v in sorted(target.segment.items())) or "all segments"
    if len(prompts) < config.behaviour_min_prompts:
        need, what = config.behaviour_min_prompts, f"evaluation prompts of {where}"
        short = _short(target.signal, len(prompts), need, what, "behaviour_min_prompts")
        short.extra["segment"] = dict(target.segment)
        return short
    comparison = judge(_behaviour(candidate, serving, prompts, target.signal, config), threshold)
    comparison.extra["segment"] = dict(target.segment)
    comparison.reason = f"behaviour check on {where}: {comparison.reason}"
    return comparison


def check_servable(
    base_uri: str, adapter_uri: str | None, budget_s: float, device: str = "auto"
) -> tuple[bool, str]:
    """Whether the artifact loads on its base and answers a prompt within ``budget_s``."""
    from genmon.retrain.lm import load_lm

    start = time.monotonic()
    try:
        model = load_lm(base_uri, adapter_uri, device=device)
        model.generate([SERVABLE_PROBE], max_new_tokens=16)
    except Exception as exc:  # whatever breaks loading or answering, it cannot serve
        return False, f"not servable: {type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - start
    if elapsed > budget_s:
        return False, (
            f"not servable: loading and a first answer took {elapsed:.1f} s, over the "
            f"{budget_s:.1f} s budget (gate.servable_budget_s)"
        )
    return True, f"servable: loaded and answered in {elapsed:.1f} s (budget {budget_s:.1f} s)"
