"""The retrain policy: the shipped default, validation with file, line and field, overrides
and incident matchers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from genmon.exceptions import ConfigurationError
from genmon.retrain.exceptions import PolicyError
from genmon.retrain.policy import load_policy, parse_policy
from genmon.schemas.events import FindingKind, Severity
from genmon.schemas.incidents import Incident
from genmon.settings import Settings

#: Signals no dataset fixes: latency, errors, throughput (and an SLO on latency).
SERVING_SIGNALS = (
    "latency",
    "ttft",
    "tpot",
    "error_rate",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "slo_latency",
    "slo_error_rate",
)


def _incident(**fields: object) -> Incident:
    values: dict[str, object] = {
        "fingerprint": "f" * 32,
        "model_id": "support-bot",
        "detector": "rate_cusum",
        "kind": FindingKind.QUALITY,
        "signal": "refusal_rate",
        "severity": Severity.WARNING,
        "title": "t",
        **fields,
    }
    return Incident(**values)


def test_the_shipped_policy_never_retrains_on_latency_errors_or_throughput() -> None:
    policy = load_policy(None).for_model("support-bot")
    assert policy.triggers.incidents, "the default retrains on some incidents"
    for signal, kind, severity in itertools.product(SERVING_SIGNALS, FindingKind, Severity):
        found = _incident(signal=signal, kind=kind, severity=severity, detector="throughput")
        index, why = policy.match_incident(found)
        assert index is None, (signal, kind, severity)
        assert f"signal {signal} is not" in why
    # ... and does retrain on what a fine-tune can fix.
    assert policy.match_incident(_incident())[0] is not None
    drift = _incident(kind=FindingKind.DRIFT, signal="embedding_response", severity=Severity.ERROR)
    assert policy.match_incident(drift)[0] is not None


def test_the_policy_file_named_in_settings_is_the_one_loaded(tmp_path: Path) -> None:
    path = tmp_path / "retrain.yaml"
    path.write_text("triggers:\n  manual: false\n")
    settings = Settings.model_validate({"retrain": {"policy_file": str(path)}})
    policy = load_policy(settings.retrain.policy_file)
    assert policy.source == str(path)
    assert policy.for_model("m").triggers.manual is False


def test_a_malformed_policy_names_the_file_line_and_field_of_every_problem(
    tmp_path: Path,
) -> None:
    path = tmp_path / "retrain.yaml"
    path.write_text(
        "version: 1\n"  # 1
        "triggers:\n"  # 2
        "  incidents:\n"  # 3
        "    - match:\n"  # 4
        "        signal: refusal_rte\n"  # 5
        "        severity: loud\n"  # 6
        "      after_firings: 0\n"  # 7
        "guards:\n"  # 8
        "  cooldown: 60\n"  # 9
        "  min_examples_per_class: -1\n"  # 10
        "models:\n"  # 11
        "  - match: 'support-*'\n"  # 12
        "    guards:\n"  # 13
        "      max_running: 4\n"  # 14
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert isinstance(caught.value, ConfigurationError)
    lines = str(caught.value).splitlines()
    assert lines[:6] == [
        f"{path}:5: triggers.incidents[0].match.signal: unknown signal 'refusal_rte'; did you"
        " mean refusal_rate? use a glob or one of " + lines[0].split("one of ", 1)[1],
        f"{path}:6: triggers.incidents[0].match.severity: 'loud': input should be 'info',"
        " 'warning', 'error' or 'critical'",
        f"{path}:7: triggers.incidents[0].after_firings: 0: input should be greater than or"
        " equal to 1",
        f"{path}:9: guards.cooldown: unknown field; did you mean 'cooldown_s'? fields here:"
        " cooldown_s, min_examples_per_class, max_running, daily_device_hours,"
        " require_approval, max_attempts",
        f"{path}:10: guards.min_examples_per_class: -1: input should be greater than or equal to 0",
        f"{path}:14: models[0].guards.max_running: max_running limits the whole queue (every"
        " model); set it in the top-level guards",
    ]
    assert lines[6] == f"fix the retrain policy {path} (retrain.policy_file)"


def test_unknown_keys_get_the_closest_field_of_their_section() -> None:
    text = "triggers:\n  incidents:\n    - match: {signals: [refusal_rate]}\n  volum: {}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    message = str(caught.value)
    assert "p.yaml:3: triggers.incidents[0].match.signals: unknown field; did you mean" in message
    assert "p.yaml:4: triggers.volum: unknown field; did you mean 'volume'?" in message
    assert "match.signals: unknown field; did you mean 'signal'? fields here: kind," in message


def test_yaml_syntax_and_duplicate_keys_name_their_line() -> None:
    with pytest.raises(PolicyError, match=r"^p\.yaml:3: YAML syntax: "):
        parse_policy("guards:\n  cooldown_s: 1\n  - x\n", "p.yaml")
    with pytest.raises(PolicyError, match=r"^p\.yaml:3: cooldown_s: given twice"):
        parse_policy("guards:\n  cooldown_s: 1\n  cooldown_s: 2\n", "p.yaml")


def test_a_gate_threshold_on_an_unknown_metric_names_its_line() -> None:
    text = "gate:\n  thresholds:\n    - metric: bleu\n      greater_is_better: true\n"
    with pytest.raises(PolicyError, match=r"p\.yaml:3: gate\.thresholds\[0\]\.metric: 'bleu'"):
        parse_policy(text, "p.yaml")


def test_overrides_apply_least_specific_first_and_merge_training_params() -> None:
    policy = parse_policy(
        "guards: {cooldown_s: 100, require_approval: false}\n"
        "training: {params: {max_steps: 60, seed: 1}}\n"
        "models:\n"
        "  - match: support-bot\n"
        "    guards: {cooldown_s: 5}\n"
        "  - match: 'support-*'\n"
        "    guards: {cooldown_s: 50, require_approval: true}\n"
        "    training: {params: {max_steps: 10}}\n",
        "p.yaml",
    )
    exact = policy.for_model("support-bot")
    assert exact.guards.cooldown_s == 5  # the exact id wins over the glob below it
    assert exact.guards.require_approval is True
    assert exact.training.params == {"max_steps": 10, "seed": 1}
    assert "models[1] 'support-*', models[0] 'support-bot'" in exact.source
    other = policy.for_model("chat")
    assert (other.guards.cooldown_s, other.guards.require_approval) == (100, False)


def test_incident_matchers_take_minimum_severity_globs_and_lists() -> None:
    policy = parse_policy(
        "triggers:\n"
        "  incidents:\n"
        "    - match:\n"
        "        kind: [quality, bias]\n"
        "        detector: rate_cusum\n"
        "        severity: error\n"
        "        model: 'support-*'\n"
        "        segment: '*locale=de*'\n",
        "p.yaml",
    ).for_model("support-bot")
    fits = _incident(severity=Severity.CRITICAL, segment="model_version=v1,locale=de")
    assert policy.match_incident(fits) == (0, "")
    second_entry = fits.model_copy(update={"detector": "rate_cusum#2"})
    assert policy.match_incident(second_entry)[0] == 0
    _, why = policy.match_incident(
        fits.model_copy(update={"severity": Severity.WARNING, "segment": None})
    )
    assert "severity warning is below error" in why
    assert "segment '(none)' does not fit *locale=de*" in why


def test_training_params_and_the_trainer_are_checked() -> None:
    text = (
        "training:\n"
        "  params: {max_step: 3, lora_r: 0}\n"
        "models:\n"
        "  - match: support-*\n"
        "    training: {trainer: nope}\n"
    )
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(
        "p.yaml:2: training.params.max_step: not a lora parameter; did you mean 'max_steps'?"
    )
    assert lines[1] == "p.yaml:2: training.params: training params: lora_r must be >= 1"
    assert lines[2].startswith("p.yaml:5: models[0].training.trainer: no trainer 'nope'")
