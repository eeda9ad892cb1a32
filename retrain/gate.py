"""The gate: a candidate replaces the serving version only on evidence that it is better.

:func:`evaluate` scores the candidate and the serving model on the same held-out examples
(the dataset's evaluation split, which is later in time than anything trained on), with the
metrics the evaluation set supports:

- on corrections (``desirable`` is ``None``): ``completion_loss``, mean NLL per token of
  the correction, lower is better; ``preference_accuracy``, the share of preference pairs
  (correction vs the logged response) where the model gives the correction the higher
  *total* log-likelihood (the share by log-likelihood per token is kept beside it,
  ``per_token``: a total favours the shorter text, and a refusal is usually shorter than
  its correction);
- on thumbs and scores (KTO examples, ``desirable`` ``True``/``False``):
  ``undesirable_nll``, mean NLL per token of the answers users marked down, greater is
  better (the candidate should make them less likely), and ``desirable_nll``, the same on
  the answers marked up, lower is better. A policy written before KTO names neither; they
  then get :data:`KTO_DEFAULTS` (the first must improve, the second must not get worse);
- the **behaviour check**, when a :class:`BehaviourTarget` names the incident's signal: both
  models answer the evaluation prompts of the incident's segment and genmon's own judge
  of that signal counts the bad answers (``refusal_rate`` by
  :func:`~genmon.detectors.quality.refusal.is_refusal`). A refusal incident is fixed only
  when the candidate refuses significantly less. It has the last word: whatever the
  likelihoods say, a candidate that fails it is not promoted.

Every comparison is paired (the same examples for both models) with a percentile
bootstrap confidence interval of the difference. A :class:`MetricThreshold` (MLflow's
``MetricThreshold`` semantics: direction, minimum absolute and relative improvement, an
optional absolute bound) passes only when the interval of the improvement excludes zero
in the good direction *and* the minimum changes hold: an identical candidate is rejected
as "no significant improvement". ``must_improve=False`` makes a guard instead: it fails
only when the candidate is significantly worse. Too little evidence (``min_eval_examples``,
``behaviour_min_prompts``, or no metric that must improve could be judged) gives
``insufficient_evidence``, which never promotes.

Beyond the whole set (:mod:`genmon.retrain.segment_gate`): every metric per segment, so a
candidate better overall but worse on one segment is rejected with the segment named; the
segment a bias-triggered job up-weighted must itself pass; and an optional golden
regression set (:mod:`genmon.retrain.golden`) guards against forgetting.
:func:`check_servable` is the last check: the artifact loads and answers within a budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.gate_stats import NUMERICAL_TOLERANCE as NUMERICAL_TOLERANCE
from genmon.retrain.gate_stats import Comparison, compare, judge
from genmon.retrain.gate_stats import paired_bootstrap as paired_bootstrap

if TYPE_CHECKING:
    from genmon.retrain.lm import CausalLM

Decision = Literal["pass", "reject", "insufficient_evidence"]
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
#: Scored on corrections (SFT and DPO evaluation sets).
CORRECTION_METRICS = ("completion_loss", "preference_accuracy")
#: Scored on thumbs and scores (KTO evaluation sets).
KTO_METRICS = ("undesirable_nll", "desirable_nll")
SCORED_METRICS = (*CORRECTION_METRICS, *KTO_METRICS)


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


#: What a KTO evaluation set is judged by when the policy's thresholds do not name it: the
#: answers marked down must get less likely; those marked up must not get less likely.
KTO_DEFAULTS = {
    "undesirable_nll": MetricThreshold("undesirable_nll", greater_is_better=True),
    "desirable_nll": MetricThreshold("desirable_nll", greater_is_better=False, must_improve=False),
}


@dataclass(frozen=True)
class GateConfig:
    """How much evidence the gate asks for. A targeted behaviour signal without a threshold
    of its own must improve, a KTO metric gets :data:`KTO_DEFAULTS` (:meth:`threshold_for`).

    ``per_segment``: judge every metric on every segment ``key=value`` with at least
    ``min_segment_examples`` items too; a segment fails when it got worse by more than
    ``segment_tolerance`` (the metric's units) with confidence. The same tolerance is the
    margin of the golden set (``golden_set``: JSONL of ``{prompt, completion[, segment]}``).
    """

    thresholds: list[MetricThreshold] = field(default_factory=default_thresholds)
    min_eval_examples: int = 20
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    behaviour_min_prompts: int = 10
    servable_budget_s: float = 30.0
    per_segment: bool = True
    min_segment_examples: int = 20
    segment_tolerance: float = 0.02
    golden_set: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ConfigurationError(f"gate confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap_samples < 100:
            raise ConfigurationError(
                f"gate bootstrap_samples must be >= 100, got {self.bootstrap_samples}"
            )
        if min(self.min_eval_examples, self.behaviour_min_prompts, self.min_segment_examples) < 1:
            raise ConfigurationError(
                "gate min_eval_examples, behaviour_min_prompts and min_segment_examples "
                "must be >= 1"
            )
        if self.segment_tolerance < 0:
            raise ConfigurationError(
                f"gate segment_tolerance must be >= 0, got {self.segment_tolerance}"
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
        return KTO_DEFAULTS.get(metric)


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


# -- the metrics ----------------------------------------------------------------------------
Turns = list[list[dict[str, str]] | None]


def _token_counts(
    model: CausalLM, prompts: list[str], completions: list[str], turns: Turns
) -> np.ndarray:
    """Completion tokens (end of sequence included) each NLL was averaged over, counted
    the way :meth:`CausalLM.completion_nll` frames them."""
    from genmon.retrain.lm import encode_pair

    counts = []
    for prompt, completion, messages in zip(prompts, completions, turns, strict=True):
        _, labels = encode_pair(model.tokenizer, prompt, completion, messages, model.max_length)
        counts.append(sum(1 for label in labels if label >= 0))
    return np.array(counts, dtype=np.float64)


def _prefers(
    model: CausalLM, prompts: list[str], chosen: list[str], rejected: list[str], turns: Turns
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, whether ``model`` prefers the correction: by total log-likelihood (the
    metric) and by log-likelihood per token (kept for reference: a total favours the
    shorter text, and a refusal is often shorter than its correction)."""
    nll_chosen = np.asarray(model.completion_nll(prompts, chosen, messages=turns), np.float64)
    nll_rejected = np.asarray(model.completion_nll(prompts, rejected, messages=turns), np.float64)
    total_chosen = nll_chosen * _token_counts(model, prompts, chosen, turns)
    total_rejected = nll_rejected * _token_counts(model, prompts, rejected, turns)
    return (
        (total_chosen < total_rejected).astype(np.float64),
        (nll_chosen < nll_rejected).astype(np.float64),
    )


@dataclass
class Scores:
    """One metric's per-item values for both models, with the examples they belong to: the
    per-segment checks slice them (:mod:`genmon.retrain.segment_gate`)."""

    metric: str
    items: list[SftExample]
    candidate: np.ndarray
    serving: np.ndarray


#: What each scored metric is computed on, as reasons name it.
ITEMS = {
    "completion_loss": "corrections",
    "preference_accuracy": "preference pairs",
    "undesirable_nll": "answers marked undesirable",
    "desirable_nll": "answers marked desirable",
}


def metric_items(metric: str, eval_set: Sequence[SftExample]) -> list[SftExample]:
    """The examples ``metric`` is computed on: corrections (``desirable`` ``None``), their
    preference pairs, or the KTO examples of one class."""
    corrections = [e for e in eval_set if e.desirable is None]
    if metric == "completion_loss":
        return corrections
    if metric == "preference_accuracy":
        return [e for e in corrections if e.rejected and e.rejected.strip() != e.completion.strip()]
    return [e for e in eval_set if e.desirable is (metric == "desirable_nll")]


def _supported(metric: str, eval_set: Sequence[SftExample]) -> bool:
    """Whether the evaluation set holds the kind of data ``metric`` is about."""
    kto = metric in KTO_METRICS
    return any((e.desirable is not None) == kto for e in eval_set)


def _score(
    metric: str, candidate: CausalLM, serving: CausalLM, items: list[SftExample], config: GateConfig
) -> tuple[Comparison, Scores]:
    prompts, completions = [e.prompt for e in items], [e.completion for e in items]
    # Chat examples are scored as they were trained: through the base's chat template.
    turns: Turns = [e.messages for e in items]
    extra: dict[str, Any] = {}
    if metric == "preference_accuracy":
        rejected = [e.rejected or "" for e in items]
        ours, ours_per_token = _prefers(candidate, prompts, completions, rejected, turns)
        theirs, theirs_per_token = _prefers(serving, prompts, completions, rejected, turns)
        extra["per_token"] = {
            "candidate": float(ours_per_token.mean()),
            "serving": float(theirs_per_token.mean()),
        }
    else:
        ours = np.asarray(candidate.completion_nll(prompts, completions, messages=turns))
        theirs = np.asarray(serving.completion_nll(prompts, completions, messages=turns))
    comparison = compare(metric, ours, theirs, config)
    comparison.extra.update(extra)
    return comparison, Scores(metric, items, ours, theirs)


def segment_prompts(eval_set: Sequence[SftExample], segment: Mapping[str, str]) -> list[str]:
    """Distinct evaluation prompts whose segment holds every item of ``segment``.

    A value ``*`` (a bias incident's segment names the attribute, ``topic=*``, and flags
    one of its values in the evidence) matches every value of that attribute."""
    return list(_segment_turns(eval_set, segment))


def _segment_turns(
    eval_set: Sequence[SftExample], segment: Mapping[str, str]
) -> dict[str, list[dict[str, str]] | None]:
    """:func:`segment_prompts` with each prompt's chat turns (its first example's), so a
    chat model answers through its chat template, as it was trained and is served."""
    turns: dict[str, list[dict[str, str]] | None] = {}
    for e in eval_set:
        if all(e.segment.get(k) == v or (v == "*" and k in e.segment) for k, v in segment.items()):
            turns.setdefault(e.prompt, e.messages)
    return turns


def _behaviour(
    candidate: CausalLM,
    serving: CausalLM,
    prompts: list[str],
    signal: str,
    config: GateConfig,
    turns: Turns | None = None,
) -> Comparison:
    bad = _judges()[signal]
    # Chat turns only when there are some: a plain model's generate takes prompts alone.
    chat = {"messages": turns} if turns and any(turns) else {}
    answers = {
        "candidate": candidate.generate(prompts, **chat),
        "serving": serving.generate(prompts, **chat),
    }
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
    *,
    upweight: Mapping[str, str] | str | None = None,
    golden: Sequence[SftExample] | None = None,
) -> Verdict:
    """Judge ``candidate`` against ``serving`` on ``eval_set``: pass, reject or
    insufficient_evidence, with one reason per check.

    ``upweight``: the segment the job up-weighted (manifest ``upweight.segment``), judged
    like the whole set. ``golden``: the golden regression set; ``None`` reads
    ``config.golden_set`` when it is set."""
    from genmon.retrain.golden import golden_check, load_golden
    from genmon.retrain.segment_gate import judge_segments, judge_upweighted, parse_segment

    config = config or GateConfig()
    n = len(eval_set)
    metrics: dict[str, Any] = {"eval_examples": n, "confidence": config.confidence}
    if n < config.min_eval_examples:
        reason = (
            f"insufficient evidence: {n} evaluation examples, the gate needs at least "
            f"{config.min_eval_examples} (gate.min_eval_examples); gather more feedback"
        )
        return Verdict("insufficient_evidence", [reason], metrics)
    comparisons, scores, notes = _comparisons(candidate, serving, list(eval_set), config, target)
    for comparison in comparisons:
        metrics[comparison.metric] = comparison.to_json()
    overall = {c.metric: c for c in comparisons}
    checks = [*comparisons, *_improvement_judged(comparisons, config)]
    if config.per_segment:
        report = judge_segments(scores, overall, config)
        checks, notes = checks + report.comparisons, notes + report.notes
        metrics["segments"] = report.metrics
    segment = parse_segment(upweight) if upweight else {}
    if segment:
        report = judge_upweighted(scores, segment, config)
        checks, notes = checks + report.comparisons, notes + report.notes
        metrics["upweighted_segment"] = report.metrics
    if golden is None and config.golden_set:
        golden = load_golden(config.golden_set)
    if golden is not None:
        check = golden_check(candidate, serving, golden, config, config.golden_set)
        checks.append(check)
        metrics["golden_set"] = check.to_json()
    statuses = {c.status for c in checks}
    decision: Decision = "pass"
    if "fail" in statuses:
        decision = "reject"
    elif "insufficient" in statuses:
        decision = "insufficient_evidence"
    # The reasons behind the decision first, then the rest.
    first = {"reject": "fail", "insufficient_evidence": "insufficient", "pass": "pass"}[decision]
    ordered = sorted(checks, key=lambda c: c.status != first)
    return Verdict(decision, [c.reason for c in ordered] + notes, metrics)


def _comparisons(
    candidate: CausalLM,
    serving: CausalLM,
    eval_set: list[SftExample],
    config: GateConfig,
    target: BehaviourTarget | None,
) -> tuple[list[Comparison], list[Scores], list[str]]:
    """Every metric the evaluation set supports (and the behaviour check), with the
    per-item scores the per-segment checks slice."""
    out: list[Comparison] = []
    scores: list[Scores] = []
    notes: list[str] = []
    named = {t.metric for t in config.thresholds}
    for metric in SCORED_METRICS:
        threshold = config.threshold_for(metric)
        if threshold is None:
            continue
        items = metric_items(metric, eval_set)
        if not _supported(metric, eval_set):
            if metric in named:
                kind = "thumbs or scores" if metric in KTO_METRICS else "corrections"
                notes.append(f"{metric} not judged: the evaluation set has no {kind}")
        elif threshold.must_improve and len(items) < config.min_eval_examples:
            need = config.min_eval_examples
            out.append(_short(metric, len(items), need, ITEMS[metric], "min_eval_examples"))
        elif not items:
            notes.append(f"{metric} not judged: the evaluation set has no {ITEMS[metric]}")
        else:
            comparison, score = _score(metric, candidate, serving, items, config)
            out.append(judge(comparison, threshold))
            scores.append(score)
    if target is not None:
        behaviour = _target_check(candidate, serving, eval_set, config, target)
        if isinstance(behaviour, str):
            notes.append(behaviour)
        else:
            out.append(behaviour)
    return out, scores, notes


def _improvement_judged(comparisons: list[Comparison], config: GateConfig) -> list[Comparison]:
    """Nothing promotes on guards alone: when no metric that must improve was judged (a KTO
    set of thumbs up only, say), the verdict is insufficient evidence."""
    for comparison in comparisons:
        threshold = config.threshold_for(comparison.metric)
        if threshold is not None and threshold.must_improve:
            return []
    nan = math.nan
    missing = Comparison("improvement", nan, nan, (nan, nan), 0, confidence=nan)
    missing.status = "insufficient"
    must = [t.metric for t in config.thresholds if t.must_improve]
    must += [m for m, t in KTO_DEFAULTS.items() if t.must_improve and m not in must]
    missing.reason = (
        "insufficient evidence: no metric that must improve could be judged on this "
        f"evaluation set ({', '.join(must)} need corrections or answers marked undesirable); "
        "the gate promotes only on evidence of an improvement"
    )
    return [missing]


def _short(metric: str, have: int, need: int, what: str, setting: str) -> Comparison:
    """A metric that could not be judged for lack of items."""
    nan = math.nan
    comparison = Comparison(metric, nan, nan, (nan, nan), have, confidence=nan)
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
) -> Comparison | str:
    if target.signal not in BEHAVIOUR_SIGNALS:
        return (
            f"behaviour check skipped: signal {target.signal} cannot be judged on generated "
            f"text (the gate judges {', '.join(BEHAVIOUR_SIGNALS)}); the verdict rests on the "
            "other metrics"
        )
    threshold = config.threshold_for(target.signal)
    assert threshold is not None  # behaviour signals always have one
    chats = _segment_turns(eval_set, target.segment)
    prompts = list(chats)
    where = ", ".join(f"{k}={v}" for k, v in sorted(target.segment.items())) or "all segments"
    if len(prompts) < config.behaviour_min_prompts:
        need, what = config.behaviour_min_prompts, f"evaluation prompts of {where}"
        short = _short(target.signal, len(prompts), need, what, "behaviour_min_prompts")
        short.extra["segment"] = dict(target.segment)
        return short
    behaviour = _behaviour(candidate, serving, prompts, target.signal, config, list(chats.values()))
    comparison = judge(behaviour, threshold)
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
