"""The gate per segment (the TFX per-slice rule), the up-weighted segment, KTO evaluation
sets and the golden regression set, on scripted models whose per-item scores the test
chooses (:mod:`genmon.retrain.segment_gate`, :mod:`genmon.retrain.golden`)."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from retrain_support_gate import REFUSAL, ScriptedLM, examples, noisy

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.gate import (
    BehaviourTarget,
    GateConfig,
    MetricThreshold,
    Verdict,
    evaluate,
    paired_bootstrap,
)
from genmon.retrain.golden import load_golden
from genmon.retrain.policy import Threshold
from genmon.retrain.segment_gate import bonferroni

SERVING = noisy(2.0, 0.3)
LOSS_ONLY = [MetricThreshold("completion_loss", greater_is_better=False)]


def regional(per_region: Mapping[str, int]) -> list[SftExample]:
    """Corrections of two topics spread over regions: ``n`` examples per region."""
    out = []
    for region, n in per_region.items():
        for i in range(n):
            topic = ("cards", "transfers")[i % 2]
            out.append(
                SftExample(
                    prompt=f"{region} {topic} question {i}",
                    completion=f"Helpful answer about {topic} number {i}.",
                    rejected=REFUSAL,
                    segment={"region": region, "topic": topic},
                )
            )
    return out


def changed_by(shift: Callable[[str], float], spread: float = 0.1) -> Callable[[str, str], float]:
    """The serving model's NLL plus ``shift(prompt)`` and a little noise per item (the
    logged refusals of correction pairs keep their likelihood)."""
    noise = noisy(0.0, spread, seed=9)
    return lambda p, c: (
        SERVING(p, c) + noise(p, c) + (0.0 if c == REFUSAL and "thumbs" not in p else shift(p))
    )


def judged(candidate: Any, eval_set: Any, **kwargs: Any) -> Verdict:
    target, upweight = kwargs.pop("target", None), kwargs.pop("upweight", None)
    golden, serving = kwargs.pop("golden", None), kwargs.pop("serving", None)
    config = GateConfig(**kwargs)
    serving = serving or ScriptedLM(SERVING)
    return evaluate(candidate, serving, eval_set, config, target, upweight=upweight, golden=golden)


# -- the acceptance: better overall, worse on one segment ----------------------------------
def test_a_candidate_better_overall_but_worse_on_one_segment_is_rejected_naming_it() -> None:
    eval_set = regional({"us": 40, "eu": 25})
    candidate = ScriptedLM(changed_by(lambda p: 0.4 if p.startswith("eu") else -0.6))
    verdict = judged(candidate, eval_set)
    assert verdict.decision == "reject"
    loss = verdict.metrics["completion_loss"]
    assert loss["status"] == "pass" and loss["ci"][1] < 0  # it improved overall
    assert re.fullmatch(
        r"completion_loss on region=eu got worse: 1\.\d{3} -> 2\.\d{3} \(99\.\d+% CI of the "
        r"change \+0\.\d{3}\.\.\+0\.\d{3}; Bonferroni over 8 segment tests, tolerance 0\.020\), "
        r"while overall it improved",
        verdict.reasons[0],
    ), verdict.reasons
    worse = [r for r in verdict.reasons if " got worse: " in r]
    assert all(" on region=eu got worse: " in r for r in worse)  # and no other segment
    segments = verdict.metrics["segments"]
    assert (
        segments["tests"] == 8
    )  # 2 metrics x (region=eu, region=us, topic=cards, topic=transfers)
    assert segments["test_confidence"] == pytest.approx(1 - 0.05 / 8)
    assert segments["judged"]["completion_loss"]["region=eu"]["status"] == "fail"
    assert segments["judged"]["completion_loss"]["region=us"]["status"] == "pass"
    json.dumps(verdict.to_json(), allow_nan=False)


def test_a_segment_within_the_tolerance_passes_and_per_segment_can_be_switched_off() -> None:
    eval_set = regional({"us": 40, "eu": 25})
    candidate = ScriptedLM(changed_by(lambda p: 0.4 if p.startswith("eu") else -0.6))
    assert judged(candidate, eval_set, segment_tolerance=0.6).decision == "pass"
    unsliced = judged(candidate, eval_set, per_segment=False)
    assert unsliced.decision == "pass" and "segments" not in unsliced.metrics


def test_segments_too_small_are_listed_as_not_judged() -> None:
    eval_set = regional({"us": 40, "eu": 24, "apac": 7})
    candidate = ScriptedLM(changed_by(lambda p: 1.5 if p.startswith("apac") else -0.6))
    verdict = judged(candidate, eval_set)
    assert verdict.decision == "pass", verdict.reasons
    assert verdict.metrics["segments"]["not_judged"]["completion_loss"] == {"region=apac": 7}
    assert "region=apac" not in verdict.metrics["segments"]["judged"]["completion_loss"]
    (note,) = [r for r in verdict.reasons if r.startswith("per-segment:")]
    assert "not judged (fewer than 20 items, gate.min_segment_examples)" in note
    assert "completion_loss: region=apac (7)" in note


# -- many segments, many tests -------------------------------------------------------------
def standardized(n: int, mean: float, seed: int) -> np.ndarray:
    """``n`` draws with exactly this mean and standard deviation 1."""
    draws = np.random.default_rng(seed).standard_normal(n)
    return mean + (draws - draws.mean()) / draws.std()


def test_many_segments_are_one_family_under_bonferroni() -> None:
    """Ten topics; the first slightly worse: a lone 95 % interval would call it worse, the
    family's (each at 99.5 %) does not; nothing else changes the verdict."""
    diffs: dict[str, float] = {}
    eval_set: list[SftExample] = []
    for t in range(10):
        topic = f"t{t}"
        eval_set += examples(20, topic)
        values = standardized(20, 0.5 if t == 0 else -0.5, seed=t)
        diffs.update({f"{topic} question {i}": float(v) for i, v in enumerate(values)})
    candidate = ScriptedLM(lambda p, c: SERVING(p, c) + diffs[p])
    verdict = judged(candidate, eval_set, thresholds=LOSS_ONLY)
    first = verdict.metrics["segments"]["judged"]["completion_loss"]["topic=t0"]
    lone = paired_bootstrap(np.array([diffs[f"t0 question {i}"] for i in range(20)]), 1000, 0.95, 0)
    assert lone[0] > 0  # alone, at 95 %, it would be "worse with confidence"
    assert first["confidence"] == pytest.approx(bonferroni(0.95, 10)) == pytest.approx(0.995)
    assert first["ci"][0] < 0 < first["ci"][1] and first["status"] == "pass"
    assert verdict.decision == "pass", verdict.reasons
    assert any("Bonferroni: at most 5% chance" in r for r in verdict.reasons)


# -- the up-weighted segment ---------------------------------------------------------------
def test_the_upweighted_segment_must_have_enough_examples() -> None:
    eval_set = examples(7, "cards") + examples(30, "transfers")
    candidate = ScriptedLM(changed_by(lambda p: -0.6))
    verdict = judged(candidate, eval_set, upweight={"topic": "cards"})
    assert verdict.decision == "insufficient_evidence"
    assert verdict.reasons[0] == (
        "insufficient evidence on segment topic=cards: 7 evaluation items for completion_loss, "
        "the gate needs at least 20 (gate.min_segment_examples); the job up-weighted this "
        "segment, so it must be judged on it"
    )
    assert verdict.metrics["upweighted_segment"]["segment"] == {"topic": "cards"}


def test_the_upweighted_segment_must_improve_itself() -> None:
    eval_set = examples(20, "cards") + examples(40, "transfers")
    helps_elsewhere = ScriptedLM(changed_by(lambda p: 0.0 if p.startswith("cards") else -0.6))
    verdict = judged(helps_elsewhere, eval_set, upweight="topic=cards")
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith(
        "up-weighted segment topic=cards: no significant improvement: completion_loss"
    )
    helps_there = ScriptedLM(changed_by(lambda p: -0.6))
    verdict = judged(helps_there, eval_set, upweight="topic=cards")
    assert verdict.decision == "pass", verdict.reasons
    assert any(r.startswith("up-weighted segment topic=cards: improved") for r in verdict.reasons)


# -- KTO evaluation sets -------------------------------------------------------------------
def thumbs(n: int, desirable: bool, topic: str = "cards") -> list[SftExample]:
    answer = "Open the app and tap Cards." if desirable else REFUSAL
    return [
        SftExample(
            prompt=f"{topic} thumbs question {i} {desirable}",
            completion=answer,
            segment={"topic": topic},
            desirable=desirable,
        )
        for i in range(n)
    ]


def test_a_kto_set_is_judged_by_the_likelihood_of_each_class() -> None:
    eval_set = thumbs(25, True) + thumbs(25, False)
    pushes_down = ScriptedLM(
        changed_by(lambda p: 1.0 if p.endswith("False") else 0.0)
    )  # the answers marked down got less likely; the others did not move
    verdict = judged(pushes_down, eval_set)
    assert verdict.decision == "pass", verdict.reasons
    assert verdict.metrics["undesirable_nll"]["ci"][0] > 0
    assert verdict.metrics["undesirable_nll"]["n"] == 25
    assert verdict.metrics["desirable_nll"]["status"] == "pass"
    assert "completion_loss" not in verdict.metrics
    assert any(r.startswith("improved: undesirable_nll") for r in verdict.reasons)
    assert "completion_loss not judged: the evaluation set has no corrections" in verdict.reasons
    assert set(verdict.metrics["segments"]["judged"]) == {"undesirable_nll", "desirable_nll"}


def test_a_kto_candidate_that_makes_good_answers_unlikely_or_changes_nothing_is_rejected() -> None:
    eval_set = thumbs(25, True) + thumbs(25, False)
    both_down = ScriptedLM(changed_by(lambda p: 1.0))
    verdict = judged(both_down, eval_set)
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith("significantly worse: desirable_nll")
    unchanged = ScriptedLM(SERVING)
    verdict = judged(unchanged, eval_set)
    assert verdict.reasons[0].startswith("no significant improvement: undesirable_nll")


def test_the_behaviour_check_has_the_last_word_on_a_kto_candidate() -> None:
    eval_set = thumbs(25, True) + thumbs(25, False)
    still_refuses = ScriptedLM(
        changed_by(lambda p: 1.0 if p.endswith("False") else 0.0), lambda p: REFUSAL
    )
    serving = ScriptedLM(SERVING, lambda p: REFUSAL)
    target = BehaviourTarget("refusal_rate", {"topic": "cards"})
    verdict = judged(still_refuses, eval_set, target=target, serving=serving)
    assert verdict.decision == "reject"
    assert verdict.metrics["undesirable_nll"]["status"] == "pass"
    assert verdict.reasons[0].startswith("behaviour check on topic=cards: no significant")


def test_thumbs_up_alone_cannot_promote_and_kto_thresholds_are_policy_metrics() -> None:
    verdict = judged(ScriptedLM(changed_by(lambda p: -0.5)), thumbs(30, True))
    assert verdict.decision == "insufficient_evidence"
    assert verdict.reasons[0].startswith(
        "insufficient evidence: 0 answers marked undesirable for undesirable_nll"
    )
    only_guards = [
        MetricThreshold("desirable_nll", False, must_improve=False),
        MetricThreshold("undesirable_nll", True, must_improve=False),
    ]
    verdict = judged(
        ScriptedLM(changed_by(lambda p: -0.5)), thumbs(30, True), thresholds=only_guards
    )
    assert verdict.decision == "insufficient_evidence"
    assert "no metric that must improve could be judged" in verdict.reasons[0]
    assert Threshold(metric="undesirable_nll", greater_is_better=True).metric == "undesirable_nll"
    config = GateConfig.from_dict(
        {"thresholds": [{"metric": "completion_loss", "greater_is_better": False}]}
    )
    assert config.threshold_for("undesirable_nll") == MetricThreshold("undesirable_nll", True)


# -- the golden regression set -------------------------------------------------------------
def golden_file(path: Path, n: int = 25) -> Path:
    lines = [
        json.dumps({"prompt": f"golden question {i}", "completion": f"Golden answer {i}."})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def forgets(by: float) -> Callable[[str], float]:
    """Better on the feedback, ``by`` worse on the golden prompts."""
    return lambda p: by if p.startswith("golden") else -0.6


def test_the_golden_set_rejects_a_candidate_that_forgets(tmp_path: Path) -> None:
    source = str(golden_file(tmp_path / "golden.jsonl"))
    verdict = judged(ScriptedLM(changed_by(forgets(0.5))), examples(30), golden_set=source)
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith(
        "golden set got worse (the candidate forgets): completion_loss"
    )
    golden = verdict.metrics["golden_set"]
    assert golden["n"] == 25 and golden["source"] == source and golden["ci"][0] > 0
    assert verdict.metrics["completion_loss"]["status"] == "pass"
    kept = judged(ScriptedLM(changed_by(forgets(0.0))), examples(30), golden_set=source)
    assert kept.decision == "pass", kept.reasons
    assert any(r.startswith("golden set not worse: completion_loss") for r in kept.reasons)


def test_the_golden_set_is_read_from_an_artifact_uri_and_checked_line_by_line(
    tmp_path: Path,
) -> None:
    import fsspec

    uri = f"memory://golden-{zlib.crc32(str(tmp_path).encode())}/golden.jsonl"
    with fsspec.open(uri, "w") as out:
        out.write('{"prompt": "p", "completion": "c", "segment": {"topic": "cards"}}\n')
    assert load_golden(uri) == [SftExample("p", "c", segment={"topic": "cards"})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    with pytest.raises(ConfigurationError, match=r"bad\.jsonl:2: not a \{prompt, completion"):
        load_golden(str(bad))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_golden(str(tmp_path / "missing.jsonl"))
