"""The detector plan file: genmon's defaults, globs, calibration, and every malformed file
refused with its file, line and field."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from genmon.detectors import REGISTRY
from genmon.detectors.calibration import catalog
from genmon.detectors.calibration.budget import Budget
from genmon.detectors.calibration.plan import example_id, load_plan, parse_plan
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import Severity
from genmon.settings import Settings

WEEKLY_WINDOWS = 7 * 24 * 60


def plan_of(text: str, settings: Settings | None = None):
    return parse_plan(text, "plan.yaml", settings or Settings())


def refusal(text: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        plan_of(text)
    return str(caught.value)


# -- the shipped defaults ---------------------------------------------------------------------
def test_the_shipped_plan_loads_and_spends_exactly_the_budget() -> None:
    plan = load_plan(Settings())
    for model in ("*", "support-bot", "anything-at-all"):
        entries = plan.for_model(model)
        assert sum(e.share for e in entries) == pytest.approx(1.0)
        assert all(e.calibrated for e in entries)  # every default inside the budget
    assert plan.display == "genmon:defaults.yaml"
    assert all(re.fullmatch(r"genmon:defaults\.yaml:\d+", e.source) for e in entries)


def test_the_shipped_plan_covers_every_family_the_issue_names() -> None:
    got = {(e.signal, e.detector) for e in load_plan(Settings()).for_model("m")}
    # the built-in tests stay as they were
    for signal in ("ttft", "tpot", "latency", "error_rate", "refusal_rate", "empty_rate"):
        assert (signal, "rate_cusum") in got
    assert ("negative_feedback", "rate_cusum") in got  # per version and per segment (bias)
    assert {
        ("embedding_prompt", "embedding_shift"),
        ("embedding_response", "embedding_shift"),
    } <= got
    # drift: language mix, lengths and token counts
    assert ("language_mix", "language_shift") in got
    assert ("response_text", "length_shift") in got and ("prompt_tokens", "length_shift") in got
    # anomaly: throughput; quality: truncated, injection; bias: refusal and error per segment
    assert ("requests", "throughput") in got
    assert ("truncated_rate", "rate_cusum") in got and ("prompt_text", "injection_rate") in got
    assert {("refusal_rate", "segment_rate_bias"), ("error_rate", "segment_rate_bias")} <= got
    kinds = {REGISTRY[detector].kind.value for _, detector in got}
    assert kinds == {"drift", "anomaly", "quality", "bias"}


def test_the_settings_name_the_plan_file(tmp_path: Path) -> None:
    path = tmp_path / "detectors.yaml"
    path.write_text("models:\n  - match: '*'\n    signals:\n      error_rate:\n"
                    "        - {detector: rate_cusum, share: 0.5}\n")  # fmt: skip
    plan = load_plan(Settings(detectors={"config_file": path}))
    (entry,) = plan.for_model("x")
    assert (entry.signal, entry.share, entry.source) == ("error_rate", 0.5, f"{path}:5")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigurationError, match="GENMON_DETECTORS__CONFIG_FILE"):
        load_plan(Settings(detectors={"config_file": missing}))


# -- globs --------------------------------------------------------------------------------------
GLOBS = """\
version: 1
models:
  - match: "support-*"
    signals:
      error_rate: []
      tpot:
        - {detector: rate_cusum, share: 0.2}
  - match: "*"
    signals:
      error_rate:
        - {detector: rate_cusum, share: 0.1}
      ttft:
        - {detector: rate_cusum, share: 0.1}
      tpot:
        - {detector: rate_cusum, share: 0.1}
  - match: "support-bot"
    signals:
      ttft: null
  - match: "support-b*"
    signals:
      tpot:
        - {detector: rate_cusum, share: 0.3}
  - match: "sup*"
    signals:
      tpot:
        - {detector: rate_cusum, share: 0.4}
"""


def test_more_specific_globs_override_per_signal_whatever_their_order() -> None:
    plan = plan_of(GLOBS)

    def shares(model: str) -> dict[str, float]:
        return {e.signal: e.share for e in plan.for_model(model)}

    assert shares("chat") == {"error_rate": 0.1, "ttft": 0.1, "tpot": 0.1}
    # "support-*" is written first but is more specific than "*": it wins, per signal
    assert shares("support-x") == {"ttft": 0.1, "tpot": 0.2}
    # an exact id beats every glob; more literal characters beat fewer
    assert shares("support-bot") == {"tpot": 0.3}
    assert shares("super") == {"error_rate": 0.1, "ttft": 0.1, "tpot": 0.4}
    assert plan.entry("support-bot", "error_rate", "rate_cusum") is None  # [] switches it off


def test_at_equal_specificity_the_later_block_wins() -> None:
    plan = plan_of(
        "models:\n"
        "  - {match: 'a*', signals: {ttft: [{detector: rate_cusum, share: 0.1}]}}\n"
        "  - {match: '*b', signals: {ttft: [{detector: rate_cusum, share: 0.3}]}}\n"
    )
    assert [e.share for e in plan.for_model("ab")] == [0.3]


def test_a_glob_is_checked_as_a_model_it_matches() -> None:
    assert example_id("support-*") == "support-"
    assert example_id("bot-[ab]?") == "bot-ax"
    problem = refusal(GLOBS.replace("share: 0.4", "share: 0.95"))
    assert problem.startswith("plan.yaml:23: models[4].match: a model like 'sup'")
    assert "summing to 1.15" in problem


# -- malformed files: file, line, field ----------------------------------------------------------
HEAD = "version: 1\nmodels:\n  - match: '*'\n    signals:\n"
BAD = {
    "yaml syntax": (HEAD + "      error_rate: [\n", r"plan.yaml:6: YAML syntax: "),
    "unknown field": (
        HEAD + "      error_rate:\n        - detector: rate_cusum\n          shares: 0.1\n",
        r"plan.yaml:7: models\[0\].signals.error_rate\[0\].shares: unknown field",
    ),
    "share out of range": (
        HEAD + "      error_rate:\n        - detector: rate_cusum\n          share: 1.5\n",
        r"plan.yaml:7: models\[0\].signals.error_rate\[0\].share: 1.5: input should be less",
    ),
    "severity": (
        HEAD + "      error_rate:\n        - {detector: rate_cusum, share: 0.1, severity: loud}\n",
        r"plan.yaml:6: models\[0\].signals.error_rate\[0\].severity: 'loud': input should be",
    ),
    "unknown signal": (
        HEAD + "      eror_rate:\n        - {detector: rate_cusum, share: 0.1}\n",
        r"plan.yaml:5: models\[0\].signals.eror_rate: unknown signal 'eror_rate'; "
        r"did you mean error_rate",
    ),
    "unknown detector": (
        HEAD + "      requests:\n        - detector: throughputt\n",
        r"plan.yaml:6: models\[0\].signals.requests\[0\].detector: unknown detector "
        r"'throughputt'; did you mean throughput",
    ),
    "input does not fit": (
        HEAD + "      language_mix:\n        - detector: ks_drift\n",
        r"plan.yaml:6: models\[0\].signals.language_mix\[0\].detector: ks_drift takes "
        r"samples, value; signal 'language_mix' gives categories; it fits: ",
    ),
    "no signal feeds it": (
        HEAD + "      embedding_response:\n        - detector: relevance\n",
        r"plan.yaml:6: .*relevance takes similarities, which no signal gives yet: needs each",
    ),
    "constructor refuses": (
        HEAD + "      error_rate:\n        - detector: ewma_zscore\n          params:\n"
        "            warmup: 2\n            alpha: -1\n",
        r"plan.yaml:9: models\[0\].signals.error_rate\[0\].params.alpha: -1 is out of range; "
        r"choose a value in \(0.0, 1.0\)",
    ),
    "unknown param": (
        HEAD + "      requests:\n        - detector: throughput\n          params: {windw: 5}\n",
        r"plan.yaml:7: models\[0\].signals.requests\[0\].params.windw: not a parameter of "
        r"throughput; its parameters: window, ",
    ),
    "missing param": (
        HEAD + "      latency:\n        - detector: ab_latency\n          params: {baseline: v1}\n",
        r"plan.yaml:7: models\[0\].signals.latency\[0\].params.candidate: required by ab_latency",
    ),
    "calibrated by hand": (
        HEAD + "      requests:\n        - detector: throughput\n          share: 0.1\n"
        "          params:\n            threshold: 3\n",
        r"plan.yaml:9: models\[0\].signals.requests\[0\].params.threshold: set by the budget "
        r"from share 0.1",
    ),
    "cannot be calibrated": (
        HEAD + "      requests:\n        - detector: wasserstein_drift\n          share: 0.1\n",
        r"plan.yaml:7: models\[0\].signals.requests\[0\].share: wasserstein_drift cannot be "
        r"calibrated",
    ),
    "reference given": (
        HEAD + "      ttft:\n        - detector: ks_drift\n          params: {reference: [1, 2]}\n",
        r"plan.yaml:7: models\[0\].signals.ttft\[0\].params.reference: the reference is "
        r"learned from the stream",
    ),
    "reference too small": (
        HEAD + "      embedding_prompt:\n        - detector: online_mmd\n"
        "          reference_size: 10\n          params: {window_size: 8}\n",
        r"plan.yaml:7: models\[0\].signals.embedding_prompt\[0\].reference_size: 10 is too "
        r"small for online_mmd; at least 24",
    ),
    "duplicate key": (
        HEAD + "      ttft: []\n      ttft: []\n",
        r"plan.yaml:6: ttft: the key is given twice",
    ),
    "shares over 1": (
        HEAD + "      ttft:\n        - {detector: rate_cusum, share: 0.6}\n"
        "      tpot:\n        - {detector: rate_cusum, share: 0.6}\n",
        r"plan.yaml:3: models\[0\].match: a model like '' gets shares summing to 1.2",
    ),
    "empty": ("\n", r"plan.yaml:1: \(file\): the plan is empty"),
    "no models": ("version: 1\nmodels: []\n", r"plan.yaml:2: models: list should have at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_plan_names_file_line_and_field(case: str) -> None:
    text, expected = BAD[case]
    problem = refusal(text)
    assert re.match(expected, problem), problem
    assert problem.splitlines()[-1].startswith("fix the detector plan plan.yaml")


def test_every_problem_of_a_file_is_listed_each_at_its_line() -> None:
    text = (
        HEAD
        + "      eror_rate: []\n"  # line 5
        + "      requests:\n"
        + "        - {detector: throughput, params: {windw: 5}}\n"  # line 7
        + "        - {detector: cusm}\n"  # line 8
    )
    lines = refusal(text).splitlines()
    assert [line.split(":")[1] for line in lines[:-1]] == ["5", "7", "8"]


# -- calibration ----------------------------------------------------------------------------------
def test_each_calibrated_detector_takes_its_parameter_from_its_share() -> None:
    settings = Settings()
    plan = plan_of(
        HEAD
        + "      requests:\n        - {detector: throughput, share: 0.05}\n"
        + "      error_rate:\n        - {detector: segment_rate_bias, share: 0.05}\n"
        + "        - {detector: cusum, share: 0.05, params: {k: 0.5}}\n"
        + "        - {detector: rate_cusum, share: 0.05}\n"
        + "      prompt_text:\n        - {detector: injection_rate, share: 0.05}\n"
    )
    budget = Budget(settings, plan)
    arl = WEEKLY_WINDOWS / 0.05
    throughput, bias, cusum, rate, injection = plan.for_model("m")
    assert budget.params(throughput, 2)["threshold"] == pytest.approx(
        catalog.z_threshold(1 / (2 * arl))
    )
    assert budget.params(bias, 1)["alpha"] == pytest.approx(1 / arl)
    h = budget.params(cusum)["h"]
    assert catalog.cusum_arl(h, 0.5) == pytest.approx(2 * arl, rel=1e-6)  # each side
    assert budget.params(rate)["threshold"] == pytest.approx(math.log(2 * arl))
    assert budget.rate_test("error_rate", 3, "m") == pytest.approx(
        (math.log(2 * arl * 3), 1 / (2 * arl * 3))
    )
    # a sample signal is judged per look (embedding.flush_interval_s), not per window
    looks = 7 * 24 * 3600 / settings.embedding.flush_interval_s / 0.05
    assert budget.params(injection)["alpha"] == pytest.approx(1 / looks)


def test_an_entry_outside_the_budget_keeps_its_own_thresholds() -> None:
    plan = plan_of(
        HEAD
        + "      error_rate:\n"
        + "        - {detector: rate_cusum, params: {threshold: 3.5, window_alpha: 0.001},"
        + " severity: critical}\n"
        + "      requests:\n        - {detector: threshold, params: {threshold: 500}}\n"
    )
    budget = Budget(Settings(), plan)
    assert budget.rate_test("error_rate", 4, "m") == (3.5, 0.001)
    rows = budget.table("m")
    assert [row["inside_budget"] for row in rows] == [False, False]
    assert [row["hours_between_false_pages"] for row in rows] == [None, None]
    assert plan.for_model("m")[0].severity is Severity.CRITICAL


def test_a_z_threshold_and_a_cusum_interval_are_what_their_alpha_says() -> None:
    assert catalog.z_threshold(0.05) == pytest.approx(1.959964, abs=1e-5)
    assert catalog.z_threshold(0.05, "up") == pytest.approx(1.644854, abs=1e-5)
    # Montgomery's table: k = 0.5, h = 5 gives a one-sided ARL of about 930 (two-sided 465)
    assert catalog.cusum_arl(5.0, 0.5) == pytest.approx(930, rel=0.05)
    assert catalog.cusum_interval(465, 0.5) == pytest.approx(5.0, abs=0.05)


def test_every_registered_detector_fits_a_signal_or_says_why_not() -> None:
    genmon_detectors = {n for n, cls in REGISTRY.items() if cls.__module__.startswith(
        "genmon.detectors.") and ".backends." not in cls.__module__}  # fmt: skip
    assert genmon_detectors == set(catalog.FITS)
    unfed = {name for name in catalog.FITS if not catalog.signals_for(name)}
    assert unfed == set(catalog.UNFED) == {"relevance", "equal_opportunity"}
