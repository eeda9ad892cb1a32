"""The gate says no: paired bootstrap comparisons against the serving model, MLflow-style
thresholds, a behaviour check judged by genmon's own detector, and too little evidence
never promotes. First on scripted models (the rules), then on the real tiny LM trained
on corrections, on swapped pairs and with learning rate 0 (the issue's acceptance)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from retrain_support_gate import (
    REFUSAL,
    ScriptedLM,
    examples,
    noisy,
    shifted,
    swapped,
    train_adapter,
    unlearnt_refusal,
)
from retrain_support_model import SupportData, corrections

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.gate import (
    BehaviourTarget,
    GateConfig,
    MetricThreshold,
    Verdict,
    check_servable,
    evaluate,
    paired_bootstrap,
)

if TYPE_CHECKING:
    from genmon.retrain.lm import CausalLM

CARDS = BehaviourTarget("refusal_rate", {"topic": "cards"})


def judged(candidate: Any, serving: Any, eval_set: Any, **kwargs: Any) -> Verdict:
    target = kwargs.pop("target", None)
    return evaluate(candidate, serving, eval_set, GateConfig(**kwargs), target)


def better(answer: Callable[[str], str] = lambda prompt: "Here is how.") -> ScriptedLM:
    """A candidate that learnt the corrections: lower loss on them, refusals unlikely."""
    return ScriptedLM(unlearnt_refusal(noisy(1.2, 0.3, seed=1)), answer)


def prefers_refusal(base: float) -> ScriptedLM:
    """A model that finds the refusal likelier than any correction."""
    loss = noisy(base, 0.2)
    return ScriptedLM(lambda p, c: 0.5 if c == REFUSAL else loss(p, c))


# -- the rules, on scripted models ----------------------------------------------------------
def test_a_candidate_identical_to_serving_is_no_significant_improvement() -> None:
    serving = ScriptedLM(noisy(2.0, 0.3))
    verdict = judged(ScriptedLM(noisy(2.0, 0.3)), serving, examples(30))
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith("no significant improvement: completion_loss")
    assert "(95% CI of change 0.000..0.000)" in verdict.reasons[0]
    assert verdict.metrics["completion_loss"]["ci"] == [0.0, 0.0]


def test_a_better_candidate_passes_with_the_interval_that_shows_it() -> None:
    serving = ScriptedLM(noisy(2.0, 0.3))
    candidate = better()
    verdict = judged(candidate, serving, examples(30))
    assert verdict.decision == "pass", verdict.reasons
    loss = verdict.metrics["completion_loss"]
    assert loss["candidate"] < loss["serving"]
    assert loss["ci"][0] < loss["ci"][1] < 0
    assert loss["status"] == "pass" and loss["n"] == 30
    assert any(r.startswith("improved: completion_loss") for r in verdict.reasons)


def test_a_worse_candidate_is_significantly_worse() -> None:
    serving = ScriptedLM(noisy(2.0, 0.3))
    verdict = judged(ScriptedLM(noisy(2.6, 0.3, seed=2)), serving, examples(30))
    assert verdict.decision == "reject"
    assert re.fullmatch(
        r"significantly worse: completion_loss 1\.9\d\d -> 2\.5\d\d "
        r"\(95% CI of change 0\.\d+\.\.0\.\d+\)",
        verdict.reasons[0],
    )


@pytest.mark.parametrize(
    ("threshold", "reason"),
    [
        (MetricThreshold("completion_loss", False, min_absolute_change=0.2), "min_absolute_change"),
        (MetricThreshold("completion_loss", False, min_relative_change=0.1), "min_relative_change"),
        (MetricThreshold("completion_loss", False, threshold=1.5), "above the threshold 1.500"),
    ],
)
def test_minimum_changes_and_bounds_must_hold_too(threshold: MetricThreshold, reason: str) -> None:
    serving = ScriptedLM(noisy(2.0, 0.3))
    candidate = ScriptedLM(shifted(noisy(2.0, 0.3), -0.1))  # significant, but 0.1 (5 %) only
    verdict = judged(candidate, serving, examples(30), thresholds=[threshold])
    assert verdict.decision == "reject"
    assert reason in verdict.reasons[0]
    loose = MetricThreshold("completion_loss", False, min_absolute_change=0.05, threshold=2.0)
    assert judged(candidate, serving, examples(30), thresholds=[loose]).decision == "pass"


def test_preference_accuracy_guards_against_a_candidate_that_prefers_the_logged_response() -> None:
    serving = ScriptedLM(noisy(2.0, 0.05))  # per token alike: prefers the shorter corrections
    candidate = prefers_refusal(1.5)  # better loss on corrections, yet prefers refusals
    verdict = judged(candidate, serving, examples(30))
    assert verdict.decision == "reject"
    assert verdict.reasons[0] == (
        "significantly worse: preference_accuracy 1.000 -> 0.000 (95% CI of change -1.000..-1.000)"
    )
    assert verdict.metrics["completion_loss"]["status"] == "pass"
    assert verdict.metrics["preference_accuracy"]["n"] == 30


def test_below_the_minimum_the_verdict_is_insufficient_evidence_and_nothing_is_scored() -> None:
    serving, candidate = ScriptedLM(noisy(2.0, 0.3)), ScriptedLM(noisy(0.5, 0.1))
    calls: list[int] = []
    candidate.completion_nll = lambda *a, **k: calls.append(1)  # type: ignore[method-assign,assignment]
    verdict = judged(candidate, serving, examples(19), target=CARDS)
    assert verdict.decision == "insufficient_evidence"
    assert verdict.reasons == [
        "insufficient evidence: 19 evaluation examples, the gate needs at least 20 "
        "(gate.min_eval_examples); gather more feedback"
    ]
    assert calls == [] and candidate.generated == []


def test_behaviour_check_judges_the_targeted_segment_with_the_refusal_detector() -> None:
    eval_set = examples(20, "cards") + examples(20, "transfers")
    serving = ScriptedLM(noisy(2.0, 0.3), lambda p: REFUSAL if "cards" in p else "Sure.")
    candidate = better(lambda p: "Open the app and tap Cards.")
    verdict = judged(candidate, serving, eval_set, target=CARDS)
    assert verdict.decision == "pass", verdict.reasons
    refusals = verdict.metrics["refusal_rate"]
    assert (refusals["serving"], refusals["candidate"], refusals["n"]) == (1.0, 0.0, 20)
    assert refusals["segment"] == {"topic": "cards"}
    assert refusals["samples"][0]["serving"] == REFUSAL
    assert candidate.generated == [e.prompt for e in eval_set[:20]]
    assert any(r.startswith("behaviour check on topic=cards: improved") for r in verdict.reasons)


def test_behaviour_check_answers_chat_prompts_through_their_turns() -> None:
    """A chat example's prompt is answered with its turns (the model frames them with its
    chat template); a plain eval set passes none, so a plain model's generate is enough."""
    from dataclasses import replace

    turns = [{"role": "system", "content": "Be brief."}]
    chats = [
        replace(e, messages=[*turns, {"role": "user", "content": e.prompt}])
        for e in examples(20, "cards")
    ]
    serving = ScriptedLM(noisy(2.0, 0.3), lambda p: REFUSAL)
    candidate = better(lambda p: "Open the app and tap Cards.")
    verdict = judged(candidate, serving, chats + examples(20, "transfers"), target=CARDS)
    assert verdict.decision == "pass", verdict.reasons
    assert candidate.generated_turns == [[e.messages for e in chats]]
    plain = better(lambda p: "Open the app and tap Cards.")
    judged(plain, serving, examples(20, "cards"), target=CARDS)
    assert plain.generated_turns == [None]


def test_behaviour_check_rejects_a_candidate_that_still_refuses() -> None:
    eval_set = examples(20, "cards")
    serving = ScriptedLM(noisy(2.0, 0.3), lambda p: REFUSAL)
    candidate = better(lambda p: REFUSAL)
    verdict = judged(candidate, serving, eval_set, target=CARDS)
    assert verdict.decision == "reject"
    assert verdict.reasons[0] == (
        "behaviour check on topic=cards: no significant improvement: "
        "refusal_rate 1.000 -> 1.000 (95% CI of change 0.000..0.000)"
    )


def test_too_few_prompts_of_the_segment_is_insufficient_evidence() -> None:
    eval_set = examples(9, "cards") + examples(20, "transfers")
    serving = ScriptedLM(noisy(2.0, 0.3), lambda p: REFUSAL)
    candidate = better(lambda p: "Sure.")
    verdict = judged(candidate, serving, eval_set, target=CARDS)
    assert verdict.decision == "insufficient_evidence"
    assert verdict.reasons[0] == (
        "insufficient evidence: 9 evaluation prompts of topic=cards for refusal_rate, "
        "the gate needs at least 10 (gate.behaviour_min_prompts)"
    )
    assert candidate.generated == []
    json.dumps(verdict.to_json(), allow_nan=False)  # storable: PostgreSQL JSON has no NaN


def test_a_signal_text_cannot_show_is_named_and_left_to_the_other_metrics() -> None:
    serving, candidate = ScriptedLM(noisy(2.0, 0.3)), better()
    target = BehaviourTarget("latency_ms", {})
    verdict = judged(candidate, serving, examples(30), target=target)
    assert verdict.decision == "pass"
    assert any("signal latency_ms cannot be judged on generated text" in r for r in verdict.reasons)


def test_verdict_round_trips_and_an_unservable_artifact_is_rejected() -> None:
    verdict = judged(better(), ScriptedLM(noisy(2.0, 0.3)), examples(30))
    stored = json.loads(json.dumps(verdict.to_json(), allow_nan=False))
    assert Verdict.from_json(stored) == verdict
    broken = verdict.with_servable(False, "not servable: ModelLoadError: no adapter")
    assert (verdict.decision, broken.decision) == ("pass", "reject")
    assert broken.reasons[-1] == "not servable: ModelLoadError: no adapter"
    assert broken.metrics["servable"] == {"ok": False, "reason": broken.reasons[-1]}


def test_gate_config_from_a_policy_names_what_it_does_not_know() -> None:
    config = GateConfig.from_dict(
        {
            "thresholds": [{"metric": "completion_loss", "greater_is_better": False}],
            "min_eval_examples": 50,
        }
    )
    assert config.min_eval_examples == 50
    assert config.threshold_for("preference_accuracy") is None
    assert config.threshold_for("refusal_rate") == MetricThreshold("refusal_rate", False)
    with pytest.raises(ConfigurationError, match="min_eval_exmaples"):
        GateConfig.from_dict({"min_eval_exmaples": 5})
    with pytest.raises(ConfigurationError, match="unknown metric 'accuracy'"):
        GateConfig.from_dict({"thresholds": [{"metric": "accuracy", "greater_is_better": True}]})
    with pytest.raises(ConfigurationError, match="confidence"):
        GateConfig(confidence=1.0)


def test_paired_bootstrap_is_seeded_and_covers_the_mean() -> None:
    import numpy as np

    diffs = np.random.default_rng(1).normal(-0.3, 1.0, 200)
    low, high = paired_bootstrap(diffs, 1000, 0.95, seed=7)
    assert (low, high) == paired_bootstrap(diffs, 1000, 0.95, seed=7)
    assert low < diffs.mean() < high
    assert 0.2 < high - low < 0.35  # about 2 x 1.96 x 1 / sqrt(200)


# -- the acceptance, on the real tiny model -------------------------------------------------
#: Steps and learning rate of a candidate that learns the corrections (about 4 s on a core).
STEPS, LEARNING_RATE = 100, 2e-3


@pytest.fixture(scope="module")
def held_out(support_data: SupportData) -> tuple[list[SftExample], list[SftExample]]:
    """The refused topic's corrections: two thirds to train on, one third to judge on (40);
    the logged response of each was the serving model's refusal."""
    pairs = corrections(support_data.refused, rejected=REFUSAL)
    train = [e for i, e in enumerate(pairs) if i % 3]
    evaluation = [e for i, e in enumerate(pairs) if i % 3 == 0]
    return train, evaluation


@pytest.fixture(scope="module")
def serving_lm(tiny_lm_path: Path) -> CausalLM:
    import torch

    from genmon.retrain.lm import load_lm

    torch.set_num_threads(1)
    return load_lm(str(tiny_lm_path), device="cpu")


@pytest.fixture(scope="module")
def adapters(
    tiny_lm_path: Path,
    held_out: tuple[list[SftExample], list[SftExample]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The candidates, trained once for the module (``forgetful``: the corrections at five
    times the learning rate, which also unlearns some of the healthy answers)."""
    train, _ = held_out
    root = tmp_path_factory.mktemp("candidates")
    return {
        "corrections": train_adapter(tiny_lm_path, train, root / "c", LEARNING_RATE, STEPS),
        "swapped": train_adapter(tiny_lm_path, swapped(train), root / "s", LEARNING_RATE, STEPS),
        "lr0": train_adapter(tiny_lm_path, train, root / "z", 0.0, 2),
        "forgetful": train_adapter(tiny_lm_path, train, root / "f", 5 * LEARNING_RATE, STEPS),
    }


def candidate_lm(tiny_lm_path: Path, adapters: dict[str, str], name: str) -> CausalLM:
    from genmon.retrain.lm import load_lm

    return load_lm(str(tiny_lm_path), adapters[name], device="cpu")


def test_candidate_trained_on_the_corrections_passes_and_refuses_less(
    tiny_lm_path: Path, adapters: dict[str, str], serving_lm: CausalLM, held_out: Any
) -> None:
    candidate = candidate_lm(tiny_lm_path, adapters, "corrections")
    verdict = evaluate(candidate, serving_lm, held_out[1], GateConfig(), CARDS)
    assert verdict.decision == "pass", verdict.reasons
    refusals = verdict.metrics["refusal_rate"]
    assert refusals["serving"] == 1.0  # the flaw the incident was about
    assert refusals["candidate"] < 0.5 and refusals["ci"][1] < 0
    loss = verdict.metrics["completion_loss"]
    assert loss["candidate"] < loss["serving"] and loss["ci"][1] < 0
    assert verdict.metrics["eval_examples"] == 40


def test_candidate_trained_with_chosen_and_rejected_swapped_is_rejected(
    tiny_lm_path: Path, adapters: dict[str, str], serving_lm: CausalLM, held_out: Any
) -> None:
    candidate = candidate_lm(tiny_lm_path, adapters, "swapped")
    verdict = evaluate(candidate, serving_lm, held_out[1], GateConfig(), CARDS)
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith("significantly worse: completion_loss")
    assert verdict.metrics["refusal_rate"]["candidate"] == 1.0
    assert any("refusal_rate" in r and "no significant improvement" in r for r in verdict.reasons)


def test_candidate_identical_to_serving_is_no_significant_improvement(
    tiny_lm_path: Path, adapters: dict[str, str], serving_lm: CausalLM, held_out: Any
) -> None:
    candidate = candidate_lm(tiny_lm_path, adapters, "lr0")
    verdict = evaluate(candidate, serving_lm, held_out[1], GateConfig(), CARDS)
    assert verdict.decision == "reject"
    assert re.fullmatch(
        r"no significant improvement: completion_loss (\d+\.\d{3}) -> \1 "
        r"\(95% CI of change 0\.000\.\.0\.000\)",
        verdict.reasons[0],
    ), verdict.reasons


def test_evaluation_set_below_the_minimum_is_insufficient_evidence(
    tiny_lm_path: Path, adapters: dict[str, str], serving_lm: CausalLM, held_out: Any
) -> None:
    candidate = candidate_lm(tiny_lm_path, adapters, "corrections")
    verdict = evaluate(candidate, serving_lm, held_out[1][:19], GateConfig(), CARDS)
    assert verdict.decision == "insufficient_evidence"
    assert "19 evaluation examples" in verdict.reasons[0]
    small = GateConfig(min_eval_examples=5, behaviour_min_prompts=10)
    verdict = evaluate(candidate, serving_lm, held_out[1][:8], small, CARDS)
    assert verdict.decision == "insufficient_evidence"  # the loss improved, too few prompts
    assert verdict.metrics["completion_loss"]["status"] == "pass"


def test_servable_check_loads_and_answers_within_the_budget(
    tiny_lm_path: Path, adapters: dict[str, str], tmp_path: Path
) -> None:
    ok, reason = check_servable(str(tiny_lm_path), adapters["corrections"], 60.0, device="cpu")
    assert ok, reason
    assert reason.startswith("servable: loaded and answered in")
    ok, reason = check_servable(str(tiny_lm_path), str(tmp_path), 60.0, device="cpu")
    assert not ok and reason.startswith("not servable: ModelLoadError")
    ok, reason = check_servable(str(tiny_lm_path), adapters["corrections"], 1e-6, device="cpu")
    assert not ok and "over the 0.0 s budget" in reason


def test_the_golden_set_catches_a_candidate_that_forgets_the_healthy_topics(
    tiny_lm_path: Path,
    adapters: dict[str, str],
    serving_lm: CausalLM,
    held_out: Any,
    support_data: SupportData,
    tmp_path: Path,
) -> None:
    """Golden set: 40 healthy questions the serving model answers right. Any fine-tune moves
    their loss a little (about +0.005 nats here), so the tolerance is 0.02."""
    golden = tmp_path / "golden.jsonl"
    lines = [json.dumps({"prompt": p.prompt, "completion": p.answer}) for p in support_data.healthy]
    golden.write_text("\n".join(lines[:40]) + "\n")
    config = GateConfig(golden_set=str(golden), segment_tolerance=0.02)
    kept = candidate_lm(tiny_lm_path, adapters, "corrections")
    verdict = evaluate(kept, serving_lm, held_out[1], config, CARDS)
    assert verdict.decision == "pass", verdict.reasons
    assert verdict.metrics["golden_set"]["status"] == "pass"
    assert verdict.metrics["golden_set"]["n"] == 40
    forgets = candidate_lm(tiny_lm_path, adapters, "forgetful")
    verdict = evaluate(forgets, serving_lm, held_out[1], config, CARDS)
    assert verdict.decision == "reject"
    assert verdict.metrics["golden_set"]["ci"][0] > 0.02
    assert verdict.reasons[0].startswith("golden set got worse (the candidate forgets)")
